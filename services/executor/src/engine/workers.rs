//! Connected workers (sessions) and the ready queues they are fed from.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use dagmesh_proto::v1::{Hello, ServerMessage, WorkerInfo, server_message};
use semver::{Version, VersionReq};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::run::StepRef;

/// What the engine sends a worker's stream; the gRPC adapter turns errors into its status.
pub(crate) type Outbound = mpsc::UnboundedSender<Result<ServerMessage, crate::ExecError>>;

/// What a task needs from a worker. Steps with equal routes share one queue, so dispatch looks
/// at one head per route instead of scanning every ready task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Route {
    pub task_name: String,
    pub version_req: VersionReq,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    /// Shared resource held while running (StepSpec.concurrency_key); empty: none.
    pub concurrency_key: String,
}

/// A ready task in a queue. The entry may be stale (the run was cancelled meanwhile); dispatch
/// checks the step's state and attempt before it assigns.
#[derive(Debug, Clone)]
pub(crate) struct QueuedTask {
    pub origin: Origin,
    pub attempt: u32,
    /// When it was queued (for the queue's oldest age).
    pub queued_at: Instant,
}

/// Whose task a queue entry is.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// A step of a run this engine drives.
    Local { run_id: Arc<str>, step: StepRef },
    /// A task another executor offered (see `super::relay`); `task_id` names it.
    Peer {
        peer: super::relay::PeerId,
        task_id: Arc<str>,
    },
}

/// Queue order: higher priority first, then first-in-first-out.
pub(crate) type QueueKey = (Reverse<i32>, u64);

#[derive(Default)]
pub(crate) struct ReadyQueues {
    queues: HashMap<QueueRoute, BTreeMap<QueueKey, QueuedTask>>,
    fifo: u64,
}

/// A ready queue's key: its route, compared by pointer first. A plan's equal routes share one
/// `Arc` (`Plan::from_compiled`), so a push or pop for a queue's own route skips comparing its
/// strings (~1.5% of a fan-out's CPU); equal routes of different plans still meet in one queue.
#[derive(Clone)]
struct QueueRoute(Arc<Route>);

impl PartialEq for QueueRoute {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for QueueRoute {}

impl std::hash::Hash for QueueRoute {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl ReadyQueues {
    pub fn push(&mut self, route: &Arc<Route>, priority: i32, task: QueuedTask) {
        self.fifo += 1;
        self.queues
            .entry(QueueRoute(route.clone()))
            .or_default()
            .insert((Reverse(priority), self.fifo), task);
    }

    /// The route whose head comes first, among routes for which `eligible` holds.
    pub fn best_head(&self, mut eligible: impl FnMut(&Route) -> bool) -> Option<Arc<Route>> {
        self.queues
            .iter()
            .filter_map(|(route, queue)| Some((&route.0, *queue.first_key_value()?.0)))
            .filter(|(route, _)| eligible(route))
            .min_by_key(|(_, key)| *key)
            .map(|(route, _)| route.clone())
    }

    /// Every queue with its entries (stale ones included), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<Route>, impl Iterator<Item = &QueuedTask>)> {
        self.queues
            .iter()
            .map(|(route, queue)| (&route.0, queue.values()))
    }

