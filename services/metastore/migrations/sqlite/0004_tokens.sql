-- API tokens (SQLite dialect; keep in step with ../postgres). body: dagmesh.v1.StoredToken —
-- the token's public part and the SHA-256 of its secret; the secret itself is never stored.
-- created_at: microseconds since the Unix epoch, for listing newest first.
CREATE TABLE tokens (
    token_id   TEXT    NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    body       BLOB    NOT NULL
);
