//! The brake of a batch: one place that decides whether a provider call may start.
//!
//! Three things stop a batch's calls, and they must act alike — checked right before each
//! call, never interrupting one in flight, and telling every scene that did not call why:
//! the account failing (a 401 or 402 refuses every other call the same way), the budget
//! (`STAGE3_MAX_COST_USD`, counted from estimates reserved before each call and settled at
//! what it was billed), and the user (Ctrl-C). The service makes one [`BatchStop`] per batch;
//! the CLI hands one in to stop it from outside.

use std::sync::Arc;

use crate::error::{Result, Stage3Error};
use crate::image_spec::ProviderKind;

/// The brake of one batch: once stopped, no provider call starts, and every scene that
/// would have called fails with the stopping cause (see
/// `Stage3Error::for_unstarted_scene`). Also keeps the batch's spending against
/// `STAGE3_MAX_COST_USD`. Checked right before each provider call; calls in flight finish.
/// Cheap to clone: clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct BatchStop(Arc<StopState>);

#[derive(Debug, Default)]
struct StopState {
    reason: std::sync::Mutex<Option<Stage3Error>>,
    /// Providers whose account refused a call (a 401 or 402), with the refusal.
    refused_providers: std::sync::Mutex<Vec<(ProviderKind, Stage3Error)>>,
    spending: std::sync::Mutex<Spending>,
    /// Models that answered "unavailable" in this batch: later scenes go straight to their
    /// fallbacks instead of paying a round trip to learn it again.
    unavailable_models: std::sync::Mutex<Vec<String>>,
}

#[derive(Debug, Default)]
struct Spending {
    max_usd: Option<f64>,
    spent_usd: f64,
    /// Estimates of the calls in flight, whose price is not known yet.
    reserved_usd: f64,
}

fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data stays consistent under every panic point (plain assignments), so a poisoned
    // lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BatchStop {
    pub fn new() -> Self {
        BatchStop::default()
    }

    /// A stop that also refuses calls once spending would pass `max_usd`.
    pub(crate) fn with_budget(max_usd: Option<f64>) -> Self {
        let stop = BatchStop::new();
        stop.limit_spending(max_usd);
        stop
    }

    /// Stops the batch with `error`. The first cause wins.
    pub fn stop(&self, error: Stage3Error) {
        let mut reason = locked(&self.0.reason);
        if reason.is_none() {
            tracing::warn!(
                error_type = %error.error_type(),
                error = %error,
                "the batch stops starting provider calls"
            );
            *reason = Some(error);
        }
    }

    /// `Ok` while calls may start; the stopping cause, retold for a scene that never
    /// called, once stopped.
    pub(crate) fn check(&self) -> Result<()> {
        match locked(&self.0.reason).as_ref() {
            None => Ok(()),
            Some(error) => Err(error.for_unstarted_scene()),
        }
    }

    /// Stops every later call to `provider` with `error`: its account refused one (a 401
    /// or 402), and would refuse the others the same way. The first cause wins.
    pub(crate) fn stop_provider(&self, provider: ProviderKind, error: Stage3Error) {
        let mut refused = locked(&self.0.refused_providers);
        if !refused.iter().any(|(kind, _)| *kind == provider) {
            tracing::warn!(
                provider = %provider,
                error_type = %error.error_type(),
                error = %error,
                "no further calls to this provider in this batch"
            );
            refused.push((provider, error));
        }
    }

    /// `Ok` while calls to `provider` may start: the batch is not stopped and the
    /// provider's account has not refused a call.
    pub(crate) fn check_provider(&self, provider: ProviderKind) -> Result<()> {
        self.check()?;
        match locked(&self.0.refused_providers)
            .iter()
            .find(|(kind, _)| *kind == provider)
        {
            Some((_, error)) => Err(error.for_unstarted_scene()),
            None => Ok(()),
        }
    }

    /// Why the batch stopped, if it has.
    pub fn reason(&self) -> Option<Stage3Error> {
        locked(&self.0.reason).clone()
    }

    pub(crate) fn mark_unavailable(&self, model: &str) {
        let mut models = locked(&self.0.unavailable_models);
        if !models.iter().any(|m| m == model) {
            models.push(model.to_string());
        }
    }

    pub(crate) fn is_unavailable(&self, model: &str) -> bool {
        locked(&self.0.unavailable_models)
            .iter()
            .any(|m| m == model)
    }

    /// What the batch's calls were billed so far, in USD.
    #[cfg(test)]
    pub(crate) fn spent_usd(&self) -> f64 {
        locked(&self.0.spending).spent_usd
    }

    /// Sets the budget unless one is set already.
    pub(crate) fn limit_spending(&self, max_usd: Option<f64>) {
        let mut spending = locked(&self.0.spending);
        if spending.max_usd.is_none() {
            spending.max_usd = max_usd;
        }
    }

    /// Whether spending is limited: then a call's real cost must be known before the next
    /// call is checked against the budget.
    pub(crate) fn limits_spending(&self) -> bool {
        locked(&self.0.spending).max_usd.is_some()
    }

    /// Reserves a call's estimate, or stops the batch when spent + reserved + estimate would
    /// pass the budget. Returns the amount reserved.
    pub(crate) fn reserve(&self, estimate_usd: Option<f64>) -> Result<f64> {
        let estimate = estimate_usd.unwrap_or(0.0);
        let mut spending = locked(&self.0.spending);
        if let Some(max) = spending.max_usd {
            let committed = spending.spent_usd + spending.reserved_usd;
            if committed + estimate > max + 1e-9 {
                drop(spending);
                let error = Stage3Error::BudgetExceeded(format!(
                    "the batch has spent or committed ${committed:.4} of its ${max:.2} budget \
                     (STAGE3_MAX_COST_USD); the next call's estimate of ${estimate:.4} would \
                     pass it"
                ));
                self.stop(error.clone());
                return Err(error);
            }
        }
        spending.reserved_usd += estimate;
        Ok(estimate)
    }

    /// Replaces a call's reservation by what it cost.
    pub(crate) fn settle(&self, reserved_usd: f64, cost_usd: Option<f64>) {
        let mut spending = locked(&self.0.spending);
        spending.reserved_usd = (spending.reserved_usd - reserved_usd).max(0.0);
        spending.spent_usd += cost_usd.unwrap_or(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorType;

    #[test]
    fn a_call_is_refused_once_reserved_and_spent_would_pass_the_budget() {
        let stop = BatchStop::with_budget(Some(0.10));
        let first = stop.reserve(Some(0.04)).unwrap();
        let second = stop.reserve(Some(0.04)).unwrap();
        // 0.08 committed: a third 0.04 would make 0.12.
        let refused = stop.reserve(Some(0.04)).unwrap_err();
        assert_eq!(refused.error_type(), ErrorType::BudgetExceeded);
        // The refusal stops the batch: nothing else starts, whatever its price.
        assert_eq!(
            stop.check().unwrap_err().error_type(),
            ErrorType::BudgetExceeded
        );
        // Settling replaces each reservation by what was billed.
        stop.settle(first, Some(0.03));
        stop.settle(second, None);
        assert!((stop.spent_usd() - 0.03).abs() < 1e-12);
    }

    #[test]
    fn an_account_refusal_stops_only_its_provider() {
        let stop = BatchStop::new();
        stop.stop_provider(
            ProviderKind::DashScope,
            Stage3Error::Auth(crate::error::ProviderFailure::new(Some(401), "bad key")),
        );
        let refused = stop.check_provider(ProviderKind::DashScope).unwrap_err();
        assert_eq!(refused.error_type(), ErrorType::Auth);
        assert!(refused.to_string().contains("not started"), "{refused}");
        stop.check_provider(ProviderKind::Ark).unwrap();
        stop.check().unwrap();
        stop.stop(Stage3Error::Cancelled("Ctrl-C".into()));
        assert_eq!(
            stop.check_provider(ProviderKind::Ark)
                .unwrap_err()
                .error_type(),
            ErrorType::Cancelled
        );
    }

    #[test]
    fn the_first_cause_wins_and_a_budget_is_set_once() {
        let stop = BatchStop::new();
        stop.check().unwrap();
        stop.stop(Stage3Error::Cancelled("Ctrl-C".into()));
        stop.stop(Stage3Error::BudgetExceeded("later".into()));
        assert_eq!(stop.reason().unwrap().error_type(), ErrorType::Cancelled);

        let budgeted = BatchStop::with_budget(Some(1.0));
        budgeted.limit_spending(Some(0.01));
        budgeted.reserve(Some(0.5)).unwrap();
    }
}
