//! Retry policy with the proto defaults applied, and the backoff arithmetic.

use std::time::Duration;

use dagmesh_proto::limits::{MAX_ATTEMPTS, MAX_BACKOFF};
use dagmesh_proto::v1::RetryPolicy;

use crate::error::SpecError;

pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_MULTIPLIER: f64 = 2.0;
pub const DEFAULT_JITTER: f64 = 0.2;

/// A step's retry policy, defaults applied. `Retry::default()` is what an absent `retry` means:
/// one attempt only.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Total attempts including the first, at least 1.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// At least 1.
    pub multiplier: f64,
    /// In 0..=1.
    pub jitter: f64,
    pub retry_non_retryable: bool,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 1,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            multiplier: DEFAULT_MULTIPLIER,
            jitter: DEFAULT_JITTER,
            retry_non_retryable: false,
        }
    }
}

impl Retry {
    /// The delay before attempt `failed_attempt + 1` (attempts count from 1):
    /// `initial_backoff * multiplier^(failed_attempt - 1)`, capped at `max_backoff`, then
    /// jittered to `d * (1 - jitter * rng_unit)`. `rng_unit` is uniform in `[0, 1)`; the caller
    /// draws it so that tests can pin it.
    pub fn backoff(&self, failed_attempt: u32, rng_unit: f64) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(i32::MAX as u32) as i32;
        let max = self.max_backoff.as_secs_f64();
        // In f64 so that a large exponent saturates to infinity (then the cap) instead of
        // overflowing a Duration.
        let grown = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = if grown.is_nan() { max } else { grown.min(max) };
        let rng_unit = if rng_unit.is_nan() {
            0.0
        } else {
            rng_unit.clamp(0.0, 1.0)
        };
        let jittered = capped * (1.0 - self.jitter * rng_unit);
        Duration::try_from_secs_f64(jittered.max(0.0)).unwrap_or(self.max_backoff)
    }

    /// Whether a step whose attempt `failed_attempt` failed gets another attempt. `retryable`
    /// is false when the worker marked the failure non-retryable.
    pub fn should_retry(&self, failed_attempt: u32, retryable: bool) -> bool {
        failed_attempt < self.max_attempts && (retryable || self.retry_non_retryable)
    }

    /// Applies the proto defaults and checks the ranges; problems are pushed under `path`
    /// (e.g. `steps[2].retry`).
    pub(crate) fn from_proto(
        policy: &RetryPolicy,
        path: &str,
        errors: &mut Vec<SpecError>,
    ) -> Self {
        if policy.max_attempts > MAX_ATTEMPTS {
            errors.push(SpecError::new(
                format!("{path}.max_attempts"),
                format!(
                    "{} attempts, over the limit of {MAX_ATTEMPTS}",
                    policy.max_attempts
                ),
            ));
        }
        let mut duration = |field: &str, text: &str, default: Duration| {
            if text.is_empty() {
                return default;
            }
            match crate::compile::parse_duration(text) {
                Ok(d) if d > MAX_BACKOFF => {
                    errors.push(SpecError::new(
                        format!("{path}.{field}"),
                        format!(
                            "{text:?} is over the limit of {}",
                            humantime::format_duration(MAX_BACKOFF)
                        ),
                    ));
                    default
                }
                Ok(d) => d,
                Err(message) => {
                    errors.push(SpecError::new(format!("{path}.{field}"), message));
                    default
                }
            }
        };
        let initial_backoff = duration(
            "initial_backoff",
            &policy.initial_backoff,
            DEFAULT_INITIAL_BACKOFF,
        );
        let max_backoff = duration("max_backoff", &policy.max_backoff, DEFAULT_MAX_BACKOFF);
        if max_backoff < initial_backoff {
            errors.push(SpecError::new(
                format!("{path}.max_backoff"),
                format!(
                    "max_backoff {} is less than initial_backoff {}",
                    humantime::format_duration(max_backoff),
                    humantime::format_duration(initial_backoff)
                ),
            ));
        }

        let multiplier = if policy.multiplier == 0.0 {
            DEFAULT_MULTIPLIER
        } else {
            policy.multiplier
        };
        // `!(x >= 1)` rather than `x < 1` so that NaN is rejected too.
        if !(multiplier >= 1.0 && multiplier.is_finite()) {
            errors.push(SpecError::new(
                format!("{path}.multiplier"),
                format!("must be a finite number of at least 1, got {multiplier}"),
            ));
        }

        let jitter = if policy.jitter == 0.0 {
            DEFAULT_JITTER
        } else {
            policy.jitter
        };
        if !(0.0..=1.0).contains(&jitter) {
            errors.push(SpecError::new(
                format!("{path}.jitter"),
                format!("must be between 0 and 1, got {jitter}"),
            ));
        }

        Retry {
            max_attempts: policy.max_attempts.clamp(1, MAX_ATTEMPTS),
            initial_backoff,
            max_backoff,
            multiplier,
            jitter,
            retry_non_retryable: policy.retry_non_retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial: u64, max: u64, multiplier: f64, jitter: f64) -> Retry {
        Retry {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(initial),
            max_backoff: Duration::from_secs(max),
            multiplier,
            jitter,
            retry_non_retryable: false,
        }
    }

    #[test]
    fn backoff_grows_by_the_multiplier_until_the_cap() {
        let retry = policy(1, 10, 2.0, 0.2);
        let delays: Vec<_> = (1..=6).map(|a| retry.backoff(a, 0.0).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn jitter_shortens_the_delay_by_at_most_its_fraction() {
        let retry = policy(10, 100, 2.0, 0.2);
        assert_eq!(retry.backoff(1, 0.5), Duration::from_secs(9));
        assert_eq!(retry.backoff(1, 0.0), Duration::from_secs(10));
        assert!(retry.backoff(1, 0.999_999) > Duration::from_secs(8));
    }

    #[test]
    fn huge_attempt_numbers_stay_at_the_cap() {
        let retry = policy(1, 300, 2.0, 0.2);
        assert_eq!(retry.backoff(u32::MAX, 0.0), Duration::from_secs(300));
    }

    #[test]
    fn retries_stop_at_max_attempts_and_on_non_retryable_failures() {
        let mut retry = policy(1, 10, 2.0, 0.2);
        assert!(retry.should_retry(4, true));
        assert!(!retry.should_retry(5, true));
        assert!(!retry.should_retry(1, false));
        retry.retry_non_retryable = true;
        assert!(retry.should_retry(1, false));
    }

    #[test]
    fn absent_policy_means_one_attempt() {
        assert!(!Retry::default().should_retry(1, true));
    }

    #[test]
    fn empty_proto_fields_take_the_documented_defaults() {
        let mut errors = Vec::new();
        let retry = Retry::from_proto(&RetryPolicy::default(), "retry", &mut errors);
        assert!(errors.is_empty());
        assert_eq!(retry, Retry::default());
    }
}
