use std::sync::Arc;
use std::time::Duration;

use crate::Limits;

/// Partitions of a new database: far more than replicas, so that moving one is cheap.
pub const DEFAULT_PARTITIONS: u32 = 256;

/// Longest `advertise_url`: it goes into the lease holder name with the unique holder.
pub const MAX_ADVERTISE_URL: usize = 160;

/// Tunables of one executor. The defaults suit a laptop and a cluster alike; tests shorten the
/// lease so that lost workers are noticed quickly.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// How often workers must send a heartbeat (told to them in Welcome).
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is considered gone and its tasks are requeued.
    pub lease: Duration,
    /// How long a worker whose stream *ended* keeps its tasks, to reconnect and resume them; a
    /// silent worker keeps them for the whole `lease`.
    pub reconnect_grace: Duration,
    /// Attempts of one step that may be lost (its worker vanished) before the step fails with
    /// the history of losses, so that a task that kills its workers cannot loop forever.
    pub max_lost_attempts: u32,
    /// Limit of inline payloads (run inputs, step inputs and outputs), protobuf-encoded bytes.
    pub max_payload_bytes: usize,
    /// Most commands folded into one group commit.
    pub max_batch: usize,
    /// How long a drain waits for in-flight tasks before it hands them back (they stay assigned
    /// in the store and are recovered, or requeued after the lease, by the next executor).
    pub drain_timeout: Duration,
    /// Run admission and step concurrency limits (none by default).
    pub limits: Arc<Limits>,
    /// TTL of the executor lease in the store (renewed every third of it): how long a standby
    /// waits after an executor died before it takes over.
    pub executor_lease_ttl: Duration,
    /// When another executor holds the lease: wait and take over (true), or refuse to start.
    pub standby: bool,
    /// How webhooks are signed and retried.
    pub webhooks: crate::webhooks::WebhookConfig,
    /// How many partitions runs hash into, when the database has no count yet (the first
    /// executor stores it; later ones use the stored count). 1 to 4096.
    pub partitions: u32,
    /// Where other replicas reach this executor (`http://10.0.0.5:7070`): written into its
    /// lease, so that standbys forward calls to it. None: standbys cannot forward to it.
    pub advertise_url: Option<String>,
    /// Share the partitions with the other executors of the database instead of driving all of
    /// them or standing by (ARCHITECTURE.md, "Scale-out"): each drives its rendezvous share,
    /// and the one holding the executor lease dispatches every task to the workers. Needs
    /// `advertise_url`.
    pub share_partitions: bool,
    /// How this executor reaches the other replicas (TLS settings and the internal token), for
    /// the dispatcher stream of `share_partitions`.
    pub peers: dagmesh_proto::connect::ClientSettings,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            reconnect_grace: Duration::from_secs(1),
            max_lost_attempts: 5,
            max_payload_bytes: dagmesh_proto::limits::DEFAULT_MAX_PAYLOAD_BYTES,
            max_batch: 4096,
            drain_timeout: Duration::from_secs(30),
            limits: Arc::default(),
            executor_lease_ttl: Duration::from_secs(6),
            standby: true,
            webhooks: crate::webhooks::WebhookConfig::default(),
            partitions: DEFAULT_PARTITIONS,
            advertise_url: None,
            share_partitions: false,
            peers: dagmesh_proto::connect::ClientSettings::default(),
        }
    }
}

