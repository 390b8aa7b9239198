//! Retry policy and shared back-pressure.
//!
//! Image APIs fail often and every call costs money, so retries are deliberate: exponential
//! backoff with full jitter (so a batch's scenes do not retry in lock-step), the provider's
//! `Retry-After` honoured when given, and a hard bound on attempts and on the deadline.
//! When the provider says 429, [`Backpressure`] pauses the *whole batch*: scenes wait their
//! turn instead of each hammering the provider with its own retries.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::deadline::Deadline;
use crate::error::Stage3Error;

/// How many times to try, and how long to wait in between (`Config::retry_policy` reads it
/// from `STAGE3_MAX_RETRIES`, `STAGE3_RETRY_BASE_MS` and `STAGE3_RETRY_MAX_MS`).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based) after `error`: the provider's
    /// `Retry-After` if it gave one (capped at `max_delay`), otherwise a uniformly random
    /// delay in `[0, min(max_delay, base × 2^(retry-1))]` ("full jitter").
    pub fn delay_before(&self, retry: u32, error: &Stage3Error) -> Duration {
        if let Some(asked) = error.retry_after() {
            return asked.min(self.max_delay);
        }
        let exponent = retry.saturating_sub(1).min(30);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=ceiling_ms))
    }

    /// Whether `error` on attempt number `attempt` (1-based) should be tried again.
    pub fn should_retry(&self, attempt: u32, error: &Stage3Error) -> bool {
        error.is_transient() && attempt <= self.max_retries
    }

    /// The one rule of every retry loop (provider calls, storage calls): try again after
    /// `error` on attempt `attempt` only if it is transient, the retries are not spent, and
    /// the wait of `delay` plus what the next attempt needs (`then_needed`) fit before the
    /// deadline — a retry that cannot finish is paid for and thrown away.
    pub fn allows_retry(
        &self,
        attempt: u32,
        error: &Stage3Error,
        delay: Duration,
        deadline: &Deadline,
        then_needed: Duration,
    ) -> bool {
        self.should_retry(attempt, error) && deadline.allows(delay + then_needed)
    }
}

/// A pause shared by every scene in flight: after a 429, nobody calls the provider until
/// the pause is over.
#[derive(Debug)]
pub struct Backpressure {
    resume_at: Mutex<Option<Instant>>,
}

impl Default for Backpressure {
    fn default() -> Self {
        Backpressure::new()
    }
}

impl Backpressure {
    pub fn new() -> Self {
        Backpressure {
            resume_at: Mutex::new(None),
        }
    }

    /// Asks every caller of [`Backpressure::wait`] to hold off for `delay` from now. A
    /// shorter pause never cuts a longer one short.
    pub async fn pause_for(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut resume_at = self.resume_at.lock().await;
        if resume_at.is_none_or(|current| current < until) {
            *resume_at = Some(until);
        }
    }

    /// Waits until any pause is over; returns at once when there is none.
    pub async fn wait(&self) {
        let until = *self.resume_at.lock().await;
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    /// When the current pause ends, if there is one in the future.
    pub async fn paused_until(&self) -> Option<Instant> {
        self.resume_at
            .lock()
            .await
            .filter(|until| *until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProviderFailure;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        }
    }

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        let err = Stage3Error::Timeout("slow".into());
        for retry in 1..=10 {
            let ceiling =
                Duration::from_millis(100 * (1 << (retry - 1))).min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(policy().delay_before(retry, &err) <= ceiling);
            }
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let mut failure = ProviderFailure::new(Some(429), "slow down");
        failure.retry_after = Some(Duration::from_millis(700));
        let err = Stage3Error::RateLimited(failure.clone());
        assert_eq!(policy().delay_before(1, &err), Duration::from_millis(700));
        failure.retry_after = Some(Duration::from_secs(3600));
        let err = Stage3Error::RateLimited(failure);
        assert_eq!(policy().delay_before(1, &err), Duration::from_secs(1));
    }

    #[test]
    fn only_transient_errors_are_retried_and_only_within_budget() {
        let transient = Stage3Error::ProviderUnavailable(ProviderFailure::new(Some(503), "x"));
        let permanent = Stage3Error::Auth(ProviderFailure::new(Some(401), "x"));
        assert!(policy().should_retry(1, &transient));
        assert!(policy().should_retry(3, &transient));
        assert!(!policy().should_retry(4, &transient));
        assert!(!policy().should_retry(1, &permanent));
        // The deadline leaves room for the wait but not for the next attempt.
        let deadline = Deadline::after(Duration::from_secs(10));
        let second = Duration::from_secs(1);
        assert!(policy().allows_retry(1, &transient, second, &deadline, second));
        assert!(!policy().allows_retry(1, &transient, second, &deadline, Duration::from_secs(20)));
        assert!(policy().allows_retry(1, &transient, second, &Deadline::NONE, Duration::MAX / 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_waiter() {
        let pressure = Backpressure::new();
        pressure.pause_for(Duration::from_secs(5)).await;
        pressure.pause_for(Duration::from_secs(1)).await;
        let started = Instant::now();
        pressure.wait().await;
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(pressure.paused_until().await.is_none());
    }
}
