-- The scheduler's state (SQLite dialect; keep in step with ../postgres).

-- body: dagmesh.v1.Schedule without `paused`, `last_tick` and `next_tick`: `paused` and
-- `last_tick` live in their own columns so that pausing and advancing (a compare-and-set on
-- `last_tick`) never overwrite each other. last_tick: microseconds since the Unix epoch, NULL
-- before the first tick.
CREATE TABLE schedules (
    id        TEXT    NOT NULL PRIMARY KEY,
    name      TEXT    NOT NULL UNIQUE,
    paused    INTEGER NOT NULL,
    last_tick INTEGER,
    body      BLOB    NOT NULL
);

-- body: dagmesh.v1.Trigger.
CREATE TABLE triggers (
    id    TEXT NOT NULL PRIMARY KEY,
    name  TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    body  BLOB NOT NULL
);
CREATE INDEX triggers_by_topic ON triggers (topic, name);

-- body: dagmesh.v1.Backfill. id is a UUIDv7: its order is creation order.
CREATE TABLE backfills (
    id   TEXT NOT NULL PRIMARY KEY,
    body BLOB NOT NULL
);
