//! One behavioural suite for every `MetadataStore`: SQLite in a temporary directory, PostgreSQL
//! (a fresh database per test, from `DAGMESH_TEST_DATABASE_URL`), and the gRPC client talking to
//! a `MetadataGrpcServer` over a real socket (backed by SQLite).

use std::sync::Arc;

use dagmesh_metastore::grpc::{MetadataGrpcClient, MetadataGrpcServer};
use dagmesh_metastore::{MetadataStore, SqliteStore, StoreError, connect_sql};
use dagmesh_proto::v1::{
    ListRunsRequest, LogLine, Mutation, Run, RunEvent, RunState, Step, StepLog, StepSpec,
    StepState, WorkflowSpec, mutation, run_event,
};

/// Instantiates every case once per backend: `sqlite::case`, `postgres::case`, `grpc::case`.
/// `plain` cases see only the store; `raw` cases also get a [`harness::Raw`] handle on the
/// database behind it, to plant records the store would never write.
macro_rules! suite {
    (plain: [$($case:ident),* $(,)?], raw: [$($raw:ident),* $(,)?] $(,)?) => {
        suite!(@backend sqlite, with_sqlite, [$($case),*], [$($raw),*]);
        suite!(@backend postgres, with_postgres, [$($case),*], [$($raw),*]);
        suite!(@backend grpc, with_grpc, [$($case),*], [$($raw),*]);
    };
    (@backend $backend:ident, $with:ident, [$($case:ident),*], [$($raw:ident),*]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    crate::harness::$with(|store, _raw| crate::cases::$case(store)).await
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $raw() -> anyhow::Result<()> {
                    crate::harness::$with(crate::cases::$raw).await
                }
            )*
        }
    };
}

suite!(
    plain: [
        workflow_versioning,
        webhook_outbox_is_written_read_due_and_updated,
        concurrent_put_workflow,
        commit_is_atomic,
        steps_keep_insertion_order_and_upsert,
        events_append_and_page,
        list_runs_filters_and_pages,
        list_runs_default_page_size,
        idempotency_keys,
        active_runs_with_steps,
        concurrent_commits,
        large_batches,
        schedules_crud_and_compare_and_set,
        triggers_and_backfills,
        lease_is_taken_refreshed_and_handed_over,
        lease_fences_commits_renewals_and_releases,
        lease_expires_by_the_clock,
        concurrent_acquirers_exactly_one_wins,
        lease_requests_are_checked,
        live_leases_are_listed_by_prefix,
        only_long_expired_member_leases_are_deleted,
        leases_are_renewed_and_taken_in_one_claim,
        ownership_splits_partitions_and_hands_them_over,
        conflicts_are_request_errors_not_outages,
        cache_entries_are_upserted_and_expire,
        cluster_partition_count_is_written_once,
        active_runs_are_read_by_partition,
        a_commit_is_fenced_by_every_lease_it_names,
    ],
    raw: [
        unreadable_records_never_fail_reads,
        a_damaged_webhook_delivery_does_not_block_the_others,
        quarantine_ends_unreadable_runs,
    ],
);

mod harness {
    use std::future::Future;
    use std::panic::AssertUnwindSafe;
    use std::path::Path;
    use std::sync::Arc;

    use anyhow::Context;
    use futures::FutureExt;
    use sqlx::Connection;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;

    pub fn sqlite_url(dir: &Path) -> String {
        format!("sqlite://{}", dir.join("meta.db").display())
    }

    /// Direct access to the database behind a store, bypassing it: to damage records the way
    /// an old version, a bug or a disk could, and see that readers survive them.
    pub enum Raw {
        Sqlite(String),
        Postgres(String),
    }

    impl Raw {
        /// Replaces the stored body of a run.
        pub async fn set_run_body(&self, run_id: &str, body: Vec<u8>) -> anyhow::Result<()> {
            self.execute(
                "UPDATE runs SET body = ?1 WHERE run_id = ?2",
                "UPDATE runs SET body = $1 WHERE run_id = $2",
                body,
                &[run_id],
            )
            .await
        }

        /// Replaces the stored body of a webhook delivery.
        pub async fn set_delivery_body(&self, id: &str, body: Vec<u8>) -> anyhow::Result<()> {
            self.execute(
                "UPDATE webhook_deliveries SET body = ?1 WHERE delivery_id = ?2",
                "UPDATE webhook_deliveries SET body = $1 WHERE delivery_id = $2",
                body,
                &[id],
            )
            .await
        }

        /// Replaces the stored body of a step.
        pub async fn set_step_body(
            &self,
            run_id: &str,
            step_id: &str,
            body: Vec<u8>,
        ) -> anyhow::Result<()> {
            self.execute(
                "UPDATE steps SET body = ?1 WHERE run_id = ?2 AND step_id = ?3",
                "UPDATE steps SET body = $1 WHERE run_id = $2 AND step_id = $3",
                body,
                &[run_id, step_id],
            )
            .await
        }

        /// Replaces the stored body of an event.
        pub async fn set_event_body(
            &self,
            run_id: &str,
            seq: i64,
            body: Vec<u8>,
        ) -> anyhow::Result<()> {
            let seq = seq.to_string();
            self.execute(
                "UPDATE events SET body = ?1 WHERE run_id = ?2 AND seq = CAST(?3 AS INTEGER)",
                "UPDATE events SET body = $1 WHERE run_id = $2 AND seq = CAST($3 AS BIGINT)",
                body,
                &[run_id, &seq],
            )
            .await
        }

        /// Runs one UPDATE binding `body` then `keys`; exactly one row must change, so that a
        /// typo in a test cannot silently damage nothing.
        async fn execute(
            &self,
            sqlite: &'static str,
            postgres: &'static str,
            body: Vec<u8>,
            keys: &[&str],
        ) -> anyhow::Result<()> {
            let changed = match self {
                Raw::Sqlite(url) => {
                    let mut conn = sqlx::SqliteConnection::connect(url).await?;
                    let mut query = sqlx::query(sqlite).bind(body);
                    for key in keys {
                        query = query.bind(key.to_string());
                    }
                    query.execute(&mut conn).await?.rows_affected()
                }
                Raw::Postgres(url) => {
                    let mut conn = sqlx::PgConnection::connect(url).await?;
                    let mut query = sqlx::query(postgres).bind(body);
                    for key in keys {
                        query = query.bind(key.to_string());
                    }
                    query.execute(&mut conn).await?.rows_affected()
                }
            };
            anyhow::ensure!(changed == 1, "{changed} rows changed by {sqlite}");
            Ok(())
        }
    }

    pub async fn with_sqlite<F, Fut>(case: F) -> anyhow::Result<()>
    where
        F: FnOnce(Arc<dyn MetadataStore>, Raw) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let dir = tempfile::tempdir()?;
        let url = sqlite_url(dir.path());
        let store = connect_sql(&url).await?;
        assert_eq!(store.backend_name(), "sqlite");
        let result = case(store.clone(), Raw::Sqlite(url)).await;
        store.close().await;
        result
    }

    /// The admin URL of the test PostgreSQL server, or `None` to skip (never on CI).
    fn postgres_admin_url() -> Option<String> {
        match std::env::var("DAGMESH_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ if std::env::var_os("CI").is_some() => panic!(
                "DAGMESH_TEST_DATABASE_URL is not set, and CI must run the PostgreSQL suite: \
                 set it to an admin URL such as postgres://postgres@127.0.0.1:5432/postgres"
            ),
            _ => {
                eprintln!("skipping PostgreSQL test: DAGMESH_TEST_DATABASE_URL is not set");
                None
            }
        }
    }

    /// `admin` with its database name replaced by `db` (query parameters kept).
    fn database_url(admin: &str, db: &str) -> String {
        let (base, query) = match admin.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (admin, None),
        };
        let authority = base.find("://").map_or(0, |i| i + 3);
        let base = match base[authority..].find('/') {
            Some(slash) => &base[..authority + slash],
            None => base,
        };
        match query {
            Some(query) => format!("{base}/{db}?{query}"),
            None => format!("{base}/{db}"),
        }
    }

    pub async fn with_postgres<F, Fut>(case: F) -> anyhow::Result<()>
    where
        F: FnOnce(Arc<dyn MetadataStore>, Raw) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let Some(admin) = postgres_admin_url() else {
            return Ok(());
        };
        let db = format!("dagmesh_test_{:016x}", rand::random::<u64>());
        let mut admin_conn = sqlx::PgConnection::connect(&admin)
            .await
            .context("connecting to DAGMESH_TEST_DATABASE_URL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&mut admin_conn)
            .await?;

        // Catch a failed assertion too, so the database is dropped either way.
        let outcome = AssertUnwindSafe(async {
            let url = database_url(&admin, &db);
            let store = connect_sql(&url).await?;
            assert_eq!(store.backend_name(), "postgres");
            let result = case(store.clone(), Raw::Postgres(url)).await;
            store.close().await;
            result
        })
        .catch_unwind()
        .await;

        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&mut admin_conn)
        .await?;
        match outcome {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub async fn with_grpc<F, Fut>(case: F) -> anyhow::Result<()>
    where
        F: FnOnce(Arc<dyn MetadataStore>, Raw) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let dir = tempfile::tempdir()?;
        let url = sqlite_url(dir.path());
        let backing = connect_sql(&url).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MetadataGrpcServer::new(backing.clone()).into_service())
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    stopped.await.ok();
                }),
        );
        // The listener is bound already, so the first call connects; no readiness wait needed.
        let client =
            MetadataGrpcClient::connect(&format!("http://{addr}"), &Default::default()).await?;
        let result = case(Arc::new(client), Raw::Sqlite(url)).await;
        let _ = stop.send(());
        server.await??;
        backing.close().await;
        result
    }

    #[test]
    fn database_url_replaces_only_the_database() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            database_url("postgres://u:p@h/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            database_url("postgresql://h:5432", "t1"),
            "postgresql://h:5432/t1"
        );
    }
}

/// Record builders shared by the cases.
mod fixtures {
    use super::*;

    /// A UUID-shaped run id; ids sort like the UUIDv7s the executor assigns (creation order).
    pub fn run_id(n: u32) -> String {
        format!("{n:08x}-0000-7000-8000-000000000000")
    }

