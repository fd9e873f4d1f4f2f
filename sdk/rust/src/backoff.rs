//! Exponential backoff with jitter, shared by worker reconnects and the run follower.

use std::time::Duration;

/// Doubles from `initial` up to `max`; each delay is drawn from `[d/2, d]` so that a fleet of
/// workers cut off by the same executor restart does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Self {
            initial,
            max,
            next: initial,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        base.mul_f64(0.5 + 0.5 * random_fraction())
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Uniform in `[0, 1)`. A v4 UUID is 122 random bits from the OS; the low 53 bits of its second
/// half are all random, which spares a dependency on `rand` for one number per reconnect.
fn random_fraction() -> f64 {
    let (_, low) = uuid::Uuid::new_v4().as_u64_pair();
    (low & ((1 << 53) - 1)) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
        assert!(
            delays[9] >= Duration::from_millis(2500),
            "capped at 5s, jittered down to half"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
