//! Executor partitions: every commit is fenced by the lease of each partition it touches, so a
//! partition another holder took is dropped from the executor's memory (its runs untouched in
//! the store) while the other partitions go on, and it is driven again, from the store, once
//! its lease comes back.

use std::time::{Duration, Instant};

use dagmesh_integration_tests::*;
use dagmesh_metastore::ownership::partition_of;
use dagmesh_metastore::{MetadataStore, StoreError};
use dagmesh_proto::connect::AuthChannel;
use dagmesh_proto::v1::{
    self as pb, RunState, StepState, SubmitRunRequest, run_service_client::RunServiceClient,
    submit_run_request,
};
use dagmesh_sdk::{Client, SubmitRun};

/// The cluster's partition count in these tests (the executor's default).
const PARTITIONS: u32 = 256;

fn reviewed() -> pb::WorkflowSpec {
    workflow(
        "reviewed",
        vec![pb::StepSpec {
            id: "review".into(),
            approval: Some(pb::ApprovalSpec {
                message: "ship it?".into(),
                timeout: String::new(),
            }),
            ..pb::StepSpec::default()
        }],
    )
}

/// An idempotency key (`prefix-N`) whose runs land in a partition that `wanted` accepts.
fn key_where(prefix: &str, wanted: impl Fn(u32) -> bool) -> (String, u32) {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .map(|key| {
            let partition = partition_of(&key, PARTITIONS);
            (key, partition)
        })
        .find(|(_, partition)| wanted(*partition))
        .expect("some key fits")
}

async fn submit_keyed(client: &Client, key: &str) -> anyhow::Result<pb::Run> {
    Ok(client
        .submit(SubmitRun::inline(reviewed()).idempotency_key(key))
        .await?)
}

async fn approve(
    runs: &mut RunServiceClient<AuthChannel>,
    run_id: &str,
) -> Result<pb::Run, tonic::Status> {
    runs.approve_step(pb::ApproveStepRequest {
        run_id: run_id.into(),
        step_id: "review".into(),
        approve: true,
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Takes the lease of `partition` from the executor as another executor would once it
/// expired: released under the executor's feet, then acquired by `thief` (epoch + 1).
async fn steal(
    store: &dyn MetadataStore,
    partition: u32,
    ttl: Duration,
) -> anyhow::Result<dagmesh_metastore::Lease> {
    let name = format!("executor/p-{partition}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let held = store
            .list_live_leases(&name)
            .await?
            .into_iter()
            .find(|lease| lease.name == name);
        if let Some(held) = held {
            let _ = store.release_lease(&held).await;
        }
        match store.acquire_lease(&name, "thief", ttl).await {
            Ok(lease) => return Ok(lease),
            // The executor took it back between the two calls: again.
            Err(StoreError::LeaseHeld { .. }) if Instant::now() < deadline => {}
            Err(error) => return Err(error.into()),
        }
    }
}

#[tokio::test]
async fn a_partition_taken_by_another_holder_is_dropped_and_driven_again_when_it_returns()
-> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let client = sandbox.client().await?;
    let mut runs = RunServiceClient::new(sandbox.channel().await?);
    let store = dagmesh_metastore::connect(&sandbox.database.url()).await?;

    let (key_a, partition_a) = key_where("a", |_| true);
    let (key_b, partition_b) = key_where("b", |partition| partition != partition_a);
    let run_a = submit_keyed(&client, &key_a).await?;
    let run_b = submit_keyed(&client, &key_b).await?;
    assert_eq!(run_a.partition, partition_a);
    assert_eq!(run_b.partition, partition_b);
    let executors_lease = store
        .list_live_leases(&format!("executor/p-{partition_a}"))
        .await?;
    assert_eq!(
        executors_lease.len(),
        1,
        "the executor holds each partition"
    );

    let thief_ttl = Duration::from_secs(3);
    let thief = steal(store.as_ref(), partition_a, thief_ttl).await?;
    assert_eq!(thief.epoch, executors_lease[0].epoch + 1);

    // Approving run A now: the executor's commit is fenced by the stolen lease (ABORTED: its
    // change was not applied), or it has already dropped the partition (UNAVAILABLE).
    let status = approve(&mut runs, &run_a.run_id)
        .await
        .expect_err("partition taken");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Aborted | tonic::Code::Unavailable
        ),
        "{status:?}"
    );
    let stored = store.get_run(&run_a.run_id).await?;
    assert_eq!(
        stored.state(),
        RunState::Running,
        "nothing of it was written"
    );
    assert_eq!(stored.steps[0].state(), StepState::Running);
    // Once dropped, calls about its runs say to retry, naming the partition.
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        let status = approve(&mut runs, &run_a.run_id).await.expect_err("taken");
        if status.code() == tonic::Code::Unavailable || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("partition {partition_a}")),
        "{}",
        status.message()
    );
    // So do submits whose key belongs there, while runs of other partitions go on.
    let (key_a2, _) = key_where("a2", |partition| partition == partition_a);
    let raw_submit = SubmitRunRequest {
        workflow_ref: Some(submit_run_request::WorkflowRef::Spec(reviewed())),
        idempotency_key: key_a2,
        ..Default::default()
    };
    let status = runs
        .submit_run(raw_submit)
        .await
        .expect_err("partition taken");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    approve(&mut runs, &run_b.run_id).await?;
    assert_eq!(
        wait_for_run(&client, &run_b.run_id).await?.state(),
        RunState::Succeeded
    );
    let unkeyed = client.submit(SubmitRun::inline(reviewed())).await?;
    assert_ne!(unkeyed.partition, partition_a, "an unkeyed run avoids it");

    // The thief's lease runs out; the executor takes the partition again and drives run A
    // from the store.
    let deadline = Instant::now() + PATIENCE;
    let approved = loop {
        match approve(&mut runs, &run_a.run_id).await {
            Ok(run) => break run,
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Aborted
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => anyhow::bail!("run A never came back: {status:?}"),
        }
    };
    assert_eq!(approved.run_id, run_a.run_id);
    let done = wait_for_run(&client, &run_a.run_id).await?;
    assert_eq!(done.state(), RunState::Succeeded);
    let retaken = store
        .list_live_leases(&format!("executor/p-{partition_a}"))
        .await?;
    assert_eq!(
        retaken[0].epoch,
        thief.epoch + 1,
        "taken anew after the thief"
    );
    assert_ne!(retaken[0].holder, "thief");
    // The run was approved once: one SUCCEEDED for the step, one for the run.
    let events = all_events(sandbox.channel().await?, &run_a.run_id).await?;
    assert_eq!(
        step_states(&events, "review")
            .iter()
            .filter(|s| *s == "SUCCEEDED")
            .count(),
        1
    );
    sandbox.stop().await
}

