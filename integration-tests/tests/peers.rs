//! The dispatcher's end of `PeerService` (proto/dagmesh/v1/peer.proto), driven by a raw owner
//! over a real socket: what an owner offers reaches a worker connected to the dispatcher and
//! the worker's answers come back, the worker's slots are counted across owners, and an owner
//! that breaks the protocol is refused naming the field.

use std::time::Duration;

use dagmesh_integration_tests::*;
use dagmesh_proto::v1::{
    self as pb, dispatcher_message, owner_message, peer_service_client::PeerServiceClient,
    server_message, worker_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A raw owner attached to the executor at `url`.
struct RawOwner {
    tx: mpsc::UnboundedSender<pb::OwnerMessage>,
    inbound: tonic::Streaming<pb::DispatcherMessage>,
}

impl RawOwner {
    async fn attach(url: &str) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(message(owner_message::Message::Hello(pb::OwnerHello {
            owner: "http://raw-owner".into(),
        })))?;
        let inbound = PeerServiceClient::new(channel(url).await?)
            .attach(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawOwner { tx, inbound })
    }

    fn send(&self, message: owner_message::Message) -> anyhow::Result<()> {
        Ok(self.tx.send(self::message(message))?)
    }

    async fn next(&mut self) -> anyhow::Result<dispatcher_message::Message> {
        let next = tokio::time::timeout(PATIENCE, self.inbound.message()).await??;
        next.and_then(|m| m.message)
            .ok_or_else(|| anyhow::anyhow!("the dispatcher ended the stream"))
    }

    /// The status the dispatcher ends the stream with.
    async fn refusal(mut self) -> anyhow::Result<tonic::Status> {
        loop {
            match tokio::time::timeout(PATIENCE, self.inbound.message()).await? {
                Ok(Some(_)) => continue,
                Ok(None) => anyhow::bail!("the stream ended without an error"),
                Err(status) => return Ok(status),
            }
        }
    }
}

fn message(message: owner_message::Message) -> pb::OwnerMessage {
    pb::OwnerMessage {
        message: Some(message),
    }
}

fn offer(task_id: &str, slots: u32) -> owner_message::Message {
    owner_message::Message::Offer(pb::TaskOffer {
        task_id: task_id.into(),
        attempt: 1,
        task_type: "echo".into(),
        version_req: "^1".into(),
        slots,
        ..pb::TaskOffer::default()
    })
}

