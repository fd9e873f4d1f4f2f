-- Leases with fencing epochs (SQLite dialect; keep in step with ../postgres).
-- One row per lease name ("executor", later "executor/partition-3"). A row is never deleted:
-- releasing a lease only expires it, so that `epoch` keeps counting up across holders and a
-- stale holder's epoch can never match again. expires_at: microseconds since the Unix epoch,
-- by the process clock of whoever wrote it.
CREATE TABLE leases (
    name       TEXT    NOT NULL PRIMARY KEY,
    holder     TEXT    NOT NULL,
    epoch      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
