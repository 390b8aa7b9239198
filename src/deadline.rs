//! The time budget of a run: one type from the Lambda runtime's deadline down to every call.
//!
//! A Lambda invocation must answer before its deadline, or the whole event is redelivered and
//! everything it paid for is thrown away. So every outbound call — provider, image download,
//! storage — runs under `min(its own timeout, the time left)`, and a call cut short by the
//! deadline (rather than by its own timeout) is reported as `deadline_exceeded`, not as a slow
//! provider or a broken store. The CLI has no deadline: [`Deadline::NONE`].

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Result, Stage3Error};

/// When everything must be finished, if anything says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadline(Option<Instant>);

/// How long one call may take, and why it ends when it does: its own timeout, or the
/// deadline. Made once per call and handed down, so every step of the call (a POST, then an
/// image download) spends the same budget and reports running out of it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBudget {
    ends_at: Instant,
    timeout: Duration,
    /// True when the deadline, not the call's own timeout, set `timeout`.
    cut_by_deadline: bool,
}

impl CallBudget {
    /// A budget of `timeout` from now, with no deadline to cut it.
    pub(crate) fn new(timeout: Duration) -> Self {
        CallBudget {
            ends_at: Instant::now() + timeout,
            timeout,
            cut_by_deadline: false,
        }
    }

    /// The whole budget, as it was when the call started.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the deadline, not the call's own timeout, set the budget.
    pub(crate) fn cut_by_deadline(&self) -> bool {
        self.cut_by_deadline
    }

    /// The time left for the next step of the call, or the error for having none.
    pub(crate) fn remaining(&self, what: &str) -> Result<Duration> {
        let left = self.ends_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.expired(what))
        } else {
            Ok(left)
        }
    }

    /// The error for a call that ran out of this budget: `deadline_exceeded` when the
    /// deadline set it (the run is out of time, not the provider or store slow), else
    /// `timeout`.
    pub(crate) fn expired(&self, what: &str) -> Stage3Error {
        if self.cut_by_deadline {
            Stage3Error::DeadlineExceeded(format!(
                "{what} was cut short by the deadline after {} ms",
                self.timeout.as_millis()
            ))
        } else {
            Stage3Error::Timeout(format!(
                "{what} did not finish within {}",
                humantime::format_duration(self.timeout)
            ))
        }
    }
}

impl Deadline {
    /// No deadline: calls get their own timeouts.
    pub(crate) const NONE: Deadline = Deadline(None);

    pub(crate) fn after(duration: Duration) -> Self {
        Deadline(Some(Instant::now() + duration))
    }

    #[cfg(test)]
    pub(crate) fn instant(&self) -> Option<Instant> {
        self.0
    }

    /// This deadline moved `margin` later: for work allowed to spend part of a safety
    /// margin kept back before the real one.
    #[cfg(feature = "lambda")]
    pub(crate) fn later_by(&self, margin: Duration) -> Deadline {
        Deadline(self.0.map(|deadline| deadline + margin))
    }

    /// The time left, or `None` when there is no deadline.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.0
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// Whether `needed` still fits before the deadline.
    pub(crate) fn allows(&self, needed: Duration) -> bool {
        self.remaining().is_none_or(|left| needed <= left)
    }

    /// The budget for a call whose own timeout is `timeout`, keeping `reserve` back for what
    /// must happen after it.
    pub(crate) fn budget(&self, timeout: Duration, reserve: Duration) -> CallBudget {
        match self.remaining() {
            Some(left) if left.saturating_sub(reserve) < timeout => CallBudget {
                ends_at: Instant::now() + left.saturating_sub(reserve),
                timeout: left.saturating_sub(reserve),
                cut_by_deadline: true,
            },
            _ => CallBudget::new(timeout),
        }
    }

    /// Runs `call` until the deadline: `None` when the deadline came first. Without a
    /// deadline the call runs to its end (bounded only by its own timeouts).
    pub(crate) async fn within<T>(&self, call: impl Future<Output = T>) -> Option<T> {
        match self.0 {
            Some(deadline) => tokio::time::timeout_at(deadline, call).await.ok(),
            None => Some(call.await),
        }
    }

    /// Runs `call` for at most `min(timeout, time left)`. Running out of the call's own
    /// timeout is `Timeout`; running out of the deadline is `DeadlineExceeded`.
    pub(crate) async fn run<T>(
        &self,
        timeout: Duration,
        what: &str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let budget = self.budget(timeout, Duration::ZERO);
        let left = budget.remaining(what).map_err(|_| {
            Stage3Error::DeadlineExceeded(format!("no time left before the deadline for {what}"))
        })?;
        match tokio::time::timeout(left, call).await {
            Ok(result) => result,
            Err(_) => Err(budget.expired(what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorType;

    #[tokio::test(start_paused = true)]
    async fn a_call_gets_the_smaller_of_its_timeout_and_the_time_left() {
        let deadline = Deadline::after(Duration::from_secs(15));
        let budget = deadline.budget(Duration::from_secs(60), Duration::from_secs(2));
        assert_eq!(budget.timeout(), Duration::from_secs(13));
        assert!(budget.cut_by_deadline());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(budget.remaining("x").unwrap(), Duration::from_secs(9));
        tokio::time::advance(Duration::from_secs(9)).await;
        let spent = budget.remaining("POST /images").unwrap_err();
        assert_eq!(spent.error_type(), ErrorType::DeadlineExceeded);
        let budget = Deadline::NONE.budget(Duration::from_secs(60), Duration::from_secs(2));
        assert_eq!(budget.timeout(), Duration::from_secs(60));
        assert!(!budget.cut_by_deadline());
        assert_eq!(budget.expired("x").error_type(), ErrorType::Timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_call_ends_at_the_deadline_as_deadline_exceeded() {
        let deadline = Deadline::after(Duration::from_secs(15));
        let started = Instant::now();
        let hung = std::future::pending::<Result<()>>();
        let err = deadline
            .run(Duration::from_secs(60), "S3 PutObject", hung)
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), ErrorType::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn within_gives_up_at_the_deadline_and_waits_without_one() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let started = Instant::now();
        assert_eq!(deadline.within(std::future::pending::<()>()).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let slow = tokio::time::sleep(Duration::from_secs(3600));
        assert_eq!(Deadline::NONE.within(slow).await, Some(()));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_a_hung_call_ends_at_its_own_timeout() {
        let hung = std::future::pending::<Result<()>>();
        let err = Deadline::NONE
            .run(Duration::from_secs(60), "S3 PutObject", hung)
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), ErrorType::Timeout);
    }
}
