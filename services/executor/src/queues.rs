//! What waits for workers: the ready queues per route and the workers that could take them.
//!
//! One snapshot, taken by the engine on request ([`crate::Executor::queues`]), answers three
//! readers: `ClusterService.ListQueues` (and `dagmesh queues`), the Prometheus gauges refreshed
//! at each scrape, and the KEDA external scaler ([`crate::scaler`]), which asks how many slots a
//! worker pool is wanted for.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use semver::{Version, VersionReq};

/// One ready queue: the tasks of one route (task type, version requirement, labels, slots).
#[derive(Debug, Clone)]
pub struct QueueStats {
    pub task_type: String,
    pub version_req: VersionReq,
    pub labels: BTreeMap<String, String>,
    pub slots_per_task: u32,
    /// Tasks waiting for a worker.
    pub queued: u32,
    /// How long the oldest of them has waited.
    pub oldest_age: Option<Duration>,
    /// Tasks of this route assigned to or running on a worker.
    pub running: u32,
    /// Connected, not draining workers that could run these tasks, busy or not.
    pub matching_workers: u32,
    /// Free slots on those workers.
    pub free_slots: u32,
}

/// A worker session as the queues see it.
#[derive(Debug, Clone)]
pub struct WorkerStats {
    /// Hello.worker_name.
    pub pool: String,
    pub task_types: Vec<(String, Version)>,
    pub labels: HashMap<String, String>,
    pub slots: u32,
    pub used_slots: u32,
    /// Connected and not draining.
    pub live: bool,
}

#[derive(Debug, Clone, Default)]
pub struct QueueSnapshot {
    /// Routes with tasks queued or running, by task type then version requirement.
    pub queues: Vec<QueueStats>,
    pub workers: Vec<WorkerStats>,
    /// How many partitions the executor drives (their runs are in its memory).
    pub partitions_driven: u32,
}

/// A worker pool as an autoscaler describes it: the task type it serves, the version its
/// workers register and the labels they carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub task_type: String,
    /// None: any version.
    pub version: Option<Version>,
    pub labels: BTreeMap<String, String>,
}

impl Pool {
    /// Whether this pool's workers could take the tasks of `queue`.
    pub fn serves(&self, queue: &QueueStats) -> bool {
        queue.task_type == self.task_type
            && self
                .version
                .as_ref()
                .is_none_or(|version| queue.version_req.matches(version))
            && queue
                .labels
                .iter()
                .all(|(key, value)| self.labels.get(key) == Some(value))
    }
}

impl QueueSnapshot {
    /// Slots `pool` is wanted for: the slots of the queued tasks it could take plus the slots
    /// those tasks' queues hold on workers now. Zero means the pool may scale to zero.
    pub fn wanted_slots(&self, pool: &Pool) -> u64 {
        self.queues
            .iter()
            .filter(|queue| pool.serves(queue))
            .map(|queue| {
                u64::from(queue.queued + queue.running) * u64::from(queue.slots_per_task.max(1))
            })
            .sum()
    }

    /// Whether some task `pool` could take is queued (not only running).
    pub fn has_queued(&self, pool: &Pool) -> bool {
        self.queues
            .iter()
            .any(|queue| queue.queued > 0 && pool.serves(queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(
        task: &str,
        req: &str,
        labels: &[(&str, &str)],
        queued: u32,
        running: u32,
    ) -> QueueStats {
        QueueStats {
            task_type: task.into(),
            version_req: VersionReq::parse(req).unwrap(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            slots_per_task: 1,
            queued,
            oldest_age: None,
            running,
            matching_workers: 0,
            free_slots: 0,
        }
    }

    #[test]
    fn a_pool_wants_the_slots_of_the_queues_it_can_serve() {
        let snapshot = QueueSnapshot {
            queues: vec![
                queue("mesh", "^1", &[("gpu", "true")], 3, 2),
                queue("mesh", "^2", &[], 5, 0),
                queue("thumb", "^1", &[], 7, 1),
            ],
            workers: vec![],
            partitions_driven: 0,
        };
        let pool = |version: &str, labels: &[(&str, &str)]| Pool {
            task_type: "mesh".into(),
            version: (!version.is_empty()).then(|| Version::parse(version).unwrap()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        // A 1.x pool with the gpu label takes the first queue only.
        assert_eq!(snapshot.wanted_slots(&pool("1.4.0", &[("gpu", "true")])), 5);
        // Without the label it can take none of it.
        assert_eq!(snapshot.wanted_slots(&pool("1.4.0", &[])), 0);
        // Any version, with the label: both mesh queues.
        assert_eq!(snapshot.wanted_slots(&pool("", &[("gpu", "true")])), 10);
        assert!(snapshot.has_queued(&pool("2.0.0", &[])));
        assert!(!snapshot.has_queued(&pool("3.0.0", &[("gpu", "true")])));
    }
}