#[tokio::test]
async fn an_owners_offer_reaches_a_worker_here_and_its_answers_go_back() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (mut worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("w-1", "echo", "1.0.0", 1)).await?;
    let mut owner = RawOwner::attach(&sandbox.url()).await?;

    // Two offers for a one-slot worker: one grant, then the other once the first is answered.
    owner.send(offer("run-a/step", 1))?;
    owner.send(offer("run-b/step", 1))?;
    let dispatcher_message::Message::Grant(grant) = owner.next().await? else {
        anyhow::bail!("expected a grant");
    };
    assert_eq!(grant.instance_id, "w-1");
    assert_eq!(grant.version, "1.0.0");
    let first = grant.task_id.clone();
    // The owner assigns; the dispatcher relays the Assign to the worker.
    owner.send(owner_message::Message::ToWorker(pb::ToWorker {
        instance_id: "w-1".into(),
        message: Some(pb::ServerMessage {
            message: Some(server_message::Message::Assign(pb::Assign {
                task_id: first.clone(),
                attempt: 1,
                slots: 1,
                ..pb::Assign::default()
            })),
        }),
    }))?;
    let assign = worker.expect_assign().await?;
    assert_eq!(assign.task_id, first);
    // No second grant while the worker's only slot is taken.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), owner.inbound.message())
            .await
            .is_err(),
        "a second grant for a full worker"
    );
    // The worker's result goes to the owner, and frees the slot for the other offer.
    worker.start(&assign).await?;
    worker
        .complete(
            &assign.task_id,
            assign.attempt,
            serde_json::json!({"ok": true}),
        )
        .await?;
    let mut results = 0;
    let mut second = None;
    while results == 0 || second.is_none() {
        match owner.next().await? {
            dispatcher_message::Message::FromWorker(from) => {
                assert_eq!(from.instance_id, "w-1");
                if let Some(pb::WorkerMessage {
                    message: Some(worker_message::Message::Completed(done)),
                }) = from.message
                {
                    assert_eq!(done.task_id, first);
                    results += 1;
                }
            }
            dispatcher_message::Message::Grant(grant) => second = Some(grant),
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let second = second.expect("granted");
    assert_ne!(second.task_id, first);
    // Declined: the slot is free again (a new offer is granted at once).
    owner.send(owner_message::Message::Decline(pb::PeerTaskRef {
        task_id: second.task_id.clone(),
        attempt: 1,
        instance_id: "w-1".into(),
    }))?;
    owner.send(offer("run-c/step", 1))?;
    let dispatcher_message::Message::Grant(third) = owner.next().await? else {
        anyhow::bail!("expected a grant");
    };
    assert_eq!(third.task_id, "run-c/step");
    // The worker vanishes: the owner hears that its task was lost.
    worker.crash();
    let dispatcher_message::Message::Lost(lost) = owner.next().await? else {
        anyhow::bail!("expected the task lost");
    };
    assert_eq!(lost.task_id, "run-c/step");
    assert!(lost.reason.contains("w-1"), "{}", lost.reason);
    sandbox.stop().await
}

#[tokio::test]
async fn an_owner_that_breaks_the_protocol_is_refused_naming_the_field() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let long = "x".repeat(5000);
    let cases: Vec<(owner_message::Message, &str)> = vec![
        (offer("", 1), "offer.task_id: required"),
        (offer(&long, 1), "offer.task_id"),
        (offer("r/s", 0), "offer.slots: 0 is out of range"),
        (
            owner_message::Message::Offer(pb::TaskOffer {
                version_req: "not a version".into(),
                ..match offer("r/s", 1) {
                    owner_message::Message::Offer(o) => o,
                    _ => unreachable!(),
                }
            }),
            "offer.version_req",
        ),
        (
            owner_message::Message::Held(pb::TaskHeld {
                task_id: "r/s".into(),
                attempt: 1,
                instance_id: String::new(),
                slots: 1,
                concurrency_key: String::new(),
            }),
            "held.instance_id: required",
        ),
        (
            owner_message::Message::ToWorker(pb::ToWorker {
                instance_id: "w".into(),
                message: Some(pb::ServerMessage {
                    message: Some(server_message::Message::Drain(pb::Drain::default())),
                }),
            }),
            "to_worker.message: must be an Assign, a Recorded or a Cancel",
        ),
        (
            owner_message::Message::Hello(pb::OwnerHello::default()),
            "hello: sent twice",
        ),
        (
            owner_message::Message::RunOffer(pb::RunOffer::default()),
            "run_offer.run_id: required",
        ),
        (
            owner_message::Message::RunOffer(pb::RunOffer {
                run_id: "r".into(),
                partition: 1 << 20,
                ..pb::RunOffer::default()
            }),
            "run_offer.partition: 1048576 is out of range",
        ),
        (
            owner_message::Message::RunOffer(pb::RunOffer {
                run_id: "r".into(),
                buckets: vec!["b".into(); 65],
                ..pb::RunOffer::default()
            }),
            "run_offer.buckets: 65 entries, over the limit of 64",
        ),
        (
            owner_message::Message::AdmittedRuns(pb::AdmittedRuns {
                partitions: vec![0],
                runs: vec![pb::RunOffer {
                    run_id: long.clone(),
                    ..pb::RunOffer::default()
                }],
            }),
            "admitted_runs.runs.run_id",
        ),
        (
            owner_message::Message::RunReleased(pb::RunReleased::default()),
            "run_released.run_id: required",
        ),
    ];
    for (bad, expected) in cases {
        let owner = RawOwner::attach(&sandbox.url()).await?;
        owner.send(bad)?;
        let status = owner.refusal().await?;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{expected:?} not in {status:?}"
        );
    }
    // A stream that does not start with OwnerHello.
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(message(offer("r/s", 1)))?;
    let refused = PeerServiceClient::new(channel(&sandbox.url()).await?)
        .attach(UnboundedReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("OwnerHello"), "{refused:?}");
    // The executor serves everyone else all along.
    let applied = sandbox
        .client()
        .await?
        .apply_workflow(workflow("after", vec![step("only", "echo", &[], &[])]))
        .await?;
    assert_eq!(applied.name, "after");
    sandbox.stop().await
}