    pub fn spec(name: &str, description: &str) -> WorkflowSpec {
        WorkflowSpec {
            name: name.to_owned(),
            description: description.to_owned(),
            steps: vec![StepSpec {
                id: "fetch".to_owned(),
                task: "fetch@^1".to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub fn run(id: &str, workflow: &str, state: RunState) -> Run {
        Run {
            run_id: id.to_owned(),
            workflow: workflow.to_owned(),
            workflow_version: 1,
            state: state as i32,
            inputs: Some(dagmesh_proto::json::to_struct(
                &serde_json::json!({"scene": id, "frames": [1, 2, 3]}),
            )),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    pub fn tagged(mut run: Run, tags: &[(&str, &str)]) -> Run {
        run.tags = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        run
    }

    pub fn keyed(mut run: Run, key: &str) -> Run {
        run.idempotency_key = key.to_owned();
        run
    }

    pub fn step(run_id: &str, step_id: &str, state: StepState) -> Step {
        Step {
            run_id: run_id.to_owned(),
            step_id: step_id.to_owned(),
            task_id: format!("{run_id}/{step_id}"),
            state: state as i32,
            task: "fetch@^1".to_owned(),
            ..Default::default()
        }
    }

    pub fn event(run_id: &str, seq: u64) -> RunEvent {
        event_with_text(run_id, seq, format!("line {seq}"))
    }

    pub fn event_with_text(run_id: &str, seq: u64, text: String) -> RunEvent {
        RunEvent {
            run_id: run_id.to_owned(),
            seq,
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + seq as i64,
                nanos: 0,
            }),
            event: Some(run_event::Event::StepLog(StepLog {
                step_id: "fetch".to_owned(),
                attempt: 1,
                lines: vec![LogLine {
                    at: None,
                    level: "info".to_owned(),
                    text,
                }],
            })),
        }
    }

    pub fn put_run(run: Run) -> Mutation {
        Mutation {
            mutation: Some(mutation::Mutation::PutRun(run)),
        }
    }

    pub fn put_step(step: Step) -> Mutation {
        Mutation {
            mutation: Some(mutation::Mutation::PutStep(step)),
        }
    }

    pub fn append(event: RunEvent) -> Mutation {
        Mutation {
            mutation: Some(mutation::Mutation::AppendEvent(event)),
        }
    }

    pub fn step_ids(run: &Run) -> Vec<&str> {
        run.steps.iter().map(|s| s.step_id.as_str()).collect()
    }

    pub fn run_ids(runs: &[Run]) -> Vec<String> {
        runs.iter().map(|r| r.run_id.clone()).collect()
    }

    pub fn seqs(events: &[RunEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }
}

mod cases {
    use std::collections::HashSet;
    use std::time::{Duration, SystemTime};

    use anyhow::Result;
    use prost::Message as _;

    use super::harness::Raw;

    use super::fixtures::*;
    use super::*;

    pub async fn workflow_versioning(store: Arc<dyn MetadataStore>) -> Result<()> {
        let (v1, created) = store
            .put_workflow(spec("build", "one"), "h1".into())
            .await?;
        assert!(created);
        assert_eq!((v1.name.as_str(), v1.version), ("build", 1));
        assert_eq!(v1.content_hash, "h1");
        assert!(v1.created_at.is_some());

        // Applying identical content again is a no-op that returns the existing version.
        let (again, created) = store
            .put_workflow(spec("build", "one"), "h1".into())
            .await?;
        assert!(!created, "identical content must not create a version");
        assert_eq!(again, v1);

        let (v2, created) = store
            .put_workflow(spec("build", "two"), "h2".into())
            .await?;
        assert!(created);
        assert_eq!(v2.version, 2);

        assert_eq!(store.get_workflow("build", None).await?, v2);
        assert_eq!(store.get_workflow("build", Some(1)).await?, v1);
        assert_eq!(
            store
                .get_workflow("build", Some(1))
                .await?
                .spec
                .unwrap()
                .description,
            "one"
        );

        // Only the latest version is compared: going back to old content is a new version.
        let (v3, created) = store
            .put_workflow(spec("build", "one"), "h1".into())
            .await?;
        assert!(created);
        assert_eq!(v3.version, 3);

        let err = store.get_workflow("build", Some(9)).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound(m) if m.contains("\"build\"") && m.contains('9')),
            "{err:?}"
        );
        let err = store.get_workflow("nope", None).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound(m) if m.contains("\"nope\"")),
            "{err:?}"
        );

        store.put_workflow(spec("alpha", "a"), "ha".into()).await?;
        let listed: Vec<_> = store
            .list_workflows()
            .await?
            .into_iter()
            .map(|w| (w.name, w.version))
            .collect();
        assert_eq!(listed, [("alpha".to_owned(), 1), ("build".to_owned(), 3)]);

        let err = store
            .put_workflow(spec("", "x"), "h".into())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
        Ok(())
    }

    pub async fn concurrent_put_workflow(store: Arc<dyn MetadataStore>) -> Result<()> {
        // Distinct content from 8 writers at once: 8 distinct versions, none lost.
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .put_workflow(spec("race", &format!("d{i}")), format!("h{i}"))
                        .await
                })
            })
            .collect();
        let mut versions = Vec::new();
        for task in tasks {
            let (wf, created) = task.await??;
            assert!(created);
            versions.push(wf.version);
        }
        versions.sort();
        assert_eq!(versions, (1..=8).collect::<Vec<u32>>());

        // Identical content from 6 writers at once: exactly one version.
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.put_workflow(spec("same", "x"), "hx".into()).await },
                )
            })
            .collect();
        let mut created_count = 0;
        for task in tasks {
            let (wf, created) = task.await??;
            assert_eq!(wf.version, 1);
            created_count += usize::from(created);
        }
        assert_eq!(created_count, 1);
        Ok(())
    }

    pub async fn cache_entries_are_upserted_and_expire(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        use dagmesh_proto::v1::{CacheEntry, Mutation, mutation};
        let entry = |key: &str, run_id: &str, ttl: Duration| {
            let now = SystemTime::now();
            Mutation {
                mutation: Some(mutation::Mutation::PutCacheEntry(CacheEntry {
                    key: key.into(),
                    run_id: run_id.into(),
                    step_id: "square".into(),
                    outputs: Some(dagmesh_proto::json::map_to_struct(
                        serde_json::json!({"n": 1}).as_object().expect("object"),
                    )),
                    stored_at: Some(now.into()),
                    expires_at: Some((now + ttl).into()),
                })),
            }
        };
        assert_eq!(store.read_cache_entry("k").await?, None);
        store
            .commit(vec![
                entry("k", "r1", Duration::from_secs(60)),
                entry("gone", "r1", Duration::from_millis(1)),
            ])
            .await?;
        let hit = store.read_cache_entry("k").await?.expect("a hit");
        assert_eq!(
            (hit.run_id.as_str(), hit.step_id.as_str()),
            ("r1", "square")
        );
        // The same key again (twice in one batch: the last wins) replaces the entry.
        store
            .commit(vec![
                entry("k", "r2", Duration::from_secs(60)),
                entry("k", "r3", Duration::from_secs(60)),
            ])
            .await?;
        assert_eq!(
            store.read_cache_entry("k").await?.expect("hit").run_id,
            "r3"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.read_cache_entry("gone").await?, None, "expired");
        // A malformed entry is refused naming the field.
        let mut bad = entry("", "r1", Duration::from_secs(1));
        let err = store.commit(vec![bad.clone()]).await.unwrap_err();
        assert!(err.to_string().contains("put_cache_entry.key"), "{err}");
        if let Some(mutation::Mutation::PutCacheEntry(e)) = &mut bad.mutation {
            e.key = "x".into();
            e.expires_at = None;
        }
        let err = store.commit(vec![bad]).await.unwrap_err();
        assert!(
            err.to_string().contains("put_cache_entry.expires_at"),
            "{err}"
        );
        Ok(())
    }

    pub async fn webhook_outbox_is_written_read_due_and_updated(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        use dagmesh_proto::v1::{
            DeliveryState, Mutation, ReadWebhookDeliveriesRequest, WebhookDelivery, mutation,
        };
        let now = SystemTime::now();
        let delivery = |id: &str, run: &str, due: SystemTime| WebhookDelivery {
            delivery_id: id.into(),
            run_id: run.into(),
            event: "run.failed".into(),
            url: "https://hooks.example.com/x".into(),
            body: "{}".into(),
            created_at: Some(due.into()),
            next_attempt_at: Some(due.into()),
            state: DeliveryState::Pending as i32,
            ..WebhookDelivery::default()
        };
        let put = |d: WebhookDelivery| Mutation {
            mutation: Some(mutation::Mutation::PutWebhookDelivery(d)),
        };
        store
            .commit(vec![
                put(delivery("d1", "r1", now - Duration::from_secs(2))),
                put(delivery("d2", "r1", now - Duration::from_secs(1))),
                put(delivery("d3", "r2", now + Duration::from_secs(3600))),
            ])
            .await?;
        let due = |limit| ReadWebhookDeliveriesRequest {
            due_before: Some(now.into()),
            limit,
            ..ReadWebhookDeliveriesRequest::default()
        };
        let ids = |list: Vec<WebhookDelivery>| -> Vec<String> {
            list.into_iter().map(|d| d.delivery_id).collect()
        };
        // Due ones, oldest due first; the future one is not due.
        assert_eq!(
            ids(store.read_webhook_deliveries(&due(0)).await?),
            ["d1", "d2"]
        );
        assert_eq!(ids(store.read_webhook_deliveries(&due(1)).await?), ["d1"]);
        // An attempt written back: delivered rows are never due again.
        let mut done = delivery("d1", "r1", now);
        done.state = DeliveryState::Delivered as i32;
        done.attempts = 3;
        done.next_attempt_at = None;
        store.commit(vec![put(done)]).await?;
        assert_eq!(ids(store.read_webhook_deliveries(&due(0)).await?), ["d2"]);
        // One run's, newest first, in every state.
        let of_run = ReadWebhookDeliveriesRequest {
            run_id: "r1".into(),
            ..ReadWebhookDeliveriesRequest::default()
        };
        let listed = store.read_webhook_deliveries(&of_run).await?;
        assert_eq!(ids(listed.clone()), ["d2", "d1"]);
        assert_eq!(listed[1].attempts, 3);
        assert_eq!(
            store
                .read_webhook_deliveries(&Default::default())
                .await?
                .len(),
            3
        );
        // A malformed row is refused naming the field.
        let err = store
            .commit(vec![put(delivery("", "r1", now))])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("put_webhook_delivery"), "{err}");
        Ok(())
    }

    pub async fn a_damaged_webhook_delivery_does_not_block_the_others(
        store: Arc<dyn MetadataStore>,
        raw: Raw,
    ) -> Result<()> {
        use dagmesh_proto::v1::{
            DeliveryState, Mutation, ReadWebhookDeliveriesRequest, WebhookDelivery, mutation,
        };
        let past = SystemTime::now() - Duration::from_secs(1);
        let put = |id: &str| Mutation {
            mutation: Some(mutation::Mutation::PutWebhookDelivery(WebhookDelivery {
                delivery_id: id.into(),
                run_id: "r1".into(),
                url: "https://hooks.example.com/x".into(),
                state: DeliveryState::Pending as i32,
                created_at: Some(past.into()),
                next_attempt_at: Some(past.into()),
                ..WebhookDelivery::default()
            })),
        };
        store.commit(vec![put("good"), put("damaged")]).await?;
        raw.set_delivery_body("damaged", vec![0xff; 16]).await?;
        let due = store
            .read_webhook_deliveries(&ReadWebhookDeliveriesRequest {
                due_before: Some(SystemTime::now().into()),
                ..ReadWebhookDeliveriesRequest::default()
            })
            .await?;
        assert_eq!(due.len(), 2, "{due:?}");
        let damaged = due
            .iter()
            .find(|d| d.delivery_id == "damaged")
            .expect("listed");
        assert_eq!(damaged.state, DeliveryState::GaveUp as i32, "{damaged:?}");
        assert_eq!(damaged.run_id, "r1");
        assert!(
            damaged.last_error.contains("does not decode"),
            "{damaged:?}"
        );
        let good = due
            .iter()
            .find(|d| d.delivery_id == "good")
            .expect("listed");
        assert_eq!(good.url, "https://hooks.example.com/x");
        Ok(())
    }

    pub async fn commit_is_atomic(store: Arc<dyn MetadataStore>) -> Result<()> {
        let (r1, r2, r3) = (run_id(1), run_id(2), run_id(3));
        store
            .commit(vec![put_run(keyed(
                run(&r1, "build", RunState::Queued),
                "k1",
            ))])
            .await?;

        // The last mutation reuses r1's key: nothing of the batch may stay.
        let err = store
            .commit(vec![
                put_run(keyed(run(&r2, "build", RunState::Queued), "k2")),
                put_step(step(&r2, "fetch", StepState::Pending)),
                append(event(&r2, 1)),
                put_run(keyed(run(&r3, "build", RunState::Queued), "k1")),
            ])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists(m) if m.contains("\"k1\"")),
            "{err:?}"
        );
        let err = store.get_run(&r2).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound(m) if m.contains(&r2)),
            "{err:?}"
        );
        assert!(store.read_events(&r2, 0, 0).await?.is_empty());
        assert_eq!(store.find_run_by_idempotency_key("k2").await?, None);
        assert_eq!(
            store.find_run_by_idempotency_key("k1").await?,
            Some(r1.clone())
        );
        let all = store.list_runs(&ListRunsRequest::default()).await?;
        assert_eq!(run_ids(&all.runs), [r1.as_str()]);

        // A malformed mutation rejects the batch before anything is written.
        let r4 = run_id(4);
        let err = store
            .commit(vec![
                put_run(run(&r4, "build", RunState::Queued)),
                Mutation { mutation: None },
            ])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.contains("mutations[1]")),
            "{err:?}"
        );
        assert!(matches!(
            store.get_run(&r4).await,
            Err(StoreError::NotFound(_))
        ));

        store.commit(Vec::new()).await?;
        Ok(())
    }

    pub async fn steps_keep_insertion_order_and_upsert(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let id = run_id(1);
        let other = run_id(2);
        let mut first = run(&id, "build", RunState::Running);
        // A run's own `steps` field is not stored: steps are written with put_step.
        first.steps = vec![step(&id, "ghost", StepState::Pending)];
        store
            .commit(vec![
                put_run(first),
                put_step(step(&id, "compile", StepState::Pending)),
                put_step(step(&id, "assemble", StepState::Pending)),
                put_step(step(&id, "bundle", StepState::Pending)),
                put_run(run(&other, "build", RunState::Running)),
                put_step(step(&other, "aaa", StepState::Pending)),
            ])
            .await?;
        let got = store.get_run(&id).await?;
        assert_eq!(step_ids(&got), ["compile", "assemble", "bundle"]);
        assert_eq!(got.inputs, run(&id, "build", RunState::Running).inputs);

        // Two writes of one step in one batch: the last one wins, the position stays.
        let mut running = step(&id, "assemble", StepState::Running);
        running.attempt = 1;
        running.worker = "w-1".to_owned();
        let mut done = running.clone();
        done.state = StepState::Succeeded as i32;
        done.outputs = Some(dagmesh_proto::json::to_struct(
            &serde_json::json!({"mesh": "s3://bucket/mesh.glb"}),
        ));
        store
            .commit(vec![put_step(running), put_step(done.clone())])
            .await?;
        store
            .commit(vec![put_step(step(&id, "publish", StepState::Pending))])
            .await?;

        let got = store.get_run(&id).await?;
        assert_eq!(step_ids(&got), ["compile", "assemble", "bundle", "publish"]);
        assert_eq!(got.steps[1], done);

        // Updating the run keeps its steps.
        let mut finished = run(&id, "build", RunState::Succeeded);
        finished.last_seq = 7;
        store.commit(vec![put_run(finished)]).await?;
        let got = store.get_run(&id).await?;
        assert_eq!(got.state, RunState::Succeeded as i32);
        assert_eq!(got.last_seq, 7);
        assert_eq!(got.steps.len(), 4);

        let err = store.get_run("no-such-run").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound(m) if m.contains("\"no-such-run\"")),
            "{err:?}"
        );
        Ok(())
    }

    pub async fn events_append_and_page(store: Arc<dyn MetadataStore>) -> Result<()> {
        let id = run_id(1);
        store
            .commit(vec![
                put_run(run(&id, "build", RunState::Running)),
                append(event(&id, 1)),
                append(event(&id, 2)),
                append(event(&id, 3)),
            ])
            .await?;
        store
            .commit(vec![append(event(&id, 4)), append(event(&id, 5))])
            .await?;

        let all = store.read_events(&id, 0, 0).await?;
        assert_eq!(seqs(&all), [1, 2, 3, 4, 5]);
        assert_eq!(all[2], event(&id, 3), "the event payload must round-trip");
        assert_eq!(seqs(&store.read_events(&id, 2, 2).await?), [3, 4]);
        assert!(store.read_events(&id, 5, 0).await?.is_empty());
        assert!(store.read_events(&run_id(9), 0, 0).await?.is_empty());

        // Paging with a small limit visits every event once.
        let mut paged = Vec::new();
        let mut after = 0;
        loop {
            let page = store.read_events(&id, after, 2).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            paged.extend(seqs(&page));
        }
        assert_eq!(paged, [1, 2, 3, 4, 5]);

        // A sequence number that exists fails the batch; seq 6 is not written either.
        let err = store
            .commit(vec![append(event(&id, 6)), append(event(&id, 3))])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists(m) if m.contains('3') && m.contains(&id)),
            "{err:?}"
        );
        assert!(store.read_events(&id, 5, 0).await?.is_empty());

        // So does a duplicate within one batch.
        let err = store
            .commit(vec![append(event(&id, 7)), append(event(&id, 7))])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
        assert!(store.read_events(&id, 5, 0).await?.is_empty());

        let err = store.commit(vec![append(event(&id, 0))]).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
        Ok(())
    }

    pub async fn list_runs_filters_and_pages(store: Arc<dyn MetadataStore>) -> Result<()> {
        use RunState::*;
        let runs = [
            tagged(
                run(&run_id(1), "build", Succeeded),
                &[("team", "a"), ("env", "prod")],
            ),
            tagged(run(&run_id(2), "build", Failed), &[("team", "b")]),
            tagged(run(&run_id(3), "scan", Running), &[("team", "a")]),
            tagged(
                run(&run_id(4), "build", Running),
                &[("team", "a"), ("env", "dev")],
            ),
            run(&run_id(5), "scan", Succeeded),
            tagged(
                run(&run_id(6), "build", Succeeded),
                &[("team", "a"), ("env", "prod")],
            ),
        ];
        let mut batch: Vec<_> = runs.iter().cloned().map(put_run).collect();
        batch.push(put_step(step(&run_id(4), "fetch", StepState::Running)));
        store.commit(batch).await?;

        let ids = |ns: &[u32]| ns.iter().map(|&n| run_id(n)).collect::<Vec<_>>();
        let list = |req: ListRunsRequest| {
            let store = store.clone();
            async move { store.list_runs(&req).await }
        };
        let tags = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };

        let all = list(ListRunsRequest::default()).await?;
        assert_eq!(run_ids(&all.runs), ids(&[6, 5, 4, 3, 2, 1]), "newest first");
        assert!(all.next_page_token.is_empty());
        assert!(all.runs.iter().all(|r| r.steps.is_empty()));
        assert_eq!(all.runs[5], runs[0], "runs round-trip with their tags");

        let by_workflow = list(ListRunsRequest {
            workflow: "build".into(),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&by_workflow.runs), ids(&[6, 4, 2, 1]));

        let by_state = list(ListRunsRequest {
            state: Succeeded as i32,
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&by_state.runs), ids(&[6, 5, 1]));

        let by_tag = list(ListRunsRequest {
            tags: tags(&[("team", "a")]),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&by_tag.runs), ids(&[6, 4, 3, 1]));

        let by_tags = list(ListRunsRequest {
            tags: tags(&[("team", "a"), ("env", "prod")]),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&by_tags.runs), ids(&[6, 1]), "all tags must match");

        let combined = list(ListRunsRequest {
            workflow: "build".into(),
            state: Running as i32,
            tags: tags(&[("team", "a")]),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&combined.runs), ids(&[4]));

        // Creation time: ids are UUIDv7, and run n's id says millisecond n << 16.
        let at = |n: u64| {
            let ms = n << 16;
            prost_types::Timestamp {
                seconds: (ms / 1000) as i64,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            }
        };
        let window = list(ListRunsRequest {
            created_after: Some(at(2)),
            created_before: Some(at(5)),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&window.runs), ids(&[4, 3, 2]), "after is inclusive");
        let recent_builds = list(ListRunsRequest {
            workflow: "build".into(),
            created_after: Some(at(3)),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&recent_builds.runs), ids(&[6, 4]));
        // Times no id can hold keep their meaning: before 1970 bounds nothing, past year 10889
        // is after every run.
        let before_1970 = prost_types::Timestamp {
            seconds: -5,
            nanos: 0,
        };
        let far_future = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        let everything = list(ListRunsRequest {
            created_after: Some(before_1970),
            created_before: Some(far_future),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&everything.runs), ids(&[6, 5, 4, 3, 2, 1]));
        let nothing = list(ListRunsRequest {
            created_after: Some(far_future),
            ..Default::default()
        })
        .await?;
        assert!(nothing.runs.is_empty());
        let nothing = list(ListRunsRequest {
            created_before: Some(before_1970),
            ..Default::default()
        })
        .await?;
        assert!(nothing.runs.is_empty());

        let none = list(ListRunsRequest {
            tags: tags(&[("team", "z")]),
            ..Default::default()
        })
        .await?;
        assert!(none.runs.is_empty() && none.next_page_token.is_empty());

        // Pages: no run twice, none skipped, the last page has no token.
        let page1 = list(ListRunsRequest {
            page_size: 4,
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&page1.runs), ids(&[6, 5, 4, 3]));
        assert!(!page1.next_page_token.is_empty());
        let page2 = list(ListRunsRequest {
            page_size: 4,
            page_token: page1.next_page_token.clone(),
            ..Default::default()
        })
        .await?;
        assert_eq!(run_ids(&page2.runs), ids(&[2, 1]));
        assert!(page2.next_page_token.is_empty());

        // A page that ends exactly at the last match has no token either.
        let filtered = ListRunsRequest {
            workflow: "build".into(),
            page_size: 2,
            ..Default::default()
        };
        let p1 = list(filtered.clone()).await?;
        assert_eq!(run_ids(&p1.runs), ids(&[6, 4]));
        let p2 = list(ListRunsRequest {
            page_token: p1.next_page_token,
            ..filtered
        })
        .await?;
        assert_eq!(run_ids(&p2.runs), ids(&[2, 1]));
        assert!(p2.next_page_token.is_empty());
        Ok(())
    }

    pub async fn list_runs_default_page_size(store: Arc<dyn MetadataStore>) -> Result<()> {
        let batch = (1..=60)
            .map(|n| put_run(run(&run_id(n), "bulk", RunState::Succeeded)))
            .collect();
        store.commit(batch).await?;
        let first = store.list_runs(&ListRunsRequest::default()).await?;
        assert_eq!(first.runs.len(), 50, "default page size");
        assert_eq!(first.runs[0].run_id, run_id(60));
        let rest = store
            .list_runs(&ListRunsRequest {
                page_token: first.next_page_token,
                ..Default::default()
            })
            .await?;
        assert_eq!(
            run_ids(&rest.runs),
            (1..=10).rev().map(run_id).collect::<Vec<_>>()
        );
        assert!(rest.next_page_token.is_empty());

        let huge = store
            .list_runs(&ListRunsRequest {
                page_size: 1_000_000,
                ..Default::default()
            })
            .await?;
        assert_eq!(huge.runs.len(), 60);
        Ok(())
    }

    pub async fn idempotency_keys(store: Arc<dyn MetadataStore>) -> Result<()> {
        let (r1, r2, r3, r4) = (run_id(1), run_id(2), run_id(3), run_id(4));
        // Runs without a key never collide with each other.
        store
            .commit(vec![
                put_run(keyed(run(&r1, "build", RunState::Queued), "order-42")),
                put_run(run(&r2, "build", RunState::Queued)),
                put_run(run(&r3, "build", RunState::Queued)),
            ])
            .await?;
        assert_eq!(
            store.find_run_by_idempotency_key("order-42").await?,
            Some(r1.clone())
        );
        assert_eq!(store.find_run_by_idempotency_key("order-43").await?, None);
        assert_eq!(store.find_run_by_idempotency_key("").await?, None);

        // Updating the run keeps its key.
        store
            .commit(vec![put_run(keyed(
                run(&r1, "build", RunState::Succeeded),
                "order-42",
            ))])
            .await?;
        assert_eq!(
            store.find_run_by_idempotency_key("order-42").await?,
            Some(r1.clone())
        );
        assert_eq!(store.get_run(&r1).await?.state, RunState::Succeeded as i32);

        // A later run with the same key is refused.
        let err = store
            .commit(vec![put_run(keyed(
                run(&r4, "build", RunState::Queued),
                "order-42",
            ))])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists(m) if m.contains("order-42")),
            "{err:?}"
        );
        assert!(matches!(
            store.get_run(&r4).await,
            Err(StoreError::NotFound(_))
        ));
        Ok(())
    }

    pub async fn active_runs_with_steps(store: Arc<dyn MetadataStore>) -> Result<()> {
        use RunState::*;
        store
            .commit(vec![
                put_run(run(&run_id(1), "w", Queued)),
                put_run(run(&run_id(2), "w", Running)),
                put_step(step(&run_id(2), "second", StepState::Running)),
                put_step(step(&run_id(2), "first", StepState::Pending)),
                put_run(run(&run_id(3), "w", Succeeded)),
                put_step(step(&run_id(3), "done", StepState::Succeeded)),
                put_run(run(&run_id(4), "w", Failed)),
                put_run(run(&run_id(5), "w", Cancelled)),
                put_run(run(&run_id(6), "w", Running)),
                put_step(step(&run_id(6), "only", StepState::Ready)),
            ])
            .await?;
        let active = store.read_active_runs().await?;
        assert_eq!(
            run_ids(&active),
            [run_id(1), run_id(2), run_id(6)],
            "queued and running runs, oldest first"
        );
        assert!(active[0].steps.is_empty());
        assert_eq!(step_ids(&active[1]), ["second", "first"]);
        assert_eq!(step_ids(&active[2]), ["only"]);

        store
            .commit(vec![put_run(run(&run_id(2), "w", Succeeded))])
            .await?;
        let active = store.read_active_runs().await?;
        assert_eq!(run_ids(&active), [run_id(1), run_id(6)]);
        Ok(())
    }

    pub async fn concurrent_commits(store: Arc<dyn MetadataStore>) -> Result<()> {
        // Many writers at once must neither fail (SQLITE_BUSY) nor lose writes.
        let tasks: Vec<_> = (1..=12)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let id = run_id(n);
                    store
                        .commit(vec![put_run(run(&id, "w", RunState::Running))])
                        .await?;
                    for seq in 1..=10 {
                        store
                            .commit(vec![
                                put_step(step(&id, &format!("s{seq}"), StepState::Running)),
                                append(event(&id, seq)),
                            ])
                            .await?;
                    }
                    Ok::<_, StoreError>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        let mut seen = HashSet::new();
        for n in 1..=12 {
            let id = run_id(n);
            assert_eq!(
                seqs(&store.read_events(&id, 0, 0).await?),
                (1..=10).collect::<Vec<_>>()
            );
            let got = store.get_run(&id).await?;
            let expected: Vec<String> = (1..=10).map(|s| format!("s{s}")).collect();
            assert_eq!(step_ids(&got), expected);
            seen.insert(id);
        }
        assert_eq!(store.read_active_runs().await?.len(), seen.len());
        Ok(())
    }

    pub async fn large_batches(store: Arc<dyn MetadataStore>) -> Result<()> {
        // ~6 MB in one commit and ~5 MB in one read: beyond gRPC's 4 MiB default.
        let id = run_id(1);
        let text = "x".repeat(5000);
        let mut batch = vec![put_run(run(&id, "w", RunState::Running))];
        batch.extend((1..=1200).map(|seq| append(event_with_text(&id, seq, text.clone()))));
        store.commit(batch).await?;
        let first = store.read_events(&id, 0, 0).await?;
        assert_eq!(first.len(), 1000, "default limit");
        assert_eq!(first[999].seq, 1000);
        let rest = store.read_events(&id, 1000, 0).await?;
        assert_eq!(seqs(&rest), (1001..=1200).collect::<Vec<_>>());
        Ok(())
    }

    pub async fn schedules_crud_and_compare_and_set(store: Arc<dyn MetadataStore>) -> Result<()> {
        use dagmesh_proto::v1::{CatchUp, Schedule};
        let ts = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        let nightly = Schedule {
            id: "0000-s1".into(),
            name: "nightly".into(),
            cron: "0 2 * * *".into(),
            time_zone: "Europe/Berlin".into(),
            workflow: "build".into(),
            inputs: [("day".to_owned(), "tick".to_owned())].into(),
            catch_up: CatchUp::All as i32,
            catch_up_limit: 5,
            created_at: Some(ts(1_700_000_000)),
            ..Default::default()
        };
        let created = store.create_schedule(nightly.clone()).await?;
        assert_eq!(created, nightly);
        assert_eq!(store.get_schedule("nightly").await?, nightly);
        assert_eq!(store.get_schedule("0000-s1").await?, nightly);

        let err = store
            .create_schedule(Schedule {
                id: "0000-s2".into(),
                ..nightly.clone()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists(m) if m.contains("\"nightly\"")),
            "{err:?}"
        );
        let hourly = Schedule {
            id: "0000-s3".into(),
            name: "hourly".into(),
            ..nightly.clone()
        };
        store.create_schedule(hourly).await?;
        let names: Vec<_> = store
            .list_schedules()
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["hourly", "nightly"]);

        // Compare-and-set: only the writer that saw the current value moves it.
        assert!(store.advance_schedule("0000-s1", None, ts(100)).await?);
        assert!(!store.advance_schedule("0000-s1", None, ts(200)).await?);
        assert!(
            !store
                .advance_schedule("0000-s1", Some(ts(99)), ts(200))
                .await?
        );
        assert!(
            store
                .advance_schedule("0000-s1", Some(ts(100)), ts(200))
                .await?
        );
        assert_eq!(
            store.get_schedule("nightly").await?.last_tick,
            Some(ts(200))
        );

        // Racing advances from the same value: exactly one wins.
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .advance_schedule("0000-s1", Some(ts(200)), ts(300 + i))
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for racer in racers {
            won += usize::from(racer.await??);
        }
        assert_eq!(won, 1);

        // Pausing touches `paused` only: the advanced tick stays.
        let paused = store.set_schedule_paused("nightly", true).await?;
        assert!(paused.paused);
        assert!(paused.last_tick.is_some_and(|t| t.seconds >= 300));
        assert_eq!(paused.inputs, nightly.inputs);
        assert!(!store.set_schedule_paused("0000-s1", false).await?.paused);

        store.delete_schedule("nightly").await?;
        let err = store.get_schedule("nightly").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        let err = store.delete_schedule("nightly").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        assert!(!store.advance_schedule("0000-s1", None, ts(1)).await?);
        Ok(())
    }

    pub async fn triggers_and_backfills(store: Arc<dyn MetadataStore>) -> Result<()> {
        use dagmesh_proto::v1::{Backfill, BackfillState, Trigger};
        let trigger = |id: &str, name: &str, topic: &str| Trigger {
            id: id.into(),
            name: name.into(),
            topic: topic.into(),
            workflow: "ingest".into(),
            filter: "event.size > 10".into(),
            ..Default::default()
        };
        store
            .create_trigger(trigger("t1", "b-upload", "uploads"))
            .await?;
        store
            .create_trigger(trigger("t2", "a-upload", "uploads"))
            .await?;
        store
            .create_trigger(trigger("t3", "other", "deletes"))
            .await?;
        let err = store
            .create_trigger(trigger("t4", "other", "x"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
        let names = |ts: Vec<Trigger>| ts.into_iter().map(|t| t.name).collect::<Vec<_>>();
        assert_eq!(
            names(store.list_triggers("uploads").await?),
            ["a-upload", "b-upload"]
        );
        assert_eq!(names(store.list_triggers("").await?).len(), 3);
        store.delete_trigger("a-upload").await?;
        store.delete_trigger("t3").await?;
        assert_eq!(names(store.list_triggers("").await?), ["b-upload"]);
        let err = store.delete_trigger("t3").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");

        let mut backfill = Backfill {
            id: run_id(1),
            workflow: "ingest".into(),
            max_concurrency: 3,
            state: BackfillState::Running as i32,
            total: 10,
            queued: 10,
            ..Default::default()
        };
        let first = store.put_backfill(backfill.clone()).await?;
        assert_eq!(first.revision, 1);
        store
            .put_backfill(Backfill {
                id: run_id(2),
                ..backfill.clone()
            })
            .await?;
        backfill = first.clone();
        backfill.done = 4;
        backfill.queued = 6;
        let second = store.put_backfill(backfill.clone()).await?;
        assert_eq!(second.revision, 2);
        assert_eq!(store.get_backfill(&run_id(1)).await?, second);
        // A writer that read revision 1 lost the race: refused, nothing written.
        let stale = Backfill {
            state: BackfillState::Cancelled as i32,
            ..first.clone()
        };
        let err = store.put_backfill(stale).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict(ref m) if m.contains("stored revision 2")),
            "{err:?}"
        );
        assert_eq!(store.get_backfill(&run_id(1)).await?, second);
        // So is a second create of the same id, and an update of a record that does not exist.
        let err = store.put_backfill(backfill.clone()).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        let err = store
            .put_backfill(Backfill {
                id: run_id(3),
                ..second.clone()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        let ids: Vec<_> = store
            .list_backfills()
            .await?
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(ids, [run_id(2), run_id(1)]);
        let err = store.get_backfill("nope").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        Ok(())
    }

    // Leases and fencing.

    const TTL: Duration = Duration::from_secs(30);

    pub async fn lease_is_taken_refreshed_and_handed_over(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let before = SystemTime::now();
        let a = store.acquire_lease("executor", "host-a/1", TTL).await?;
        assert_eq!(
            (a.name.as_str(), a.holder.as_str(), a.epoch),
            ("executor", "host-a/1", 1)
        );
        // Judged by the database's clock, which is this machine's here: about now + TTL.
        let lasts = a.expires_at.duration_since(before)?;
        assert!(
            lasts > TTL - Duration::from_secs(5) && lasts <= TTL + Duration::from_secs(5),
            "{lasts:?}"
        );

        // The holder asking again refreshes it: same epoch.
        let again = store.acquire_lease("executor", "host-a/1", TTL).await?;
        assert_eq!(again.epoch, 1);
        assert!(again.expires_at >= a.expires_at);

        // Someone else is told who holds it and for how long.
        let err = store
            .acquire_lease("executor", "host-b/2", TTL)
            .await
            .unwrap_err();
        match &err {
            StoreError::LeaseHeld {
                name,
                holder,
                expires_in,
            } => {
                assert_eq!((name.as_str(), holder.as_str()), ("executor", "host-a/1"));
                assert!(
                    *expires_in > Duration::ZERO && *expires_in <= TTL,
                    "{expires_in:?}"
                );
            }
            other => panic!("expected LeaseHeld, got {other:?}"),
        }
        assert!(err.to_string().contains("\"host-a/1\""), "{err}");
        assert!(!err.is_outage());

        // Leases are named: another partition's lease is independent.
        let p3 = store
            .acquire_lease("executor/partition-3", "host-b/2", TTL)
            .await?;
        assert_eq!((p3.holder.as_str(), p3.epoch), ("host-b/2", 1));

        // Renewing keeps the epoch and pushes the expiry.
        let renewed = store.renew_lease(&again, TTL).await?;
        assert_eq!(renewed.epoch, 1);
        assert!(renewed.expires_at >= again.expires_at);

        // Released: a standby takes it at once, with the next epoch.
        store.release_lease(&renewed).await?;
        let b = store.acquire_lease("executor", "host-b/2", TTL).await?;
        assert_eq!((b.holder.as_str(), b.epoch), ("host-b/2", 2));
        Ok(())
    }

    /// The first caller fixes the partition count; later callers (another replica started
    /// with another --partitions) get the stored one back.
    pub async fn cluster_partition_count_is_written_once(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        for bad in [0, dagmesh_metastore::MAX_PARTITIONS + 1] {
            let err = store.init_cluster(bad).await.unwrap_err();
            assert!(
                matches!(&err, StoreError::InvalidArgument(m) if m.starts_with("partitions: ") && m.contains("1 to 4096")),
                "{err:?}"
            );
        }
        assert_eq!(store.init_cluster(64).await?, 64);
        assert_eq!(store.init_cluster(256).await?, 64);
        assert_eq!(store.init_cluster(64).await?, 64);
        Ok(())
    }

    /// Recovery by partition: a replica reads the active runs (with their steps) of the
    /// partitions it took, and nothing of the others.
    pub async fn active_runs_are_read_by_partition(store: Arc<dyn MetadataStore>) -> Result<()> {
        let mut mutations = Vec::new();
        for (n, partition, state) in [
            (1, 0, RunState::Running),
            (2, 1, RunState::Queued),
            (3, 2, RunState::Running),
            (4, 1, RunState::Succeeded),
            (5, 4095, RunState::Running),
        ] {
            let id = run_id(n);
            let mut run = run(&id, "build", state);
            run.partition = partition;
            mutations.push(put_run(run));
            mutations.push(put_step(step(&id, "fetch", StepState::Running)));
        }
        store.commit(mutations).await?;
        let ids = |runs: &[Run]| runs.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>();

        let some = store.read_active_runs_checked(Some(&[1, 2])).await?;
        assert_eq!(ids(&some.runs), [run_id(2), run_id(3)]);
        assert!(some.runs.iter().all(|r| r.steps.len() == 1));
        assert_eq!(
            some.runs[0].partition, 1,
            "the partition survives the round trip"
        );
        let last = store.read_active_runs_checked(Some(&[4095])).await?;
        assert_eq!(ids(&last.runs), [run_id(5)]);
        assert!(
            store
                .read_active_runs_checked(Some(&[]))
                .await?
                .runs
                .is_empty()
        );
        assert!(
            store
                .read_active_runs_checked(Some(&[7]))
                .await?
                .runs
                .is_empty()
        );
        let every = store.read_active_runs_checked(None).await?;
        assert_eq!(
            ids(&every.runs),
            [run_id(1), run_id(2), run_id(3), run_id(5)]
        );

        // The partition is fixed at creation: an update cannot move a run.
        let mut moved = store.get_run(&run_id(1)).await?;
        moved.partition = 2;
        store.commit(vec![put_run(moved)]).await?;
        assert_eq!(
            ids(&store.read_active_runs_checked(Some(&[0])).await?.runs),
            [run_id(1)]
        );

        let err = store
            .read_active_runs_checked(Some(&[3, 4096]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.starts_with("partitions[1]: 4096")),
            "{err:?}"
        );
        let too_many: Vec<u32> = (0..4097).map(|n| n % 4096).collect();
        let err = store
            .read_active_runs_checked(Some(&too_many))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.contains("4097 entries")),
            "{err:?}"
        );
        let mut outside = run(&run_id(6), "build", RunState::Running);
        outside.partition = 4096;
        let err = store.commit(vec![put_run(outside)]).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.starts_with("mutations[0].put_run.partition: 4096")),
            "{err:?}"
        );
        Ok(())
    }

    /// A batch that touches runs of several partitions names every partition's lease: one of
    /// them stale refuses the whole batch, naming it.
    pub async fn a_commit_is_fenced_by_every_lease_it_names(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let (r1, r2) = (run_id(1), run_id(2));
        let p0 = store.acquire_lease("executor/p-0", "a", TTL).await?;
        let p1 = store.acquire_lease("executor/p-1", "a", TTL).await?;
        store
            .commit_fenced(
                &[p0.clone(), p1.clone()],
                vec![put_run(run(&r1, "build", RunState::Running))],
            )
            .await?;

        // p-1 moves to b; a's next batch over both partitions is refused whole.
        store.release_lease(&p1).await?;
        let b1 = store.acquire_lease("executor/p-1", "b", TTL).await?;
        let err = store
            .commit_fenced(
                &[p0.clone(), p1.clone()],
                vec![
                    put_run(run(&r2, "build", RunState::Running)),
                    append(event(&r1, 1)),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::Fenced {
                name: "executor/p-1".into(),
                epoch: 1,
                current_epoch: 2
            }
        );
        assert!(matches!(
            store.get_run(&r2).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.read_events(&r1, 0, 0).await?.is_empty());
        // What a still holds goes on alone; b writes its own.
        store
            .commit_fenced(std::slice::from_ref(&p0), vec![append(event(&r1, 1))])
            .await?;
        store
            .commit_fenced(
                std::slice::from_ref(&b1),
                vec![put_run(run(&r2, "build", RunState::Running))],
            )
            .await?;
        assert_eq!(seqs(&store.read_events(&r1, 0, 0).await?), [1]);

        // The fences themselves are checked.
        let err = store.commit_fenced(&[], vec![]).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.starts_with("fences: at least one")),
            "{err:?}"
        );
        let err = store
            .commit_fenced(&[p0.clone(), b1.clone(), p0.clone()], vec![])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.starts_with("fences[2].name: \"executor/p-0\" is given twice")),
            "{err:?}"
        );
        // One per partition and the executor's own lease fit; one more does not.
        let many: Vec<_> = (0..4098)
            .map(|n| dagmesh_metastore::Lease {
                name: format!("executor/p-{n}"),
                ..p0.clone()
            })
            .collect();
        let err = store.commit_fenced(&many, vec![]).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.contains("4098 leases, over the limit of 4097")),
            "{err:?}"
        );
        Ok(())
    }

    pub async fn lease_fences_commits_renewals_and_releases(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let (r1, r2, r3) = (run_id(1), run_id(2), run_id(3));
        let a = store.acquire_lease("executor", "a", TTL).await?;
        store
            .commit_fenced(
                std::slice::from_ref(&a),
                vec![put_run(run(&r1, "build", RunState::Running))],
            )
            .await?;
        assert_eq!(store.get_run(&r1).await?.state(), RunState::Running);

        store.release_lease(&a).await?;
        let b = store.acquire_lease("executor", "b", TTL).await?;
        assert_eq!(b.epoch, 2);

        // The old holder does not know yet: its next batch is refused whole.
        let err = store
            .commit_fenced(
                std::slice::from_ref(&a),
                vec![
                    put_run(run(&r2, "build", RunState::Running)),
                    put_step(step(&r1, "fetch", StepState::Running)),
                    append(event(&r1, 1)),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::Fenced {
                name: "executor".into(),
                epoch: 1,
                current_epoch: 2
            }
        );
        assert!(
            err.to_string().contains("epoch 1") && err.to_string().contains("epoch is 2"),
            "{err}"
        );
        assert!(!err.is_outage());
        assert!(matches!(
            store.get_run(&r2).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(store.get_run(&r1).await?.steps.is_empty());
        assert!(store.read_events(&r1, 0, 0).await?.is_empty());

        // Nor can it renew or release what it lost; the new holder keeps it.
        let err = store.renew_lease(&a, TTL).await.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Fenced {
                    epoch: 1,
                    current_epoch: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = store.release_lease(&a).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");
        let err = store.acquire_lease("executor", "a", TTL).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::LeaseHeld { holder, .. } if holder == "b"),
            "{err:?}"
        );

        // A lease that was never taken fences everything.
        let never = dagmesh_metastore::Lease {
            name: "never".into(),
            ..b.clone()
        };
        let err = store
            .commit_fenced(
                std::slice::from_ref(&never),
                vec![put_run(run(&r3, "build", RunState::Running))],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Fenced {
                    current_epoch: 0,
                    ..
                }
            ),
            "{err:?}"
        );

        // The new holder commits; the expiry is not part of the fence, only the epoch.
        store
            .commit_fenced(
                std::slice::from_ref(&b),
                vec![
                    put_run(run(&r3, "build", RunState::Running)),
                    append(event(&r3, 1)),
                ],
            )
            .await?;
        assert_eq!(seqs(&store.read_events(&r3, 0, 0).await?), [1]);
        // A conflict inside a fenced commit is still a conflict (and nothing half-applies).
        let err = store
            .commit_fenced(
                std::slice::from_ref(&b),
                vec![
                    put_step(step(&r3, "fetch", StepState::Ready)),
                    append(event(&r3, 1)),
                ],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
        assert!(store.get_run(&r3).await?.steps.is_empty());
        Ok(())
    }

    pub async fn live_leases_are_listed_by_prefix(store: Arc<dyn MetadataStore>) -> Result<()> {
        let short = Duration::from_secs(1);
        store.acquire_lease("members/scheduler/b", "b", TTL).await?;
        store.acquire_lease("members/scheduler/a", "a", TTL).await?;
        store
            .acquire_lease("members/scheduler/gone", "g", short)
            .await?;
        store.acquire_lease("members/executor/x", "x", TTL).await?;
        let released = store
            .acquire_lease("members/scheduler/left", "l", TTL)
            .await?;
        store.release_lease(&released).await?;
        // Waiting for a lease's time to pass: the database's clock decides.
        tokio::time::sleep(short * 2).await;
        let live = store.list_live_leases("members/scheduler/").await?;
        let holders: Vec<&str> = live.iter().map(|l| l.holder.as_str()).collect();
        assert_eq!(
            holders,
            ["a", "b"],
            "only unexpired leases with the prefix, by name"
        );
        assert_eq!(live[0].name, "members/scheduler/a");
        assert_eq!(live[0].epoch, 1);
        // `%` and `_` are plain characters in a prefix, not patterns.
        assert!(store.list_live_leases("members/%").await?.is_empty());
        let err = store.list_live_leases("").await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument(ref m) if m.contains("prefix")),
            "{err}"
        );
        let err = store.list_live_leases(&"p".repeat(129)).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument(ref m) if m.contains("128")),
            "{err}"
        );
        Ok(())
    }

    pub async fn only_long_expired_member_leases_are_deleted(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let short = Duration::from_secs(1);
        store.acquire_lease("members/g/gone", "gone", short).await?;
        store.acquire_lease("members/g/live", "live", TTL).await?;
        let partition = store.acquire_lease("g/p-1", "gone", short).await?;
        // Waiting for the leases' time to pass: the database's clock decides.
        tokio::time::sleep(short * 3).await;
        // Expired for less than an hour: kept.
        assert_eq!(
            store
                .delete_expired_leases("members/g/", Duration::from_secs(3600))
                .await?,
            0
        );
        assert_eq!(store.delete_expired_leases("members/g/", short).await?, 1);
        let live = store.list_live_leases("members/g/").await?;
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].holder, "live");
        // A partition's lease is never deleted: its epoch keeps fencing.
        let err = store.delete_expired_leases("g/", short).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument(ref m) if m.contains("members/")),
            "{err:?}"
        );
        let again = store.acquire_lease("g/p-1", "next", TTL).await?;
        assert_eq!(again.epoch, partition.epoch + 1);
        let err = store
            .delete_expired_leases("members/g/", Duration::ZERO)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument(ref m) if m.starts_with("expired_for:")),
            "{err:?}"
        );
        Ok(())
    }

    pub async fn leases_are_renewed_and_taken_in_one_claim(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let short = Duration::from_secs(1);
        let mine = store.acquire_lease("x/p-0", "me", TTL).await?;
        let stolen = store.acquire_lease("x/p-1", "me", short).await?;
        store.acquire_lease("x/p-2", "other", TTL).await?;
        store.acquire_lease("x/p-3", "gone", short).await?;
        // Waiting for the short leases' time to pass: the database's clock decides.
        tokio::time::sleep(short * 2).await;
        let thief = store.acquire_lease("x/p-1", "thief", TTL).await?;
        assert_eq!(thief.epoch, stolen.epoch + 1);

        let take: Vec<String> = ["x/p-2", "x/p-3", "x/p-4"].map(String::from).to_vec();
        let claimed = store
            .claim_leases("me", TTL, &[mine.clone(), stolen.clone()], &take)
            .await?;
        assert_eq!(claimed.kept.len(), 1);
        assert_eq!(claimed.kept[0].name, "x/p-0");
        assert_eq!(
            claimed.kept[0].epoch, mine.epoch,
            "a renewal keeps the epoch"
        );
        assert!(claimed.kept[0].expires_at >= mine.expires_at);
        assert_eq!(claimed.lost, ["x/p-1"], "taken by another holder since");
        let taken: Vec<(&str, u64)> = claimed
            .taken
            .iter()
            .map(|lease| (lease.name.as_str(), lease.epoch))
            .collect();
        // p-2 is held unexpired by another: skipped. p-3 expired: epoch 2. p-4 is new: epoch 1.
        assert_eq!(taken, [("x/p-3", 2), ("x/p-4", 1)]);
        assert!(claimed.taken.iter().all(|lease| lease.holder == "me"));
        // What was renewed and taken fences commits; the lost lease does not.
        store
            .commit_fenced(&[claimed.kept[0].clone(), claimed.taken[0].clone()], vec![])
            .await?;
        let err = store.commit_fenced(&[stolen], vec![]).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");
        assert!(
            store
                .claim_leases("me", TTL, &[], &[])
                .await?
                .taken
                .is_empty()
        );

        for (keep, take, wanted) in [
            (vec![thief.clone()], vec![], "keep[0].holder"),
            (
                vec![],
                vec!["x/p-9".to_owned(), "x/p-9".to_owned()],
                "take[1]: \"x/p-9\" is given twice",
            ),
            (vec![], vec![String::new()], "take[0]: must not be empty"),
            (vec![], vec!["p".repeat(129)], "take[0]: 129 bytes"),
            (
                vec![],
                vec!["x/p-0".to_owned(); 4097],
                "take: 4097 leases, over the limit of 4096",
            ),
        ] {
            let err = store
                .claim_leases("me", TTL, &keep, &take)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidArgument(ref m) if m.starts_with(wanted)),
                "{wanted}: {err:?}"
            );
        }
        let err = store.claim_leases("", TTL, &[], &take).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument(ref m) if m.starts_with("holder")),
            "{err:?}"
        );
        Ok(())
    }

    pub async fn ownership_splits_partitions_and_hands_them_over(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        use dagmesh_metastore::ownership::Ownership;
        const PARTITIONS: u32 = 16;
        let member = |holder: &str| {
            Ownership::new(store.clone(), "test", holder.to_owned(), PARTITIONS, TTL)
        };
        let owned = |o: &Ownership| o.owned().map(|(p, _)| p).collect::<HashSet<u32>>();
        let (mut a, mut b) = (member("a"), member("b"));

        // Alone, a owns everything.
        let first = a.refresh().await?;
        assert_eq!(first.gained.len(), PARTITIONS as usize);
        let old_leases: Vec<_> = a.owned().map(|(p, l)| (p, l.clone())).collect();
        // b joins: a still holds b's share until a notices and hands it over.
        assert!(b.refresh().await?.gained.is_empty());
        let handed = a.refresh().await?;
        assert!(
            !handed.released.is_empty() && handed.lost.is_empty(),
            "{handed:?}"
        );
        let taken = b.refresh().await?;
        assert_eq!(
            taken.gained, handed.released,
            "b takes exactly what a handed over"
        );
        let (in_a, in_b) = (owned(&a), owned(&b));
        assert!(in_a.is_disjoint(&in_b));
        assert_eq!(in_a.len() + in_b.len(), PARTITIONS as usize);
        // A member's view agrees with the keys it owns.
        let key = (0..)
            .map(|i| format!("schedule-{i}"))
            .find(|k| in_b.contains(&b.partition_of(k)))
            .unwrap();
        assert!(b.owns_key(&key) && !a.owns_key(&key));

        // The old owner's lease on a moved partition no longer fences a write in.
        let (moved, stale) = old_leases
            .iter()
            .find(|(p, _)| in_b.contains(p))
            .unwrap()
            .clone();
        let err = store
            .commit_fenced(std::slice::from_ref(&stale), vec![])
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Fenced { .. }),
            "partition {moved}: {err:?}"
        );

        // a leaves cleanly: b takes everything at its next refresh.
        a.release_all().await;
        let rest = b.refresh().await?;
        assert_eq!(rest.gained.len(), in_a.len());
        assert_eq!(owned(&b).len(), PARTITIONS as usize);
        Ok(())
    }

    pub async fn lease_expires_by_the_clock(store: Arc<dyn MetadataStore>) -> Result<()> {
        // Long enough that the second acquire below lands before expiry on a loaded machine
        // (100 ms was not: a busy CI box took longer between the two statements).
        let short = Duration::from_secs(1);
        let a = store.acquire_lease("executor", "a", short).await?;
        assert!(matches!(
            store.acquire_lease("executor", "b", TTL).await,
            Err(StoreError::LeaseHeld { .. })
        ));
        // Waiting for the lease's time to pass (not for readiness): the database's clock
        // decides, so virtual time cannot stand in.
        tokio::time::sleep(short * 2).await;
        let b = store.acquire_lease("executor", "b", TTL).await?;
        assert_eq!((b.holder.as_str(), b.epoch), ("b", 2));
        let err = store.renew_lease(&a, TTL).await.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Fenced {
                    epoch: 1,
                    current_epoch: 2,
                    ..
                }
            ),
            "{err:?}"
        );

        // The same holder taking its own expired lease again gets a new epoch: the lease may
        // have been used by a predecessor under the same name.
        let c = store.acquire_lease("other", "c", short).await?;
        tokio::time::sleep(short * 3).await;
        let c2 = store.acquire_lease("other", "c", TTL).await?;
        assert_eq!((c.epoch, c2.epoch), (1, 2));
        // An expired lease nobody took is still fenced by its epoch only: renewing revives it.
        let d = store.acquire_lease("third", "d", short).await?;
        tokio::time::sleep(short * 3).await;
        assert_eq!(store.renew_lease(&d, TTL).await?.epoch, 1);
        Ok(())
    }

    pub async fn concurrent_acquirers_exactly_one_wins(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .acquire_lease("executor", &format!("holder-{i}"), TTL)
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut refusals = Vec::new();
        for task in tasks {
            match task.await? {
                Ok(lease) => winners.push(lease),
                Err(StoreError::LeaseHeld { holder, .. }) => refusals.push(holder),
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        assert_eq!(winners[0].epoch, 1);
        assert_eq!(refusals.len(), 7);
        assert!(
            refusals.iter().all(|h| *h == winners[0].holder),
            "{refusals:?}"
        );
        Ok(())
    }

    pub async fn lease_requests_are_checked(store: Arc<dyn MetadataStore>) -> Result<()> {
        let err = store
            .acquire_lease("executor", "a", Duration::ZERO)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.starts_with("ttl")),
            "{err:?}"
        );
        let err = store
            .acquire_lease("executor", "a", Duration::from_secs(u64::MAX))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.starts_with("ttl")),
            "{err:?}"
        );
        let long = "n".repeat(300);
        let err = store.acquire_lease(&long, "a", TTL).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m)
                if m.contains("lease.name") && m.contains("300 bytes") && m.contains("128")),
            "{err:?}"
        );
        let err = store.acquire_lease("executor", "", TTL).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.contains("lease.holder")),
            "{err:?}"
        );
        // Nothing was taken by the refused requests.
        assert_eq!(store.acquire_lease("executor", "a", TTL).await?.epoch, 1);
        Ok(())
    }

    pub async fn conflicts_are_request_errors_not_outages(
        store: Arc<dyn MetadataStore>,
    ) -> Result<()> {
        let r1 = run_id(1);
        store
            .commit(vec![
                put_run(run(&r1, "build", RunState::Running)),
                append(event(&r1, 5)),
            ])
            .await?;
        // What two executors on one database ran into: the second write of event 5.
        let err = store
            .commit(vec![
                put_step(step(&r1, "fetch", StepState::Running)),
                append(event(&r1, 5)),
            ])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::AlreadyExists(m)
                if m.contains("event 5") && m.contains(&r1)),
            "{err:?}"
        );
        assert!(!err.is_outage(), "{err:?}");
        // The store is fine: the next batch goes through.
        store
            .commit(vec![
                put_step(step(&r1, "fetch", StepState::Running)),
                append(event(&r1, 6)),
            ])
            .await?;
        assert_eq!(seqs(&store.read_events(&r1, 0, 0).await?), [5, 6]);

        // A value the database cannot store (PostgreSQL refuses NUL in text; SQLite keeps it)
        // is the request's fault either way.
        let nul = format!("{}\0x", run_id(2));
        match store
            .commit(vec![put_run(run(&nul, "build", RunState::Running))])
            .await
        {
            Ok(()) => {}
            Err(err) => assert!(
                matches!(err, StoreError::InvalidArgument(_)) && !err.is_outage(),
                "{err:?}"
            ),
        }
        store.commit(vec![append(event(&r1, 7))]).await?;
        Ok(())
    }

    // Unreadable records.

    /// A payload nested `levels` deep: encodes fine, but prost refuses to decode it (its
    /// recursion limit is 100), like a record written before the depth limit existed.
    fn deep_struct(levels: usize) -> prost_types::Struct {
        use prost_types::{Struct, Value, value::Kind};
        let mut inner = Struct::default();
        for _ in 0..levels {
            inner = Struct {
                fields: [(
                    "a".to_owned(),
                    Value {
                        kind: Some(Kind::StructValue(inner)),
                    },
                )]
                .into(),
            };
        }
        inner
    }

    /// Garbage: a field header promising more bytes than there are.
    const GARBAGE: &[u8] = &[0x0a, 0xff, 0xff, 0x03, 0x01];

    /// Runs with damaged records: returns (good, bad step, deep run record, garbage run record).
    async fn plant_damage(
        store: &Arc<dyn MetadataStore>,
        raw: &Raw,
    ) -> Result<(String, String, String, String)> {
        let (good, bad_step, deep_run, garbage_run) = (run_id(1), run_id(2), run_id(3), run_id(4));
        let mut mutations = Vec::new();
        for id in [&good, &bad_step, &deep_run, &garbage_run] {
            mutations.push(put_run(tagged(
                keyed(run(id, "build", RunState::Running), &format!("key-{id}")),
                &[("team", "a")],
            )));
            mutations.push(put_step(step(id, "fetch", StepState::Succeeded)));
            mutations.push(put_step(step(id, "render", StepState::Running)));
            for seq in 1..=3 {
                mutations.push(append(event(id, seq)));
            }
        }
        store.commit(mutations).await?;

        let mut render = step(&bad_step, "render", StepState::Running);
        render.outputs = Some(deep_struct(200));
        raw.set_step_body(&bad_step, "render", render.encode_to_vec())
            .await?;
        raw.set_event_body(&bad_step, 2, GARBAGE.to_vec()).await?;
        let mut deep = tagged(
            keyed(
                run(&deep_run, "build", RunState::Running),
                &format!("key-{deep_run}"),
            ),
            &[("team", "a")],
        );
        deep.workflow_version = 4;
        deep.inputs = Some(deep_struct(200));
        raw.set_run_body(&deep_run, deep.encode_to_vec()).await?;
        raw.set_run_body(&garbage_run, GARBAGE.to_vec()).await?;
        Ok((good, bad_step, deep_run, garbage_run))
    }

    pub async fn unreadable_records_never_fail_reads(
        store: Arc<dyn MetadataStore>,
        raw: Raw,
    ) -> Result<()> {
        let (good, bad_step, deep_run, garbage_run) = plant_damage(&store, &raw).await?;

        // Recovery: the readable run comes back whole, each damaged one is named with why.
        let active = store.read_active_runs_checked(None).await?;
        assert_eq!(run_ids(&active.runs), [good.as_str()]);
        assert_eq!(step_ids(&active.runs[0]), ["fetch", "render"]);
        let unreadable: Vec<_> = active
            .unreadable
            .iter()
            .map(|u| (u.run_id.as_str(), u.workflow.as_str(), u.workflow_version))
            .collect();
        assert_eq!(
            unreadable,
            [
                (bad_step.as_str(), "build", 1),
                (deep_run.as_str(), "build", 4),
                // Not even the header decodes: the version is unknown.
                (garbage_run.as_str(), "build", 0),
            ]
        );
        let reason = &active.unreadable[0].reason;
        assert!(
            reason.contains("step \"render\"") && reason.contains(&bad_step),
            "{reason}"
        );
        let reason = &active.unreadable[1].reason;
        assert!(reason.contains(&format!("run {deep_run:?}")), "{reason}");

        // The old all-or-nothing read names a damaged run instead of a bare decode error.
        let err = store.read_active_runs().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::DataLoss(m) if m.contains(&bad_step)),
            "{err:?}"
        );
        assert!(!err.is_outage());

        // GetRun answers: the unreadable step is a placeholder that says so.
        let run = store.get_run(&bad_step).await?;
        assert_eq!(step_ids(&run), ["fetch", "render"]);
        assert_eq!(run.steps[0].state(), StepState::Succeeded);
        let render = &run.steps[1];
        assert_eq!(render.state(), StepState::Unspecified);
        assert_eq!(render.task_id, format!("{bad_step}/render"));
        assert!(render.error.contains("does not decode"), "{}", render.error);

        // An unreadable run record: a stand-in from the columns and what of the header decodes.
        let run = store.get_run(&deep_run).await?;
        assert_eq!(
            (run.workflow.as_str(), run.workflow_version, run.state()),
            ("build", 4, RunState::Running)
        );
        assert_eq!(run.idempotency_key, format!("key-{deep_run}"));
        assert!(run.error.contains("does not decode"), "{}", run.error);
        assert!(run.inputs.is_none());
        let run = store.get_run(&garbage_run).await?;
        assert_eq!(run.state(), RunState::Running);
        assert!(run.error.contains("does not decode"), "{}", run.error);

        // ListRuns lists every run.
        let page = store.list_runs(&ListRunsRequest::default()).await?;
        assert_eq!(page.runs.len(), 4);

        // The event log keeps its order; the damaged event says what it was.
        let events = store.read_events(&bad_step, 0, 0).await?;
        assert_eq!(seqs(&events), [1, 2, 3]);
        assert!(matches!(
            events[0].event,
            Some(run_event::Event::StepLog(_))
        ));
        match &events[1].event {
            Some(run_event::Event::Unreadable(u)) => {
                assert!(u.reason.contains("event 2"), "{}", u.reason);
            }
            other => panic!("expected unreadable, got {other:?}"),
        }
        assert_eq!(events[1].run_id, bad_step);
        assert!(matches!(
            events[2].event,
            Some(run_event::Event::StepLog(_))
        ));
        Ok(())
    }

    pub async fn quarantine_ends_unreadable_runs(
        store: Arc<dyn MetadataStore>,
        raw: Raw,
    ) -> Result<()> {
        let (good, bad_step, deep_run, garbage_run) = plant_damage(&store, &raw).await?;
        let reason = "quarantined: unreadable records";

        let run = store.quarantine_run(&bad_step, reason).await?;
        assert_eq!(
            (run.state(), run.error.as_str()),
            (RunState::Failed, reason)
        );
        assert!(run.finished_at.is_some());
        assert_eq!(step_ids(&run), ["fetch", "render"]);
        // The readable, finished step is left alone; the unreadable one is FAILED with why.
        assert_eq!(run.steps[0].state(), StepState::Succeeded);
        assert_eq!(run.steps[1].state(), StepState::Failed);
        assert!(
            run.steps[1].error.contains("does not decode"),
            "{}",
            run.steps[1].error
        );
        assert_eq!(store.get_run(&bad_step).await?, run);

        // The log goes on after the highest stored seq and ends with the run's failure.
        let events = store.read_events(&bad_step, 3, 0).await?;
        assert_eq!(seqs(&events), [4, 5]);
        assert!(matches!(
            &events[0].event,
            Some(run_event::Event::StepState(s))
                if s.step_id == "render" && s.state() == StepState::Failed
        ));
        match &events[1].event {
            Some(run_event::Event::RunState(s)) => {
                assert_eq!((s.state(), s.error.as_str()), (RunState::Failed, reason));
            }
            other => panic!("expected RunStateChanged, got {other:?}"),
        }
        assert_eq!(run.last_seq, 5);

        // A run whose own record is unreadable is rebuilt from its columns; its unfinished
        // step is cancelled like any failed run's.
        let run = store.quarantine_run(&deep_run, reason).await?;
        assert_eq!(
            (run.state(), run.workflow_version, run.error.as_str()),
            (RunState::Failed, 4, reason)
        );
        assert_eq!(run.tags.get("team").map(String::as_str), Some("a"));
        assert_eq!(run.steps[1].state(), StepState::Cancelled);
        assert_eq!(run.steps[1].error, reason);
        store.quarantine_run(&garbage_run, reason).await?;
        assert_eq!(store.get_run(&garbage_run).await?.state(), RunState::Failed);

        // Recovery now sees only the good run, and nothing unreadable.
        let active = store.read_active_runs_checked(None).await?;
        assert_eq!(run_ids(&active.runs), [good.as_str()]);
        assert!(active.unreadable.is_empty(), "{:?}", active.unreadable);
        assert_eq!(run_ids(&store.read_active_runs().await?), [good.as_str()]);

        let err = store.quarantine_run(&run_id(99), reason).await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        Ok(())
    }
}

