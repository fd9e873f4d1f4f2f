//! [`SqlStore`]: the [`MetadataStore`] in a SQL database, through sqlx.
//!
//! One implementation ([`store`]) serves every database: its statements use `$N` parameters,
//! which SQLite reads too. A [`Dialect`] ties a `sqlx::Database` to the little that differs:
//! how to connect, how a write transaction begins and locks rows, whose clock judges leases,
//! and the batch commit (multi-row statements on SQLite, arrays on PostgreSQL). Record encoding
//! and assembly live in [`records`].

mod postgres;
mod records;

pub use records::run_id_floor;
mod sqlite;
mod sqlite_commit;
mod store;

use sqlite_commit::SqliteCommitter;

use std::future::Future;
use std::sync::Arc;

use dagmesh_proto::v1::Mutation;
use sqlx::Pool;

use crate::{MetadataStore, StoreError};

/// What differs between the databases a [`SqlStore`] runs on. Implemented for `sqlx::Sqlite`
/// and `sqlx::Postgres` only (sealed: the generic statements are tested on those two).
pub trait Dialect: sqlx::Database + sealed::Sealed {
    /// `"sqlite"` or `"postgres"`.
    const BACKEND: &'static str;
    /// The statement that begins a write transaction.
    const BEGIN_WRITE: &'static str;
    /// Appended to a read of a row the transaction will write, to lock it until the commit;
    /// empty where [`Dialect::BEGIN_WRITE`] already holds the database's write lock.
    const FOR_UPDATE: &'static str;
    /// Appended to the fenced commit's read of its lease row: excludes a concurrent acquire,
    /// not other commits.
    const FOR_SHARE: &'static str;
    /// The query for the clock that lease expiries are judged by, in microseconds since the
    /// Unix epoch; `None`: this process's clock.
    const CLOCK: Option<&'static str>;

    /// How many rows a statement changed (sqlx has no trait for it).
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// What a store of this dialect holds besides its pools.
    type Local: Send + Sync + 'static;

    /// Opens the database at `url`, creating it where the dialect can, and applies its
    /// migrations. Returns the pool for writes, the pool for reads (they may be one) and the
    /// rest of the store.
    #[allow(clippy::type_complexity)]
    fn connect(
        url: &str,
    ) -> impl Future<Output = Result<(Pool<Self>, Pool<Self>, Self::Local), StoreError>> + Send;

    /// The thread that writes commit batches in one call, where the dialect has one (SQLite);
    /// otherwise batches are written through the write pool.
    fn committer(local: &Self::Local) -> Option<&SqliteCommitter>;

    /// Applies a validated commit batch inside the caller's transaction. (Mutable: step and
    /// event bodies are encoded without their key fields, taken out and put back.)
    fn apply<'a>(
        conn: &'a mut Self::Connection,
        mutations: &'a mut [Mutation],
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a;

    /// Whether the server offers TLS and the pool's connections use it; `None` where the
    /// question does not arise (SQLite).
    fn tls(pool: &Pool<Self>) -> impl Future<Output = Result<Option<PgTls>, StoreError>> + Send;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Sqlite {}
    impl Sealed for sqlx::Postgres {}
}

/// A metadata store in a SQL database: [`SqliteStore`] or [`PostgresStore`]. [`connect`] picks
/// one by URL:
///
/// - `sqlite://PATH` (the file and its parent directories are created when missing) or
///   `sqlite::memory:` (gone when the store is dropped);
/// - `postgres://...` or `postgresql://...` (the database must exist).
///
/// Connecting applies the embedded schema migrations. Dropping the store (or
/// [`SqlStore::close`]) closes its connections.
pub struct SqlStore<D: Dialect> {
    /// SQLite: one connection, the only writer, so that writes queue in the pool instead of
    /// failing as busy. PostgreSQL: the one pool.
    write: Pool<D>,
    /// Readers (the write pool where the dialect has no separate readers).
    read: Pool<D>,
    /// SQLite: the commit thread (and a `sqlite::memory:` database's directory).
    local: D::Local,
}

/// The store on SQLite.
pub type SqliteStore = SqlStore<sqlx::Sqlite>;
/// The store on PostgreSQL.
pub type PostgresStore = SqlStore<sqlx::Postgres>;

/// How a PostgreSQL connection is protected (see [`SqlStore::postgres_tls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTls {
    /// The server has `ssl = on`.
    pub server_enabled: bool,
    /// This store's connection is encrypted (`sslmode=require` or stricter in the URL, or a
    /// server that insisted).
    pub connection_encrypted: bool,
}

impl<D: Dialect> SqlStore<D> {
    /// Opens (and migrates) the database at `url`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (write, read, local) = D::connect(url).await?;
        tracing::info!(backend = D::BACKEND, "metadata store ready");
        Ok(SqlStore { write, read, local })
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        D::BACKEND
    }

    /// For PostgreSQL: whether the server offers TLS and this store's connection uses it
    /// (logged at start, so an operator sees it). None for SQLite.
    pub async fn postgres_tls(&self) -> Result<Option<PgTls>, StoreError> {
        D::tls(&self.read).await
    }

    /// Closes the connections, waiting for operations in flight. Later calls fail with
    /// `Unavailable`. For SQLite this also checkpoints the write-ahead log into the database file.
    pub async fn close(&self) {
        if let Some(committer) = D::committer(&self.local) {
            committer.close().await;
        }
        self.read.close().await;
        self.write.close().await;
    }
}

