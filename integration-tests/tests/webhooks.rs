//! Durable webhooks against a real HTTP server started here, through a `dagmesh up` process
//! that is SIGKILLed while deliveries are still being refused: every event is delivered, none
//! lost, each signed (Standard Webhooks) and carrying an id a receiver can deduplicate on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use dagmesh_integration_tests::*;
use dagmesh_proto::v1 as pb;
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use hmac::{Hmac, Mac as _};
use serde_json::Value;

const SECRET: &str = "test-secret-for-webhooks";
/// Attempts the receiver refuses (503) before it accepts a delivery.
const REFUSALS: u32 = 2;

#[derive(Default)]
struct Received {
    /// Attempts per delivery id (refused and accepted).
    attempts: HashMap<String, u32>,
    /// Accepted deliveries: id -> (path, body).
    accepted: BTreeMap<String, (String, Value)>,
    /// Requests whose signature or id did not check.
    bad: Vec<String>,
}

async fn receive(
    received: Arc<Mutex<Received>>,
    path: &str,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let parsed: Value = serde_json::from_str(&body).unwrap_or_default();
    let mut received = received.lock().unwrap();
    if signature != expected || parsed["id"] != id.as_str() || id.is_empty() {
        received.bad.push(format!("{id} {signature} {body}"));
        return StatusCode::BAD_REQUEST;
    }
    let attempts = received.attempts.entry(id.clone()).or_default();
    *attempts += 1;
    if *attempts <= REFUSALS {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    received.accepted.insert(id, (path.to_owned(), parsed));
    StatusCode::NO_CONTENT
}

async fn start_receiver(received: Arc<Mutex<Received>>) -> anyhow::Result<String> {
    use axum::routing::post;
    let hook = received.clone();
    let filtered = received.clone();
    let app = axum::Router::new()
        .route(
            "/hook",
            post(move |headers: HeaderMap, body: String| {
                receive(hook.clone(), "/hook", headers, body)
            }),
        )
        .route(
            "/filtered",
            post(move |headers: HeaderMap, body: String| {
                receive(filtered.clone(), "/filtered", headers, body)
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

async fn start_up(
    name: &str,
    dir: &Path,
    port: u16,
    log_format: &str,
) -> anyhow::Result<ChildGuard> {
    let listen = format!("127.0.0.1:{port}");
    let data_dir = dir.join("data");
    let secret = dir.join("secret");
    let mut child = ChildGuard::spawn_with_env(
        name,
        &[
            "up",
            "--listen",
            &listen,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--no-auth",
            "--webhook-secret-file",
            secret.to_str().unwrap(),
            "--webhook-backoff",
            "200ms",
            "--log-format",
            log_format,
        ],
        &[],
        dir,
    )?;
    child.wait_ready(&format!("http://{listen}")).await?;
    Ok(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_webhook_is_delivered_signed_across_a_sigkill() -> anyhow::Result<()> {
    let received = Arc::new(Mutex::new(Received::default()));
    let receiver = start_receiver(received.clone()).await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n"))?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let mut up = start_up("up-1", dir.path(), port, "text").await?;

    let worker = Worker::builder(&url)
        .name("hooks")
        .slots(4)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .task(
            "hook.ok",
            "1.0.0",
            |_: TaskContext, input: Value| async move { Ok::<_, TaskError>(input) },
        )
        .task(
            "hook.fail",
            "1.0.0",
            |_: TaskContext, _: Value| async move {
                Err::<Value, _>(TaskError::fatal("broken on purpose"))
            },
        );
    connected(&spawn_worker(worker).await?).await?;

    let client = Client::connect(&url).await?;
    let mut failing = workflow(
        "hooked-fail",
        vec![step("broken", "hook.fail@^1", &[], &[])],
    );
    failing.notifications = vec![
        pb::Notification {
            url: format!("{receiver}/hook"),
            events: vec!["run.failed".into(), "step.failed".into()],
            filter: String::new(),
        },
        pb::Notification {
            url: format!("{receiver}/filtered"),
            events: vec!["run.failed".into()],
            filter: "event.run.tags.team == 'vision'".into(),
        },
    ];
    client.apply_workflow(failing).await?;
    client
        .apply_workflow(workflow(
            "hooked-ok",
            vec![step("fine", "hook.ok@^1", &[], &[])],
        ))
        .await?;

    let mut runs = Vec::new();
    for i in 0..4 {
        let team = if i % 2 == 0 { "vision" } else { "audio" };
        let run = client
            .submit(SubmitRun::workflow("hooked-fail").tag("team", team))
            .await?;
        runs.push(run.run_id);
    }
    for _ in 0..3 {
        let run = client
            .submit(
                SubmitRun::workflow("hooked-ok")
                    .notify(format!("{receiver}/hook"), ["run.succeeded"]),
            )
            .await?;
        runs.push(run.run_id);
    }
    for run_id in &runs {
        wait_for_run(&client, run_id).await?;
    }
    const EXPECTED: usize = 4 * 2 + 2 + 3;

    // Kill the process once every delivery has been refused at least once.
    let deadline = std::time::Instant::now() + PATIENCE;
    while received.lock().unwrap().attempts.len() < EXPECTED {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {} deliveries were attempted",
            received.lock().unwrap().attempts.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted_before = received.lock().unwrap().accepted.len();
    up.sigkill()?;
    assert!(
        accepted_before < EXPECTED,
        "every delivery was accepted before the kill; nothing was tested"
    );
    // The second process logs JSON, one object per line.
    let _up = start_up("up-2", dir.path(), port, "json").await?;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while received.lock().unwrap().accepted.len() < EXPECTED {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {} of {EXPECTED} deliveries arrived",
            received.lock().unwrap().accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No more than expected either (a repeat has the same id and is deduplicated here).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = std::mem::take(&mut *received.lock().unwrap());
    assert!(received.bad.is_empty(), "bad requests: {:?}", received.bad);
    assert_eq!(received.accepted.len(), EXPECTED, "{:?}", received.accepted);

    let mut events: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (path, body) in received.accepted.values() {
        let event = body["event"].as_str().unwrap_or_default().to_owned();
        *events.entry((path.clone(), event.clone())).or_default() += 1;
        assert!(
            runs.contains(
                &body["run"]["run_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            )
        );
        match event.as_str() {
            "run.failed" => assert_eq!(body["run"]["state"], "FAILED", "{body}"),
            "run.succeeded" => assert_eq!(body["run"]["state"], "SUCCEEDED", "{body}"),
            "step.failed" => {
                assert_eq!(body["step"]["step_id"], "broken", "{body}");
                assert!(
                    body["step"]["error"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("broken on purpose"),
                    "{body}"
                );
            }
            other => panic!("unexpected event {other}: {body}"),
        }
        if path == "/filtered" {
            assert_eq!(body["run"]["tags"]["team"], "vision", "{body}");
        }
    }
    let expected: BTreeMap<(String, String), usize> = [
        (("/hook".into(), "run.failed".into()), 4),
        (("/hook".into(), "step.failed".into()), 4),
        (("/hook".into(), "run.succeeded".into()), 3),
        (("/filtered".into(), "run.failed".into()), 2),
    ]
    .into_iter()
    .collect();
    assert_eq!(events, expected);

    // The attempts and answers, as an operator reads them.
    let output = std::process::Command::new(dagmesh_binary()?)
        .args([
            "--server",
            &url,
            "-o",
            "json",
            "webhooks",
            "deliveries",
            "--limit",
            "100",
        ])
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let listed: Value = serde_json::from_slice(&output.stdout)?;
    let deliveries = listed["deliveries"].as_array().cloned().unwrap_or_default();
    assert_eq!(deliveries.len(), EXPECTED, "{listed}");
    for delivery in &deliveries {
        assert_eq!(delivery["state"], "DELIVERED", "{delivery}");
        assert!(
            delivery["attempts"].as_u64().unwrap_or_default() > u64::from(REFUSALS),
            "{delivery}"
        );
        assert_eq!(delivery["last_status"], 204, "{delivery}");
    }
    let text = std::process::Command::new(dagmesh_binary()?)
        .args([
            "--server",
            &url,
            "webhooks",
            "deliveries",
            "--run",
            &runs[0],
        ])
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("DELIVERED") && text.contains("run.failed"),
        "{text}"
    );
    let log = std::fs::read_to_string(dir.path().join("up-2.log"))?;
    let mut lines = 0;
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let object: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("not a JSON log line ({e}): {line}"))?;
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 0, "no log lines from the JSON process");
    Ok(())
}

#[tokio::test]
async fn bad_notifications_are_refused_naming_the_field() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let client = sandbox.client().await?;
    let mut spec = workflow("bad-hooks", vec![step("a", "x@^1", &[], &[])]);
    spec.notifications = vec![pb::Notification {
        url: "ftp://example.com/x".into(),
        events: vec!["run.exploded".into()],
        filter: "event.run.state ==".into(),
    }];
    let error = client.apply_workflow(spec).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
    let message = error.message();
    for path in [
        "notifications[0].url",
        "notifications[0].events[0]",
        "notifications[0].filter",
    ] {
        assert!(message.contains(path), "{path} not named in: {message}");
    }
    client
        .apply_workflow(workflow("good-hooks", vec![step("a", "x@^1", &[], &[])]))
        .await?;
    let error = client
        .submit(SubmitRun::workflow("good-hooks").notify("not a url", ["run.failed"]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
    assert!(error.message().contains("notifications[0].url"), "{error}");
    sandbox.stop().await
}

/// The other events: a step waiting for approval, and a cancelled run; deliveries of a run are
/// listed over the API with their attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_and_cancellations_are_notified() -> anyhow::Result<()> {
    let received = Arc::new(Mutex::new(Received::default()));
    let receiver = start_receiver(received.clone()).await?;
    let mut config = fast_config();
    config.webhooks.secret = Some(Arc::from(SECRET.as_bytes()));
    config.webhooks.first_backoff = Duration::from_millis(50);
    let sandbox = Sandbox::start_with(Database::sqlite()?, config).await?;
    let client = sandbox.client().await?;
    let mut spec = workflow(
        "hooked-approval",
        vec![pb::StepSpec {
            id: "review".into(),
            approval: Some(pb::ApprovalSpec {
                message: "Ship it?".into(),
                timeout: String::new(),
            }),
            ..pb::StepSpec::default()
        }],
    );
    spec.notifications = vec![pb::Notification {
        url: format!("{receiver}/hook"),
        events: vec!["step.waiting_for_approval".into(), "run.cancelled".into()],
        filter: String::new(),
    }];
    client.apply_workflow(spec).await?;
    let run = client
        .submit(SubmitRun::workflow("hooked-approval"))
        .await?;
    let deadline = std::time::Instant::now() + PATIENCE;
    while received.lock().unwrap().accepted.is_empty() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no approval webhook");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.cancel_run(&run.run_id, "not today").await?;
    while received.lock().unwrap().accepted.len() < 2 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no cancellation webhook"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = std::mem::take(&mut *received.lock().unwrap());
    assert!(received.bad.is_empty(), "{:?}", received.bad);
    let bodies: Vec<&Value> = received.accepted.values().map(|(_, body)| body).collect();
    let waiting = bodies
        .iter()
        .find(|b| b["event"] == "step.waiting_for_approval")
        .expect("the approval event");
    assert_eq!(waiting["step"]["step_id"], "review");
    assert_eq!(waiting["step"]["message"], "Ship it?");
    let cancelled = bodies
        .iter()
        .find(|b| b["event"] == "run.cancelled")
        .expect("the cancellation event");
    assert_eq!(cancelled["run"]["state"], "CANCELLED");

    let mut webhooks =
        pb::webhook_service_client::WebhookServiceClient::new(sandbox.channel().await?);
    let listed = webhooks
        .list_deliveries(pb::ListDeliveriesRequest {
            run_id: run.run_id.clone(),
            limit: 0,
        })
        .await?
        .into_inner()
        .deliveries;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let refused = webhooks
        .list_deliveries(pb::ListDeliveriesRequest {
            run_id: String::new(),
            limit: 5000,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("limit"), "{refused:?}");
    sandbox.stop().await
}
