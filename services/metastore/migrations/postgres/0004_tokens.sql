-- API tokens (PostgreSQL dialect; keep in step with ../sqlite). body: dagmesh.v1.StoredToken —
-- the token's public part and the SHA-256 of its secret; the secret itself is never stored.
-- created_at: microseconds since the Unix epoch, for listing newest first.
CREATE TABLE tokens (
    token_id   TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    name       TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    body       BYTEA  NOT NULL
);
