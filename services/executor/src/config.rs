use std::sync::Arc;
use std::time::Duration;

use crate::Limits;

/// Tunables of one executor. The defaults suit a laptop and a cluster alike; tests shorten the
/// lease so that lost workers are noticed quickly.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// How often workers must send a heartbeat (told to them in Welcome).
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is considered gone and its tasks are requeued.
    pub lease: Duration,
    /// Limit of inline payloads (run inputs, step inputs and outputs), protobuf-encoded bytes.
    pub max_payload_bytes: usize,
    /// Most commands folded into one group commit.
    pub max_batch: usize,
    /// How long a drain waits for in-flight tasks before it hands them back (they stay assigned
    /// in the store and are recovered, or requeued after the lease, by the next executor).
    pub drain_timeout: Duration,
    /// Run admission and step concurrency limits (none by default).
    pub limits: Arc<Limits>,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            max_payload_bytes: 4 * 1024 * 1024,
            max_batch: 4096,
            drain_timeout: Duration::from_secs(30),
            limits: Arc::default(),
        }
    }
}
