//! The engine's answer to "what waits for workers" (see [`crate::queues`]).

use std::collections::HashMap;
use std::sync::Arc;

use crate::queues::{QueueSnapshot, QueueStats, WorkerStats};

use super::{Engine, Origin, Route};

impl Engine {
    /// Counts the live entries of every ready queue (stale ones, of cancelled runs or older
    /// attempts, are skipped), the tasks each route has on workers, and the workers that could
    /// take each route. Linear in queued and held tasks; asked for by scrapes, the scaler and
    /// `ListQueues`, never on the hot path.
    pub(super) fn queue_snapshot(&self) -> QueueSnapshot {
        let now = self.ctx.now.max(tokio::time::Instant::now());
        let mut by_route: HashMap<Arc<Route>, QueueStats> = HashMap::new();
        let stats = |route: &Arc<Route>| QueueStats {
            task_type: route.task_name.clone(),
            version_req: route.version_req.clone(),
            labels: route.labels.clone(),
            slots_per_task: route.slots,
            queued: 0,
            oldest_age: None,
            running: 0,
            matching_workers: 0,
            free_slots: 0,
        };
        for (route, tasks) in self.ctx.queues.iter() {
            for task in tasks {
                let live = match &task.origin {
                    Origin::Local { run_id, step } => self
                        .runs
                        .get(run_id)
                        .is_some_and(|entry| entry.is_queued(*step, task.attempt)),
                    Origin::Peer { peer, task_id } => self.offer_live(*peer, task_id, task.attempt),
                };
                if !live {
                    continue;
                }
                let queue = by_route
                    .entry(route.clone())
                    .or_insert_with(|| stats(route));
                queue.queued += 1;
                let age = now.saturating_duration_since(task.queued_at);
                queue.oldest_age = Some(queue.oldest_age.map_or(age, |oldest| oldest.max(age)));
            }
        }
        for session in self.ctx.workers.sessions.values() {
            for (task_id, _) in session.held.keys() {
                let Some((run_id, step_id)) = task_id.split_once('/') else {
                    continue;
                };
                let Some(entry) = self.runs.get(run_id) else {
                    continue;
                };
                let Some(at) = entry.step_ref(step_id) else {
                    continue;
                };
                let route = entry.route(at);
                by_route
                    .entry(route.clone())
                    .or_insert_with(|| stats(route))
                    .running += 1;
            }
        }
        for route in self.remote_routes() {
            by_route
                .entry(route.clone())
                .or_insert_with(|| stats(&route))
                .running += 1;
        }
        for (route, queue) in &mut by_route {
            for session in self.ctx.workers.sessions.values() {
                if session.is_live() && !session.draining && session.could_run(route).is_some() {
                    queue.matching_workers += 1;
                    queue.free_slots += session.available_slots();
                }
            }
        }
        let mut queues: Vec<QueueStats> = by_route.into_values().collect();
        queues.sort_by(|a, b| {
            (&a.task_type, a.version_req.to_string(), &a.labels).cmp(&(
                &b.task_type,
                b.version_req.to_string(),
                &b.labels,
            ))
        });
        let workers = self
            .ctx
            .workers
            .sessions
            .values()
            .map(|session| WorkerStats {
                pool: session.hello.worker_name.clone(),
                task_types: session.task_types.clone(),
                labels: session.hello.labels.clone(),
                slots: session.hello.slots,
                used_slots: session.used_slots,
                live: session.is_live() && !session.draining,
            })
            .collect();
        QueueSnapshot {
            queues,
            workers,
            partitions_driven: u32::try_from(self.driven.len()).unwrap_or(u32::MAX),
        }
    }
}