/// After the dispatcher changed (executors that share the partitions), a reconnecting worker's
/// tasks that no owner has declared yet are kept for a lease instead of cancelled: the owner
/// that declares one gets its result, and one nobody declares is cancelled after the lease.
#[tokio::test]
async fn a_new_dispatcher_keeps_a_workers_undeclared_tasks_for_their_owner() -> anyhow::Result<()> {
    let config = dagmesh_executor::ExecutorConfig {
        share_partitions: true,
        advertise_url: Some("http://sandbox.invalid:7070".into()),
        lease: Duration::from_secs(3),
        ..fast_config()
    };
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    let mut hello = RawWorker::hello("w-1", "echo", "1.0.0", 2);
    hello.in_flight = ["elsewhere-1/a", "elsewhere-2/a"]
        .map(|task_id| pb::TaskRef {
            task_id: task_id.into(),
            attempt: 1,
        })
        .to_vec();
    let (mut worker, welcome) = RawWorker::connect(&sandbox.url(), hello).await?;
    let mut resumed: Vec<&str> = welcome.resumed.iter().map(|t| t.task_id.as_str()).collect();
    resumed.sort_unstable();
    assert_eq!(resumed, ["elsewhere-1/a", "elsewhere-2/a"]);

    let mut owner = RawOwner::attach(&sandbox.url()).await?;
    owner.send(owner_message::Message::Held(pb::TaskHeld {
        task_id: "elsewhere-1/a".into(),
        attempt: 1,
        instance_id: "w-1".into(),
        slots: 1,
        concurrency_key: String::new(),
    }))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    worker
        .complete("elsewhere-1/a", 1, serde_json::json!({"done": true}))
        .await?;
    let dispatcher_message::Message::FromWorker(from) = owner.next().await? else {
        anyhow::bail!("expected the worker's result");
    };
    let Some(worker_message::Message::Completed(done)) = from.message.and_then(|m| m.message)
    else {
        anyhow::bail!("expected Completed");
    };
    assert_eq!(done.task_id, "elsewhere-1/a");

    // Nobody declares the other one: after the lease the worker is told to drop it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    worker.heartbeat().await?;
    let server_message::Message::Cancel(cancel) = worker.next().await? else {
        anyhow::bail!("expected a Cancel");
    };
    assert_eq!(cancel.task_id, "elsewhere-2/a");
    assert!(cancel.reason.contains("no executor claimed"), "{cancel:?}");
    sandbox.stop().await
}

/// A grant whose Assign never reached the dispatcher (the owner's stream broke first) is
/// reported lost when the owner declares the task on its next stream: the worker never had it.
#[tokio::test]
async fn a_grant_whose_assign_was_lost_with_the_stream_is_lost() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let (_worker, _) =
        RawWorker::connect(&sandbox.url(), RawWorker::hello("w-1", "echo", "1.0.0", 1)).await?;
    let mut owner = RawOwner::attach(&sandbox.url()).await?;
    owner.send(offer("run-a/step", 1))?;
    let dispatcher_message::Message::Grant(grant) = owner.next().await? else {
        anyhow::bail!("expected a grant");
    };
    drop(owner); // the stream breaks before the owner's Assign went out
    let mut again = RawOwner::attach(&sandbox.url()).await?;
    again.send(owner_message::Message::Held(pb::TaskHeld {
        task_id: grant.task_id.clone(),
        attempt: 1,
        instance_id: "w-1".into(),
        slots: 1,
        concurrency_key: String::new(),
    }))?;
    let dispatcher_message::Message::Lost(lost) = again.next().await? else {
        anyhow::bail!("expected the task lost");
    };
    assert_eq!(lost.task_id, grant.task_id);
    assert!(lost.reason.contains("did not reach the worker"), "{lost:?}");
    // Its slot is free: the next offer is granted to the same worker.
    again.send(offer("run-b/step", 1))?;
    let dispatcher_message::Message::Grant(next) = again.next().await? else {
        anyhow::bail!("expected a grant");
    };
    assert_eq!(next.task_id, "run-b/step");
    sandbox.stop().await
}

/// An owner that declares far more of a worker's slots than exist (65,536 per task, tens of
/// thousands of tasks) cannot overflow the dispatcher's count: the executor goes on serving.
#[tokio::test]
async fn declarations_past_every_slot_count_do_not_break_the_dispatcher() -> anyhow::Result<()> {
    // A lease long enough that the declared worker's session outlives the test.
    let config = dagmesh_executor::ExecutorConfig {
        lease: Duration::from_secs(120),
        ..fast_config()
    };
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    let owner = RawOwner::attach(&sandbox.url()).await?;
    for n in 0..70_000 {
        owner.send(owner_message::Message::Held(pb::TaskHeld {
            task_id: format!("run-{n}/step"),
            attempt: 1,
            instance_id: "w-greedy".into(),
            slots: 1 << 16,
            concurrency_key: String::new(),
        }))?;
    }
    // The engine read them all and still answers (a panic would have stopped it); the count
    // stops at the most it can hold.
    let mut cluster = dagmesh_proto::v1::cluster_service_client::ClusterServiceClient::new(
        channel(&sandbox.url()).await?,
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let workers = cluster
            .list_workers(pb::ListWorkersRequest::default())
            .await?
            .into_inner()
            .workers;
        let greedy = workers.iter().find(|w| w.instance_id == "w-greedy");
        if let Some(greedy) = greedy.filter(|w| w.tasks.len() == 70_000) {
            assert_eq!(greedy.used_slots, u32::MAX);
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the declarations never all arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = sandbox.client().await?;
    let run = client
        .submit(dagmesh_sdk::SubmitRun::inline(workflow(
            "after",
            vec![step("only", "echo", &[], &[])],
        )))
        .await?;
    assert!(!run.run_id.is_empty());
    sandbox.stop().await
}
