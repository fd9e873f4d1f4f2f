//! The built-in KEDA external scaler: how many slots each worker pool is wanted for.
//!
//! KEDA calls it with a ScaledObject's `scalerMetadata`, which names the pool:
//!
//! | key | meaning |
//! |---|---|
//! | `taskType` (required) | the task type the pool's workers register, e.g. `mesh.build` |
//! | `version` | the version they register (exact semver, e.g. `1.4.0`): only tasks whose version requirement accepts it count; absent: any |
//! | `labels` | the pool's worker labels, `k=v,k=v`: tasks that require labels count only if the pool has them all |
//! | `tasksPerReplica` | the target per replica (usually the workers' `--slots`), default 1 |
//!
//! The metric is the slots wanted ([`QueueSnapshot::wanted_slots`]): queued tasks plus tasks on
//! workers, so a pool does not shrink under its running tasks. The pool is active while it is
//! above zero; `StreamIsActive` pushes the change the moment a task is queued for an idle pool,
//! so scale-from-zero does not wait for KEDA's polling interval.
//!
//! This module holds what the calls mean; `grpc::scaler` only decodes and encodes.

use std::collections::{BTreeMap, HashMap};

use semver::Version;

use crate::ExecError;
use crate::queues::{Pool, QueueSnapshot};
use dagmesh_proto::limits::{MAX_ENTRIES, MAX_NAME_LEN, MAX_VALUE_LEN, check_len};

/// A ScaledObject's trigger, decoded from its `scalerMetadata`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub pool: Pool,
    /// Target value per replica.
    pub tasks_per_replica: f64,
}

impl Trigger {
    /// Decodes `scalerMetadata`; errors name the key and what is wrong with it.
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Result<Self, ExecError> {
        let invalid = |message: String| ExecError::InvalidArgument(message);
        if metadata.len() > MAX_ENTRIES {
            return Err(invalid(format!(
                "scalerMetadata: {} keys, the limit is {MAX_ENTRIES}",
                metadata.len()
            )));
        }
        for (key, value) in metadata {
            check_len("scalerMetadata key", key, MAX_NAME_LEN).map_err(invalid)?;
            check_len(&format!("scalerMetadata.{key}"), value, 4 * MAX_VALUE_LEN)
                .map_err(invalid)?;
        }
        let get = |key: &str| {
            metadata
                .get(key)
                .map(|value| value.trim())
                .filter(|value| !value.is_empty())
        };
        let task_type = get("taskType").ok_or_else(|| {
            invalid(
                "scalerMetadata.taskType: required (the task type the pool's workers register, \
                 e.g. mesh.build)"
                    .into(),
            )
        })?;
        let version = get("version")
            .map(|text| {
                Version::parse(text).map_err(|error| {
                    invalid(format!(
                        "scalerMetadata.version: {text:?} is not a version (the exact version \
                         the pool's workers register, e.g. 1.4.0): {error}"
                    ))
                })
            })
            .transpose()?;
        let mut labels = BTreeMap::new();
        for pair in get("labels").unwrap_or_default().split(',') {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let Some((key, value)) = pair.split_once('=') else {
                return Err(invalid(format!(
                    "scalerMetadata.labels: {pair:?} is not key=value (write labels as \
                     gpu=true,zone=a)"
                )));
            };
            labels.insert(key.trim().to_owned(), value.trim().to_owned());
        }
        let tasks_per_replica = match get("tasksPerReplica") {
            None => 1.0,
            Some(text) => match text.parse::<f64>() {
                Ok(value) if value.is_finite() && value > 0.0 && value <= 1e6 => value,
                _ => {
                    return Err(invalid(format!(
                        "scalerMetadata.tasksPerReplica: {text:?} is not a number above 0 \
                         (at most 1000000)"
                    )));
                }
            },
        };
        Ok(Self {
            pool: Pool {
                task_type: task_type.to_owned(),
                version,
                labels,
            },
            tasks_per_replica,
        })
    }

    /// The metric's name: `dagmesh_wanted_slots_` and the task type, with anything but ASCII
    /// letters and digits as `_` (KEDA and the HPA accept only such names).
    pub fn metric_name(&self) -> String {
        let task: String = self
            .pool
            .task_type
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("dagmesh_wanted_slots_{task}")
    }

    pub fn wanted(&self, snapshot: &QueueSnapshot) -> u64 {
        snapshot.wanted_slots(&self.pool)
    }

    pub fn is_active(&self, snapshot: &QueueSnapshot) -> bool {
        self.wanted(snapshot) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn metadata_is_decoded_and_bad_keys_are_named() {
        let trigger = Trigger::from_metadata(&metadata(&[
            ("taskType", "mesh.build"),
            ("version", "1.4.0"),
            ("labels", "gpu=true, zone=a"),
            ("tasksPerReplica", "4"),
        ]))
        .unwrap();
        assert_eq!(trigger.pool.task_type, "mesh.build");
        assert_eq!(trigger.pool.version, Some(Version::new(1, 4, 0)));
        assert_eq!(
            trigger.pool.labels.get("zone").map(String::as_str),
            Some("a")
        );
        assert_eq!(trigger.tasks_per_replica, 4.0);
        assert_eq!(trigger.metric_name(), "dagmesh_wanted_slots_mesh_build");

        for (bad, named) in [
            (metadata(&[]), "scalerMetadata.taskType"),
            (
                metadata(&[("taskType", "a"), ("version", "^1")]),
                "scalerMetadata.version",
            ),
            (
                metadata(&[("taskType", "a"), ("labels", "gpu")]),
                "scalerMetadata.labels",
            ),
            (
                metadata(&[("taskType", "a"), ("tasksPerReplica", "0")]),
                "tasksPerReplica",
            ),
            (
                metadata(&[("taskType", "a"), ("tasksPerReplica", "NaN")]),
                "tasksPerReplica",
            ),
            (
                metadata(&[("taskType", &"x".repeat(2000))]),
                "scalerMetadata.taskType",
            ),
        ] {
            let error = Trigger::from_metadata(&bad).unwrap_err().to_string();
            assert!(error.contains(named), "{error}");
        }
    }
}
