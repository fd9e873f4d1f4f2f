//! The built-in KEDA external scaler, driven exactly as KEDA drives it (GetMetricSpec,
//! IsActive, StreamIsActive, GetMetrics with a ScaledObject's scalerMetadata) while tasks are
//! queued, dispatched and drained; and `ListQueues`, the same numbers for humans.

use std::collections::HashMap;
use std::time::Duration;

use dagmesh_integration_tests::*;
use dagmesh_proto::externalscaler::{
    GetMetricsRequest, IsActiveResponse, ScaledObjectRef,
    external_scaler_client::ExternalScalerClient,
};
use dagmesh_proto::v1::{
    self as pb, ListQueuesRequest, cluster_service_client::ClusterServiceClient,
};
use dagmesh_sdk::SubmitRun;

fn scaled_object(metadata: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "room-scan-worker".into(),
        namespace: "dagmesh".into(),
        scaler_metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

type Scaler = ExternalScalerClient<dagmesh_proto::connect::AuthChannel>;

async fn wanted(scaler: &mut Scaler, object: &ScaledObjectRef) -> anyhow::Result<f64> {
    let response = scaler
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: "dagmesh_wanted_slots_keda_work".into(),
        })
        .await?
        .into_inner();
    anyhow::ensure!(response.metric_values.len() == 1, "{response:?}");
    let value = &response.metric_values[0];
    assert_eq!(value.metric_name, "dagmesh_wanted_slots_keda_work");
    assert_eq!(value.metric_value as f64, value.metric_value_float);
    Ok(value.metric_value_float)
}