impl ExecutorConfig {
    /// Checks the tunables against their documented ranges, so that a typo in a flag is a clear
    /// error at start rather than an overflow later.
    pub fn validate(&self) -> Result<(), String> {
        let in_range = |name: &str, value: Duration, min: Duration, max: Duration| {
            if value < min || value > max {
                return Err(format!(
                    "{name}: {} is out of range ({} to {})",
                    humantime::format_duration(value),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ));
            }
            Ok(())
        };
        let hour = Duration::from_secs(3600);
        in_range("lease", self.lease, Duration::from_millis(100), hour)?;
        in_range(
            "heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(10),
            self.lease,
        )?;
        in_range(
            "reconnect_grace",
            self.reconnect_grace,
            Duration::ZERO,
            self.lease,
        )?;
        in_range("drain_timeout", self.drain_timeout, Duration::ZERO, hour)?;
        in_range(
            "executor_lease_ttl",
            self.executor_lease_ttl,
            Duration::from_millis(300),
            hour,
        )?;
        if self.share_partitions && self.advertise_url.is_none() {
            return Err(
                "share_partitions: needs advertise_url (where the other executors reach this one)"
                    .into(),
            );
        }
        const MIB: usize = 1024 * 1024;
        if !(1024..=64 * MIB).contains(&self.max_payload_bytes) {
            return Err(format!(
                "max_payload_bytes: {} is out of range (1024 to {})",
                self.max_payload_bytes,
                64 * MIB
            ));
        }
        if self.max_lost_attempts == 0 || self.max_lost_attempts > 1000 {
            return Err(format!(
                "max_lost_attempts: {} is out of range (1 to 1000)",
                self.max_lost_attempts
            ));
        }
        in_range(
            "webhooks.retry_for",
            self.webhooks.retry_for,
            Duration::ZERO,
            Duration::from_secs(30 * 24 * 3600),
        )?;
        in_range(
            "webhooks.attempt_timeout",
            self.webhooks.attempt_timeout,
            Duration::from_millis(10),
            Duration::from_secs(300),
        )?;
        // A day at most: the wait, with its jitter, is added to the clock.
        let day = Duration::from_secs(24 * 60 * 60);
        in_range(
            "webhooks.first_backoff",
            self.webhooks.first_backoff,
            Duration::from_millis(1),
            self.webhooks.max_backoff.min(day),
        )?;
        in_range(
            "webhooks.max_backoff",
            self.webhooks.max_backoff,
            self.webhooks.first_backoff,
            day,
        )?;
        if !(1..=dagmesh_metastore::MAX_PARTITIONS).contains(&self.partitions) {
            return Err(format!(
                "partitions: {} is out of range (1 to {})",
                self.partitions,
                dagmesh_metastore::MAX_PARTITIONS
            ));
        }
        // The lease holder name is `<unique holder> <url>`, at most 256 bytes; the unique part
        // takes up to ~90.
        if let Some(url) = &self.advertise_url
            && (url.len() > MAX_ADVERTISE_URL
                || !(url.starts_with("http://") || url.starts_with("https://"))
                || url.contains(char::is_whitespace))
        {
            return Err(format!(
                "advertise_url: {url:?} is not an http:// or https:// URL of at most \
                 {MAX_ADVERTISE_URL} bytes"
            ));
        }
        if self.max_batch == 0 {
            return Err("max_batch: must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--webhook-backoff` sets both ends of the backoff; past a day the jittered wait would
    /// overflow the clock on the first failed delivery. Refused at start instead.
    #[test]
    fn a_webhook_backoff_over_a_day_is_refused_naming_the_field() {
        let huge = Duration::from_secs(580_000_000_000 * 365 * 24 * 3600);
        let mut config = ExecutorConfig::default();
        config.webhooks.first_backoff = huge;
        config.webhooks.max_backoff = huge;
        let error = config.validate().unwrap_err();
        assert!(
            error.starts_with("webhooks.first_backoff: ") && error.ends_with("(1ms to 1day)"),
            "{error}"
        );
        config.webhooks.first_backoff = Duration::from_secs(1);
        let error = config.validate().unwrap_err();
        assert!(error.starts_with("webhooks.max_backoff: "), "{error}");
        config.webhooks.max_backoff = Duration::from_secs(3600);
        assert_eq!(config.validate(), Ok(()));
    }

    /// The advertised URL fits the lease holder name with the longest unique holder, and is a
    /// URL; anything else is refused at start naming the field.
    #[test]
    fn an_advertise_url_must_be_a_short_http_url() {
        // The longest unique holder: a 64-byte host name, the largest pid, 8 hex digits.
        let longest_host = "h".repeat(64);
        let holder = format!("{longest_host}/pid-4294967295/abcdef12");
        let fits = format!("https://{}:7070", "a".repeat(MAX_ADVERTISE_URL - 13));
        assert_eq!(fits.len(), MAX_ADVERTISE_URL);
        assert!(holder.len() + 1 + fits.len() <= dagmesh_proto::limits::MAX_VALUE_LEN);
        let mut config = ExecutorConfig {
            advertise_url: Some(fits),
            ..ExecutorConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
        for bad in [
            format!("https://{}:7070", "a".repeat(MAX_ADVERTISE_URL)),
            "10.0.0.5:7070".to_owned(),
            "http://a b:7070".to_owned(),
        ] {
            config.advertise_url = Some(bad.clone());
            let error = config.validate().unwrap_err();
            assert!(error.starts_with("advertise_url: "), "{bad}: {error}");
        }
    }
}
