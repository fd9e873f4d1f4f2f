//! [`SqlStore`]: the [`MetadataStore`] on SQLite or PostgreSQL, through sqlx.
//!
//! The two dialects differ enough (placeholders, BLOB vs BYTEA, batch inserts) that each backend
//! has its own module with its own SQL; what they share (record encoding, paging, assembling a
//! run from its rows) lives here.

mod postgres;
mod sqlite;

use dagmesh_proto::v1::{
    Backfill, ListRunsRequest, ListRunsResponse, Mutation, Run, RunEvent, Schedule, Step, Trigger,
    Workflow, WorkflowSpec,
};
use prost::Message;
use prost_types::Timestamp;
use sqlx::QueryBuilder;

use crate::StoreError;
use crate::store::{MetadataStore, page_size};

/// How often `put_workflow` retries after losing a race for the next version number. Each lost
/// race means another writer committed a version, so this bounds the number of concurrent
/// writers of one workflow name, not the time.
const PUT_WORKFLOW_ATTEMPTS: usize = 64;

/// A metadata store in a SQL database, chosen by URL:
///
/// - `sqlite://PATH` (the file and its parent directories are created when missing) or
///   `sqlite::memory:` (gone when the store is dropped);
/// - `postgres://...` or `postgresql://...` (the database must exist).
///
/// `connect` applies the embedded schema migrations. Dropping the store (or [`SqlStore::close`])
/// closes its connections.
pub struct SqlStore {
    backend: Backend,
}

enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl SqlStore {
    /// Opens (and migrates) the database at `url`.
    pub async fn connect(url: &str) -> Result<SqlStore, StoreError> {
        let Some((scheme, _)) = url.split_once(':') else {
            return Err(StoreError::InvalidArgument(
                "metadata store URL has no scheme: use sqlite://PATH, sqlite::memory: or \
                 postgres://HOST/DB"
                    .to_owned(),
            ));
        };
        let backend = match scheme {
            "sqlite" => Backend::Sqlite(sqlite::SqliteStore::connect(url).await?),
            "postgres" | "postgresql" => Backend::Postgres(postgres::PgStore::connect(url).await?),
            other => {
                return Err(StoreError::InvalidArgument(format!(
                    "unsupported metadata store URL scheme {other:?}: use sqlite://PATH, \
                     sqlite::memory: or postgres://HOST/DB"
                )));
            }
        };
        let store = SqlStore { backend };
        tracing::info!(backend = store.backend_name(), "metadata store ready");
        Ok(store)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Closes the connections, waiting for operations in flight. Later calls fail with
    /// `Unavailable`. For SQLite this also checkpoints the write-ahead log into the database file.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(s) => s.close().await,
            Backend::Postgres(p) => p.close().await,
        }
    }

    fn inner(&self) -> &dyn MetadataStore {
        match &self.backend {
            Backend::Sqlite(s) => s,
            Backend::Postgres(p) => p,
        }
    }
}

#[async_trait::async_trait]
impl MetadataStore for SqlStore {
    async fn put_workflow(
        &self,
        spec: WorkflowSpec,
        content_hash: String,
    ) -> Result<(Workflow, bool), StoreError> {
        self.inner().put_workflow(spec, content_hash).await
    }

    async fn get_workflow(&self, name: &str, version: Option<u32>) -> Result<Workflow, StoreError> {
        self.inner().get_workflow(name, version).await
    }

    async fn list_workflows(&self) -> Result<Vec<Workflow>, StoreError> {
        self.inner().list_workflows().await
    }

    async fn commit(&self, mutations: Vec<Mutation>) -> Result<(), StoreError> {
        self.inner().commit(mutations).await
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, StoreError> {
        self.inner().get_run(run_id).await
    }

    async fn list_runs(&self, req: &ListRunsRequest) -> Result<ListRunsResponse, StoreError> {
        self.inner().list_runs(req).await
    }

    async fn find_run_by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner().find_run_by_idempotency_key(key).await
    }

