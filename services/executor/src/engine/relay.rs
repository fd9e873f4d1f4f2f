//! Executors that share the partitions hand worker tasks to each other through one dispatcher
//! (ARCHITECTURE.md, "Scale-out"; the wire protocol is `proto/dagmesh/v1/peer.proto`).
//!
//! The *dispatcher* (the holder of the `executor` lease) keeps every worker session and alone
//! picks workers, so a worker's slots are counted in one place. Its engine queues the tasks the
//! other replicas (*owners*) offer beside its own, grants a worker to an offered task by
//! reserving that worker's slots, relays what the owner says to the worker and what the worker
//! says about the owner's tasks, and tells the owner when a worker holding one of its tasks is
//! lost. It keeps nothing durable: on (re)attach an owner declares the tasks it has on workers
//! and offers its ready tasks again.
//!
//! On an owner, a worker is a *mirror session*: a `Session` with no slots (its own dispatch
//! never picks it) whose outbound goes to the dispatcher. So everything the run machine says to
//! a worker and hears from it runs unchanged, holder fencing included; only the matching is
//! new: ready tasks leave the owner's queues as offers after each commit, and a grant goes
//! through `RunEntry::assign` like a local pick.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use dagmesh_proto::v1::{self as pb, server_message, worker_message};
use tokio::sync::mpsc;

use super::run::StepRef;
use super::timers::Timer;
use super::workers::{Outbound, QueuedTask, Route, Session};
use super::{Engine, Origin};
use crate::ExecError;

/// An attached owner, numbered by the dispatcher (a re-attach is a new peer).
pub(crate) type PeerId = u64;

/// What an owner tells the dispatcher.
#[derive(Debug)]
pub(crate) enum ToDispatcher {
    Offer {
        task_id: String,
        attempt: u32,
        route: Arc<Route>,
        priority: i32,
    },
    Withdraw {
        task_id: String,
        attempt: u32,
    },
    Decline {
        task_id: String,
        attempt: u32,
        instance: Arc<str>,
    },
    Held {
        task_id: String,
        attempt: u32,
        instance: Arc<str>,
        slots: u32,
        concurrency_key: String,
    },
    ToWorker {
        instance: Arc<str>,
        message: server_message::Message,
    },
    /// A QUEUED run waiting for room in its limit buckets.
    RunOffer(OfferedRun),
    RunReleased {
        run_id: Arc<str>,
    },
    /// Every admitted run of `partitions` that holds buckets.
    AdmittedRuns {
        partitions: Vec<u32>,
        runs: Vec<OfferedRun>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct OfferedRun {
    pub run_id: Arc<str>,
    pub partition: u32,
    pub buckets: Vec<String>,
    pub priority: i32,
}

/// What the dispatcher tells an owner.
#[derive(Debug)]
pub(crate) enum ToOwner {
    Grant {
        task_id: String,
        attempt: u32,
        instance: Arc<str>,
        version: String,
        principal: Arc<str>,
    },
    FromWorker {
        instance: Arc<str>,
        message: worker_message::Message,
    },
    Lost {
        task_id: String,
        attempt: u32,
        instance: Arc<str>,
        reason: String,
    },
    RunAdmitted {
        run_id: Arc<str>,
    },
}

/// The dispatcher's end of an owner's stream (errors end it with that status).
pub(crate) type PeerOutbound = mpsc::UnboundedSender<Result<ToOwner, ExecError>>;

/// Which side of the relay this engine is on.
pub(crate) enum Relay {
    /// The dispatcher (or the only executor): worker sessions are real; owners may attach.
    Dispatcher(Dispatching),
    /// A replica that is not the dispatcher: its worker sessions are mirrors.
    Owner(Owning),
}

#[derive(Default)]
pub(crate) struct Dispatching {
    peers: HashMap<PeerId, PeerOutbound>,
    /// Offers waiting in the ready queues: (task id, attempt) → the owner. A queue entry whose
    /// offer is gone (withdrawn, or its owner detached) is stale.
    offers: HashMap<(String, u32), PeerId>,
    /// Owners' tasks on workers here: (task id, attempt) → whose, on which worker.
    holds: HashMap<(String, u32), RemoteHold>,
    /// Owners' runs waiting in the admission queue.
    run_offers: HashMap<Arc<str>, (PeerId, OfferedRun)>,
    /// Owners' runs admitted here, holding their buckets (the owner: None while detached).
    admitted: HashMap<Arc<str>, (Option<PeerId>, OfferedRun)>,
}

struct RemoteHold {
    /// None while its owner is detached (until an owner declares the task again).
    peer: Option<PeerId>,
    instance: Arc<str>,
    route: Arc<Route>,
    /// The worker's result, kept while no owner is attached to take it.
    result: Option<worker_message::Message>,
    /// Whether the owner's Assign reached the worker (relayed here); a granted task whose
    /// Assign was lost with the owner's stream is lost when the owner declares it.
    assigned: bool,
    /// Kept for a reconnecting worker that listed it before any owner declared it (one slot
    /// counted until the owner says how many).
    parked: bool,
}

pub(crate) struct Owning {
    to_dispatcher: mpsc::UnboundedSender<ToDispatcher>,
    /// Offered tasks by run (step, attempt): withdrawn when they stop being ready.
    offered: HashMap<Arc<str>, HashSet<(StepRef, u32)>>,
    /// QUEUED runs offered for admission.
    runs_offered: HashSet<Arc<str>>,
}

impl Relay {
    pub fn owner(to_dispatcher: mpsc::UnboundedSender<ToDispatcher>) -> Self {
        Relay::Owner(Owning {
            to_dispatcher,
            offered: HashMap::new(),
            runs_offered: HashSet::new(),
        })
    }

    pub fn is_owner(&self) -> bool {
        matches!(self, Relay::Owner(_))
    }

    /// A session for `instance` as this side keeps it: on an owner, a mirror whose messages go
    /// to the dispatcher.
    pub fn new_session(&self, instance: Arc<str>, now: tokio::time::Instant) -> Session {
        let mut session = Session::new(instance.clone(), now);
        if let Relay::Owner(owning) = self {
            session.outbound = Some(mirror(instance, owning.to_dispatcher.clone()));
        }
        session
    }
}

/// An outbound that relays each message to the dispatcher as `ToWorker`.
fn mirror(instance: Arc<str>, to_dispatcher: mpsc::UnboundedSender<ToDispatcher>) -> Outbound {
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<pb::ServerMessage, ExecError>>();
    tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            let Ok(pb::ServerMessage {
                message: Some(message),
            }) = message
            else {
                continue; // an error ends a real stream; a mirror has none to end
            };
            let relayed = ToDispatcher::ToWorker {
                instance: instance.clone(),
                message,
            };
            if to_dispatcher.send(relayed).is_err() {
                return;
            }
        }
    });
    tx
}