async fn until_wanted(
    scaler: &mut Scaler,
    object: &ScaledObjectRef,
    expected: f64,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let value = wanted(scaler, object).await?;
        if value == expected {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "GetMetrics stayed at {value}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_active(stream: &mut tonic::Streaming<IsActiveResponse>) -> anyhow::Result<bool> {
    let message = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .map_err(|_| anyhow::anyhow!("StreamIsActive pushed nothing within 5 s"))??
        .ok_or_else(|| anyhow::anyhow!("StreamIsActive ended"))?;
    Ok(message.result)
}

#[tokio::test]
async fn keda_scales_a_pool_from_zero_on_its_own_queue() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let channel = sandbox.channel().await?;
    let mut scaler = ExternalScalerClient::new(channel.clone());
    let mut cluster = ClusterServiceClient::new(channel);
    let client = sandbox.client().await?;

    let pool = scaled_object(&[
        ("taskType", "keda.work"),
        ("version", "1.0.0"),
        ("tasksPerReplica", "2"),
    ]);
    // A pool of another major version, and one of another task type: never counted here.
    let other_version = scaled_object(&[("taskType", "keda.work"), ("version", "2.0.0")]);
    let other_task = scaled_object(&[("taskType", "keda.other")]);

    let spec = scaler.get_metric_spec(pool.clone()).await?.into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(
        spec.metric_specs[0].metric_name,
        "dagmesh_wanted_slots_keda_work"
    );
    assert_eq!(spec.metric_specs[0].target_size_float, 2.0);
    assert_eq!(spec.metric_specs[0].target_size, 2);

    // Idle: scaled to zero, and the stream says so at once.
    assert!(!scaler.is_active(pool.clone()).await?.into_inner().result);
    let mut stream = scaler.stream_is_active(pool.clone()).await?.into_inner();
    assert!(!next_active(&mut stream).await?);
    assert_eq!(wanted(&mut scaler, &pool).await?, 0.0);

    // Three tasks queued for a pool with no workers: the stream pushes at once.
    client
        .apply_workflow(workflow(
            "keda-fanout",
            vec![
                step("a", "keda.work@^1", &[], &[]),
                step("b", "keda.work@^1", &[], &[]),
                step("c", "keda.work@^1", &[], &[]),
            ],
        ))
        .await?;
    let queued_at = std::time::Instant::now();
    let run = client.submit(SubmitRun::workflow("keda-fanout")).await?;
    assert!(
        next_active(&mut stream).await?,
        "the stream must push active"
    );
    let pushed_after = queued_at.elapsed();
    assert!(
        pushed_after < Duration::from_secs(2),
        "scale-from-zero waited {pushed_after:?}"
    );
    assert!(scaler.is_active(pool.clone()).await?.into_inner().result);
    assert_eq!(wanted(&mut scaler, &pool).await?, 3.0);
    assert_eq!(wanted(&mut scaler, &other_version).await?, 0.0);
    assert!(
        !scaler
            .is_active(other_task.clone())
            .await?
            .into_inner()
            .result
    );

    let queues = cluster
        .list_queues(ListQueuesRequest {
            task_type: "keda.work".into(),
        })
        .await?
        .into_inner()
        .queues;
    assert_eq!(queues.len(), 1, "{queues:?}");
    assert_eq!(queues[0].version_requirement, "^1");
    assert_eq!(queues[0].queued, 3);
    assert_eq!(queues[0].running, 0);
    assert_eq!(queues[0].matching_workers, 0);
    assert!(queues[0].oldest_age.is_some());

    // One worker with one slot connects: a task is dispatched; the pool is still wanted for
    // the running task and the two queued ones.
    let (mut worker, _) = RawWorker::connect(
        &sandbox.url(),
        RawWorker::hello("keda-1", "keda.work", "1.0.0", 1),
    )
    .await?;
    let first = worker.expect_assign().await?;
    worker.start(&first).await?;
    until_wanted(&mut scaler, &pool, 3.0).await?;
    let queue = &cluster
        .list_queues(ListQueuesRequest::default())
        .await?
        .into_inner()
        .queues[0];
    assert_eq!((queue.queued, queue.running), (2, 1), "{queue:?}");
    assert_eq!(
        (queue.matching_workers, queue.free_slots),
        (1, 0),
        "{queue:?}"
    );

    // Drain the queue task by task; the metric follows.
    let mut assign = first;
    for left in [2.0, 1.0, 0.0] {
        worker
            .complete(&assign.task_id, assign.attempt, serde_json::json!({}))
            .await?;
        until_wanted(&mut scaler, &pool, left).await?;
        if left > 0.0 {
            assign = loop {
                match worker.next().await? {
                    pb::server_message::Message::Assign(next) => break next,
                    _ => continue, // Recorded
                }
            };
            worker.start(&assign).await?;
        }
    }
    // Drained: the stream pushes inactive (scale back to zero).
    assert!(
        !next_active(&mut stream).await?,
        "the stream must push inactive"
    );
    assert!(!scaler.is_active(pool.clone()).await?.into_inner().result);
    let done = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&done);
    assert!(
        cluster
            .list_queues(ListQueuesRequest::default())
            .await?
            .into_inner()
            .queues
            .is_empty()
    );
    sandbox.stop().await
}

#[tokio::test]
async fn bad_scaler_metadata_is_refused_naming_the_key() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let mut scaler = ExternalScalerClient::new(sandbox.channel().await?);
    for (metadata, named) in [
        (vec![], "scalerMetadata.taskType"),
        (
            vec![("taskType", "x"), ("version", "^1")],
            "scalerMetadata.version",
        ),
        (
            vec![("taskType", "x"), ("labels", "gpu")],
            "scalerMetadata.labels",
        ),
        (
            vec![("taskType", "x"), ("tasksPerReplica", "-1")],
            "scalerMetadata.tasksPerReplica",
        ),
    ] {
        let status = scaler
            .is_active(scaled_object(&metadata))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(named), "{status:?}");
        let status = scaler
            .stream_is_active(scaled_object(&metadata))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let status = scaler
        .get_metrics(GetMetricsRequest::default())
        .await
        .expect_err("refused");
    assert!(status.message().contains("scaledObjectRef"), "{status:?}");
    sandbox.stop().await
}
