//! Durable webhooks: the outbox's deliverer, and what each delivery says.
//!
//! The engine writes a [`WebhookDelivery`] row in the same commit as the event it reports
//! ([`deliveries_for`], called while a batch is drained), so a restart loses none: what is
//! committed is delivered, what is not committed did not happen. This task reads the due rows,
//! POSTs each one, and writes the attempt back with the executor's fence (a deposed executor
//! stops delivering). Delivery is at least once: a kill between a receiver's 2xx and the write
//! of that attempt sends the delivery again after the restart, with the same id.
//!
//! Each request carries the Standard Webhooks headers: `webhook-id` (the delivery id),
//! `webhook-timestamp` (Unix seconds) and, when a secret is configured, `webhook-signature:
//! v1,<base64 of HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`. A non-2xx answer, a
//! timeout or a connection error is retried with exponential backoff (capped, with jitter)
//! until `retry_for` after the event; then the delivery is GAVE_UP.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use dagmesh_metastore::{Lease, MetadataStore};
use dagmesh_proto::v1::{
    DeliveryState, Mutation, ReadWebhookDeliveriesRequest, Run, WebhookDelivery, mutation,
};
use dagmesh_spec::notify::CompiledNotification;
use hmac::{Hmac, Mac as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value as Json, json};
use sha2::Sha256;
use tokio::sync::Notify;

