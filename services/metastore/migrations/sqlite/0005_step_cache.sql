-- Step cache (SQLite dialect; keep in step with ../postgres). body: dagmesh.v1.CacheEntry — the
-- outputs of a memoized step under its cache key. expires_at: microseconds since the Unix epoch;
-- reads ignore expired rows, and commits that add entries delete a few expired ones.
CREATE TABLE step_cache (
    key        TEXT    NOT NULL PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    body       BLOB    NOT NULL
);
CREATE INDEX step_cache_by_expiry ON step_cache (expires_at);
