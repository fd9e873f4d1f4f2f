-- Step cache (PostgreSQL dialect; keep in step with ../sqlite). body: dagmesh.v1.CacheEntry — the
-- outputs of a memoized step under its cache key. expires_at: microseconds since the Unix epoch;
-- reads ignore expired rows, and commits that add entries delete a few expired ones.
CREATE TABLE step_cache (
    key        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    expires_at BIGINT NOT NULL,
    body       BYTEA  NOT NULL
);
CREATE INDEX step_cache_by_expiry ON step_cache (expires_at);