    pub fn pop(&mut self, route: &Arc<Route>) -> Option<QueuedTask> {
        let key = QueueRoute(route.clone());
        let queue = self.queues.get_mut(&key)?;
        let task = queue.pop_first().map(|(_, task)| task);
        if queue.is_empty() {
            self.queues.remove(&key);
        }
        task
    }
}

pub(crate) struct Session {
    pub instance_id: Arc<str>,
    /// Which stream of this instance is current; messages about an older stream's end are
    /// ignored.
    pub generation: u64,
    /// The principal whose stream opened this session; None for a session recovered from the
    /// store (the first principal to reconnect takes it).
    pub principal: Option<Arc<str>>,
    pub hello: Hello,
    pub task_types: Vec<(String, Version)>,
    /// None while the stream is broken and the lease still runs.
    pub outbound: Option<Outbound>,
    pub last_seen: Instant,
    pub last_seen_wall: SystemTime,
    /// When the stream ended (None while connected, and for sessions recovered from the store,
    /// which get the whole lease to reconnect).
    pub disconnected_at: Option<Instant>,
    /// Why the last stream ended, for the reason of tasks lost with it.
    pub disconnect_reason: String,
    pub used_slots: u32,
    pub draining: bool,
    /// (task id, attempt) -> slots, for every task assigned and not yet answered by a result.
    pub held: HashMap<(String, u32), u32>,
}

impl Session {
    pub fn new(instance_id: Arc<str>, now: Instant) -> Self {
        Self {
            instance_id,
            generation: 0,
            principal: None,
            hello: Hello::default(),
            task_types: Vec::new(),
            outbound: None,
            last_seen: now,
            last_seen_wall: SystemTime::now(),
            disconnected_at: None,
            disconnect_reason: String::new(),
            used_slots: 0,
            draining: false,
            held: HashMap::new(),
        }
    }

    fn free_slots(&self) -> u32 {
        self.hello.slots.saturating_sub(self.used_slots)
    }

    /// Whether the stream is open (the worker is connected and the server has not noticed it
    /// leave).
    pub fn is_live(&self) -> bool {
        self.outbound.as_ref().is_some_and(|o| !o.is_closed())
    }

    /// The version of `route`'s task type this worker runs, if it can take the task now.
    fn accepts(&self, route: &Route) -> Option<&Version> {
        if self.outbound.is_none() || self.draining || self.free_slots() < route.slots {
            return None;
        }
        self.could_run(route)
    }

    /// Slots free now (0 while the worker is away or draining).
    pub fn available_slots(&self) -> u32 {
        if self.outbound.is_none() || self.draining {
            0
        } else {
            self.free_slots()
        }
    }

    /// The version of `route`'s task type this worker runs, if it could take the task once it
    /// has room (task type, version, labels, total slots).
    pub fn could_run(&self, route: &Route) -> Option<&Version> {
        if self.hello.slots < route.slots {
            return None;
        }
        let labels_match = route
            .labels
            .iter()
            .all(|(key, value)| self.hello.labels.get(key) == Some(value));
        if !labels_match {
            return None;
        }
        self.task_types
            .iter()
            .filter(|(name, version)| {
                *name == route.task_name && route.version_req.matches(version)
            })
            .map(|(_, version)| version)
            .max()
    }

    pub fn send(&self, message: server_message::Message) {
        if let Some(outbound) = &self.outbound {
            // A failed send means the stream just ended; its disconnect is on its way.
            let _ = outbound.send(Ok(ServerMessage {
                message: Some(message),
            }));
        }
    }

    pub fn info(&self) -> WorkerInfo {
        let mut tasks: Vec<String> = self
            .held
            .keys()
            .map(|(task_id, attempt)| format!("{task_id}#{attempt}"))
            .collect();
        tasks.sort();
        WorkerInfo {
            instance_id: self.instance_id.to_string(),
            worker_name: self.hello.worker_name.clone(),
            task_types: self.hello.task_types.clone(),
            labels: self.hello.labels.clone(),
            slots: self.hello.slots,
            used_slots: self.used_slots,
            connected: self.outbound.is_some(),
            draining: self.draining,
            sdk_language: self.hello.sdk_language.clone(),
            sdk_version: self.hello.sdk_version.clone(),
            last_seen: Some(self.last_seen_wall.into()),
            tasks,
        }
    }
}

#[derive(Default)]
pub(crate) struct Workers {
    pub sessions: HashMap<Arc<str>, Session>,
    /// The sessions are mirrors of workers connected to the dispatcher (on an owner, see
    /// `super::relay`): who could take a task is not known here.
    pub mirrored: bool,
}

impl Workers {
    /// The worker with the most free slots that can run `route` now, and the version it runs.
    pub fn pick(&self, route: &Route) -> Option<(Arc<str>, String)> {
        self.sessions
            .values()
            .filter_map(|session| Some((session, session.accepts(route)?)))
            .max_by_key(|(session, _)| session.free_slots())
            .map(|(session, version)| (session.instance_id.clone(), version.to_string()))
    }

