//! OpenTelemetry end to end: a real `dagmesh up` exports a span per run, step and attempt over
//! OTLP/gRPC to a receiver inside this test, flushes them when SIGTERM stops it, and the
//! worker's own span for each attempt continues the trace through the Assign's `traceparent`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dagmesh_integration_tests::{
    ChildGuard, PATIENCE, assert_succeeded, free_port, step, workflow,
};
use dagmesh_proto::v1::RetryPolicy;
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, filter::Targets};

/// The service name `dagmesh up` reports when OTEL_SERVICE_NAME is not set.
const SERVER_SERVICE: &str = "dagmesh";
const WORKER_SERVICE: &str = "telemetry-test-worker";
const WORKER_ID: &str = "traced-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_exports_run_step_and_attempt_spans_and_workers_continue_the_trace() -> anyhow::Result<()>
{
    let (receiver_url, mut received) = start_receiver().await?;
    let worker_traces = install_worker_tracing(&receiver_url)?;

    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let database = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let mut up = ChildGuard::spawn_with_env(
        "up",
        &[
            "up",
            "--listen",
            &listen,
            "--database",
            &database,
            "--no-auth",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver_url.as_str()),
            // Longer than the test: every span has to come out through the shutdown flush.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
        dir.path(),
    )?;
    up.wait_ready(&url).await?;

    // Every attempt's traceparent as the handler saw it, by (step, attempt).
    let seen: Arc<Mutex<HashMap<(String, u32), String>>> = Arc::default();
    let seen_by_handler = seen.clone();
    let worker = Worker::builder(&url)
        .name("traced")
        .instance_id(WORKER_ID)
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .task(
            "flaky.step",
            "1.0.0",
            move |ctx: TaskContext, _input: Value| {
                let seen = seen_by_handler.clone();
                async move {
                    let key = (ctx.step_id().to_owned(), ctx.attempt());
                    let parent = ctx.traceparent().unwrap_or_default().to_owned();
                    seen.lock().expect("lock").insert(key, parent);
                    if ctx.step_id() == "b" && ctx.attempt() == 1 {
                        return Err(TaskError::retryable("flaky on purpose"));
                    }
                    Ok(json!({ "ok": true }))
                }
            },
        )
        .build()?;
    let handle = worker.handle();
    let worker_task = tokio::spawn(worker.run_until(std::future::pending()));
    tokio::time::timeout(PATIENCE, handle.wait_for(|state| state.connected))
        .await
        .context("the worker never connected")?;

    let mut retried = step("b", "flaky.step@^1", &["a"], &[]);
    retried.retry = Some(RetryPolicy {
        max_attempts: 3,
        initial_backoff: "50ms".into(),
        ..RetryPolicy::default()
    });
    let spec = workflow(
        "traced",
        vec![step("a", "flaky.step@^1", &[], &[]), retried],
    );
    let client = Client::connect(&url).await?;
    let run = client.submit(SubmitRun::inline(spec)).await?;
    let run = tokio::time::timeout(PATIENCE, client.wait_for_run(&run.run_id))
        .await
        .context("the run did not end in time")??;
    assert_succeeded(&run);
    let run_id = run.run_id.clone();

    // Graceful shutdown flushes: everything must be at the receiver once the process is gone,
    // although the batch delay has not passed.
    up.sigterm()?;
    let status = up.wait_exit(Duration::from_secs(15)).await?;
    assert!(
        status.success(),
        "dagmesh up exited with {status}{}",
        up.context()
    );
    handle.abort();
    let _ = worker_task.await;
    let at_exit = drain(&mut received);
    let server = by_service(&at_exit, SERVER_SERVICE);
    // The worker's spans go out from this process; flush them here.
    tokio::task::spawn_blocking(move || worker_traces.shutdown()).await??;
    let from_worker = wait_for(&mut received, WORKER_SERVICE, 3).await?;

    // The executor's spans: one run, one per step, one per attempt, all in the run's trace.
    let trace_id = uuid::Uuid::parse_str(&run_id)?.as_bytes().to_vec();
    let executor: Vec<&Span> = server
        .iter()
        .copied()
        .filter(|span| text(span, "dagmesh.run_id").is_some())
        .collect();
    for span in &executor {
        assert_eq!(
            span.trace_id, trace_id,
            "span {:?} is not in the run's trace",
            span.name
        );
        assert_eq!(
            text(span, "dagmesh.run_id").as_deref(),
            Some(run_id.as_str())
        );
        assert_eq!(text(span, "dagmesh.workflow").as_deref(), Some("traced"));
        assert!(span.start_time_unix_nano <= span.end_time_unix_nano);
    }
    let runs: Vec<&Span> = executor
        .iter()
        .copied()
        .filter(|span| text(span, "dagmesh.step_id").is_none())
        .collect();
    assert_eq!(runs.len(), 1, "run spans: {:?}", names(&runs));
    let run_span = runs[0];
    assert!(
        run_span.parent_span_id.is_empty(),
        "the run span is the root"
    );
    assert_eq!(
        text(run_span, "dagmesh.state").as_deref(),
        Some("succeeded")
    );

    let steps: HashMap<String, &Span> = executor
        .iter()
        .filter(|span| text(span, "dagmesh.step_id").is_some())
        .filter(|span| int(span, "dagmesh.attempt").is_none())
        .map(|span| (text(span, "dagmesh.step_id").expect("filtered"), *span))
        .collect();
    assert_eq!(
        steps.len(),
        2,
        "step spans: {:?}",
        names(&steps.values().copied().collect::<Vec<_>>())
    );
    for (step_id, span) in &steps {
        assert_eq!(
            span.parent_span_id, run_span.span_id,
            "step {step_id} is not under the run"
        );
        assert_eq!(text(span, "dagmesh.state").as_deref(), Some("succeeded"));
        within(span, run_span);
    }

    let is_phase =
        |span: &Span| span.name.starts_with("queued ") || span.name.starts_with("dispatched ");
    let attempts: Vec<&Span> = executor
        .iter()
        .copied()
        .filter(|span| int(span, "dagmesh.attempt").is_some() && !is_phase(span))
        .collect();
    // Each attempt's phases: queued (under the step) and dispatched (under the attempt).
    for (step_id, attempt) in [("a", 1), ("b", 1), ("b", 2)] {
        let phase = |prefix: &str| {
            executor
                .iter()
                .copied()
                .find(|span| {
                    span.name == format!("{prefix} {step_id}")
                        && int(span, "dagmesh.attempt") == Some(attempt)
                })
                .unwrap_or_else(|| panic!("no {prefix} span of {step_id}#{attempt}"))
        };
        let attempt_span = attempts
            .iter()
            .find(|span| attempt_key(span) == (step_id.to_owned(), attempt))
            .expect("the attempt span");
        assert_eq!(phase("queued").parent_span_id, steps[step_id].span_id);
        assert_eq!(phase("dispatched").parent_span_id, attempt_span.span_id);
        assert!(
            phase("queued").end_time_unix_nano <= attempt_span.start_time_unix_nano + 1_000_000
        );
    }
    let mut keys: Vec<(String, i64)> = attempts.iter().map(|span| attempt_key(span)).collect();
    keys.sort();
    assert_eq!(
        keys,
        [("a".into(), 1), ("b".into(), 1), ("b".into(), 2)],
        "one span per attempt"
    );
    let seen = seen.lock().expect("lock").clone();
    for span in &attempts {
        let (step_id, attempt) = attempt_key(span);
        let parent = steps[&step_id];
        assert_eq!(
            span.parent_span_id, parent.span_id,
            "attempt {step_id}#{attempt} is not under its step"
        );
        within(span, parent);
        assert_eq!(text(span, "dagmesh.worker").as_deref(), Some(WORKER_ID));
        assert_eq!(
            text(span, "dagmesh.task").as_deref(),
            Some("flaky.step@1.0.0")
        );
        let status = span.status.clone().unwrap_or_default();
        if (step_id.as_str(), attempt) == ("b", 1) {
            assert_eq!(status.code(), StatusCode::Error, "the failed attempt");
            assert!(
                status.message.contains("flaky on purpose"),
                "status message {:?}",
                status.message
            );
            assert_eq!(text(span, "dagmesh.state").as_deref(), Some("failed"));
        } else {
            assert_ne!(status.code(), StatusCode::Error, "{step_id}#{attempt}");
            assert_eq!(text(span, "dagmesh.state").as_deref(), Some("succeeded"));
        }
        // What the step code got is this very span.
        let expected = format!("00-{}-{}-01", hex(&span.trace_id), hex(&span.span_id));
        assert_eq!(
            seen.get(&(step_id.clone(), attempt as u32)),
            Some(&expected),
            "traceparent of {step_id}#{attempt}"
        );
    }

    // The worker's span for each attempt is a child of that attempt's span.
    let worker_spans: Vec<&Span> = by_service(&from_worker, WORKER_SERVICE)
        .into_iter()
        .filter(|span| span.name == "task")
        .collect();
    assert_eq!(
        worker_spans.len(),
        3,
        "worker spans: {:?}",
        names(&worker_spans)
    );
    let mut parents: Vec<&[u8]> = worker_spans
        .iter()
        .map(|span| span.parent_span_id.as_slice())
        .collect();
    let mut attempt_ids: Vec<&[u8]> = attempts
        .iter()
        .map(|span| span.span_id.as_slice())
        .collect();
    parents.sort();
    attempt_ids.sort();
    assert_eq!(
        parents, attempt_ids,
        "worker spans are not under the attempts"
    );
    for span in &worker_spans {
        assert_eq!(
            span.trace_id, trace_id,
            "worker span outside the run's trace"
        );
    }
    Ok(())
}

