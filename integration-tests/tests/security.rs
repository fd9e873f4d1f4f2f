//! Security as an attacker on the same network would try it: every RPC with each scope (and
//! none), expired and revoked tokens, workers outside their token, session takeover, the store
//! API, TLS and mTLS handshakes, certificate reload, and who did what on a run.

use std::collections::HashMap;
use std::time::Duration;

use dagmesh::mesh::MeshSecurity;
use dagmesh_integration_tests::pki::TestPki;
use dagmesh_integration_tests::*;
use dagmesh_proto::connect::{AuthChannel, ClientSettings};
use dagmesh_proto::v1::cluster_service_client::ClusterServiceClient;
use dagmesh_proto::v1::metadata_service_client::MetadataServiceClient;
use dagmesh_proto::v1::run_service_client::RunServiceClient;
use dagmesh_proto::v1::scheduler_service_client::SchedulerServiceClient;
use dagmesh_proto::v1::token_service_client::TokenServiceClient;
use dagmesh_proto::v1::workflow_service_client::WorkflowServiceClient;
use dagmesh_proto::v1::{
    self as pb, CancelRunRequest, CreateTokenRequest, GetRunRequest, ListRunsRequest,
    ListSchedulesRequest, ListTokensRequest, ListWorkersRequest, ListWorkflowsRequest,
    PublishEventRequest, ReadRunRequest, RetryRunRequest, RevokeTokenRequest, Scope,
    SubmitRunRequest, WhoAmIRequest, WorkflowRef, submit_run_request,
};
use dagmesh_runtime::tls::{ServerTls, TlsFiles};
use dagmesh_sdk::{Client, SubmitRun, TaskContext, TaskError, Worker};
use serde_json::{Value, json};
use tonic::Code;

struct Secured {
    sandbox: Sandbox,
    admin: String,
    _dir: tempfile::TempDir,
}

async fn secured(tls: Option<TlsFiles>) -> anyhow::Result<Secured> {
    let dir = tempfile::tempdir()?;
    let tls = tls.map(ServerTls::load).transpose()?;
    let sandbox = Sandbox::start_secure(MeshSecurity {
        auth: true,
        internal_token: None,
        jwt: None,
        tls,
        admin_token_file: Some(dir.path().join("admin.token")),
    })
    .await?;
    let admin = sandbox
        .mesh
        .admin_token()
        .expect("an admin token")
        .to_owned();
    Ok(Secured {
        sandbox,
        admin,
        _dir: dir,
    })
}

fn with_token(token: &str) -> ClientSettings {
    ClientSettings::default().with_token(token)
}

async fn channel_as(url: &str, settings: &ClientSettings) -> anyhow::Result<AuthChannel> {
    Ok(settings.connect(url, |endpoint| endpoint).await?)
}