    /// Why no connected worker can ever take `route` as things stand, or None when one can
    /// (even if it is busy now).
    pub fn waiting_reason(&self, route: &Route) -> Option<String> {
        if self.mirrored {
            return None;
        }
        let connected = || {
            self.sessions
                .values()
                .filter(|s| s.outbound.is_some() && !s.draining)
        };
        if connected().any(|s| s.could_run(route).is_some()) {
            return None;
        }
        let mut wanted = format!("{}@{}", route.task_name, route.version_req);
        if !route.labels.is_empty() {
            let labels: Vec<String> = route
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            wanted.push_str(&format!(" with {}", labels.join(",")));
        }
        if route.slots > 1 {
            wanted.push_str(&format!(" and {} free slots", route.slots));
        }
        Some(format!("waiting: no connected worker offers {wanted}"))
    }

    pub fn any_free(&self) -> bool {
        self.sessions
            .values()
            .any(|s| s.outbound.is_some() && !s.draining && s.free_slots() > 0)
    }

    pub fn hold(&mut self, instance: &str, task_id: String, attempt: u32, slots: u32) {
        if let Some(session) = self.sessions.get_mut(instance) {
            // Saturating: a hostile owner's declarations must not overflow the count.
            let before = session.held.insert((task_id, attempt), slots).unwrap_or(0);
            session.used_slots = session
                .used_slots
                .saturating_sub(before)
                .saturating_add(slots);
        }
    }

    /// Frees the slots of a task once its worker answered it (any result, even a stale one).
    /// Returns whether the worker held it.
    pub fn release(&mut self, instance: &str, task_id: &str, attempt: u32) -> bool {
        if let Some(session) = self.sessions.get_mut(instance)
            && let Some(slots) = session.held.remove(&(task_id.to_owned(), attempt))
        {
            session.used_slots = session.used_slots.saturating_sub(slots);
            return true;
        }
        false
    }

    pub fn outbound(&self, instance: &str) -> Option<Outbound> {
        self.sessions.get(instance)?.outbound.clone()
    }

    pub fn send(&self, instance: &str, message: server_message::Message) {
        if let Some(session) = self.sessions.get(instance) {
            session.send(message);
        }
    }

    pub fn total_held(&self) -> usize {
        self.sessions.values().map(|s| s.held.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(attempt: u32) -> QueuedTask {
        QueuedTask {
            origin: Origin::Local {
                run_id: "r".into(),
                step: StepRef::step(0),
            },
            attempt,
            queued_at: Instant::now(),
        }
    }

    #[test]
    fn equal_routes_of_different_plans_share_one_queue_in_order() {
        let route = Route {
            task_name: "echo".into(),
            version_req: VersionReq::STAR,
            labels: BTreeMap::new(),
            slots: 1,
            concurrency_key: String::new(),
        };
        let (first, second) = (Arc::new(route.clone()), Arc::new(route));
        let other = Arc::new(Route {
            task_name: "other".into(),
            ..(*first).clone()
        });
        let mut queues = ReadyQueues::default();
        queues.push(&first, 0, task(1));
        queues.push(&other, 0, task(2));
        queues.push(&second, 0, task(3));
        assert_eq!(queues.iter().count(), 2, "one queue per distinct route");
        let attempts = |queues: &mut ReadyQueues, route: &Arc<Route>| {
            std::iter::from_fn(|| queues.pop(route).map(|task| task.attempt)).collect::<Vec<_>>()
        };
        assert_eq!(attempts(&mut queues, &second), [1, 3]);
        assert_eq!(attempts(&mut queues, &other), [2]);
        assert_eq!(queues.iter().count(), 0);
    }
}