/// Spans as received, each with its resource's `service.name`.
type Received = Vec<(String, Span)>;

#[derive(Clone)]
struct Receiver {
    tx: mpsc::UnboundedSender<ExportTraceServiceRequest>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.tx.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC trace receiver on 127.0.0.1:0: its URL and what it receives.
async fn start_receiver()
-> anyhow::Result<(String, mpsc::UnboundedReceiver<ExportTraceServiceRequest>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { tx }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok((url, rx))
}

fn flatten(request: ExportTraceServiceRequest, into: &mut Received) {
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(string_value)
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            into.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
        }
    }
}

/// What has arrived so far.
fn drain(received: &mut mpsc::UnboundedReceiver<ExportTraceServiceRequest>) -> Received {
    let mut spans = Vec::new();
    while let Ok(request) = received.try_recv() {
        flatten(request, &mut spans);
    }
    spans
}

/// Waits (bounded) until at least `count` spans of `service` have arrived; returns all spans
/// received meanwhile.
async fn wait_for(
    received: &mut mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
    service: &str,
    count: usize,
) -> anyhow::Result<Received> {
    let mut spans = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while spans.iter().filter(|(s, _)| s == service).count() < count {
        match tokio::time::timeout_at(deadline, received.recv()).await {
            Ok(Some(request)) => flatten(request, &mut spans),
            Ok(None) => bail!("the receiver stopped"),
            Err(_) => bail!(
                "only {} spans of {service} arrived",
                spans.iter().filter(|(s, _)| s == service).count()
            ),
        }
    }
    Ok(spans)
}

