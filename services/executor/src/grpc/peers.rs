//! `PeerService` (see `proto/dagmesh/v1/peer.proto`): the dispatcher's end of an owner's
//! stream, and the owner's link that keeps one attached to whichever replica dispatches. The
//! engine's side of both is `crate::engine::relay`; this module only decodes, checks and
//! encodes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dagmesh_metastore::MetadataStore;
use dagmesh_metastore::ownership::holder_address;
use dagmesh_proto::connect::ClientSettings;
use dagmesh_proto::limits::{MAX_ENTRIES, MAX_NAME_LEN, MAX_VALUE_LEN, check_len};
use dagmesh_proto::v1::{
    self as pb, DispatcherMessage, OwnerMessage, dispatcher_message, owner_message,
    peer_service_client::PeerServiceClient, peer_service_server::PeerService, server_message,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Command, EngineHandle, OfferedRun, Route, ToDispatcher, ToOwner};
use crate::lease::EXECUTOR_LEASE;
use crate::{ExecError, Executor};

/// Most slots one task may take (a worker announces at most this many too).
const MAX_TASK_SLOTS: u32 = 1 << 16;

/// Most limit buckets one run takes (one per run limit that applies to it).
const MAX_BUCKETS: usize = 64;

/// Most admitted runs one declaration lists.
const MAX_DECLARED_RUNS: usize = 100_000;

pub(super) struct Peers {
    executor: Executor,
    next_peer: AtomicU64,
}

impl Peers {
    pub fn new(executor: Executor) -> Self {
        Self {
            executor,
            next_peer: AtomicU64::new(1),
        }
    }
}

#[tonic::async_trait]
impl PeerService for Peers {
    type AttachStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<DispatcherMessage, Status>> + Send + 'static>,
    >;

