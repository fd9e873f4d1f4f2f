//! Run admission (QUEUED → RUNNING) and step resources, under the configured [`Limits`].
//!
//! A run occupies one bucket per run limit that applies to it; it is admitted when every bucket
//! has room, and gives them back when it ends. Queued runs wait in priority, then FIFO order; a
//! run that does not fit yet does not hold back later runs that do.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::Limits;

pub(crate) type AdmissionKey = (Reverse<i32>, u64);

pub(crate) struct Admission {
    limits: Arc<Limits>,
    /// Admitted runs holding each bucket.
    held: HashMap<String, u32>,
    /// Running steps holding each resource (StepSpec.concurrency_key).
    resources: HashMap<String, u32>,
    queue: BTreeMap<AdmissionKey, Arc<str>>,
    fifo: u64,
    /// Room was freed or a run was queued since the last admission pass.
    pub dirty: bool,
}

impl Admission {
    pub fn new(limits: Arc<Limits>) -> Self {
        Self {
            limits,
            held: HashMap::new(),
            resources: HashMap::new(),
            queue: BTreeMap::new(),
            fifo: 0,
            dirty: false,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn fits(&self, buckets: &[String]) -> bool {
        buckets.iter().all(|bucket| {
            self.held.get(bucket).copied().unwrap_or(0) < self.limits.bucket_max(bucket)
        })
    }

    pub fn acquire(&mut self, buckets: &[String]) {
        for bucket in buckets {
            *self.held.entry(bucket.clone()).or_default() += 1;
        }
    }

    pub fn release(&mut self, buckets: &[String]) {
        for bucket in buckets {
            if let Some(count) = self.held.get_mut(bucket) {
                *count = count.saturating_sub(1);
            }
        }
        self.dirty = true;
    }

    pub fn enqueue(&mut self, priority: i32, run_id: Arc<str>) {
        self.fifo += 1;
        self.queue.insert((Reverse(priority), self.fifo), run_id);
        self.dirty = true;
    }

    pub fn queue_is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queued runs in admission order.
    pub fn queued(&self) -> Vec<(AdmissionKey, Arc<str>)> {
        self.queue
            .iter()
            .map(|(key, run_id)| (*key, run_id.clone()))
            .collect()
    }

    pub fn dequeue(&mut self, key: &AdmissionKey) {
        self.queue.remove(key);
    }

    pub fn resource_available(&self, key: &str) -> bool {
        key.is_empty() || self.resources.get(key).copied().unwrap_or(0) < self.limits.step_max(key)
    }

    pub fn hold_resource(&mut self, key: &str) {
        if !key.is_empty() {
            *self.resources.entry(key.to_owned()).or_default() += 1;
        }
    }

    pub fn release_resource(&mut self, key: &str) {
        if let Some(count) = self.resources.get_mut(key) {
            *count = count.saturating_sub(1);
        }
    }
}