#[tokio::test]
async fn sqlite_data_survives_reopen() -> anyhow::Result<()> {
    use fixtures::*;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("nested/state/meta.db");
    let url = format!("sqlite://{}", path.display());

    let store = SqliteStore::connect(&url).await?;
    assert!(
        path.exists(),
        "connect creates the file and its directories"
    );
    let (wf, _) = store
        .put_workflow(spec("build", "one"), "h1".into())
        .await?;
    let id = run_id(1);
    store
        .commit(vec![
            put_run(keyed(
                tagged(run(&id, "build", RunState::Running), &[("team", "a")]),
                "key-1",
            )),
            put_step(step(&id, "b", StepState::Running)),
            put_step(step(&id, "a", StepState::Pending)),
            append(event(&id, 1)),
            append(event(&id, 2)),
        ])
        .await?;
    let before = store.get_run(&id).await?;
    store.close().await;
    drop(store);

    let store = SqliteStore::connect(&url).await?;
    assert_eq!(store.get_workflow("build", None).await?, wf);
    assert_eq!(store.get_run(&id).await?, before);
    assert_eq!(seqs(&store.read_events(&id, 0, 0).await?), [1, 2]);
    assert_eq!(
        store.find_run_by_idempotency_key("key-1").await?,
        Some(id.clone())
    );
    let tagged_runs = store
        .list_runs(&ListRunsRequest {
            tags: [("team".to_owned(), "a".to_owned())].into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(run_ids(&tagged_runs.runs), [id.as_str()]);
    assert_eq!(run_ids(&store.read_active_runs().await?), [id.as_str()]);

    // New steps still go after the ones written before the restart.
    store
        .commit(vec![put_step(step(&id, "c", StepState::Pending))])
        .await?;
    assert_eq!(step_ids(&store.get_run(&id).await?), ["b", "a", "c"]);
    store.close().await;
    Ok(())
}

/// A metastore that cannot be reached is `Unavailable` (retryable), not an internal error.
#[tokio::test]
async fn grpc_client_reports_unreachable_metastore_as_unavailable() -> anyhow::Result<()> {
    // Bind then drop: the port is (almost certainly) closed now.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?;
    let client =
        MetadataGrpcClient::connect(&format!("http://{addr}"), &Default::default()).await?;
    let err = client.get_run("r").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");

    let err = MetadataGrpcClient::connect("not a url", &Default::default())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    Ok(())
}

/// Requests the typed client never sends, over the wire: a partition filter with
/// `every_partition`, a filter on the strict ReadActiveRuns, a fence without a lease. Each is
/// INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn raw_partition_requests_are_refused_naming_the_field() -> anyhow::Result<()> {
    use dagmesh_proto::v1::metadata_service_client::MetadataServiceClient;
    use dagmesh_proto::v1::{CommitFencedRequest, InitClusterRequest, ReadActiveRunsRequest};
    let dir = tempfile::tempdir()?;
    let backing = connect_sql(&harness::sqlite_url(dir.path())).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetadataGrpcServer::new(backing.clone()).into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = MetadataServiceClient::new(channel);
    let refused = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    };
    let both = ReadActiveRunsRequest {
        partitions: vec![1],
        every_partition: true,
    };
    refused(
        client
            .read_active_runs_checked(both.clone())
            .await
            .unwrap_err(),
        "partitions: must be empty with every_partition",
    );
    refused(
        client.read_active_runs(both).await.unwrap_err(),
        "partitions: ReadActiveRuns reads every partition",
    );
    refused(
        client
            .commit_fenced(CommitFencedRequest::default())
            .await
            .unwrap_err(),
        "fences: at least one lease is required",
    );
    refused(
        client
            .init_cluster(InitClusterRequest { partitions: 0 })
            .await
            .unwrap_err(),
        "partitions: 0 is out of range",
    );
    // ClaimLeases: a missing or negative TTL, a lease without a name, and an epoch
    // beyond any stored one (lost, not a panic).
    use dagmesh_proto::v1::{ClaimLeasesRequest, Lease as WireLease};
    let ttl = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    let claim = |keep: Vec<WireLease>, ttl: Option<prost_types::Duration>| ClaimLeasesRequest {
        holder: "me".into(),
        ttl,
        keep,
        take: vec!["g/p-0".into()],
    };
    refused(
        client.claim_leases(claim(vec![], None)).await.unwrap_err(),
        "ttl: required",
    );
    let negative = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    refused(
        client
            .claim_leases(claim(vec![], negative))
            .await
            .unwrap_err(),
        "ttl:",
    );
    let nameless = WireLease {
        name: String::new(),
        holder: "me".into(),
        epoch: 1,
        expires_at: None,
    };
    refused(
        client
            .claim_leases(claim(vec![nameless], ttl))
            .await
            .unwrap_err(),
        "keep[0].name: must not be empty",
    );
    let beyond = WireLease {
        name: "g/p-0".into(),
        holder: "me".into(),
        epoch: u64::MAX,
        expires_at: None,
    };
    let mut request = claim(vec![beyond], ttl);
    request.take = vec!["g/p-2".into()];
    let claimed = client.claim_leases(request).await?.into_inner();
    assert_eq!(claimed.lost, ["g/p-0"]);
    assert_eq!(claimed.taken.len(), 1);
    // The empty filter (not every partition) reads nothing.
    let none = client
        .read_active_runs_checked(ReadActiveRunsRequest::default())
        .await?
        .into_inner();
    assert!(none.runs.is_empty());
    server.abort();
    backing.close().await;
    Ok(())
}