fn by_service<'a>(spans: &'a Received, service: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|(s, _)| s == service)
        .map(|(_, span)| span)
        .collect()
}

/// This process plays a worker that exports its `tracing` spans (the SDK's per-task span) to
/// the receiver, as a worker in production would.
fn install_worker_tracing(receiver_url: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(receiver_url)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(WORKER_SERVICE)
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("telemetry-test"))
        .with_filter(Targets::new().with_target("dagmesh_sdk", tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .context("installing the test's tracing subscriber")?;
    Ok(provider)
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a KeyValue> {
    span.attributes.iter().find(|kv| kv.key == key)
}

fn string_value(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn text(span: &Span, key: &str) -> Option<String> {
    attr(span, key).and_then(string_value)
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)?.value.as_ref()?.value.as_ref()? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn attempt_key(span: &Span) -> (String, i64) {
    (
        text(span, "dagmesh.step_id").unwrap_or_default(),
        int(span, "dagmesh.attempt").unwrap_or_default(),
    )
}

/// `inner` lies within `outer` in time.
fn within(inner: &Span, outer: &Span) {
    assert!(
        outer.start_time_unix_nano <= inner.start_time_unix_nano
            && inner.end_time_unix_nano <= outer.end_time_unix_nano,
        "span {:?} is not within {:?}",
        inner.name,
        outer.name
    );
}

fn names(spans: &[&Span]) -> Vec<String> {
    spans.iter().map(|span| span.name.clone()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Traces leave over TLS when the endpoint is https://, trusting the CA named by the standard
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` (a collector behind a private CA, as in most clusters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_go_to_an_https_collector() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dagmesh_integration_tests::pki::TestPki::create(dir.path(), "")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_url = format!("https://localhost:{}", listener.local_addr()?.port());
    let (tx, mut received) = mpsc::unbounded_channel();
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(&pki.server_cert)?,
        std::fs::read(&pki.server_key)?,
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
            .add_service(TraceServiceServer::new(Receiver { tx }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let database = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let ca = pki.ca.display().to_string();
    let mut up = ChildGuard::spawn_with_env(
        "up",
        &[
            "up",
            "--listen",
            &listen,
            "--database",
            &database,
            "--no-auth",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver_url.as_str()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        dir.path(),
    )?;
    up.wait_ready(&url).await?;
    // No worker serves it: cancelling ends the run, and with it the run's span.
    let client = Client::connect(&url).await?;
    let spec = dagmesh_integration_tests::workflow(
        "tls-traced",
        vec![dagmesh_integration_tests::step(
            "only",
            "nobody.serves@^1",
            &[],
            &[],
        )],
    );
    let run = client.submit(SubmitRun::inline(spec)).await?;
    client.cancel_run(&run.run_id, "done").await?;
    let spans = wait_for(&mut received, "dagmesh", 1).await?;
    assert!(
        by_service(&spans, "dagmesh")
            .iter()
            .any(|span| text(span, "dagmesh.run_id").as_deref() == Some(run.run_id.as_str())),
        "the run's span arrived over TLS: {:?}",
        names(&by_service(&spans, "dagmesh"))
    );
    Ok(())
}

/// A backend's `traceparent` on SubmitRun parents the run span (the run is in the backend's
/// trace), and a step that is still running already shows where it sits: its `queued` and
/// `dispatched` phase spans are exported while the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_start_with_the_caller_and_show_work_in_flight() -> anyhow::Result<()> {
    use dagmesh_integration_tests::RawWorker;
    use dagmesh_proto::v1::run_service_client::RunServiceClient;
    let (receiver_url, mut received) = start_receiver().await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let database = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let mut up = ChildGuard::spawn_with_env(
        "up",
        &[
            "up",
            "--listen",
            &listen,
            "--database",
            &database,
            "--no-auth",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver_url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        dir.path(),
    )?;
    up.wait_ready(&url).await?;
    let (mut worker, _) =
        RawWorker::connect(&url, RawWorker::hello("slow-1", "slow.step", "1.0.0", 1)).await?;

    const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CALLER_SPAN: &str = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(dagmesh_proto::v1::SubmitRunRequest {
        workflow_ref: Some(dagmesh_proto::v1::submit_run_request::WorkflowRef::Spec(
            workflow(
                "caller-traced",
                vec![step("slow", "slow.step@^1", &[], &[])],
            ),
        )),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01").parse()?,
    );
    let mut client = RunServiceClient::new(dagmesh_integration_tests::channel(&url).await?);
    let run = client
        .submit_run(request)
        .await?
        .into_inner()
        .run
        .context("a run")?;

    let assign = worker.expect_assign().await?;
    assert!(
        assign
            .traceparent
            .starts_with(&format!("00-{CALLER_TRACE}-")),
        "the task continues the caller's trace: {}",
        assign.traceparent
    );
    worker.start(&assign).await?;
    // Stuck running: the phases are out already.
    let spans = wait_for(&mut received, SERVER_SERVICE, 2).await?;
    let names: Vec<String> = spans.iter().map(|(_, span)| span.name.clone()).collect();
    assert!(names.contains(&"queued slow".to_owned()), "{names:?}");
    assert!(names.contains(&"dispatched slow".to_owned()), "{names:?}");
    for (_, span) in &spans {
        assert_eq!(hex(&span.trace_id), CALLER_TRACE, "{}", span.name);
    }

    worker
        .complete(&assign.task_id, assign.attempt, json!({}))
        .await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let run_span = loop {
        let more = drain(&mut received);
        if let Some((_, span)) = more
            .into_iter()
            .find(|(_, span)| span.name == "run caller-traced")
        {
            break span;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no run span");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hex(&run_span.trace_id), CALLER_TRACE);
    assert_eq!(
        hex(&run_span.parent_span_id),
        CALLER_SPAN,
        "the caller's span is the parent"
    );
    assert_eq!(
        text(&run_span, "dagmesh.run_id").as_deref(),
        Some(run.run_id.as_str())
    );
    Ok(())
}