    async fn read_events(
        &self,
        run_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<RunEvent>, StoreError> {
        self.inner().read_events(run_id, after_seq, limit).await
    }

    async fn read_active_runs(&self) -> Result<Vec<Run>, StoreError> {
        self.inner().read_active_runs().await
    }

    async fn create_schedule(&self, schedule: Schedule) -> Result<Schedule, StoreError> {
        self.inner().create_schedule(schedule).await
    }

    async fn get_schedule(&self, id_or_name: &str) -> Result<Schedule, StoreError> {
        self.inner().get_schedule(id_or_name).await
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>, StoreError> {
        self.inner().list_schedules().await
    }

    async fn delete_schedule(&self, id_or_name: &str) -> Result<(), StoreError> {
        self.inner().delete_schedule(id_or_name).await
    }

    async fn set_schedule_paused(
        &self,
        id_or_name: &str,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        self.inner().set_schedule_paused(id_or_name, paused).await
    }

    async fn advance_schedule(
        &self,
        id: &str,
        expected: Option<Timestamp>,
        to: Timestamp,
    ) -> Result<bool, StoreError> {
        self.inner().advance_schedule(id, expected, to).await
    }

    async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, StoreError> {
        self.inner().create_trigger(trigger).await
    }

    async fn list_triggers(&self, topic: &str) -> Result<Vec<Trigger>, StoreError> {
        self.inner().list_triggers(topic).await
    }

    async fn delete_trigger(&self, id_or_name: &str) -> Result<(), StoreError> {
        self.inner().delete_trigger(id_or_name).await
    }

    async fn put_backfill(&self, backfill: Backfill) -> Result<(), StoreError> {
        self.inner().put_backfill(backfill).await
    }

    async fn get_backfill(&self, id: &str) -> Result<Backfill, StoreError> {
        self.inner().get_backfill(id).await
    }

    async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError> {
        self.inner().list_backfills().await
    }
}

/// Decodes the `body` column of a row; `what` names the row in the error.
fn decode<M: Message + Default>(
    body: &[u8],
    what: impl FnOnce() -> String,
) -> Result<M, StoreError> {
    M::decode(body).map_err(|err| StoreError::Internal(format!("corrupt {}: {err}", what())))
}

/// The stored form of a run: without its steps, which have rows of their own.
fn encode_run(run: &Run) -> Vec<u8> {
    if run.steps.is_empty() {
        run.encode_to_vec()
    } else {
        Run {
            steps: Vec::new(),
            ..run.clone()
        }
        .encode_to_vec()
    }
}

fn new_workflow(spec: WorkflowSpec, content_hash: String, version: u32) -> Workflow {
    Workflow {
        name: spec.name.clone(),
        version,
        spec: Some(spec),
        content_hash,
        created_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
    }
}

fn validate_spec(spec: &WorkflowSpec) -> Result<(), StoreError> {
    if spec.name.is_empty() {
        return Err(StoreError::InvalidArgument(
            "spec.name: must not be empty".to_owned(),
        ));
    }
    Ok(())
}

/// `after_seq` as a bound for the `seq` column. Sequence numbers beyond `i64::MAX` are never
/// stored (commit rejects them), so a larger bound simply matches nothing.
fn seq_bound(after_seq: u64) -> i64 {
    i64::try_from(after_seq).unwrap_or(i64::MAX)
}

/// Whether a row of the run/step union queries is the run (kind 0) or one of its steps (1).
const KIND_RUN: i32 = 0;

/// A row of the "each run, then its steps in position order" union queries:
/// `(run_id, kind, position, body)`.
type UnionRow = (String, i32, i64, Vec<u8>);

/// Assembles runs from [`UnionRow`]s sorted by run, kind and position. Steps whose run row is
/// absent are ignored.
fn assemble_runs(rows: Vec<UnionRow>) -> Result<Vec<Run>, StoreError> {
    let mut runs: Vec<Run> = Vec::new();
    for (run_id, kind, _, body) in rows {
        if kind == KIND_RUN {
            runs.push(decode(&body, || format!("run {run_id:?}"))?);
        } else if let Some(run) = runs.last_mut().filter(|r| r.run_id == run_id) {
            let step: Step = decode(&body, || format!("step of run {run_id:?}"))?;
            run.steps.push(step);
        }
    }
    Ok(runs)
}

/// The `list_runs` query: filters as `AND` clauses, keyset pagination on `run_id`, one row more
/// than the page to learn whether another page follows. Selects `(run_id, body)`.
fn list_runs_query<DB>(req: &ListRunsRequest) -> QueryBuilder<DB>
where
    DB: sqlx::Database,
    DB::Arguments: Default,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let mut q = QueryBuilder::new("SELECT r.run_id, r.body FROM runs r WHERE 1 = 1");
    if !req.workflow.is_empty() {
        q.push(" AND r.workflow = ").push_bind(req.workflow.clone());
    }
    if req.state != 0 {
        q.push(" AND r.state = ").push_bind(req.state);
    }
    // Sorted so that the same filter always yields the same SQL text (and the cached statement).
    let mut tags: Vec<_> = req.tags.iter().collect();
    tags.sort();
    for (key, value) in tags {
        q.push(" AND EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = r.run_id AND t.key = ")
            .push_bind(key.clone())
            .push(" AND t.value = ")
            .push_bind(value.clone())
            .push(")");
    }
    if !req.page_token.is_empty() {
        q.push(" AND r.run_id < ").push_bind(req.page_token.clone());
    }
    q.push(" ORDER BY r.run_id DESC LIMIT ")
        .push_bind(i64::from(page_size(req)) + 1);
    q
}

/// Turns the rows of [`list_runs_query`] into a page.
fn runs_page(
    req: &ListRunsRequest,
    rows: Vec<(String, Vec<u8>)>,
) -> Result<ListRunsResponse, StoreError> {
    let size = page_size(req) as usize;
    let more = rows.len() > size;
    let runs = rows
        .into_iter()
        .take(size)
        .map(|(run_id, body)| decode::<Run>(&body, || format!("run {run_id:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let next_page_token = match runs.last() {
        Some(last) if more => last.run_id.clone(),
        _ => String::new(),
    };
    Ok(ListRunsResponse {
        runs,
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_is_rejected_by_name() {
        let err = SqlStore::connect("mysql://localhost/db")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.contains("\"mysql\"")),
            "{err:?}"
        );
        let err = SqlStore::connect("just-a-path.db").await.err().unwrap();
        assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    }

    #[tokio::test]
    async fn in_memory_sqlite_works() {
        let store = SqlStore::connect("sqlite::memory:").await.unwrap();
        assert_eq!(store.backend_name(), "sqlite");
        let spec = WorkflowSpec {
            name: "mem".into(),
            ..Default::default()
        };
        let (wf, created) = store.put_workflow(spec, "h".into()).await.unwrap();
        assert!(created);
        assert_eq!(store.get_workflow("mem", None).await.unwrap(), wf);
    }
}
