//! Deadlines the engine acts on. Timers are never cancelled: when one fires, the engine checks
//! that the state it was set for (step attempt, session) still holds, and ignores it otherwise.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use tokio::time::Instant;

use super::run::StepRef;

#[derive(Debug, Clone)]
pub(crate) enum Timer {
    /// A step's backoff after a failed attempt is over.
    RetryDue {
        run_id: Arc<str>,
        step: StepRef,
        attempt: u32,
    },
    /// An attempt's deadline (StepSpec.timeout) has passed.
    AttemptTimeout {
        run_id: Arc<str>,
        step: StepRef,
        attempt: u32,
    },
    /// A READY attempt's schedule-to-start timeout (StepSpec.schedule_to_start_timeout).
    ScheduleToStart {
        run_id: Arc<str>,
        step: StepRef,
        attempt: u32,
    },
    /// Write the latest progress of a step that reported faster than events are kept.
    ProgressFlush {
        run_id: Arc<str>,
        step: StepRef,
        attempt: u32,
    },
    /// A sleep is over, or a wait (approval) reached its timeout.
    WaitDeadline {
        run_id: Arc<str>,
        step: StepRef,
        attempt: u32,
    },
    /// Check whether a worker has been silent for a whole lease.
    Lease { instance: Arc<str> },
    /// A task a reconnecting worker listed was kept for its owner to declare (see
    /// `relay::park_unknown`); cancel it if none did.
    Parked { task_id: String, attempt: u32 },
    /// Stop waiting for in-flight tasks during a drain.
    DrainDeadline,
}

struct Entry {
    at: Instant,
    seq: u64,
    timer: Timer,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    // Reversed: BinaryHeap is a max-heap and the earliest deadline must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl Timers {
    pub fn schedule(&mut self, at: Instant, timer: Timer) {
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            timer,
        });
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|entry| entry.at)
    }

    /// Removes and returns the next timer due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.heap.peek()?.at <= now {
            self.heap.pop().map(|entry| entry.timer)
        } else {
            None
        }
    }
}
