//! Retry policy and shared back-pressure.
//!
//! Image APIs fail often and every call costs money, so retries are deliberate: exponential
//! backoff with full jitter (so a batch's scenes do not retry in lock-step), the provider's
//! `Retry-After` honoured when given, and a hard bound on attempts and on the deadline.
//! When the provider says 429, [`Backpressure`] pauses the *whole batch*: scenes wait their
//! turn instead of each hammering the provider with its own retries.
//!
//! The retry loops run on [`RetryPolicy`]: provider and storage calls with the policy
//! `STAGE3_MAX_RETRIES` and its two delays configure, completion events with
//! [`RetryPolicy::EVENTS`], story publishing with [`RetryPolicy::STORY_STORE`] and
//! [`RetryPolicy::STORY_LISTING`], a story's queue messages with [`RetryPolicy::QUEUE_SEND`]. Each caller keeps its own judgement of which failures
//! are worth another try; the count, the waits and the deadline check are decided here.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};

/// How many times to try, and how long to wait in between (`Config::retry_policy` reads it
/// from `STAGE3_MAX_RETRIES`, `STAGE3_RETRY_BASE_MS` and `STAGE3_RETRY_MAX_MS`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Completion events (EventBridge entries and calls, webhook POSTs): 4 attempts, 200 ms
    /// doubling to at most 2 s. Events are a report, so this is short — the batch's answer
    /// must not wait long on them.
    pub(crate) const EVENTS: RetryPolicy = RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
    };

    /// One store call of story publishing (a fragment, the manifest, the page, a LIST, a
    /// GET, a DELETE): 3 attempts, 100 ms doubling, at most 400 ms. Short, because a story that cannot be
    /// published costs no scene: its fragment is stored and the next batch merges it.
    pub(crate) const STORY_STORE: RetryPolicy = RetryPolicy {
        max_retries: 2,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(400),
    };

    /// Messages of a story that `SendMessageBatch` did not take (`stage3 submit`): 6
    /// attempts, 200 ms doubling to at most 5 s. Above the SQS client's own 3 attempts per
    /// call: a submission has a person waiting, but nothing else, so it tries for a while
    /// before it reports what it could not send.
    #[cfg(any(feature = "sqs", test))]
    pub(crate) const QUEUE_SEND: RetryPolicy = RetryPolicy {
        max_retries: 5,
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
    };

    /// The pause before another story publishing round when the store's listing lags
    /// behind a write or a delete: 100 ms doubling to at most 1.6 s, one pause between each
    /// two of the story's 8 rounds (`story::MAX_ROUNDS`), so a slow listing gets a few
    /// seconds in all to catch up.
    pub(crate) const STORY_LISTING: RetryPolicy = RetryPolicy {
        max_retries: 7,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(1600),
    };

    /// The wait before retry number `retry` (1-based) when nobody asked for one: a
    /// uniformly random delay in `[0, min(max_delay, base × 2^(retry-1))]` ("full jitter").
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(30);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=ceiling_ms))
    }

    /// The wait before retry number `retry` (1-based) after `error`: the provider's
    /// `Retry-After` if it gave one (capped at `max_delay`), otherwise [`Self::backoff`].
    pub(crate) fn delay_before(&self, retry: u32, error: &Stage3Error) -> Duration {
        match error.retry_after() {
            Some(asked) => asked.min(self.max_delay),
            None => self.backoff(retry),
        }
    }

    /// The one rule of every retry loop (provider calls, storage calls): try again after
    /// `error` on attempt `attempt` only if it is transient, the retries are not spent, and
    /// the wait of `delay` plus what the next attempt needs (`then_needed`) fit before the
    /// deadline — a retry that cannot finish is paid for and thrown away.
    pub(crate) fn allows_retry(
        &self,
        attempt: u32,
        error: &Stage3Error,
        delay: Duration,
        deadline: &Deadline,
        then_needed: Duration,
    ) -> bool {
        error.is_transient() && self.allows_another(attempt, delay, deadline, then_needed)
    }

    /// [`Self::allows_retry`] for a failure its caller has already judged worth another
    /// try: the events judge HTTP statuses and AWS error codes, which are no
    /// [`Stage3Error`].
    pub(crate) fn allows_another(
        &self,
        attempt: u32,
        delay: Duration,
        deadline: &Deadline,
        then_needed: Duration,
    ) -> bool {
        attempt <= self.max_retries && deadline.allows(delay + then_needed)
    }

    /// After attempt `attempt` (1-based) failed in a way its caller judged passing: sleeps
    /// the [`Self::backoff`] and answers true, or answers false at once when the retries are
    /// spent or the wait would outlast `deadline`. Each attempt bounds its own time; this
    /// only refuses to start a wait that cannot end in time.
    pub(crate) async fn wait_to_retry(&self, attempt: u32, deadline: Deadline) -> bool {
        let delay = self.backoff(attempt);
        if !self.allows_another(attempt, delay, &deadline, Duration::ZERO) {
            return false;
        }
        tokio::time::sleep(delay).await;
        true
    }

    /// Runs `operation` until it succeeds, fails for good, or [`Self::allows_retry`] says
    /// no more (retries spent, or the wait would outlast `deadline`); answers its last
    /// outcome. Every retry is logged, with `what` naming the call. Each attempt bounds its
    /// own time: nothing here cuts one short.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        deadline: Deadline,
        what: &str,
        mut operation: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            let error = match operation().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let delay = self.delay_before(attempt, &error);
            if !self.allows_retry(attempt, &error, delay, &deadline, Duration::ZERO) {
                return Err(error);
            }
            tracing::warn!(
                attempt,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error_type = %error.error_type(),
                error = %error,
                "{what} failed; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A pause shared by every scene in flight: after a 429, nobody calls the provider until
/// the pause is over.
#[derive(Debug)]
pub(crate) struct Backpressure {
    resume_at: Mutex<Option<Instant>>,
}

impl Default for Backpressure {
    fn default() -> Self {
        Backpressure::new()
    }
}

impl Backpressure {
    pub(crate) fn new() -> Self {
        Backpressure {
            resume_at: Mutex::new(None),
        }
    }

    /// Asks every caller of [`Backpressure::wait`] to hold off for `delay` from now. A
    /// shorter pause never cuts a longer one short.
    pub(crate) async fn pause_for(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut resume_at = self.resume_at.lock().await;
        if resume_at.is_none_or(|current| current < until) {
            *resume_at = Some(until);
        }
    }

    /// Waits until any pause is over; returns at once when there is none.
    pub(crate) async fn wait(&self) {
        let until = *self.resume_at.lock().await;
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
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
        let (none, second) = (Duration::ZERO, Duration::from_secs(1));
        assert!(policy().allows_retry(1, &transient, none, &Deadline::NONE, none));
        assert!(policy().allows_retry(3, &transient, none, &Deadline::NONE, none));
        assert!(!policy().allows_retry(4, &transient, none, &Deadline::NONE, none));
        assert!(!policy().allows_retry(1, &permanent, none, &Deadline::NONE, none));
        // The deadline leaves room for the wait but not for the next attempt.
        let deadline = Deadline::after(Duration::from_secs(10));
        assert!(policy().allows_retry(1, &transient, second, &deadline, second));
        assert!(!policy().allows_retry(1, &transient, second, &deadline, Duration::from_secs(20)));
        assert!(policy().allows_retry(1, &transient, second, &Deadline::NONE, Duration::MAX / 2));
    }

    #[test]
    fn the_named_policies_keep_their_callers_timing() {
        let timing = |policy: RetryPolicy| {
            (
                policy.max_retries + 1,
                policy.base_delay.as_millis(),
                policy.max_delay.as_millis(),
            )
        };
        assert_eq!(timing(RetryPolicy::EVENTS), (4, 200, 2000));
        assert_eq!(timing(RetryPolicy::STORY_STORE), (3, 100, 400));
        assert_eq!(timing(RetryPolicy::STORY_LISTING), (8, 100, 1600));
        assert_eq!(timing(RetryPolicy::QUEUE_SEND), (6, 200, 5000));
        for policy in [
            RetryPolicy::QUEUE_SEND,
            RetryPolicy::EVENTS,
            RetryPolicy::STORY_STORE,
            RetryPolicy::STORY_LISTING,
        ] {
            for retry in 1..40 {
                assert!(policy.backoff(retry) <= policy.max_delay);
            }
            assert!(policy.backoff(1) <= policy.base_delay);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wait_to_retry_stops_when_the_retries_are_spent_or_the_deadline_is_near() {
        let policy = policy();
        let started = Instant::now();
        for attempt in 1..=3 {
            assert!(policy.wait_to_retry(attempt, Deadline::NONE).await);
        }
        assert!(started.elapsed() <= Duration::from_millis(100 + 200 + 400));
        assert!(!policy.wait_to_retry(4, Deadline::NONE).await);
        // A wait is started only if it ends before the deadline; one that would not is
        // refused at once, without sleeping.
        let long_waits = RetryPolicy {
            base_delay: Duration::from_secs(1),
            ..policy
        };
        let deadline = Deadline::after(Duration::from_millis(50));
        let mut refused = 0;
        for _ in 0..20 {
            let before = Instant::now();
            if long_waits.wait_to_retry(1, deadline).await {
                assert!(deadline.instant().is_some_and(|end| Instant::now() <= end));
            } else {
                assert!(before.elapsed().is_zero());
                refused += 1;
            }
        }
        // Each wait is drawn from 0..=1000 ms, so about 1 in 20 fits in 50 ms: twenty in a
        // row fitting is next to impossible.
        assert!(refused > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn run_retries_transient_failures_only_and_only_within_budget() {
        let policy = policy();
        let mut calls = 0;
        let answer = policy
            .run(Deadline::NONE, "a flaky call", || {
                calls += 1;
                let outcome = if calls < 3 {
                    Err(Stage3Error::storage("SlowDown", true))
                } else {
                    Ok(calls)
                };
                async move { outcome }
            })
            .await;
        assert_eq!(answer.unwrap(), 3);

        let mut calls = 0;
        let err = policy
            .run(Deadline::NONE, "a broken call", || {
                calls += 1;
                async { Err::<(), _>(Stage3Error::storage("SlowDown", true)) }
            })
            .await
            .unwrap_err();
        assert!(err.is_transient());
        assert_eq!(calls, 4, "the first attempt and max_retries more");

        let mut calls = 0;
        let err = policy
            .run(Deadline::NONE, "a refused call", || {
                calls += 1;
                async { Err::<(), _>(Stage3Error::storage("AccessDenied", false)) }
            })
            .await
            .unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(calls, 1, "a permanent failure is not tried again");

        // A Retry-After longer than the time left: the last failure comes back at once.
        let mut calls = 0;
        let deadline = Deadline::after(Duration::from_millis(500));
        let started = Instant::now();
        let err = policy
            .run(deadline, "a rate-limited call", || {
                calls += 1;
                let mut failure = ProviderFailure::new(Some(429), "slow down");
                failure.retry_after = Some(Duration::from_millis(900));
                async move { Err::<(), _>(Stage3Error::RateLimited(failure)) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Stage3Error::RateLimited(_)), "{err}");
        assert_eq!(calls, 1);
        assert!(started.elapsed().is_zero());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_waiter() {
        let pressure = Backpressure::new();
        pressure.pause_for(Duration::from_secs(5)).await;
        pressure.pause_for(Duration::from_secs(1)).await;
        let started = Instant::now();
        pressure.wait().await;
        assert!(started.elapsed() >= Duration::from_secs(5));
        // The pause is over: a later waiter passes at once.
        let again = Instant::now();
        pressure.wait().await;
        assert!(again.elapsed().is_zero());
    }
}