/// The route of a task known only from a declaration (`Held`, or a worker's reconnect): what
/// it takes of the worker, not what it asked for (task type and labels stay empty).
fn declared_route(slots: u32, concurrency_key: String) -> Arc<Route> {
    Arc::new(Route {
        task_name: String::new(),
        version_req: semver::VersionReq::STAR,
        labels: Default::default(),
        slots,
        concurrency_key,
    })
}

/// The task id a worker message is about, if it is about one.
fn task_of(message: &worker_message::Message) -> Option<(&str, u32)> {
    use worker_message::Message;
    match message {
        Message::Started(m) => Some((&m.task_id, m.attempt)),
        Message::Progress(m) => Some((&m.task_id, m.attempt)),
        Message::Log(m) => Some((&m.task_id, m.attempt)),
        Message::Completed(m) => Some((&m.task_id, m.attempt)),
        Message::Failed(m) => Some((&m.task_id, m.attempt)),
        Message::Hello(_) | Message::Heartbeat(_) | Message::Draining(_) => None,
    }
}

impl Engine {
    // ----- the dispatcher's side -----

    pub(super) fn peer_attached(&mut self, peer: PeerId, outbound: PeerOutbound) {
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            let _ = outbound.send(Err(ExecError::FailedPrecondition(
                "this executor is not the dispatcher any more; attach to the holder of the \
                 executor lease"
                    .into(),
            )));
            return;
        };
        tracing::info!(
            peer,
            "an executor attached to hand its tasks to workers here"
        );
        dispatching.peers.insert(peer, outbound);
    }

    pub(super) fn peer_detached(&mut self, peer: PeerId) {
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return;
        };
        if dispatching.peers.remove(&peer).is_none() {
            return;
        }
        tracing::info!(peer, "an executor detached");
        // Its queued offers go stale; its tasks on workers wait for an owner to declare them.
        dispatching.offers.retain(|_, owner| *owner != peer);
        dispatching
            .run_offers
            .retain(|_, (owner, _)| *owner != peer);
        for hold in dispatching.holds.values_mut() {
            if hold.peer == Some(peer) {
                hold.peer = None;
            }
        }
        for (owner, _) in dispatching.admitted.values_mut() {
            if *owner == Some(peer) {
                *owner = None;
            }
        }
        self.ctx.queues_touched = true;
    }

    pub(super) fn on_peer_message(&mut self, peer: PeerId, message: ToDispatcher) {
        let now = self.ctx.now;
        let lease = self.ctx.after(self.ctx.config.lease);
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return;
        };
        if !dispatching.peers.contains_key(&peer) {
            return;
        }
        match message {
            ToDispatcher::Offer {
                task_id,
                attempt,
                route,
                priority,
            } => {
                let key = (task_id, attempt);
                if dispatching.holds.contains_key(&key) {
                    return; // already on a worker
                }
                let task_id: Arc<str> = Arc::from(key.0.as_str());
                dispatching.offers.insert(key, peer);
                self.ctx.queues.push(
                    &route,
                    priority,
                    QueuedTask {
                        origin: Origin::Peer { peer, task_id },
                        attempt,
                        queued_at: now,
                    },
                );
                self.ctx.queues_touched = true;
            }
            ToDispatcher::Withdraw { task_id, attempt } => {
                let key = (task_id, attempt);
                if dispatching.offers.get(&key) == Some(&peer) {
                    dispatching.offers.remove(&key);
                    self.ctx.queues_touched = true;
                }
            }
            ToDispatcher::Decline {
                task_id,
                attempt,
                instance,
            } => {
                let key = (task_id, attempt);
                let declined = dispatching
                    .holds
                    .get(&key)
                    .is_some_and(|hold| hold.peer == Some(peer) && hold.instance == instance);
                if declined {
                    let hold = dispatching.holds.remove(&key).expect("checked");
                    self.ctx.workers.release(&instance, &key.0, attempt);
                    self.ctx
                        .admission
                        .release_resource(&hold.route.concurrency_key);
                    self.ctx.queues_touched = true;
                }
            }
            ToDispatcher::Held {
                task_id,
                attempt,
                instance,
                slots,
                concurrency_key,
            } => {
                let key = (task_id, attempt);
                if let Some(hold) = dispatching.holds.get_mut(&key) {
                    if hold.instance != instance {
                        return;
                    }
                    if !hold.assigned {
                        // Granted, assigned by the owner, but its Assign went down with the
                        // owner's previous stream: the worker never heard of the task.
                        let hold = dispatching.holds.remove(&key).expect("present");
                        self.ctx.workers.release(&instance, &key.0, attempt);
                        self.ctx
                            .admission
                            .release_resource(&hold.route.concurrency_key);
                        let _ = dispatching.peers[&peer].send(Ok(ToOwner::Lost {
                            task_id: key.0,
                            attempt,
                            instance,
                            reason: "the assignment did not reach the worker (the executor's \
                                     stream to the dispatcher broke)"
                                .into(),
                        }));
                        return;
                    }
                    hold.peer = Some(peer);
                    if std::mem::take(&mut hold.parked) {
                        // The owner says what the task takes: its slots and its resource.
                        self.ctx
                            .workers
                            .hold(&instance, key.0.clone(), attempt, slots);
                        self.ctx.admission.hold_resource(&concurrency_key);
                        hold.route = declared_route(slots, concurrency_key);
                    }
                    if let Some(result) = hold.result.take() {
                        // The worker answered while no owner was attached: deliver it now.
                        let outbound = &dispatching.peers[&peer];
                        let _ = outbound.send(Ok(ToOwner::FromWorker {
                            instance,
                            message: result,
                        }));
                        dispatching.holds.remove(&key);
                    }
                    return;
                }
                let session = self.ctx.workers.sessions.get(&instance);
                if session.is_some_and(Session::is_live) {
                    // Connected, and it did not list the task when it (re)connected here.
                    let reason = format!(
                        "worker {instance} reconnected to a new dispatcher without the task"
                    );
                    let _ = dispatching.peers[&peer].send(Ok(ToOwner::Lost {
                        task_id: key.0,
                        attempt,
                        instance,
                        reason,
                    }));
                    return;
                }
                // Away: it has the lease to reconnect and resume the task, as after a restart.
                if session.is_none() {
                    let session = Session::new(instance.clone(), now);
                    self.ctx.workers.sessions.insert(instance.clone(), session);
                    self.ctx.timers.schedule(
                        lease,
                        Timer::Lease {
                            instance: instance.clone(),
                        },
                    );
                }
                let route = declared_route(slots, concurrency_key);
                self.ctx
                    .workers
                    .hold(&instance, key.0.clone(), attempt, slots);
                self.ctx.admission.hold_resource(&route.concurrency_key);
                dispatching.holds.insert(
                    key,
                    RemoteHold {
                        peer: Some(peer),
                        instance,
                        route,
                        result: None,
                        assigned: true, // the worker says at its reconnect whether it has it
                        parked: false,
                    },
                );
            }
            ToDispatcher::RunOffer(run) => {
                if dispatching.admitted.contains_key(&run.run_id) {
                    return;
                }
                self.ctx.admission.enqueue(run.priority, run.run_id.clone());
                dispatching
                    .run_offers
                    .insert(run.run_id.clone(), (peer, run));
            }
            ToDispatcher::RunReleased { run_id } => {
                dispatching.run_offers.remove(&run_id);
                if let Some((_, run)) = dispatching.admitted.remove(&run_id) {
                    self.ctx.admission.release(&run.buckets);
                }
            }
            ToDispatcher::AdmittedRuns { partitions, runs } => {
                let listed: HashSet<&Arc<str>> = runs.iter().map(|run| &run.run_id).collect();
                // Runs of these partitions the owner does not list ended while no owner was
                // attached to say so.
                let ended: Vec<Arc<str>> = dispatching
                    .admitted
                    .iter()
                    .filter(|(id, (_, run))| {
                        partitions.contains(&run.partition) && !listed.contains(id)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for run_id in ended {
                    if let Some((_, run)) = dispatching.admitted.remove(&run_id) {
                        self.ctx.admission.release(&run.buckets);
                    }
                }
                for run in runs {
                    match dispatching.admitted.get_mut(&run.run_id) {
                        Some((owner, _)) => *owner = Some(peer),
                        None => {
                            self.ctx.admission.acquire(&run.buckets);
                            dispatching.run_offers.remove(&run.run_id);
                            dispatching
                                .admitted
                                .insert(run.run_id.clone(), (Some(peer), run));
                        }
                    }
                }
            }
            ToDispatcher::ToWorker { instance, message } => {
                let about = match &message {
                    server_message::Message::Assign(m) => (&m.task_id, m.attempt),
                    server_message::Message::Recorded(m) => (&m.task_id, m.attempt),
                    server_message::Message::Cancel(m) => (&m.task_id, m.attempt),
                    _ => return, // Welcome and Drain are the dispatcher's to say
                };
                // An Assign only for a task granted to that owner, on that worker.
                if let server_message::Message::Assign(_) = &message {
                    let hold = dispatching
                        .holds
                        .get_mut(&(about.0.clone(), about.1))
                        .filter(|hold| hold.peer == Some(peer) && hold.instance == instance);
                    let Some(hold) = hold else {
                        return;
                    };
                    hold.assigned = true;
                }
                self.ctx.workers.send(&instance, message);
            }
        }
    }

    /// Grants `instance` to an owner's offer popped from the queues (dispatch): reserves its
    /// slots and the task's resource until the owner declines or the worker answers. False when
    /// the offer was stale.
    pub(super) fn grant(
        &mut self,
        peer: PeerId,
        task_id: &str,
        attempt: u32,
        route: &Arc<Route>,
        instance: &Arc<str>,
        version: String,
    ) -> bool {
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return false;
        };
        let key = (task_id.to_owned(), attempt);
        if dispatching.offers.get(&key) != Some(&peer) {
            return false;
        }
        dispatching.offers.remove(&key);
        let Some(outbound) = dispatching.peers.get(&peer) else {
            return false;
        };
        let principal = self
            .ctx
            .workers
            .sessions
            .get(instance)
            .and_then(|session| session.principal.clone())
            .unwrap_or_else(|| Arc::from(""));
        let granted = outbound.send(Ok(ToOwner::Grant {
            task_id: task_id.to_owned(),
            attempt,
            instance: instance.clone(),
            version,
            principal,
        }));
        if granted.is_err() {
            return false;
        }
        self.ctx
            .workers
            .hold(instance, task_id.to_owned(), attempt, route.slots);
        self.ctx.admission.hold_resource(&route.concurrency_key);
        dispatching.holds.insert(
            key,
            RemoteHold {
                peer: Some(peer),
                instance: instance.clone(),
                route: route.clone(),
                result: None,
                assigned: false,
                parked: false,
            },
        );
        true
    }

    /// Admits an owner's queued run (`run_id`, at `key` in the admission queue) when its
    /// buckets have room. False: no owner offered it (a stale queue entry).
    pub(super) fn admit_remote(
        &mut self,
        key: &super::admission::AdmissionKey,
        run_id: &Arc<str>,
    ) -> bool {
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return false;
        };
        let Some((peer, run)) = dispatching.run_offers.get(run_id) else {
            return false;
        };
        if !self.ctx.admission.fits(&run.buckets) {
            return true; // waits for room
        }
        let (peer, run) = (*peer, run.clone());
        dispatching.run_offers.remove(run_id);
        self.ctx.admission.dequeue(key);
        let Some(outbound) = dispatching.peers.get(&peer) else {
            return true;
        };
        if outbound
            .send(Ok(ToOwner::RunAdmitted {
                run_id: run_id.clone(),
            }))
            .is_ok()
        {
            self.ctx.admission.acquire(&run.buckets);
            dispatching
                .admitted
                .insert(run_id.clone(), (Some(peer), run));
        }
        true
    }

    /// Whether an owner's offer in the queues is still live.
    pub(super) fn offer_live(&self, peer: PeerId, task_id: &str, attempt: u32) -> bool {
        match &self.ctx.relay {
            Relay::Dispatcher(dispatching) => {
                dispatching.offers.get(&(task_id.to_owned(), attempt)) == Some(&peer)
            }
            Relay::Owner(_) => false,
        }
    }

    /// The routes of owners' tasks on workers here, for the queue snapshot.
    pub(super) fn remote_routes(&self) -> Vec<Arc<Route>> {
        match &self.ctx.relay {
            Relay::Dispatcher(dispatching) => dispatching
                .holds
                .values()
                .filter(|hold| !hold.route.task_name.is_empty())
                .map(|hold| hold.route.clone())
                .collect(),
            Relay::Owner(_) => Vec::new(),
        }
    }

    /// Relays a worker's message about an owner's task (true), or leaves it to the engine
    /// (false: not an owner's task).
    pub(super) fn relay_from_worker(
        &mut self,
        instance: &Arc<str>,
        message: &mut Option<worker_message::Message>,
    ) -> bool {
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return false;
        };
        if dispatching.holds.is_empty() {
            return false; // no other executor's task here (always, for a lone executor)
        }
        let Some(inner) = message.as_ref() else {
            return false;
        };
        if let worker_message::Message::Draining(_) = inner {
            // Every owner with a task on it hears it (an Assign that crosses it may be handed
            // back unstarted, which the owner must not count as a failure).
            let owners: HashSet<PeerId> = dispatching
                .holds
                .values()
                .filter(|hold| hold.instance == *instance)
                .filter_map(|hold| hold.peer)
                .collect();
            for peer in owners {
                if let Some(outbound) = dispatching.peers.get(&peer) {
                    let _ = outbound.send(Ok(ToOwner::FromWorker {
                        instance: instance.clone(),
                        message: inner.clone(),
                    }));
                }
            }
            return false; // the dispatcher's session drains too
        }
        let Some((task_id, attempt)) = task_of(inner) else {
            return false;
        };
        let key = (task_id.to_owned(), attempt);
        let Some(hold) = dispatching.holds.get_mut(&key) else {
            return false;
        };
        if hold.instance != *instance {
            return false; // not its holder: the engine answers it as stale
        }
        let message = message.take().expect("checked");
        let is_result = matches!(
            message,
            worker_message::Message::Completed(_) | worker_message::Message::Failed(_)
        );
        let outbound = hold.peer.and_then(|peer| dispatching.peers.get(&peer));
        match outbound {
            Some(outbound) => {
                let _ = outbound.send(Ok(ToOwner::FromWorker {
                    instance: instance.clone(),
                    message,
                }));
                if is_result {
                    let hold = dispatching.holds.remove(&key).expect("present");
                    self.ctx.workers.release(instance, &key.0, attempt);
                    self.ctx
                        .admission
                        .release_resource(&hold.route.concurrency_key);
                }
            }
            None if is_result => {
                // Kept for the owner that declares the task next; the worker is free now.
                hold.result = Some(message);
                let resource = hold.route.concurrency_key.clone();
                self.ctx.workers.release(instance, &key.0, attempt);
                self.ctx.admission.release_resource(&resource);
            }
            None => {} // progress while no owner listens: dropped, like a lost heartbeat
        }
        self.ctx.queues_touched |= is_result;
        true
    }

    /// A worker holding an owner's task was lost here: the owner hears it (true), or the task
    /// is the engine's own (false).
    pub(super) fn remote_lost(
        &mut self,
        instance: &Arc<str>,
        task_id: &str,
        attempt: u32,
        reason: &str,
    ) -> bool {
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return false;
        };
        let key = (task_id.to_owned(), attempt);
        let Some(hold) = dispatching.holds.remove(&key) else {
            return false;
        };
        self.ctx.workers.release(instance, task_id, attempt);
        self.ctx
            .admission
            .release_resource(&hold.route.concurrency_key);
        if let Some(outbound) = hold.peer.and_then(|peer| dispatching.peers.get(&peer)) {
            let _ = outbound.send(Ok(ToOwner::Lost {
                task_id: task_id.to_owned(),
                attempt,
                instance: instance.clone(),
                reason: reason.to_owned(),
            }));
        }
        true
    }

    /// A reconnecting worker lists a task no run here has and no owner declared (executors that
    /// share the partitions, after the dispatcher changed: its owner has not re-attached yet).
    /// It is kept for a lease, waiting for the owner's `Held`, instead of being cancelled (and
    /// redone) at once; true when kept.
    pub(super) fn park_unknown(
        &mut self,
        instance: &Arc<str>,
        task_id: &str,
        attempt: u32,
    ) -> bool {
        if !self.ctx.config.share_partitions || self.locate(task_id).is_some() {
            return false;
        }
        let deadline = self.ctx.after(self.ctx.config.lease);
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return false;
        };
        let key = (task_id.to_owned(), attempt);
        if dispatching.holds.contains_key(&key) {
            return false; // held for another worker: not this one's
        }
        self.ctx
            .workers
            .hold(instance, task_id.to_owned(), attempt, 1);
        dispatching.holds.insert(
            key,
            RemoteHold {
                peer: None,
                instance: instance.clone(),
                route: declared_route(1, String::new()),
                result: None,
                assigned: true,
                parked: true,
            },
        );
        self.ctx.timers.schedule(
            deadline,
            Timer::Parked {
                task_id: task_id.to_owned(),
                attempt,
            },
        );
        true
    }

    /// No owner declared a parked task within a lease: the worker is told to drop it.
    pub(super) fn parked_expired(&mut self, task_id: String, attempt: u32) {
        let Relay::Dispatcher(dispatching) = &mut self.ctx.relay else {
            return;
        };
        let key = (task_id, attempt);
        if !dispatching.holds.get(&key).is_some_and(|hold| hold.parked) {
            return;
        }
        let hold = dispatching.holds.remove(&key).expect("checked");
        self.ctx.workers.release(&hold.instance, &key.0, attempt);
        self.ctx.workers.send(
            &hold.instance,
            super::cancel_message(&key.0, attempt, "no executor claimed the task"),
        );
    }

    /// Whether (task, attempt) is an owner's task held here.
    pub(super) fn is_remote_hold(&self, task_id: &str, attempt: u32) -> bool {
        match &self.ctx.relay {
            Relay::Dispatcher(dispatching) => dispatching
                .holds
                .contains_key(&(task_id.to_owned(), attempt)),
            Relay::Owner(_) => false,
        }
    }

    // ----- the owner's side -----

    /// After a commit: the ready tasks queued in this batch go to the dispatcher as offers,
    /// and offered tasks of the batch's runs that stopped being ready are withdrawn.
    pub(super) fn send_offers(&mut self, dirty: &[Arc<str>]) {
        let Relay::Owner(owning) = &mut self.ctx.relay else {
            return;
        };
        // A mirror holds nothing of its own once its tasks are answered: workers come and go.
        self.ctx
            .workers
            .sessions
            .retain(|_, session| !session.held.is_empty());
        while let Some(route) = self.ctx.queues.best_head(|_| true) {
            let Some(task) = self.ctx.queues.pop(&route) else {
                continue;
            };
            let Origin::Local { run_id, step } = task.origin else {
                continue;
            };
            let Some(entry) = self.runs.get(&run_id) else {
                continue;
            };
            if !entry.is_queued(step, task.attempt) || entry.run.suspended {
                continue;
            }
            if !owning
                .offered
                .entry(run_id.clone())
                .or_default()
                .insert((step, task.attempt))
            {
                continue; // offered already (a reloaded run queues its ready tasks again)
            }
            let priority = entry.plan.compiled.steps[step.spec()].priority;
            let _ = owning.to_dispatcher.send(ToDispatcher::Offer {
                task_id: entry.task_id(step).to_owned(),
                attempt: task.attempt,
                route,
                priority,
            });
        }
        for run_id in dirty {
            let Some(offered) = owning.offered.get_mut(run_id) else {
                continue;
            };
            let entry = self.runs.get(run_id);
            offered.retain(|&(step, attempt)| {
                let ready = entry.is_some_and(|e| e.is_queued(step, attempt) && !e.run.suspended);
                if !ready && let Some(entry) = entry {
                    let _ = owning.to_dispatcher.send(ToDispatcher::Withdraw {
                        task_id: entry.task_id(step).to_owned(),
                        attempt,
                    });
                }
                ready
            });
            if offered.is_empty() || entry.is_none() {
                owning.offered.remove(run_id);
            }
        }
    }

    /// The dispatcher granted `instance` to an offered task: assign it like a local pick, or
    /// decline when it is no longer ready.
    pub(super) fn granted(
        &mut self,
        task_id: String,
        attempt: u32,
        instance: Arc<str>,
        version: String,
        principal: Arc<str>,
    ) {
        let now = self.ctx.now;
        let located = self.locate(&task_id).map(|(id, step)| (id.clone(), step));
        let Relay::Owner(owning) = &mut self.ctx.relay else {
            return;
        };
        let mut assigned = false;
        if let Some((run_id, step)) = located {
            if let Some(offered) = owning.offered.get_mut(&run_id) {
                offered.remove(&(step, attempt));
            }
            let session = self
                .ctx
                .workers
                .sessions
                .entry(instance.clone())
                .or_insert_with(|| self.ctx.relay.new_session(instance.clone(), now));
            session.principal = Some(principal);
            let entry = self.runs.get_mut(&run_id).expect("located");
            assigned = entry.assign(step, attempt, &instance, &version, &mut self.ctx);
            self.ctx.apply_shared();
        }
        if !assigned {
            self.decline(task_id, attempt, instance);
        }
    }

    pub(super) fn decline(&self, task_id: String, attempt: u32, instance: Arc<str>) {
        if let Relay::Owner(owning) = &self.ctx.relay {
            let _ = owning.to_dispatcher.send(ToDispatcher::Decline {
                task_id,
                attempt,
                instance,
            });
        }
    }

    /// A message from the dispatcher, on an owner.
    pub(super) fn on_dispatcher_message(&mut self, message: ToOwner) {
        if !self.ctx.relay.is_owner() {
            return;
        }
        match message {
            ToOwner::Grant {
                task_id,
                attempt,
                instance,
                version,
                principal,
            } => self.granted(task_id, attempt, instance, version, principal),
            ToOwner::FromWorker { instance, message } => {
                self.ensure_mirror(&instance);
                self.on_worker_message(instance, message);
            }
            ToOwner::Lost {
                task_id,
                attempt,
                instance,
                reason,
            } => {
                if self.ctx.workers.release(&instance, &task_id, attempt) {
                    self.requeue_lost(&task_id, attempt, &reason);
                }
            }
            ToOwner::RunAdmitted { run_id } => self.run_admitted(run_id),
        }
    }

    /// The dispatcher made room for a queued run: it starts (its buckets are counted here too,
    /// for the day this replica dispatches). A run that no longer waits gives the room back.
    fn run_admitted(&mut self, run_id: Arc<str>) {
        if let Relay::Owner(owning) = &mut self.ctx.relay {
            owning.runs_offered.remove(&run_id);
        }
        match self.runs.get_mut(&run_id) {
            Some(entry) if entry.run.state() == pb::RunState::Queued => {
                self.ctx.admission.acquire(&entry.buckets);
                entry.admit(&mut self.ctx);
            }
            _ => self.send_to_dispatcher(ToDispatcher::RunReleased { run_id }),
        }
    }

    fn send_to_dispatcher(&self, message: ToDispatcher) {
        if let Relay::Owner(owning) = &self.ctx.relay {
            let _ = owning.to_dispatcher.send(message);
        }
    }

    /// On an owner: a queued run that needs room in limit buckets is offered to the dispatcher
    /// (once); true when the dispatcher decides its admission.
    pub(super) fn offer_run(&mut self, run_id: &Arc<str>) -> bool {
        let Relay::Owner(owning) = &mut self.ctx.relay else {
            return false;
        };
        let Some(entry) = self.runs.get(run_id) else {
            return false;
        };
        if entry.buckets.is_empty() {
            return false; // nothing to count: admitted here
        }
        if owning.runs_offered.insert(run_id.clone()) {
            let _ = owning
                .to_dispatcher
                .send(ToDispatcher::RunOffer(OfferedRun {
                    run_id: run_id.clone(),
                    partition: entry.run.partition,
                    buckets: entry.buckets.clone(),
                    priority: entry.run.priority,
                }));
        }
        true
    }

    /// On an owner: a run that held (or waited for) limit buckets ended.
    pub(super) fn run_ended(&mut self, run_id: &Arc<str>, buckets: &[String]) {
        let Relay::Owner(owning) = &mut self.ctx.relay else {
            return;
        };
        owning.runs_offered.remove(run_id);
        if !buckets.is_empty() {
            let _ = owning.to_dispatcher.send(ToDispatcher::RunReleased {
                run_id: run_id.clone(),
            });
        }
    }

    fn ensure_mirror(&mut self, instance: &Arc<str>) {
        if !self.ctx.workers.sessions.contains_key(instance) {
            let session = self.ctx.relay.new_session(instance.clone(), self.ctx.now);
            self.ctx.workers.sessions.insert(instance.clone(), session);
        }
    }

    /// Tells the dispatcher which tasks of the runs of `partitions` (all, when `None`) are on
    /// workers: after an attach (a new dispatcher knows none of them) and after partitions were
    /// taken up (their runs' tasks were the previous owner's).
    pub(super) fn declare_held(&self, partitions: Option<&[u32]>) {
        let Relay::Owner(owning) = &self.ctx.relay else {
            return;
        };
        let declared: Vec<u32> = match partitions {
            Some(partitions) => partitions.to_vec(),
            None => self.driven.keys().copied().collect(),
        };
        let runs = self
            .runs
            .values()
            .filter(|entry| entry.admitted && !entry.buckets.is_empty())
            .filter(|entry| declared.contains(&entry.run.partition))
            .map(|entry| OfferedRun {
                run_id: entry.id.clone(),
                partition: entry.run.partition,
                buckets: entry.buckets.clone(),
                priority: entry.run.priority,
            })
            .collect();
        let _ = owning.to_dispatcher.send(ToDispatcher::AdmittedRuns {
            partitions: declared,
            runs,
        });
        for session in self.ctx.workers.sessions.values() {
            for ((task_id, attempt), slots) in &session.held {
                let Some((run_id, step_id)) = task_id.split_once('/') else {
                    continue;
                };
                let Some(entry) = self.runs.get(run_id) else {
                    continue;
                };
                if partitions.is_some_and(|p| !p.contains(&entry.run.partition)) {
                    continue;
                }
                let concurrency_key = entry
                    .resolve(step_id)
                    .map(|at| entry.route(at).concurrency_key.clone())
                    .unwrap_or_default();
                let _ = owning.to_dispatcher.send(ToDispatcher::Held {
                    task_id: task_id.clone(),
                    attempt: *attempt,
                    instance: session.instance_id.clone(),
                    slots: *slots,
                    concurrency_key,
                });
            }
        }
    }

    /// Attached (again) to a dispatcher: declare every task on a worker, then offer every
    /// ready task again (a new dispatcher knows none of them).
    pub(super) fn dispatcher_attached(&mut self) {
        self.declare_held(None);
        let Relay::Owner(owning) = &mut self.ctx.relay else {
            return;
        };
        owning.offered.clear();
        // Queued runs are offered for admission again.
        owning.runs_offered.clear();
        self.ctx.admission.dirty = true;
        self.queue_ready_tasks();
        self.send_offers(&[]);
    }

    /// Puts every ready task of every run into the ready queues again (an owner's queues are
    /// drained into offers, so after an attach or a promotion they hold none).
    fn queue_ready_tasks(&mut self) {
        for (run_id, entry) in &self.runs {
            for (step, _) in entry.ready_steps() {
                let (attempt, _) = entry.attempt_state(step);
                self.ctx.queues.push(
                    entry.route(step),
                    entry.plan.compiled.steps[step.spec()].priority,
                    QueuedTask {
                        origin: Origin::Local {
                            run_id: run_id.clone(),
                            step,
                        },
                        attempt,
                        queued_at: self.ctx.now,
                    },
                );
            }
        }
    }

    /// This replica took the executor lease: it dispatches from now on. Mirror sessions become
    /// sessions waiting for their workers to connect (the whole lease, as after a restart), and
    /// the ready tasks go into its own queues.
    pub(super) fn become_dispatcher(&mut self) {
        let Relay::Owner(_) = &self.ctx.relay else {
            return;
        };
        self.ctx.relay = Relay::Dispatcher(Dispatching::default());
        let now = self.ctx.now;
        let lease = self.ctx.after(self.ctx.config.lease);
        for session in self.ctx.workers.sessions.values_mut() {
            session.outbound = None;
            session.disconnected_at = None;
            session.last_seen = now;
            self.ctx.timers.schedule(
                lease,
                Timer::Lease {
                    instance: session.instance_id.clone(),
                },
            );
        }
        self.ctx
            .workers
            .sessions
            .retain(|_, session| !session.held.is_empty());
        self.ctx.workers.mirrored = false;
        self.queue_ready_tasks();
        self.ctx.queues_touched = true;
        tracing::info!("this executor dispatches to workers now (it took the executor lease)");
    }
}
