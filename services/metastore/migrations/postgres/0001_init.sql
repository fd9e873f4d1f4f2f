-- Schema of the dagmesh metadata store (PostgreSQL dialect; keep in step with ../sqlite).
-- Every row keeps the whole record as a prost-encoded message in `body`; the other columns are
-- copies of the fields that queries filter or sort on. Keys use the "C" collation so that
-- ordering is byte order, as in SQLite, whatever the database's locale.

-- One immutable version of a workflow; body: dagmesh.v1.Workflow.
CREATE TABLE workflows (
    name         TEXT COLLATE "C" NOT NULL,
    version      BIGINT NOT NULL,
    content_hash TEXT   NOT NULL,
    body         BYTEA  NOT NULL,
    PRIMARY KEY (name, version)
);

-- body: dagmesh.v1.Run without its steps. `idempotency_key` is NULL when the run has none, so
-- runs without a key never collide on the unique index. run_id is a UUIDv7: its order is
-- creation order.
CREATE TABLE runs (
    run_id          TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    workflow        TEXT COLLATE "C" NOT NULL,
    state           INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    body            BYTEA NOT NULL
);
CREATE INDEX runs_by_workflow ON runs (workflow, run_id);
CREATE INDEX runs_by_state ON runs (state, run_id);

-- Tags of a run, for ListRuns filters. Written when the run is inserted; tags never change.
CREATE TABLE run_tags (
    run_id TEXT COLLATE "C" NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX run_tags_by_value ON run_tags (key, value, run_id);

-- body: dagmesh.v1.Step. `position` is assigned on first insert (the executor inserts a run's
-- steps in workflow order) and an upsert keeps it.
CREATE TABLE steps (
    position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id   TEXT COLLATE "C" NOT NULL,
    step_id  TEXT COLLATE "C" NOT NULL,
    body     BYTEA NOT NULL,
    UNIQUE (run_id, step_id)
);

-- The append-only event log of each run; body: dagmesh.v1.RunEvent.
CREATE TABLE events (
    run_id TEXT COLLATE "C" NOT NULL,
    seq    BIGINT NOT NULL,
    body   BYTEA  NOT NULL,
    PRIMARY KEY (run_id, seq)
);