async fn create_token(
    url: &str,
    admin: &str,
    name: &str,
    scopes: &[Scope],
    patterns: &[&str],
    labels: &[(&str, &str)],
    ttl: Option<Duration>,
) -> anyhow::Result<String> {
    let mut tokens = TokenServiceClient::new(channel_as(url, &with_token(admin)).await?);
    let response = tokens
        .create_token(CreateTokenRequest {
            name: name.into(),
            scopes: scopes.iter().map(|&s| s as i32).collect(),
            task_patterns: patterns.iter().map(|p| p.to_string()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ttl: ttl.map(|ttl| prost_types::Duration {
                seconds: ttl.as_secs() as i64,
                nanos: ttl.subsec_nanos() as i32,
            }),
        })
        .await?
        .into_inner();
    Ok(response.secret)
}

fn echo_spec(task: &str) -> pb::WorkflowSpec {
    workflow(
        "secured",
        vec![step("only", task, &[], &[("text", "'hi'")])],
    )
}

/// One call per kind of rule; the code it ends with.
async fn call(url: &str, settings: &ClientSettings, rpc: &str) -> anyhow::Result<Code> {
    let channel = channel_as(url, settings).await?;
    let mut runs = RunServiceClient::new(channel.clone());
    let code = |result: Result<(), tonic::Status>| match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    };
    let no_run = "01900000-0000-7000-8000-000000000000".to_owned();
    Ok(match rpc {
        "SubmitRun" => code(
            runs.submit_run(SubmitRunRequest {
                workflow_ref: Some(submit_run_request::WorkflowRef::Workflow(WorkflowRef {
                    name: "no-such-workflow".into(),
                    version: 0,
                })),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        "GetRun" => code(
            runs.get_run(GetRunRequest {
                run_id: no_run.clone(),
            })
            .await
            .map(drop),
        ),
        "ListRuns" => code(runs.list_runs(ListRunsRequest::default()).await.map(drop)),
        "CancelRun" => code(
            runs.cancel_run(CancelRunRequest {
                run_id: no_run.clone(),
                reason: String::new(),
            })
            .await
            .map(drop),
        ),
        "RetryRun" => code(
            runs.retry_run(RetryRunRequest {
                run_id: no_run,
                from_step: String::new(),
            })
            .await
            .map(drop),
        ),
        "ApplyWorkflow" => code(
            WorkflowServiceClient::new(channel)
                .apply_workflow(pb::ApplyWorkflowRequest {
                    spec: Some(echo_spec("sec.echo@^1")),
                })
                .await
                .map(drop),
        ),
        "ListWorkflows" => code(
            WorkflowServiceClient::new(channel)
                .list_workflows(ListWorkflowsRequest {})
                .await
                .map(drop),
        ),
        "ListWorkers" => code(
            ClusterServiceClient::new(channel)
                .list_workers(ListWorkersRequest {})
                .await
                .map(drop),
        ),
        "ListSchedules" => code(
            SchedulerServiceClient::new(channel)
                .list_schedules(ListSchedulesRequest::default())
                .await
                .map(drop),
        ),
        "PublishEvent" => code(
            SchedulerServiceClient::new(channel)
                .publish_event(PublishEventRequest {
                    topic: "nobody.listens".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        "DeleteSchedule" => code(
            SchedulerServiceClient::new(channel)
                .delete_schedule(pb::DeleteScheduleRequest {
                    schedule: "no-such-schedule".into(),
                })
                .await
                .map(drop),
        ),
        "ListTokens" => code(
            TokenServiceClient::new(channel)
                .list_tokens(ListTokensRequest::default())
                .await
                .map(drop),
        ),
        "WhoAmI" => code(
            TokenServiceClient::new(channel)
                .who_am_i(WhoAmIRequest {})
                .await
                .map(drop),
        ),
        "ReadRun (store API)" => code(
            MetadataServiceClient::new(channel)
                .get_run(ReadRunRequest { run_id: "x".into() })
                .await
                .map(drop),
        ),
        other => anyhow::bail!("unknown rpc {other}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_its_scope() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let mut tokens = HashMap::new();
    for (name, scope) in [
        ("worker", Scope::Worker),
        ("submit", Scope::Submit),
        ("read", Scope::Read),
        ("operate", Scope::Operate),
        ("admin", Scope::Admin),
    ] {
        let patterns: &[&str] = if scope == Scope::Worker { &["*"] } else { &[] };
        let token = create_token(
            &url,
            &secured.admin,
            &format!("matrix-{name}"),
            &[scope],
            patterns,
            &[],
            None,
        )
        .await?;
        tokens.insert(name, token);
    }
    // rpc -> the scopes that may call it (admin may call everything a person may).
    let matrix: &[(&str, &[&str])] = &[
        ("SubmitRun", &["submit", "admin"]),
        ("GetRun", &["read", "admin"]),
        ("ListRuns", &["read", "admin"]),
        ("CancelRun", &["operate", "admin"]),
        ("RetryRun", &["operate", "admin"]),
        ("ApplyWorkflow", &["admin"]),
        ("ListWorkflows", &["read", "admin"]),
        ("ListWorkers", &["read", "admin"]),
        ("ListSchedules", &["read", "admin"]),
        ("PublishEvent", &["submit", "admin"]),
        ("DeleteSchedule", &["admin"]),
        ("ListTokens", &["admin"]),
        ("WhoAmI", &["worker", "submit", "read", "operate", "admin"]),
    ];
    let mut failures = Vec::new();
    for (rpc, allowed) in matrix {
        let anonymous = call(&url, &ClientSettings::default(), rpc).await?;
        if anonymous != Code::Unauthenticated {
            failures.push(format!("{rpc} without a token: {anonymous:?}"));
        }
        let forged = format!("dmt_000000000000_{}", "0".repeat(64));
        let forged = call(&url, &with_token(&forged), rpc).await?;
        if forged != Code::Unauthenticated {
            failures.push(format!("{rpc} with a forged token: {forged:?}"));
        }
        for (name, token) in &tokens {
            let got = call(&url, &with_token(token), rpc).await?;
            let should = allowed.contains(name);
            let refused = matches!(got, Code::PermissionDenied | Code::Unauthenticated);
            if should && refused {
                failures.push(format!("{rpc} with a {name} token was refused: {got:?}"));
            }
            if !should && got != Code::PermissionDenied {
                failures.push(format!(
                    "{rpc} with a {name} token: {got:?}, expected PermissionDenied"
                ));
            }
        }
    }
    // The store API needs the internal scope (and is not even served on this port).
    let store = call(&url, &with_token(&secured.admin), "ReadRun (store API)").await?;
    if !matches!(store, Code::PermissionDenied | Code::Unimplemented) {
        failures.push(format!(
            "the store API answered {store:?} on the public port"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Health stays open for load balancers and kubelets.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        channel_as(&url, &ClientSettings::default()).await?,
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;
    secured.sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_tokens_are_refused() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let short = create_token(
        &url,
        &secured.admin,
        "short-lived",
        &[Scope::Read],
        &[],
        &[],
        Some(Duration::from_secs(1)),
    )
    .await?;
    assert_eq!(call(&url, &with_token(&short), "ListRuns").await?, Code::Ok);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut runs = RunServiceClient::new(channel_as(&url, &with_token(&short)).await?);
    let err = runs
        .list_runs(ListRunsRequest::default())
        .await
        .expect_err("an expired token is refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    let revoked = create_token(
        &url,
        &secured.admin,
        "soon-revoked",
        &[Scope::Read],
        &[],
        &[],
        None,
    )
    .await?;
    assert_eq!(
        call(&url, &with_token(&revoked), "ListRuns").await?,
        Code::Ok
    );
    TokenServiceClient::new(channel_as(&url, &with_token(&secured.admin)).await?)
        .revoke_token(RevokeTokenRequest {
            token: "soon-revoked".into(),
        })
        .await?;
    let mut runs = RunServiceClient::new(channel_as(&url, &with_token(&revoked)).await?);
    let err = runs
        .list_runs(ListRunsRequest::default())
        .await
        .expect_err("a revoked token is refused at once on the server that revoked it");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());

    // A right id with a wrong secret is not the token.
    let id = revoked.split('_').nth(1).unwrap();
    let wrong = format!("dmt_{id}_{}", "0".repeat(64));
    assert_eq!(
        call(&url, &with_token(&wrong), "ListRuns").await?,
        Code::Unauthenticated
    );

    // Tokens are listed without secrets; the store keeps only hashes.
    let listed = TokenServiceClient::new(channel_as(&url, &with_token(&secured.admin)).await?)
        .list_tokens(ListTokensRequest {
            include_revoked: true,
        })
        .await?
        .into_inner();
    let text = format!("{listed:?}");
    assert!(!text.contains(&short[17..]) && !text.contains(&revoked[17..]));
    assert!(
        listed
            .tokens
            .iter()
            .any(|t| t.name == "soon-revoked" && t.revoked_at.is_some())
    );
    secured.sandbox.stop().await
}

async fn echo(_ctx: TaskContext, inputs: Value) -> Result<Value, TaskError> {
    Ok(inputs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_only_what_their_token_allows() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let billing = create_token(
        &url,
        &secured.admin,
        "billing-pool",
        &[Scope::Worker],
        &["billing.*"],
        &[],
        None,
    )
    .await?;
    let mesh_pool = create_token(
        &url,
        &secured.admin,
        "mesh-pool",
        &[Scope::Worker],
        &["mesh.*"],
        &[("pool", "cpu")],
        None,
    )
    .await?;

    // The attack: another team's worker registers a higher version of the victim's task type
    // to be preferred by dispatch and receive its inputs.
    let intruder = Worker::builder(&url)
        .token(billing.clone())
        .instance_id("intruder")
        .slots(100)
        .task("mesh.charge", "9.0.0", echo)
        .build()?;
    let err = tokio::time::timeout(PATIENCE, intruder.run())
        .await?
        .expect_err("a task type outside the token is refused");
    let text = err.to_string();
    assert!(
        text.contains("mesh.charge") && text.contains("billing.*"),
        "the refusal names the task type and what the token allows: {text}"
    );

    // Without any token, not even the stream opens.
    let anonymous = Worker::builder(&url)
        .client_settings(ClientSettings::default())
        .instance_id("anonymous")
        .task("mesh.charge", "9.0.0", echo)
        .build()?;
    let err = tokio::time::timeout(PATIENCE, anonymous.run())
        .await?
        .expect_err("no token, no worker");
    assert!(err.to_string().contains("credentials"), "{err}");

    // A label the token does not allow (claiming a GPU to pull GPU steps) is refused too.
    let liar = Worker::builder(&url)
        .token(mesh_pool.clone())
        .instance_id("liar")
        .label("gpu", "true")
        .task("mesh.charge", "1.0.0", echo)
        .build()?;
    let err = tokio::time::timeout(PATIENCE, liar.run())
        .await?
        .expect_err("a label outside the token is refused");
    assert!(err.to_string().contains("labels.gpu"), "{err}");

    // The rightful worker runs the step.
    let worker = spawn_worker(
        Worker::builder(&url)
            .token(mesh_pool)
            .instance_id("rightful")
            .label("pool", "cpu")
            .task("mesh.charge", "1.0.0", echo),
    )
    .await?;
    let client = Client::connect_with(&url, with_token(&secured.admin)).await?;
    let run = client
        .submit(SubmitRun::inline(echo_spec("mesh.charge@^1")).inputs(json!({"card": "4111"})))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(run.steps[0].worker, "rightful");
    worker.abort();
    secured.sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_is_resumed_only_by_its_principal() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let victim = create_token(
        &url,
        &secured.admin,
        "victim",
        &[Scope::Worker],
        &["*"],
        &[],
        None,
    )
    .await?;
    let attacker = create_token(
        &url,
        &secured.admin,
        "attacker",
        &[Scope::Worker],
        &["*"],
        &[],
        None,
    )
    .await?;
    let worker = spawn_worker(
        Worker::builder(&url)
            .token(victim.clone())
            .instance_id("gpu-7")
            .task("mesh.render", "1.0.0", echo),
    )
    .await?;
    // ListWorkers shows the instance id to anyone who may read; reusing it must not take over.
    let refused = RawWorker::connect_once_with(
        &url,
        &with_token(&attacker),
        pb::Hello {
            instance_id: "gpu-7".into(),
            worker_name: "evil".into(),
            task_types: vec![pb::TaskTypeVersion {
                name: "mesh.render".into(),
                version: "1.0.0".into(),
            }],
            slots: 1,
            ..Default::default()
        },
    )
    .await
    .err()
    .expect("the attacker's stream is refused");
    let status = refused
        .downcast_ref::<tonic::Status>()
        .unwrap_or_else(|| panic!("not a gRPC refusal: {refused:#}"));
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("another principal"),
        "{}",
        status.message()
    );
    // The victim's session is untouched.
    assert!(worker.state().connected);
    worker.abort();
    secured.sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_record_who_submitted_cancelled_and_retried() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let backend = create_token(
        &url,
        &secured.admin,
        "backend",
        &[Scope::Submit, Scope::Read],
        &[],
        &[],
        None,
    )
    .await?;
    let ops = create_token(
        &url,
        &secured.admin,
        "ops",
        &[Scope::Operate, Scope::Read],
        &[],
        &[],
        None,
    )
    .await?;
    // No worker: the run waits, so it can be cancelled.
    let client = Client::connect_with(&url, with_token(&backend)).await?;
    let run = client
        .submit(SubmitRun::inline(echo_spec("nobody.serves@^1")))
        .await?;
    assert_eq!(run.submitted_by, "token:backend");
    let operator = Client::connect_with(&url, with_token(&ops)).await?;
    operator.cancel_run(&run.run_id, "wrong inputs").await?;
    let cancelled = operator.get_run(&run.run_id).await?;
    assert_eq!(cancelled.cancelled_by, "token:ops");
    operator.retry_run(&run.run_id).await?;
    let retried = operator.get_run(&run.run_id).await?;
    assert_eq!(retried.retried_by, "token:ops");
    assert_eq!(retried.submitted_by, "token:backend");
    // Still no worker: cancel again so the run's log ends.
    operator.cancel_run(&run.run_id, "").await?;
    let events = all_events(
        secured.sandbox.channel_with(&with_token(&ops)).await?,
        &run.run_id,
    )
    .await?;
    let actors: Vec<(i32, String)> = events
        .iter()
        .filter_map(|event| match &event.event {
            Some(pb::run_event::Event::RunState(change)) if !change.actor.is_empty() => {
                Some((change.state, change.actor.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        actors,
        vec![
            (pb::RunState::Running as i32, "token:backend".to_owned()),
            (pb::RunState::Cancelled as i32, "token:ops".to_owned()),
            (pb::RunState::Queued as i32, "token:ops".to_owned()),
            (pb::RunState::Cancelled as i32, "token:ops".to_owned()),
        ]
    );
    secured.sandbox.stop().await
}

fn tls_files(pki: &TestPki, mutual: bool) -> TlsFiles {
    TlsFiles {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: mutual.then(|| pki.ca.clone()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_fail_clearly_and_work_with_the_right_ca() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), "")?;
    let other = TestPki::create(dir.path(), "other-")?;
    let secured = secured(Some(tls_files(&pki, false))).await?;
    let url = secured.sandbox.url();
    assert!(url.starts_with("https://"));
    let port = secured.sandbox.mesh.addr().port();

    let trusted = with_token(&secured.admin);
    let trusted = ClientSettings {
        tls_ca: Some(pki.ca.clone()),
        ..trusted
    };
    assert_eq!(call(&url, &trusted, "ListRuns").await?, Code::Ok);
    // By name, as in a cluster.
    let by_name = format!("https://localhost:{port}");
    assert_eq!(call(&by_name, &trusted, "ListRuns").await?, Code::Ok);

    // Not trusting the server's CA: the system roots do not know it, nor does another CA.
    for (what, settings) in [
        ("system roots", with_token(&secured.admin)),
        (
            "another CA",
            ClientSettings {
                tls_ca: Some(other.ca.clone()),
                ..with_token(&secured.admin)
            },
        ),
    ] {
        let err = channel_as(&url, &settings)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the handshake must fail"));
        let text = err.to_string();
        assert!(
            text.contains("certificate") || text.contains("UnknownIssuer"),
            "{what}: the error says what is wrong: {text}"
        );
    }
    // A name the certificate does not carry.
    let wrong_name = ClientSettings {
        tls_server_name: Some("dagmesh.example.com".into()),
        ..trusted.clone()
    };
    let Err(err) = channel_as(&url, &wrong_name).await else {
        panic!("a name the certificate does not carry must fail the handshake");
    };
    assert!(err.to_string().contains("certificate"), "{err}");
    // Plaintext to a TLS port fails, and does not hang.
    let plain = format!("http://127.0.0.1:{port}");
    let result = tokio::time::timeout(
        PATIENCE,
        call(&plain, &with_token(&secured.admin), "ListRuns"),
    )
    .await?;
    assert!(
        !matches!(result, Ok(Code::Ok)),
        "plaintext reached a TLS server: {result:?}"
    );

    // A worker over TLS with a token runs a step.
    let worker = spawn_worker(
        Worker::builder(&url)
            .client_settings(ClientSettings {
                tls_ca: Some(pki.ca.clone()),
                ..with_token(&secured.admin)
            })
            .instance_id("tls-worker")
            .task("sec.echo", "1.0.0", echo),
    )
    .await?;
    let client = Client::connect_with(&url, trusted).await?;
    let run = client
        .submit(SubmitRun::inline(echo_spec("sec.echo@^1")))
        .await?;
    assert_succeeded(&wait_for_run(&client, &run.run_id).await?);
    worker.abort();

    // The certificate is rotated on disk: new connections get the new one without a restart.
    std::fs::copy(&other.server_cert, &pki.server_cert)?;
    std::fs::copy(&other.server_key, &pki.server_key)?;
    let rotated = ClientSettings {
        tls_ca: Some(other.ca.clone()),
        ..with_token(&secured.admin)
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(Code::Ok) = call(&url, &rotated, "ListRuns").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    secured.sandbox.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_from_the_ca() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), "")?;
    let secured = secured(Some(tls_files(&pki, true))).await?;
    let url = secured.sandbox.url();
    let base = ClientSettings {
        tls_ca: Some(pki.ca.clone()),
        ..with_token(&secured.admin)
    };
    // Without a client certificate, or with one from another CA: refused in the handshake
    // (TLS 1.3 reports it on the first call rather than at connect).
    for (what, settings) in [
        ("no client certificate", base.clone()),
        (
            "a stranger's certificate",
            ClientSettings {
                tls_client_cert: Some(pki.stranger_cert.clone()),
                tls_client_key: Some(pki.stranger_key.clone()),
                ..base.clone()
            },
        ),
    ] {
        let outcome = match channel_as(&url, &settings).await {
            Err(error) => Err(error.to_string()),
            Ok(channel) => RunServiceClient::new(channel)
                .list_runs(ListRunsRequest::default())
                .await
                .map(drop)
                .map_err(|status| status.to_string()),
        };
        assert!(outcome.is_err(), "{what}: the server let it in");
    }
    let with_cert = ClientSettings {
        tls_client_cert: Some(pki.client_cert.clone()),
        tls_client_key: Some(pki.client_key.clone()),
        ..base
    };
    assert_eq!(call(&url, &with_cert, "ListRuns").await?, Code::Ok);
    // mTLS proves the machine, the token still decides what it may do.
    let no_token = ClientSettings {
        token: None,
        ..with_cert
    };
    assert_eq!(
        call(&url, &no_token, "ListRuns").await?,
        Code::Unauthenticated
    );
    secured.sandbox.stop().await
}

/// The split mode as Kubernetes runs it: metastore and executor as processes, TLS between
/// everything, the services' internal token between them. The store API answers only to that
/// token, so none of the store attacks (reading inputs, writing a fake SUCCEEDED step, storing
/// an unvalidated workflow) is open to an API token, even an admin's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_over_tls_with_the_internal_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::create(dir.path(), "")?;
    let internal = "f0e1d2c3b4a5968778695a4b3c2d1e0ff0e1d2c3b4a5968778695a4b3c2d1e0f";
    let (store_port, exec_port) = (free_port()?, free_port()?);
    let store_url = format!("https://localhost:{store_port}");
    let exec_url = format!("https://localhost:{exec_port}");
    let (cert, key, ca) = (
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let env = [
        ("DAGMESH_TLS_CERT", cert.as_str()),
        ("DAGMESH_TLS_KEY", key.as_str()),
        ("DAGMESH_TLS_CA", ca.as_str()),
        ("DAGMESH_INTERNAL_TOKEN", internal),
    ];
    let database = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let mut metastore = ChildGuard::spawn_with_env(
        "metastore",
        &[
            "metastore",
            "--listen",
            &format!("127.0.0.1:{store_port}"),
            "--database",
            &database,
        ],
        &env,
        dir.path(),
    )?;
    let mut executor = ChildGuard::spawn_with_env(
        "executor",
        &[
            "executor",
            "--listen",
            &format!("127.0.0.1:{exec_port}"),
            "--metastore",
            &store_url,
            "--lease",
            "2s",
            // Where a standby reaches it (the default would be the same: its listen address).
            "--advertise-url",
            &format!("https://127.0.0.1:{exec_port}"),
        ],
        &env,
        dir.path(),
    )?;
    let tls = ClientSettings {
        tls_ca: Some(pki.ca.clone()),
        ..ClientSettings::default()
    };
    metastore.wait_ready_with(&store_url, &tls).await?;
    executor.wait_ready_with(&exec_url, &tls).await?;

    let as_internal = ClientSettings {
        token: Some(internal.into()),
        ..tls.clone()
    };
    let mut tokens = TokenServiceClient::new(channel_as(&exec_url, &as_internal).await?);
    let create = |name: &str, scopes: Vec<Scope>, patterns: Vec<String>| CreateTokenRequest {
        name: name.into(),
        scopes: scopes.into_iter().map(|s| s as i32).collect(),
        task_patterns: patterns,
        ..Default::default()
    };
    let admin = tokens
        .create_token(create("ops-admin", vec![Scope::Admin], vec![]))
        .await?
        .into_inner()
        .secret;
    let worker_token = tokens
        .create_token(create(
            "split-workers",
            vec![Scope::Worker],
            vec!["split.*".into()],
        ))
        .await?
        .into_inner()
        .secret;
    let as_admin = ClientSettings {
        token: Some(admin.clone()),
        ..tls.clone()
    };

    // The store API: no token, a made-up token, an admin token — all refused.
    let fake_success = pb::CommitRequest {
        mutations: vec![pb::Mutation {
            mutation: Some(pb::mutation::Mutation::PutStep(pb::Step {
                run_id: "victim".into(),
                step_id: "charge".into(),
                state: pb::StepState::Succeeded as i32,
                ..Default::default()
            })),
        }],
    };
    for (who, settings, expected) in [
        ("no token", tls.clone(), Code::Unauthenticated),
        (
            "a made-up token",
            ClientSettings {
                token: Some("not-the-internal-token".into()),
                ..tls.clone()
            },
            Code::Unauthenticated,
        ),
        ("an admin token", as_admin.clone(), Code::PermissionDenied),
    ] {
        let mut store = MetadataServiceClient::new(channel_as(&store_url, &settings).await?);
        let read = store
            .get_run(ReadRunRequest { run_id: "x".into() })
            .await
            .expect_err("reading the store is refused");
        assert_eq!(read.code(), expected, "{who}: {read:?}");
        let write = store
            .commit(fake_success.clone())
            .await
            .expect_err("writing the store is refused");
        assert_eq!(write.code(), expected, "{who}: {write:?}");
    }

    // Work flows over TLS with tokens: a worker, a backend, the CLI.
    let worker = spawn_worker(
        Worker::builder(&exec_url)
            .client_settings(ClientSettings {
                token: Some(worker_token),
                ..tls.clone()
            })
            .instance_id("split-worker")
            .task("split.echo", "1.0.0", echo),
    )
    .await?;
    let client = Client::connect_with(&exec_url, as_admin.clone()).await?;
    let run = client
        .submit(SubmitRun::inline(echo_spec("split.echo@^1")))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(run.submitted_by, "token:ops-admin");

    // A second executor is a standby that forwards over TLS to the first (whose certificate
    // names localhost, not the advertised 127.0.0.1): it checks the token itself, and the
    // holder sees the caller's own token.
    let standby_port = free_port()?;
    let standby_url = format!("https://localhost:{standby_port}");
    let mut standby = ChildGuard::spawn_with_env(
        "standby",
        &[
            "executor",
            "--listen",
            &format!("127.0.0.1:{standby_port}"),
            "--metastore",
            &store_url,
            "--peer-tls-server-name",
            "localhost",
        ],
        &env,
        dir.path(),
    )?;
    standby.wait_ready_with(&standby_url, &tls).await?;
    let through_standby = Client::connect_with(&standby_url, as_admin.clone()).await?;
    let forwarded = through_standby
        .submit(SubmitRun::inline(echo_spec("split.echo@^1")))
        .await?;
    let forwarded = wait_for_run(&through_standby, &forwarded.run_id).await?;
    assert_succeeded(&forwarded);
    assert_eq!(forwarded.submitted_by, "token:ops-admin");
    let made_up = ClientSettings {
        token: Some("not-a-token".into()),
        ..tls.clone()
    };
    let refused = RunServiceClient::new(channel_as(&standby_url, &made_up).await?)
        .list_runs(pb::ListRunsRequest::default())
        .await
        .expect_err("a made-up token is refused by the standby");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A request that says it was already forwarded is not forwarded again (no loops).
    let mut looped = tonic::Request::new(pb::ListRunsRequest::default());
    looped
        .metadata_mut()
        .insert("dagmesh-forwarded-by", "https://10.0.0.9:7070".parse()?);
    let looped = RunServiceClient::new(channel_as(&standby_url, &as_admin).await?)
        .list_runs(looped)
        .await
        .expect_err("a twice-forwarded call is refused");
    assert_eq!(looped.code(), Code::Unavailable, "{looped:?}");
    assert!(
        looped
            .message()
            .contains("already forwarded once (by https://10.0.0.9:7070)"),
        "{looped:?}"
    );
    drop(standby);
    worker.abort();

    // The scheduler too: its client TLS settings by flag this time, its own port over TLS, and
    // an admin token checked through the metastore.
    let sched_port = free_port()?;
    let sched_url = format!("https://localhost:{sched_port}");
    let mut scheduler = ChildGuard::spawn_with_env(
        "scheduler",
        &[
            "scheduler",
            "--listen",
            &format!("127.0.0.1:{sched_port}"),
            "--metastore",
            &store_url,
            "--executor",
            &exec_url,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
        ],
        &[("DAGMESH_INTERNAL_TOKEN", internal)],
        dir.path(),
    )?;
    scheduler.wait_ready_with(&sched_url, &tls).await?;
    let schedules = std::process::Command::new(dagmesh_binary()?)
        .args(["--server", &sched_url, "--tls-ca", &ca, "schedules", "list"])
        .env("DAGMESH_TOKEN", &admin)
        .output()?;
    assert!(
        schedules.status.success(),
        "dagmesh schedules list against the scheduler over TLS: {}",
        String::from_utf8_lossy(&schedules.stderr)
    );
    let anonymous = std::process::Command::new(dagmesh_binary()?)
        .args(["--server", &sched_url, "--tls-ca", &ca, "schedules", "list"])
        .env(
            "DAGMESH_TOKEN",
            "dmt_000000000000_0000000000000000000000000000000000000000000000000000000000000000",
        )
        .output()?;
    assert!(!anonymous.status.success());

    let whoami = std::process::Command::new(dagmesh_binary()?)
        .args(["--server", &exec_url, "tokens", "whoami"])
        .env("DAGMESH_TOKEN", &admin)
        .env("DAGMESH_TLS_CA", &ca)
        .output()?;
    let stdout = String::from_utf8_lossy(&whoami.stdout);
    assert!(
        whoami.status.success() && stdout.contains("token:ops-admin"),
        "dagmesh tokens whoami over TLS: {stdout} {}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    Ok(())
}

/// A newcomer's first minutes: `dagmesh up` on loopback needs no flags, and the CLI run from the
/// same directory finds the admin token it wrote. On any other address it refuses to start
/// without TLS and authentication, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_is_zero_config_on_loopback_and_refuses_an_open_network() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let data_dir = dir.path().join("data").display().to_string();
    let mut up = ChildGuard::spawn(
        "up",
        &["up", "--listen", &listen, "--data-dir", &data_dir],
        dir.path(),
    )?;
    let url = format!("http://{listen}");
    up.wait_ready(&url).await?;
    let token_file = dir.path().join("data").join("admin.token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file)?.permissions());
    assert_eq!(
        mode & 0o777,
        0o600,
        "the admin token is readable only by its owner"
    );

    let cli = |data_dir: Option<&str>| -> anyhow::Result<std::process::Output> {
        let mut command = std::process::Command::new(dagmesh_binary()?);
        command.args(["--server", &url, "runs", "list"]);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DAGMESH_") {
                command.env_remove(key);
            }
        }
        if let Some(dir) = data_dir {
            command.env("DAGMESH_DATA_DIR", dir);
        }
        Ok(command.current_dir(std::env::temp_dir()).output()?)
    };
    let with_token = cli(Some(&data_dir))?;
    assert!(with_token.status.success(), "{with_token:?}");
    let without = cli(None)?;
    assert!(!without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("missing credentials"), "{stderr}");
    up.sigterm()?;
    up.wait_exit(Duration::from_secs(20)).await?;

    let mut open = ChildGuard::spawn(
        "open",
        &[
            "up",
            "--listen",
            &format!("0.0.0.0:{}", free_port()?),
            "--data-dir",
            &data_dir,
        ],
        dir.path(),
    )?;
    let status = open.wait_exit(Duration::from_secs(20)).await?;
    assert!(!status.success());
    let log = open.log_tail();
    assert!(log.contains("refusing to listen on 0.0.0.0"), "{log}");
    assert!(log.contains("--insecure"), "{log}");
    Ok(())
}

/// An identity provider's JWTs: verified against its JWKS (issuer, audience, expiry), scopes and
/// a worker's task types from claims; a token signed by another key, for another audience or
/// expired is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_from_an_identity_provider() -> anyhow::Result<()> {
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let dir = tempfile::tempdir()?;
    let signing = rcgen::KeyPair::generate()?;
    let stranger = rcgen::KeyPair::generate()?;
    let point = signing.public_key_raw();
    anyhow::ensure!(
        point.len() == 65 && point[0] == 4,
        "an uncompressed P-256 point"
    );
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "idp-1",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string())?;
    let sandbox = Sandbox::start_secure(MeshSecurity {
        auth: true,
        jwt: Some(dagmesh_auth::jwt::JwtConfig {
            jwks: jwks_path,
            issuer: "https://idp.example.com".into(),
            audience: "dagmesh".into(),
            scopes_claim: "scope".into(),
            tasks_claim: "dagmesh_tasks".into(),
        }),
        ..MeshSecurity::default()
    })
    .await?;
    let url = sandbox.url();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let sign = |key: &rcgen::KeyPair, claims: Value| -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("idp-1".into());
        Ok(jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?,
        )?)
    };
    let claims = |sub: &str, scope: &str, aud: &str, exp: u64| {
        json!({"sub": sub, "iss": "https://idp.example.com", "aud": aud, "exp": exp,
               "scope": scope, "dagmesh_tasks": ["jwt.*"]})
    };

    let reader = sign(
        &signing,
        claims("alice", "openid read", "dagmesh", now + 600),
    )?;
    assert_eq!(
        call(&url, &with_token(&reader), "ListRuns").await?,
        Code::Ok
    );
    assert_eq!(
        call(&url, &with_token(&reader), "CancelRun").await?,
        Code::PermissionDenied
    );
    let me = TokenServiceClient::new(channel_as(&url, &with_token(&reader)).await?)
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(me.principal, "jwt:alice");

    for (what, token, expected) in [
        (
            "another key",
            sign(&stranger, claims("mallory", "admin", "dagmesh", now + 600))?,
            "InvalidSignature",
        ),
        (
            "another audience",
            sign(&signing, claims("bob", "admin", "billing", now + 600))?,
            "InvalidAudience",
        ),
        (
            "expired",
            sign(&signing, claims("carol", "admin", "dagmesh", now - 600))?,
            "ExpiredSignature",
        ),
    ] {
        let mut runs = RunServiceClient::new(channel_as(&url, &with_token(&token)).await?);
        let err = runs
            .list_runs(ListRunsRequest::default())
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert!(
            err.message().contains(expected),
            "{what}: {}",
            err.message()
        );
    }

    // Hostile JWTs: garbage in three parts, a subject too long to record.
    let long_subject = sign(
        &signing,
        claims(&"s".repeat(300), "read", "dagmesh", now + 600),
    )?;
    for (what, token, expected) in [
        ("garbage", "aaa.bbb.ccc".to_owned(), "invalid JWT"),
        ("a long subject", long_subject, "sub"),
    ] {
        let mut runs = RunServiceClient::new(channel_as(&url, &with_token(&token)).await?);
        let err = runs
            .list_runs(ListRunsRequest::default())
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert!(
            err.message().contains(expected),
            "{what}: {}",
            err.message()
        );
    }

    // A worker identified by the provider serves only the task types of its claim.
    let worker_jwt = sign(
        &signing,
        claims("gpu-node-3", "worker", "dagmesh", now + 600),
    )?;
    let refused = Worker::builder(&url)
        .token(worker_jwt.clone())
        .instance_id("jwt-intruder")
        .task("billing.charge", "1.0.0", echo)
        .build()?;
    let err = tokio::time::timeout(PATIENCE, refused.run())
        .await?
        .expect_err("outside the claim");
    assert!(err.to_string().contains("jwt.*"), "{err}");
    let worker = spawn_worker(
        Worker::builder(&url)
            .token(worker_jwt)
            .instance_id("jwt-worker")
            .task("jwt.echo", "1.0.0", echo),
    )
    .await?;
    let submitter = sign(
        &signing,
        claims("backend", "submit read", "dagmesh", now + 600),
    )?;
    let client = Client::connect_with(&url, with_token(&submitter)).await?;
    let run = client
        .submit(SubmitRun::inline(echo_spec("jwt.echo@^1")))
        .await?;
    let run = wait_for_run(&client, &run.run_id).await?;
    assert_succeeded(&run);
    assert_eq!(run.submitted_by, "jwt:backend");
    worker.abort();
    sandbox.stop().await
}

/// After an executor crash, a session recovered from the store belongs to the principal whose
/// worker held its tasks: another principal claiming the instance id (and the task, to forge
/// its result) is refused, the rightful worker resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_session_is_resumed_only_by_its_principal() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let victim = create_token(
        &url,
        &secured.admin,
        "render-pool",
        &[Scope::Worker],
        &["mesh.*"],
        &[],
        None,
    )
    .await?;
    let attacker = create_token(
        &url,
        &secured.admin,
        "other-pool",
        &[Scope::Worker],
        &["*"],
        &[],
        None,
    )
    .await?;
    let hello = RawWorker::hello("render-9", "mesh.render", "1.0.0", 1);
    let (mut worker, _) =
        RawWorker::connect_once_with(&url, &with_token(&victim), hello.clone()).await?;
    let client = Client::connect_with(&url, with_token(&secured.admin)).await?;
    let run = client
        .submit(SubmitRun::inline(echo_spec("mesh.render@^1")))
        .await?;
    let assign = worker.expect_assign().await?;
    worker.start(&assign).await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // RUNNING is committed
    worker.crash();

    // The executor dies and comes back on the same database.
    let Secured {
        sandbox,
        admin,
        _dir: dir,
    } = secured;
    let Sandbox { mesh, database, .. } = sandbox;
    mesh.abort();
    let mesh = dagmesh::mesh::Mesh::start(dagmesh::mesh::MeshOptions {
        listen: "127.0.0.1:0".into(),
        database_url: database.url(),
        executor: fast_config(),
        security: MeshSecurity {
            auth: true,
            admin_token_file: Some(dir.path().join("admin.token")),
            ..MeshSecurity::default()
        },
    })
    .await?;
    let url = mesh.url();
    let held = pb::TaskRef {
        task_id: assign.task_id.clone(),
        attempt: assign.attempt,
    };
    let claim = pb::Hello {
        in_flight: vec![held.clone()],
        ..hello.clone()
    };
    let refused = RawWorker::connect_once_with(&url, &with_token(&attacker), claim.clone())
        .await
        .err()
        .expect("another principal cannot resume the recovered session");
    let status = refused
        .downcast_ref::<tonic::Status>()
        .unwrap_or_else(|| panic!("not a gRPC refusal: {refused:#}"));
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let (_worker, welcome) =
        RawWorker::connect_once_with(&url, &with_token(&victim), claim).await?;
    assert_eq!(
        welcome.resumed,
        vec![held],
        "the rightful worker keeps its task"
    );
    let run = Client::connect_with(&url, with_token(&admin))
        .await?
        .get_run(&run.run_id)
        .await?;
    assert_eq!(run.steps[0].worker_principal, "token:render-pool");
    mesh.abort();
    database.cleanup().await
}

/// Every field of the token API is bounded and checked; each refusal names the field, and the
/// server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_requests_are_refused_naming_the_field() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let mut tokens = TokenServiceClient::new(channel_as(&url, &with_token(&secured.admin)).await?);
    let base = || CreateTokenRequest {
        name: "hostile".into(),
        scopes: vec![Scope::Read as i32],
        ..Default::default()
    };
    let duration = |seconds: i64| Some(prost_types::Duration { seconds, nanos: 0 });
    let cases: Vec<(&str, CreateTokenRequest, &str)> = vec![
        (
            "a name with a space",
            CreateTokenRequest {
                name: "a b".into(),
                ..base()
            },
            "name",
        ),
        (
            "an empty name",
            CreateTokenRequest {
                name: String::new(),
                ..base()
            },
            "name",
        ),
        (
            "a long name",
            CreateTokenRequest {
                name: "n".repeat(129),
                ..base()
            },
            "name",
        ),
        (
            "no scope",
            CreateTokenRequest {
                scopes: vec![],
                ..base()
            },
            "scopes",
        ),
        (
            "an unknown scope",
            CreateTokenRequest {
                scopes: vec![99],
                ..base()
            },
            "scopes[0]",
        ),
        (
            "the internal scope",
            CreateTokenRequest {
                scopes: vec![Scope::Internal as i32],
                ..base()
            },
            "internal",
        ),
        (
            "a worker token without patterns",
            CreateTokenRequest {
                scopes: vec![Scope::Worker as i32],
                ..base()
            },
            "task_patterns",
        ),
        (
            "too many patterns",
            CreateTokenRequest {
                scopes: vec![Scope::Worker as i32],
                task_patterns: (0..65).map(|i| format!("t{i}.*")).collect(),
                ..base()
            },
            "task_patterns",
        ),
        (
            "a long pattern",
            CreateTokenRequest {
                scopes: vec![Scope::Worker as i32],
                task_patterns: vec!["p".repeat(200)],
                ..base()
            },
            "task_patterns[0]",
        ),
        (
            "too many labels",
            CreateTokenRequest {
                labels: (0..65).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..base()
            },
            "labels",
        ),
        (
            "a negative ttl",
            CreateTokenRequest {
                ttl: duration(-5),
                ..base()
            },
            "ttl",
        ),
        (
            "a ttl over ten years",
            CreateTokenRequest {
                ttl: duration(20 * 365 * 24 * 3600),
                ..base()
            },
            "ttl",
        ),
    ];
    for (what, request, field) in cases {
        let err = tokens.create_token(request).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(field), "{what}: {}", err.message());
    }
    tokens.create_token(base()).await?;
    let again = tokens.create_token(base()).await.expect_err("a taken name");
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    for (what, token, code) in [
        ("no id or name", String::new(), Code::InvalidArgument),
        ("a long one", "x".repeat(300), Code::InvalidArgument),
        ("an unknown one", "no-such-token".to_owned(), Code::NotFound),
    ] {
        let err = tokens
            .revoke_token(RevokeTokenRequest { token })
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }
    // A bearer far longer than any token is refused without being looked at.
    let huge = format!("dmt_{}", "a".repeat(9000));
    let mut runs = RunServiceClient::new(channel_as(&url, &with_token(&huge)).await?);
    let err = runs
        .list_runs(ListRunsRequest::default())
        .await
        .expect_err("an oversized bearer");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("over the limit"),
        "{}",
        err.message()
    );
    assert_eq!(
        call(&url, &with_token(&secured.admin), "ListRuns").await?,
        Code::Ok
    );
    secured.sandbox.stop().await
}

/// Only the services' internal token may name another caller (`dagmesh-on-behalf-of`, how an
/// executor replica forwards a call to the replica that drives its run): from any other token
/// the header is ignored and the run records who really called.
#[tokio::test]
async fn an_api_token_cannot_speak_on_behalf_of_another_caller() -> anyhow::Result<()> {
    let secured = secured(None).await?;
    let url = secured.sandbox.url();
    let backend = create_token(
        &url,
        &secured.admin,
        "backend",
        &[Scope::Submit, Scope::Read],
        &[],
        &[],
        None,
    )
    .await?;
    let mut runs = RunServiceClient::new(channel_as(&url, &with_token(&backend)).await?);
    let mut request = tonic::Request::new(SubmitRunRequest {
        workflow_ref: Some(submit_run_request::WorkflowRef::Spec(echo_spec(
            "nobody.serves@^1",
        ))),
        ..SubmitRunRequest::default()
    });
    request
        .metadata_mut()
        .insert("dagmesh-on-behalf-of", "token:ops-admin".parse()?);
    let run = runs
        .submit_run(request)
        .await?
        .into_inner()
        .run
        .expect("a run");
    assert_eq!(run.submitted_by, "token:backend");
    let stored = runs
        .get_run(GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(stored.submitted_by, "token:backend");
    secured.sandbox.stop().await
}
