-- Webhook outbox (PostgreSQL dialect; keep in step with ../sqlite). body: dagmesh.v1.WebhookDelivery.
-- Written in the commit of the event it reports; the deliverer reads the due PENDING rows
-- (state 1) and writes each attempt back. Times: microseconds since the Unix epoch.
CREATE TABLE webhook_deliveries (
    delivery_id     TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    run_id          TEXT COLLATE "C" NOT NULL,
    state           INTEGER NOT NULL,
    next_attempt_at BIGINT  NOT NULL,
    created_at      BIGINT  NOT NULL,
    body            BYTEA   NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_by_run ON webhook_deliveries (run_id, created_at);
CREATE INDEX webhook_deliveries_by_time ON webhook_deliveries (created_at);