/// A SQL store opened by URL, whichever its database: the [`MetadataStore`] plus what only a
/// database has. Its `Arc` converts into an `Arc<dyn MetadataStore>`.
#[async_trait::async_trait]
pub trait SqlDatabase: MetadataStore {
    /// `"sqlite"` or `"postgres"`.
    fn backend_name(&self) -> &'static str;
    /// See [`SqlStore::postgres_tls`].
    async fn postgres_tls(&self) -> Result<Option<PgTls>, StoreError>;
    /// See [`SqlStore::close`].
    async fn close(&self);
}

#[async_trait::async_trait]
impl<D: Dialect> SqlDatabase for SqlStore<D>
where
    SqlStore<D>: MetadataStore,
{
    fn backend_name(&self) -> &'static str {
        D::BACKEND
    }

    async fn postgres_tls(&self) -> Result<Option<PgTls>, StoreError> {
        SqlStore::postgres_tls(self).await
    }

    async fn close(&self) {
        SqlStore::close(self).await
    }
}

/// Opens (and migrates) the metadata store at `url` (`sqlite://PATH`, `sqlite::memory:`,
/// `postgres://HOST/DB`).
pub async fn connect(url: &str) -> Result<Arc<dyn MetadataStore>, StoreError> {
    Ok(connect_sql(url).await?)
}

/// [`connect`], keeping what only a database has ([`SqlDatabase`]): which one it is, its TLS
/// and closing it.
pub async fn connect_sql(url: &str) -> Result<Arc<dyn SqlDatabase>, StoreError> {
    let Some((scheme, _)) = url.split_once(':') else {
        return Err(StoreError::InvalidArgument(
            "metadata store URL has no scheme: use sqlite://PATH, sqlite::memory: or \
             postgres://HOST/DB"
                .to_owned(),
        ));
    };
    Ok(match scheme {
        "sqlite" => Arc::new(SqliteStore::connect(url).await?),
        "postgres" | "postgresql" => Arc::new(PostgresStore::connect(url).await?),
        other => {
            return Err(StoreError::InvalidArgument(format!(
                "unsupported metadata store URL scheme {other:?}: use sqlite://PATH, \
                 sqlite::memory: or postgres://HOST/DB"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use dagmesh_proto::v1::WorkflowSpec;

    use super::*;

    #[tokio::test]
    async fn unknown_scheme_is_rejected_by_name() {
        let err = connect("mysql://localhost/db").await.err().unwrap();
        assert!(
            matches!(&err, StoreError::InvalidArgument(m) if m.contains("\"mysql\"")),
            "{err:?}"
        );
        let err = connect("just-a-path.db").await.err().unwrap();
        assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    }

    #[tokio::test]
    async fn in_memory_sqlite_works() {
        let store = connect_sql("sqlite::memory:").await.unwrap();
        assert_eq!(store.backend_name(), "sqlite");
        let spec = WorkflowSpec {
            name: "mem".into(),
            ..Default::default()
        };
        let (wf, created) = store.put_workflow(spec, "h".into()).await.unwrap();
        assert!(created);
        assert_eq!(store.get_workflow("mem", None).await.unwrap(), wf);
    }

    /// Two `sqlite::memory:` stores are two databases, and each is gone with its store.
    #[tokio::test]
    async fn in_memory_sqlite_is_private_and_goes_with_the_store() {
        let run = |id: &str| Mutation {
            mutation: Some(dagmesh_proto::v1::mutation::Mutation::PutRun(
                dagmesh_proto::v1::Run {
                    run_id: id.into(),
                    ..Default::default()
                },
            )),
        };
        let one = SqliteStore::connect("sqlite::memory:").await.unwrap();
        let two = SqliteStore::connect("sqlite::memory:").await.unwrap();
        one.commit(vec![run("r1")]).await.unwrap();
        assert!(one.get_run("r1").await.is_ok());
        assert!(matches!(
            two.get_run("r1").await,
            Err(StoreError::NotFound(_))
        ));
        let dir = one.local.scratch_dir().unwrap().to_path_buf();
        assert!(dir.exists());
        one.close().await;
        drop(one);
        assert!(!dir.exists(), "{} is left behind", dir.display());
    }

    /// The write-ahead log stays bounded under a stream of commits: the checkpoint thread alone
    /// would never catch up with them, so a commit completes the checkpoint at 4,096 pages.
    #[tokio::test]
    async fn the_write_ahead_log_stays_bounded_under_a_stream_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let wal = dir.path().join("wal.db-wal");
        let mut largest = 0;
        // 60 MB of rows, about four times the log's bound.
        for batch in 0..1_500 {
            let runs = (0..10)
                .map(|i| Mutation {
                    mutation: Some(dagmesh_proto::v1::mutation::Mutation::PutRun(
                        dagmesh_proto::v1::Run {
                            run_id: format!("r{batch}-{i}"),
                            workflow: "w".repeat(4000),
                            ..Default::default()
                        },
                    )),
                })
                .collect();
            store.commit(runs).await.unwrap();
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
        store.close().await;
        assert!(
            largest < 24 << 20,
            "the write-ahead log grew to {largest} bytes"
        );
    }

    /// After `close`, a commit is refused as retryable, not lost silently or panicking.
    #[tokio::test]
    async fn a_closed_sqlite_store_refuses_commits_as_unavailable() {
        let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
        store.close().await;
        let err = store
            .commit(vec![Mutation {
                mutation: Some(dagmesh_proto::v1::mutation::Mutation::PutRun(
                    dagmesh_proto::v1::Run {
                        run_id: "r".into(),
                        ..Default::default()
                    },
                )),
            }])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
