//! Operating the mesh: a real Prometheus (Debian's `prometheus`) scrapes a running mesh's
//! `/metrics`, and PromQL through its HTTP API returns what happened; the Grafana dashboards in
//! `deploy/grafana` name only metrics the services really export.
//!
//! Metrics are one registry per process, so this file holds the only mesh of its test binary.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use dagmesh_integration_tests::*;
use dagmesh_sdk::{SubmitRun, TaskContext, TaskError, Worker};
use serde_json::Value;

/// Debian's Prometheus: `DAGMESH_PROMETHEUS`, else `prometheus` on PATH. None (the test is
/// skipped) only outside CI; `scripts/test.sh` installs it.
fn prometheus_binary() -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = std::env::var_os("DAGMESH_PROMETHEUS") {
        return Ok(Some(PathBuf::from(path)));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("prometheus");
        if candidate.is_file() {
            return Ok(Some(candidate));
        }
    }
    if std::env::var_os("CI").is_some() {
        anyhow::bail!("prometheus is not installed, and CI must test the metrics with it");
    }
    eprintln!("skipping: prometheus is not installed (apt-get install prometheus)");
    Ok(None)
}

/// The one value of an instant PromQL query, or None while it has no result.
async fn query(prometheus: &str, promql: &str) -> anyhow::Result<Option<f64>> {
    let (status, body) = http_get(
        prometheus,
        &format!("/api/v1/query?query={}", url_encode(promql)),
    )
    .await?;
    anyhow::ensure!(status == 200, "{promql}: HTTP {status}: {body}");
    let answer: Value = serde_json::from_str(&body)?;
    let results = answer["data"]["result"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{promql}: no result in {answer}"))?;
    match results.as_slice() {
        [] => Ok(None),
        [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
        many => anyhow::bail!("{promql}: {} series, expected one: {answer}", many.len()),
    }
}

/// Waits until `promql` evaluates to `expected` (scrapes come every second).
async fn until(prometheus: &str, promql: &str, expected: f64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Prometheus may still be starting: a refused connection is retried too.
        let value = query(prometheus, promql).await;
        if matches!(value, Ok(Some(value)) if value == expected) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{promql} is {value:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_mesh_and_the_dashboards_name_real_metrics() -> anyhow::Result<()> {
    let sandbox = Sandbox::start().await?;
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let metrics_addr = metrics_listener.local_addr()?.to_string();
    tokio::spawn(dagmesh_runtime::metrics::serve(
        metrics_listener,
        std::future::pending(),
    ));

    let client = sandbox.client().await?;
    spawn_worker(
        Worker::builder(sandbox.url())
            .name("obs-pool")
            .slots(3)
            .task(
                "obs.ok",
                "1.0.0",
                |_: TaskContext, input: Value| async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok::<_, TaskError>(input)
                },
            )
            .task("obs.fail", "1.0.0", |_: TaskContext, _: Value| async move {
                Err::<Value, _>(TaskError::fatal("broken on purpose"))
            }),
    )
    .await?;
    client
        .apply_workflow(workflow("obs", vec![step("work", "obs.ok@^1", &[], &[])]))
        .await?;
    client
        .apply_workflow(workflow(
            "obs-fail",
            vec![step("work", "obs.fail@^1", &[], &[])],
        ))
        .await?;
    client
        .apply_workflow(workflow(
            "obs-queued",
            vec![step("wait", "nobody.home@^1", &[], &[])],
        ))
        .await?;
    for workflow in ["obs", "obs", "obs-fail"] {
        let run = client.submit(SubmitRun::workflow(workflow)).await?;
        wait_for_run(&client, &run.run_id).await?;
    }
    for _ in 0..3 {
        client.submit(SubmitRun::workflow("obs-queued")).await?;
    }

    // The metrics port itself: OpenMetrics text.
    let (status, exposition) = http_get(&metrics_addr, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(exposition.ends_with("# EOF\n"), "{exposition}");

    if let Some(binary) = prometheus_binary()? {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
                 - job_name: dagmesh\n    static_configs:\n      - targets: ['{metrics_addr}']\n"
            ),
        )?;
        let port = free_port()?;
        let prometheus = format!("127.0.0.1:{port}");
        let config_arg = format!("--config.file={}", config.display());
        let storage_arg = format!("--storage.tsdb.path={}", dir.path().join("data").display());
        let listen_arg = format!("--web.listen-address={prometheus}");
        let _server = ChildGuard::spawn_program(
            &binary,
            "prometheus",
            &[&config_arg, &storage_arg, &listen_arg],
            &[],
            dir.path(),
        )?;
        until(&prometheus, "up{job=\"dagmesh\"}", 1.0).await?;
        for (promql, expected) in [
            ("dagmesh_runs_started_total{workflow=\"obs\"}", 2.0),
            (
                "dagmesh_runs_finished_total{workflow=\"obs\",state=\"succeeded\"}",
                2.0,
            ),
            (
                "dagmesh_runs_finished_total{workflow=\"obs-fail\",state=\"failed\"}",
                1.0,
            ),
            ("dagmesh_steps_started_total{task_type=\"obs.ok\"}", 2.0),
            ("dagmesh_steps_succeeded_total{task_type=\"obs.ok\"}", 2.0),
            ("dagmesh_steps_failed_total{task_type=\"obs.fail\"}", 1.0),
            (
                "dagmesh_step_duration_seconds_count{task_type=\"obs.ok\"}",
                2.0,
            ),
            (
                "dagmesh_step_schedule_to_start_seconds_count{task_type=\"obs.ok\"}",
                2.0,
            ),
            // Each obs.ok attempt took at least 30 ms on the worker.
            (
                "dagmesh_step_duration_seconds_sum{task_type=\"obs.ok\"} >= bool 0.06",
                1.0,
            ),
            (
                "dagmesh_queue_depth{task_type=\"nobody.home\",version=\"^1\"}",
                3.0,
            ),
            (
                "dagmesh_queue_oldest_age_seconds{task_type=\"nobody.home\"} > bool 0",
                1.0,
            ),
            (
                "dagmesh_scaler_wanted_slots{task_type=\"nobody.home\"}",
                3.0,
            ),
            ("dagmesh_workers_connected{pool=\"obs-pool\"}", 1.0),
            // The cluster's default partition count, all driven by the one executor.
            ("dagmesh_executor_partitions_driven", 256.0),
            (
                "dagmesh_worker_slots_free{pool=\"obs-pool\",task_type=\"obs.ok\"}",
                3.0,
            ),
            (
                "dagmesh_worker_slots_used{pool=\"obs-pool\",task_type=\"obs.ok\"}",
                0.0,
            ),
            (
                "sum(dagmesh_grpc_server_requests_total{service=\"dagmesh.v1.RunService\",\
                 method=\"SubmitRun\",code=\"OK\"})",
                6.0,
            ),
            ("sum(dagmesh_engine_batch_size_count) > bool 0", 1.0),
            (
                "sum(dagmesh_engine_commit_duration_seconds_count) > bool 0",
                1.0,
            ),
            ("sum(dagmesh_store_errors_total)", 0.0),
        ] {
            until(&prometheus, promql, expected).await?;
        }
        // No run, step or worker instance id is ever a label.
        let (_, series) = http_get(
            &prometheus,
            &format!("/api/v1/labels?match[]={}", url_encode("{job=\"dagmesh\"}")),
        )
        .await?;
        let labels: Value = serde_json::from_str(&series)?;
        for label in labels["data"].as_array().into_iter().flatten() {
            let label = label.as_str().unwrap_or_default();
            assert!(
                !["run_id", "step_id", "instance_id", "task_id"].contains(&label),
                "high-cardinality label {label}"
            );
        }
    }

    check_dashboards(&exposition)?;
    sandbox.stop().await
}

/// Every metric a dashboard's PromQL names is one the services export: declared in the
/// exposition, or registered by a service (a family without series yet is not in the text).
fn check_dashboards(exposition: &str) -> anyhow::Result<()> {
    let mut exported: BTreeSet<String> = dagmesh_runtime::metrics::series_names()
        .into_iter()
        .collect();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for suffix in suffixes {
            exported.insert(format!("{name}{suffix}"));
        }
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let mut exprs = Vec::new();
        collect_exprs(&dashboard, &mut exprs);
        anyhow::ensure!(!exprs.is_empty(), "{} has no PromQL", path.display());
        for expr in exprs {
            for name in metric_names(&expr) {
                anyhow::ensure!(
                    exported.contains(&name),
                    "{}: `{expr}` names {name}, which no service exports (exported: {exported:?})",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    anyhow::ensure!(checked > 20, "only {checked} metric references found");
    Ok(())
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}

/// The `dagmesh_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("dagmesh_") {
        let start = i + found;
        let boundary = start == 0 || {
            let before = bytes[start - 1];
            !(before.is_ascii_alphanumeric() || before == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names("sum by (le) (rate(dagmesh_a_bucket{x=\"y\"}[5m])) / xdagmesh_b + dagmesh_c"),
        vec!["dagmesh_a_bucket", "dagmesh_c"]
    );
}
