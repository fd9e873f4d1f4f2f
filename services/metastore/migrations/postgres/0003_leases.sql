-- Leases with fencing epochs (PostgreSQL dialect; keep in step with ../sqlite).
-- One row per lease name ("executor", later "executor/partition-3"). A row is never deleted:
-- releasing a lease only expires it, so that `epoch` keeps counting up across holders and a
-- stale holder's epoch can never match again. expires_at: microseconds since the Unix epoch,
-- by the database's clock (clock_timestamp()).
CREATE TABLE leases (
    name       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    holder     TEXT   NOT NULL,
    epoch      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