/// How webhooks are delivered.
#[derive(Clone)]
pub struct WebhookConfig {
    /// HMAC-SHA256 key of `webhook-signature`; None: deliveries are not signed (a warning is
    /// logged at start).
    pub secret: Option<Arc<[u8]>>,
    /// How long after its event a delivery is retried before it is given up.
    pub retry_for: Duration,
    /// Time limit of one attempt (connect, send, answer).
    pub attempt_timeout: Duration,
    /// Wait before the second attempt; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("retry_for", &self.retry_for)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("first_backoff", &self.first_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            secret: None,
            retry_for: Duration::from_secs(24 * 3600),
            attempt_timeout: Duration::from_secs(10),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Longest part of a receiver's answer kept on the delivery.
const MAX_RESPONSE_KEPT: usize = 1024;
/// Due deliveries read (and attempted, `CONCURRENCY` at a time) per pass.
const BATCH: u32 = 64;
const CONCURRENCY: usize = 8;
/// How often the outbox is looked at when nothing woke the deliverer (retries falling due).
const POLL: Duration = Duration::from_millis(500);

/// The webhook deliveries of this batch's events of `run` (the notifications of its workflow
/// and its own), each as a row for the outbox. Filters that fail skip their delivery, logged.
pub(crate) fn deliveries_for(
    run: &Run,
    event: &str,
    step: Option<Json>,
    at: SystemTime,
    notifications: &[&CompiledNotification],
) -> Vec<WebhookDelivery> {
    let mut out = Vec::new();
    for notification in notifications {
        if !notification.events.iter().any(|wanted| wanted == event) {
            continue;
        }
        let delivery_id = uuid::Uuid::now_v7().to_string();
        let mut body = json!({
            "id": delivery_id,
            "event": event,
            "occurred_at": chrono::DateTime::<chrono::Utc>::from(at)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "run": {
                "run_id": run.run_id,
                "workflow": run.workflow,
                "workflow_version": run.workflow_version,
                "state": run.state().as_str_name().trim_start_matches("RUN_STATE_"),
                "error": run.error,
                "tags": run.tags,
                "parent_run_id": run.parent_run_id,
            },
        });
        if let Some(step) = &step {
            body["step"] = step.clone();
        }
        match notification.wants(event, &body) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(problem) => {
                tracing::warn!(run_id = %run.run_id, event, url = %notification.url, %problem, "webhook skipped");
                continue;
            }
        }
        let when = prost_types::Timestamp::from(at);
        out.push(WebhookDelivery {
            delivery_id,
            run_id: run.run_id.clone(),
            event: event.to_owned(),
            step_id: step
                .as_ref()
                .and_then(|s| s["step_id"].as_str())
                .unwrap_or_default()
                .to_owned(),
            url: notification.url.clone(),
            body: body.to_string(),
            created_at: Some(when),
            state: DeliveryState::Pending as i32,
            attempts: 0,
            next_attempt_at: Some(when),
            ..WebhookDelivery::default()
        });
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

static DELIVERIES: std::sync::LazyLock<Family<Outcome, Counter>> = std::sync::LazyLock::new(|| {
    let family = Family::<Outcome, Counter>::default();
    for outcome in ["delivered", "failed", "gave_up"] {
        let _ = family.get_or_create(&Outcome { outcome });
    }
    dagmesh_runtime::metrics::register(
        "dagmesh_webhook_deliveries",
        "Webhook delivery attempts by outcome: delivered (2xx), failed (retried later), \
             gave_up (the retry period ended).",
        family.clone(),
    );
    family
});

pub(crate) fn register_metrics() {
    std::sync::LazyLock::force(&DELIVERIES);
}

fn count(outcome: &'static str) {
    if dagmesh_runtime::metrics::enabled() {
        DELIVERIES.get_or_create(&Outcome { outcome }).inc();
    }
}

/// The deliverer: runs until `stopped` resolves (the engine stopped) or the fence is lost.
pub(crate) async fn deliver(
    store: Arc<dyn MetadataStore>,
    fence: Lease,
    config: WebhookConfig,
    wake: Arc<Notify>,
    stopped: impl std::future::Future<Output = ()>,
) {
    let client = match reqwest::Client::builder()
        .timeout(config.attempt_timeout)
        .user_agent(concat!("dagmesh/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the webhook HTTP client; webhooks are not delivered");
            return;
        }
    };
    if config.secret.is_none() {
        tracing::warn!("no webhook secret configured: webhook deliveries are not signed");
    }
    let deliverer = Deliverer {
        store,
        fence,
        config,
        client,
    };
    tokio::pin!(stopped);
    loop {
        let due = deliverer
            .store
            .read_webhook_deliveries(&ReadWebhookDeliveriesRequest {
                due_before: Some(SystemTime::now().into()),
                limit: BATCH,
                ..ReadWebhookDeliveriesRequest::default()
            })
            .await;
        let full = match due {
            Ok(due) => {
                let full = due.len() == BATCH as usize;
                use futures::StreamExt as _;
                let results: Vec<bool> = futures::stream::iter(due)
                    .map(|delivery| deliverer.attempt(delivery))
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
                if results.iter().any(|kept| !kept) {
                    tracing::warn!("webhook deliverer stops: this executor lost its lease");
                    return;
                }
                full
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the webhook outbox; trying again");
                false
            }
        };
        if full {
            continue;
        }
        tokio::select! {
            () = &mut stopped => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

struct Deliverer {
    store: Arc<dyn MetadataStore>,
    fence: Lease,
    config: WebhookConfig,
    client: reqwest::Client,
}

impl Deliverer {
    /// One attempt, written back. False: the write was refused for a stale fence.
    async fn attempt(&self, mut delivery: WebhookDelivery) -> bool {
        if delivery.state != DeliveryState::Pending as i32 {
            // A row the store could not read back (see the store's `decode_delivery`): retire
            // it, so it is not due again.
            tracing::warn!(delivery_id = %delivery.delivery_id, error = %delivery.last_error, "webhook delivery unreadable; given up");
            count("gave_up");
            return self.record(delivery).await;
        }
        let now = SystemTime::now();
        let timestamp = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut request = self
            .client
            .post(&delivery.url)
            .header("content-type", "application/json")
            .header("webhook-id", &delivery.delivery_id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = &self.config.secret {
            request = request.header(
                "webhook-signature",
                signature(secret, &delivery.delivery_id, timestamp, &delivery.body),
            );
        }
        let outcome = request.body(delivery.body.clone()).send().await;
        delivery.attempts += 1;
        delivery.last_attempt_at = Some(now.into());
        let failure = match outcome {
            Ok(response) => {
                let status = response.status();
                delivery.last_status = u32::from(status.as_u16());
                let text = response.text().await.unwrap_or_default();
                delivery.last_response = cut(&text, MAX_RESPONSE_KEPT);
                (!status.is_success()).then(|| format!("HTTP {status}"))
            }
            Err(error) => {
                delivery.last_status = 0;
                delivery.last_response.clear();
                Some(describe(&error))
            }
        };
        match failure {
            None => {
                count("delivered");
                delivery.state = DeliveryState::Delivered as i32;
                delivery.last_error.clear();
                delivery.delivered_at = Some(SystemTime::now().into());
                delivery.next_attempt_at = None;
            }
            Some(error) => {
                delivery.last_error = error;
                let created = delivery
                    .created_at
                    .and_then(|at| SystemTime::try_from(at).ok())
                    .unwrap_or(now);
                let next = now + self.backoff(delivery.attempts);
                if next.duration_since(created).unwrap_or_default() > self.config.retry_for {
                    count("gave_up");
                    delivery.state = DeliveryState::GaveUp as i32;
                    delivery.next_attempt_at = None;
                    tracing::warn!(
                        delivery_id = %delivery.delivery_id,
                        url = %delivery.url,
                        attempts = delivery.attempts,
                        error = %delivery.last_error,
                        "webhook given up: the retry period ended"
                    );
                } else {
                    count("failed");
                    delivery.next_attempt_at = Some(next.into());
                    tracing::debug!(
                        delivery_id = %delivery.delivery_id,
                        url = %delivery.url,
                        attempts = delivery.attempts,
                        error = %delivery.last_error,
                        "webhook attempt failed; will retry"
                    );
                }
            }
        }
        self.record(delivery).await
    }

    /// Writes a delivery back, fenced. False: the fence is stale.
    async fn record(&self, delivery: WebhookDelivery) -> bool {
        let write = vec![Mutation {
            mutation: Some(mutation::Mutation::PutWebhookDelivery(delivery)),
        }];
        match self
            .store
            .commit_fenced(std::slice::from_ref(&self.fence), write)
            .await
        {
            Ok(()) => true,
            Err(dagmesh_metastore::StoreError::Fenced { .. }) => false,
            Err(error) => {
                // The attempt is made again when due: at least once.
                tracing::warn!(%error, "cannot record a webhook attempt");
                true
            }
        }
    }

    /// Wait before attempt `attempts + 1`: doubling from `first_backoff`, capped, with up to a
    /// quarter of jitter so that receivers coming back are not hit all at once.
    fn backoff(&self, attempts: u32) -> Duration {
        let doubled = self
            .config
            .first_backoff
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let capped = doubled.min(self.config.max_backoff);
        let jitter = rand::random::<f64>() * 0.25;
        capped.mul_f64(1.0 + jitter)
    }
}

/// `v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>` (Standard Webhooks).
pub fn signature(secret: &[u8], id: &str, timestamp: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    cut(&text, MAX_RESPONSE_KEPT)
}

fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (secret bytes are the base64
        // decoding of "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").
        let secret = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