    async fn attach(
        &self,
        request: Request<Streaming<OwnerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        if !self.executor.is_dispatcher() {
            return Err(Status::failed_precondition(
                "this executor does not dispatch (it does not hold the executor lease); attach to \
                 the one that does",
            ));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no OwnerHello within 10s"))??;
        let owner = match first.and_then(|m| m.message) {
            Some(owner_message::Message::Hello(hello)) => hello.owner,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be OwnerHello",
                ));
            }
        };
        check_len("hello.owner", &owner, MAX_VALUE_LEN).map_err(Status::invalid_argument)?;
        let engine = self.executor.inner.engine.clone();
        let peer = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let (outbound, stream) = mpsc::unbounded_channel();
        let closer = outbound.clone();
        engine
            .send(Command::PeerAttached { peer, outbound })
            .await
            .map_err(Status::from)?;
        tracing::info!(peer, %owner, "owner attached");
        tokio::spawn(async move {
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) | Err(_) => break,
                };
                match decode_owner_message(message) {
                    Ok(Some(message)) => {
                        if engine
                            .send(Command::FromPeer { peer, message })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(peer, %error, "an owner broke the peer protocol; detaching it");
                        let _ = closer.send(Err(ExecError::InvalidArgument(error)));
                        break;
                    }
                }
            }
            let _ = engine.send(Command::PeerDetached { peer }).await;
        });
        let stream = UnboundedReceiverStream::new(stream).map(|message| match message {
            Ok(message) => Ok(encode_to_owner(message)),
            Err(error) => Err(Status::from(error)),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn task_ref(field: &str, task_id: &str) -> Result<(), String> {
    if task_id.is_empty() {
        return Err(format!("{field}.task_id: required"));
    }
    check_len(&format!("{field}.task_id"), task_id, MAX_VALUE_LEN)
}

fn instance(field: &str, instance_id: &str) -> Result<Arc<str>, String> {
    if instance_id.is_empty() {
        return Err(format!("{field}.instance_id: required"));
    }
    check_len(&format!("{field}.instance_id"), instance_id, MAX_NAME_LEN)?;
    Ok(Arc::from(instance_id))
}

fn slots(field: &str, slots: u32) -> Result<u32, String> {
    if slots == 0 || slots > MAX_TASK_SLOTS {
        return Err(format!(
            "{field}.slots: {slots} is out of range (1 to {MAX_TASK_SLOTS})"
        ));
    }
    Ok(slots)
}

fn offered_run(field: &str, run: pb::RunOffer) -> Result<OfferedRun, String> {
    if run.run_id.is_empty() {
        return Err(format!("{field}.run_id: required"));
    }
    check_len(&format!("{field}.run_id"), &run.run_id, MAX_VALUE_LEN)?;
    if run.partition >= dagmesh_metastore::MAX_PARTITIONS {
        return Err(format!(
            "{field}.partition: {} is out of range (below {})",
            run.partition,
            dagmesh_metastore::MAX_PARTITIONS
        ));
    }
    if run.buckets.len() > MAX_BUCKETS {
        return Err(format!(
            "{field}.buckets: {} entries, over the limit of {MAX_BUCKETS}",
            run.buckets.len()
        ));
    }
    for bucket in &run.buckets {
        check_len(&format!("{field}.buckets"), bucket, MAX_VALUE_LEN)?;
    }
    Ok(OfferedRun {
        run_id: Arc::from(run.run_id),
        partition: run.partition,
        buckets: run.buckets,
        priority: run.priority,
    })
}

fn run_offer(run: &OfferedRun) -> pb::RunOffer {
    pb::RunOffer {
        run_id: run.run_id.to_string(),
        partition: run.partition,
        buckets: run.buckets.clone(),
        priority: run.priority,
    }
}

/// Checks an owner's message, naming the field that breaks a rule. `None`: an empty message.
fn decode_owner_message(message: OwnerMessage) -> Result<Option<ToDispatcher>, String> {
    use owner_message::Message;
    Ok(Some(match message.message {
        None => return Ok(None),
        Some(Message::Hello(_)) => return Err("hello: sent twice".into()),
        Some(Message::Offer(offer)) => {
            task_ref("offer", &offer.task_id)?;
            if offer.task_type.is_empty() {
                return Err("offer.task_type: required".into());
            }
            check_len("offer.task_type", &offer.task_type, MAX_NAME_LEN)?;
            check_len("offer.version_req", &offer.version_req, MAX_NAME_LEN)?;
            let version_req = semver::VersionReq::parse(&offer.version_req)
                .map_err(|error| format!("offer.version_req: {error}"))?;
            if offer.labels.len() > MAX_ENTRIES {
                return Err(format!(
                    "offer.labels: {} entries, over the limit of {MAX_ENTRIES}",
                    offer.labels.len()
                ));
            }
            for (key, value) in &offer.labels {
                check_len("offer.labels key", key, MAX_NAME_LEN)?;
                check_len(&format!("offer.labels.{key}"), value, MAX_VALUE_LEN)?;
            }
            check_len(
                "offer.concurrency_key",
                &offer.concurrency_key,
                MAX_NAME_LEN,
            )?;
            ToDispatcher::Offer {
                task_id: offer.task_id,
                attempt: offer.attempt,
                route: Arc::new(Route {
                    task_name: offer.task_type,
                    version_req,
                    labels: offer.labels.into_iter().collect::<BTreeMap<_, _>>(),
                    slots: slots("offer", offer.slots)?,
                    concurrency_key: offer.concurrency_key,
                }),
                priority: offer.priority,
            }
        }
        Some(Message::Withdraw(withdraw)) => {
            task_ref("withdraw", &withdraw.task_id)?;
            ToDispatcher::Withdraw {
                task_id: withdraw.task_id,
                attempt: withdraw.attempt,
            }
        }
        Some(Message::Decline(decline)) => {
            task_ref("decline", &decline.task_id)?;
            ToDispatcher::Decline {
                instance: instance("decline", &decline.instance_id)?,
                task_id: decline.task_id,
                attempt: decline.attempt,
            }
        }
        Some(Message::Held(held)) => {
            task_ref("held", &held.task_id)?;
            check_len("held.concurrency_key", &held.concurrency_key, MAX_NAME_LEN)?;
            ToDispatcher::Held {
                instance: instance("held", &held.instance_id)?,
                slots: slots("held", held.slots)?,
                task_id: held.task_id,
                attempt: held.attempt,
                concurrency_key: held.concurrency_key,
            }
        }
        Some(Message::ToWorker(to_worker)) => {
            let instance = instance("to_worker", &to_worker.instance_id)?;
            let message = match to_worker.message.and_then(|m| m.message) {
                Some(
                    message @ (server_message::Message::Assign(_)
                    | server_message::Message::Recorded(_)
                    | server_message::Message::Cancel(_)),
                ) => message,
                _ => {
                    return Err(
                        "to_worker.message: must be an Assign, a Recorded or a Cancel".into(),
                    );
                }
            };
            ToDispatcher::ToWorker { instance, message }
        }
        Some(Message::RunOffer(run)) => ToDispatcher::RunOffer(offered_run("run_offer", run)?),
        Some(Message::RunReleased(released)) => {
            if released.run_id.is_empty() {
                return Err("run_released.run_id: required".into());
            }
            check_len("run_released.run_id", &released.run_id, MAX_VALUE_LEN)?;
            ToDispatcher::RunReleased {
                run_id: Arc::from(released.run_id),
            }
        }
        Some(Message::AdmittedRuns(declared)) => {
            if declared.partitions.len() > dagmesh_metastore::MAX_PARTITIONS as usize {
                return Err(format!(
                    "admitted_runs.partitions: {} entries, over the limit of {}",
                    declared.partitions.len(),
                    dagmesh_metastore::MAX_PARTITIONS
                ));
            }
            if declared.runs.len() > MAX_DECLARED_RUNS {
                return Err(format!(
                    "admitted_runs.runs: {} entries, over the limit of {MAX_DECLARED_RUNS}",
                    declared.runs.len()
                ));
            }
            let runs = declared
                .runs
                .into_iter()
                .map(|run| offered_run("admitted_runs.runs", run))
                .collect::<Result<_, _>>()?;
            ToDispatcher::AdmittedRuns {
                partitions: declared.partitions,
                runs,
            }
        }
    }))
}

fn encode_to_owner(message: ToOwner) -> DispatcherMessage {
    use dispatcher_message::Message;
    let message = match message {
        ToOwner::Grant {
            task_id,
            attempt,
            instance,
            version,
            principal,
        } => Message::Grant(pb::TaskGrant {
            task_id,
            attempt,
            instance_id: instance.to_string(),
            version,
            principal: principal.to_string(),
        }),
        ToOwner::FromWorker { instance, message } => Message::FromWorker(pb::FromWorker {
            instance_id: instance.to_string(),
            message: Some(pb::WorkerMessage {
                message: Some(message),
            }),
        }),
        ToOwner::Lost {
            task_id,
            attempt,
            instance,
            reason,
        } => Message::Lost(pb::TaskLost {
            task_id,
            attempt,
            instance_id: instance.to_string(),
            reason,
        }),
        ToOwner::RunAdmitted { run_id } => Message::RunAdmitted(pb::RunAdmitted {
            run_id: run_id.to_string(),
        }),
    };
    DispatcherMessage {
        message: Some(message),
    }
}

fn encode_to_dispatcher(message: ToDispatcher) -> OwnerMessage {
    use owner_message::Message;
    let message = match message {
        ToDispatcher::Offer {
            task_id,
            attempt,
            route,
            priority,
        } => Message::Offer(pb::TaskOffer {
            task_id,
            attempt,
            task_type: route.task_name.clone(),
            version_req: route.version_req.to_string(),
            labels: route
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            slots: route.slots,
            concurrency_key: route.concurrency_key.clone(),
            priority,
        }),
        ToDispatcher::Withdraw { task_id, attempt } => Message::Withdraw(pb::PeerTaskRef {
            task_id,
            attempt,
            instance_id: String::new(),
        }),
        ToDispatcher::Decline {
            task_id,
            attempt,
            instance,
        } => Message::Decline(pb::PeerTaskRef {
            task_id,
            attempt,
            instance_id: instance.to_string(),
        }),
        ToDispatcher::Held {
            task_id,
            attempt,
            instance,
            slots,
            concurrency_key,
        } => Message::Held(pb::TaskHeld {
            task_id,
            attempt,
            instance_id: instance.to_string(),
            slots,
            concurrency_key,
        }),
        ToDispatcher::ToWorker { instance, message } => Message::ToWorker(pb::ToWorker {
            instance_id: instance.to_string(),
            message: Some(pb::ServerMessage {
                message: Some(message),
            }),
        }),
        ToDispatcher::RunOffer(run) => Message::RunOffer(run_offer(&run)),
        ToDispatcher::RunReleased { run_id } => Message::RunReleased(pb::RunReleased {
            run_id: run_id.to_string(),
        }),
        ToDispatcher::AdmittedRuns { partitions, runs } => {
            Message::AdmittedRuns(pb::AdmittedRuns {
                partitions,
                runs: runs.iter().map(run_offer).collect(),
            })
        }
    };
    OwnerMessage {
        message: Some(message),
    }
}

/// Checks the dispatcher's message, naming the field that breaks a rule.
fn decode_dispatcher_message(message: DispatcherMessage) -> Result<Option<ToOwner>, String> {
    use dispatcher_message::Message;
    Ok(Some(match message.message {
        None => return Ok(None),
        Some(Message::Grant(grant)) => {
            task_ref("grant", &grant.task_id)?;
            check_len("grant.version", &grant.version, MAX_NAME_LEN)?;
            check_len("grant.principal", &grant.principal, MAX_VALUE_LEN)?;
            ToOwner::Grant {
                instance: instance("grant", &grant.instance_id)?,
                task_id: grant.task_id,
                attempt: grant.attempt,
                version: grant.version,
                principal: Arc::from(grant.principal),
            }
        }
        Some(Message::FromWorker(from)) => {
            let instance = instance("from_worker", &from.instance_id)?;
            let Some(message) = from.message.and_then(|m| m.message) else {
                return Err("from_worker.message: required".into());
            };
            ToOwner::FromWorker { instance, message }
        }
        Some(Message::RunAdmitted(admitted)) => {
            if admitted.run_id.is_empty() {
                return Err("run_admitted.run_id: required".into());
            }
            check_len("run_admitted.run_id", &admitted.run_id, MAX_VALUE_LEN)?;
            ToOwner::RunAdmitted {
                run_id: Arc::from(admitted.run_id),
            }
        }
        Some(Message::Lost(lost)) => {
            task_ref("lost", &lost.task_id)?;
            ToOwner::Lost {
                instance: instance("lost", &lost.instance_id)?,
                task_id: lost.task_id,
                attempt: lost.attempt,
                reason: lost.reason,
            }
        }
    }))
}

/// The address of the replica that dispatches now (the executor lease's holder), if any.
async fn dispatcher_url(store: &Arc<dyn MetadataStore>) -> Option<String> {
    let leases = store.list_live_leases(EXECUTOR_LEASE).await.ok()?;
    let lease = leases.iter().find(|lease| lease.name == EXECUTOR_LEASE)?;
    holder_address(&lease.holder).map(str::to_owned)
}

/// On an owner: keeps a stream attached to the dispatcher until this replica dispatches itself
/// (`dispatching`) or the engine stops. While detached, what the engine has for the dispatcher
/// is dropped: on every attach the engine declares its tasks on workers and offers its ready
/// tasks again.
pub(crate) async fn link(
    store: Arc<dyn MetadataStore>,
    engine: EngineHandle,
    mut outbox: mpsc::UnboundedReceiver<ToDispatcher>,
    settings: ClientSettings,
    own_url: String,
    dispatching: Arc<AtomicBool>,
) {
    let mut logged_wait = false;
    loop {
        while outbox.try_recv().is_ok() {}
        if dispatching.load(Ordering::Acquire) || engine.is_closed() {
            return;
        }
        let url = match dispatcher_url(&store).await {
            Some(url) if url != own_url => url,
            _ => {
                if !logged_wait {
                    tracing::info!("no dispatcher to attach to yet; waiting");
                    logged_wait = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        logged_wait = false;
        match attach(
            &url,
            &engine,
            &mut outbox,
            &settings,
            &own_url,
            &dispatching,
        )
        .await
        {
            Ok(()) => tracing::info!(dispatcher = %url, "detached from the dispatcher"),
            Err(error) => {
                tracing::warn!(dispatcher = %url, %error, "cannot attach to the dispatcher; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn attach(
    url: &str,
    engine: &EngineHandle,
    outbox: &mut mpsc::UnboundedReceiver<ToDispatcher>,
    settings: &ClientSettings,
    own_url: &str,
    dispatching: &AtomicBool,
) -> Result<(), String> {
    let channel = settings
        .connect(url, |endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(10))
        })
        .await
        .map_err(|error| error.to_string())?;
    let mut client = PeerServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let (to_dispatcher, requests) = mpsc::unbounded_channel();
    let hello = OwnerMessage {
        message: Some(owner_message::Message::Hello(pb::OwnerHello {
            owner: own_url.to_owned(),
        })),
    };
    let _ = to_dispatcher.send(hello);
    let mut inbound = client
        .attach(UnboundedReceiverStream::new(requests))
        .await
        .map_err(|status| status.message().to_owned())?
        .into_inner();
    tracing::info!(dispatcher = %url, "attached to the dispatcher");
    engine
        .send(Command::DispatcherAttached)
        .await
        .map_err(|error| error.to_string())?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = outbox.recv() => {
                let Some(message) = message else {
                    return Ok(()); // the engine stopped
                };
                if to_dispatcher.send(encode_to_dispatcher(message)).is_err() {
                    return Ok(());
                }
            }
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status.message().to_owned()),
                };
                match decode_dispatcher_message(message) {
                    Ok(Some(message)) => {
                        if engine.send(Command::FromDispatcher(message)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => {}
                    Err(error) => return Err(format!("the dispatcher sent a bad message: {error}")),
                }
            }
            _ = check.tick() => {
                if dispatching.load(Ordering::Acquire) {
                    return Ok(());
                }
            }
        }
    }
}