/// A stored run whose partition is outside the cluster's count (a damaged or forged row) is
/// quarantined when the executor recovers, instead of never being driven by anyone.
#[tokio::test]
async fn a_run_stored_outside_every_partition_is_quarantined_at_recovery() -> anyhow::Result<()> {
    use prost::Message as _;
    use sqlx::Connection as _;
    let sandbox = Sandbox::start().await?;
    let client = sandbox.client().await?;
    let run = client.submit(SubmitRun::inline(reviewed())).await?;
    let Sandbox { mesh, database, .. } = sandbox;
    mesh.shutdown().await?;

    let mut stored = dagmesh_metastore::connect(&database.url())
        .await?
        .get_run(&run.run_id)
        .await?;
    assert_eq!(stored.state(), RunState::Running);
    stored.steps.clear(); // the run row's body holds the run without its steps
    stored.partition = 9999;
    let mut db = sqlx::SqliteConnection::connect(&database.url()).await?;
    let updated = sqlx::query("UPDATE runs SET body = ?1 WHERE run_id = ?2")
        .bind(stored.encode_to_vec())
        .bind(&run.run_id)
        .execute(&mut db)
        .await?;
    assert_eq!(updated.rows_affected(), 1);
    db.close().await?;

    let sandbox = Sandbox::start_with(database, fast_config()).await?;
    let client = sandbox.client().await?;
    let ended = client.get_run(&run.run_id).await?;
    assert_eq!(ended.state(), RunState::Failed);
    assert!(
        ended
            .error
            .contains("partition 9999 is outside the cluster's 256 partitions"),
        "{}",
        ended.error
    );
    // The server goes on serving.
    let next = client.submit(SubmitRun::inline(reviewed())).await?;
    assert_eq!(next.state(), RunState::Running);
    sandbox.stop().await
}
