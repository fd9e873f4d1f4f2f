-- Schema of the dagmesh metadata store (SQLite dialect; keep in step with ../postgres).
-- Every row keeps the whole record as a prost-encoded message in `body`; the other columns are
-- copies of the fields that queries filter or sort on.

-- One immutable version of a workflow; body: dagmesh.v1.Workflow.
CREATE TABLE workflows (
    name         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    content_hash TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    PRIMARY KEY (name, version)
);

-- body: dagmesh.v1.Run without its steps. `idempotency_key` is NULL when the run has none, so
-- runs without a key never collide on the unique index. run_id is a UUIDv7: its order is
-- creation order.
CREATE TABLE runs (
    run_id          TEXT    NOT NULL PRIMARY KEY,
    workflow        TEXT    NOT NULL,
    state           INTEGER NOT NULL,
    idempotency_key TEXT    UNIQUE,
    body            BLOB    NOT NULL
);
CREATE INDEX runs_by_workflow ON runs (workflow, run_id);
CREATE INDEX runs_by_state ON runs (state, run_id);

-- Tags of a run, for ListRuns filters. Written when the run is inserted; tags never change.
CREATE TABLE run_tags (
    run_id TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE INDEX run_tags_by_value ON run_tags (key, value, run_id);

-- body: dagmesh.v1.Step. `position` aliases the rowid, so it is assigned on first insert (the
-- executor inserts a run's steps in workflow order) and an upsert keeps it.
CREATE TABLE steps (
    position INTEGER PRIMARY KEY,
    run_id   TEXT NOT NULL,
    step_id  TEXT NOT NULL,
    body     BLOB NOT NULL,
    UNIQUE (run_id, step_id)
);

-- The append-only event log of each run; body: dagmesh.v1.RunEvent.
CREATE TABLE events (
    run_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    body   BLOB    NOT NULL,
    PRIMARY KEY (run_id, seq)
);
