//! What a policy decides for a class at a tick, and how decisions combine.

use std::fmt;
use std::time::Duration;

use crate::class::Route;
use crate::gate::{Directive, Reason};

/// The action of a [`Decision`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// No restriction from this policy: the breaker decides.
    Admit,
    /// Admit everything, even if the breaker would divert (an explicit override).
    Close,
    /// Divert everything to the class's route (or the decision's route).
    Open,
    /// Reject everything with a degraded answer.
    Shed,
    /// Divert everything to this route.
    Fallback(Route),
    /// Divert this share (0.0–1.0) of calls to the route, admit the rest.
    Degrade(f64),
    /// Admit this share (0.0–1.0) of calls, divert the rest to the route.
    AdmitFraction(f64),
    /// Admit every call after holding it this long.
    Delay(Duration),
}

/// The most alerts one decision carries.
pub const MAX_ALERTS: usize = 8;
/// The longest alert text kept, in bytes (cut on a character boundary).
pub const MAX_ALERT_BYTES: usize = 1024;

/// Alert text as it may reach a log line: at most [`MAX_ALERT_BYTES`], control characters
/// (newlines, escape sequences) and bidirectional overrides written as `\u{..}`.
pub(crate) fn sanitize(text: &str) -> String {
    crate::error::escape_cut(text, MAX_ALERT_BYTES)
}

/// A policy's decision for one class at one tick: an action, an optional route and
/// retry-after hint, and alerts to raise.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub(crate) action: Action,
    pub(crate) route: Option<Route>,
    pub(crate) retry_after: Option<Duration>,
    /// Shared, so the copies a chain of modifiers makes (`d = d.alert(m)` in a loop) copy no
    /// text.
    pub(crate) alerts: Vec<std::sync::Arc<str>>,
}

impl Decision {
    /// A decision with this action.
    pub fn new(action: Action) -> Self {
        let action = match action {
            Action::Degrade(l) => Action::Degrade(unit(l)),
            Action::AdmitFraction(f) => Action::AdmitFraction(unit(f)),
            a => a,
        };
        Self {
            action,
            route: None,
            retry_after: None,
            alerts: Vec::new(),
        }
    }

    /// The action.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The alerts raised with this decision.
    pub fn alerts(&self) -> &[std::sync::Arc<str>] {
        &self.alerts
    }

    /// Send what is not admitted to `route` instead of the class's route.
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = Some(route);
        self
    }

    /// Tell callers when to retry.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Raise an alert (a `warn` event and `degrade_policy_alerts_total`). At most
    /// [`MAX_ALERTS`] per decision (later ones are dropped), each cut to [`MAX_ALERT_BYTES`],
    /// with control characters and bidirectional overrides escaped before they reach logs.
    pub fn with_alert(mut self, message: impl AsRef<str>) -> Self {
        if self.alerts.len() < MAX_ALERTS {
            self.alerts.push(sanitize(message.as_ref()).into());
        }
        self
    }

    /// The share of calls this decision admits (1.0 for admit and close).
    pub fn admitted_share(&self) -> f64 {
        match self.action {
            Action::Admit | Action::Close | Action::Delay(_) => 1.0,
            Action::Open | Action::Shed | Action::Fallback(_) => 0.0,
            Action::Degrade(level) => 1.0 - level,
            Action::AdmitFraction(f) => f,
        }
    }

    /// The directive this decision stands for, `None` for [`Action::Admit`] (no opinion).
    pub(crate) fn directive(&self, class_route: Route) -> Option<Directive> {
        let route = self.route.unwrap_or(class_route);
        let retry_after = self.retry_after;
        Some(match self.action {
            Action::Admit => return None,
            Action::Close => Directive::Admit,
            Action::Delay(by) => Directive::Delay { by },
            Action::Shed => Directive::Divert {
                reason: Reason::Shed,
                route: self.route.unwrap_or(Route::Reject),
                retry_after,
            },
            Action::Open => Directive::Divert {
                reason: Reason::Policy,
                route,
                retry_after,
            },
            Action::Fallback(r) => Directive::Divert {
                reason: Reason::Policy,
                route: r,
                retry_after,
            },
            Action::Degrade(_) | Action::AdmitFraction(_) => Directive::AdmitFraction {
                fraction: self.admitted_share(),
                reason: Reason::Policy,
                route,
                retry_after,
            },
        })
    }
}

fn unit(v: f64) -> f64 {
    if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Admit => f.write_str("admit")?,
            Action::Close => f.write_str("close")?,
            Action::Open => f.write_str("open")?,
            Action::Shed => f.write_str("shed")?,
            Action::Fallback(r) => write!(f, "fallback({r})")?,
            Action::Degrade(l) => write!(f, "degrade({l})")?,
            Action::AdmitFraction(x) => write!(f, "admit_fraction({x})")?,
            Action::Delay(d) => write!(f, "delay({})", d.as_millis())?,
        }
        if let Some(r) = self.route {
            write!(f, " via {r}")?;
        }
        if let Some(d) = self.retry_after {
            write!(f, ", retry after {} ms", d.as_millis())?;
        }
        Ok(())
    }
}

/// How restrictive a directive is: first the share it admits (probes count as none), then,
/// among full admits, how long it holds calls. Smaller is stricter.
fn strictness(d: &Directive) -> (f64, std::cmp::Reverse<Duration>) {
    let (share, delay) = match d {
        Directive::Admit => (1.0, Duration::ZERO),
        Directive::Delay { by } => (1.0, *by),
        Directive::AdmitFraction { fraction, .. } => (*fraction, Duration::ZERO),
        _ => (0.0, Duration::ZERO),
    };
    (share, std::cmp::Reverse(delay))
}

impl Decision {
    fn strictness(&self) -> (f64, std::cmp::Reverse<Duration>) {
        let delay = match self.action {
            Action::Delay(d) => d,
            _ => Duration::ZERO,
        };
        (self.admitted_share(), std::cmp::Reverse(delay))
    }
}

/// Combine the breaker's directive with the enforced policy decisions of a class.
///
/// The rule, in order:
/// 1. Only decisions of the highest priority that decided something (not [`Action::Admit`])
///    count; among them the most restrictive (smallest admitted share) wins, ties going to the
///    first in policy-name order (`decisions` comes sorted by priority, then name).
/// 2. [`Action::Close`] overrides the breaker: everything is admitted.
/// 3. Any other decision can only tighten: the result is the more restrictive of the breaker's
///    directive and the decision's (the breaker's on a tie, so probes and their accounting stay).
pub(crate) fn combine<'a>(
    breaker: Directive,
    class_route: Route,
    decisions: impl IntoIterator<Item = (i64, &'a Decision)>,
) -> Directive {
    let mut best: Option<(i64, &Decision)> = None;
    for (priority, d) in decisions {
        if d.action == Action::Admit {
            continue;
        }
        match best {
            Some((p, _)) if priority < p => break,
            Some((_, b)) if d.strictness() >= b.strictness() => {}
            _ => best = Some((priority, d)),
        }
    }
    let Some((_, decision)) = best else {
        return breaker;
    };
    let Some(policy) = decision.directive(class_route) else {
        return breaker;
    };
    if decision.action == Action::Close {
        return policy;
    }
    if strictness(&policy) < strictness(&breaker) {
        policy
    } else {
        breaker
    }
}

#[cfg(test)]
mod alert_tests {
    use super::*;

    #[test]
    fn alerts_are_bounded_and_escaped() {
        let mut d = Decision::new(Action::Admit);
        for _ in 0..100 {
            d = d.with_alert("x".repeat(4096));
        }
        assert_eq!(d.alerts().len(), MAX_ALERTS);
        assert!(d.alerts()[0].len() <= MAX_ALERT_BYTES + '…'.len_utf8());
        let d = Decision::new(Action::Admit).with_alert("db\n\u{1b}[31mslow\u{202E}");
        assert_eq!(&*d.alerts()[0], "db\\u{a}\\u{1b}[31mslow\\u{202e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(a: Action) -> Decision {
        Decision::new(a)
    }

    #[test]
    fn highest_priority_then_most_restrictive() {
        let shed = d(Action::Shed);
        let degrade = d(Action::Degrade(0.5));
        let frac = d(Action::AdmitFraction(0.2));
        let admit = d(Action::Admit);
        // Same priority: the most restrictive wins.
        let out = combine(Directive::Admit, Route::Spool, [(0, &degrade), (0, &frac)]);
        assert!(
            matches!(out, Directive::AdmitFraction { fraction, .. } if (fraction - 0.2).abs() < 1e-9)
        );
        // A higher priority wins even if looser; a no-opinion decision is skipped.
        let out = combine(
            Directive::Admit,
            Route::Spool,
            [(5, &admit), (5, &degrade), (0, &shed)],
        );
        assert!(
            matches!(out, Directive::AdmitFraction { fraction, route: Route::Spool, .. } if fraction == 0.5)
        );
        // Nothing decided: the breaker stands.
        assert_eq!(
            combine(Directive::Admit, Route::Spool, [(0, &admit)]),
            Directive::Admit
        );
    }

    #[test]
    fn policies_only_tighten_unless_they_close() {
        let open = Directive::Divert {
            reason: Reason::BreakerOpen,
            route: Route::Reject,
            retry_after: None,
        };
        let degrade = d(Action::Degrade(0.5));
        assert_eq!(combine(open, Route::Reject, [(0, &degrade)]), open);
        let close = d(Action::Close);
        assert_eq!(
            combine(open, Route::Reject, [(0, &close)]),
            Directive::Admit
        );
        let shed = d(Action::Shed).with_retry_after(Duration::from_millis(700));
        assert_eq!(
            combine(Directive::Admit, Route::Spool, [(0, &shed)]),
            Directive::Divert {
                reason: Reason::Shed,
                route: Route::Reject,
                retry_after: Some(Duration::from_millis(700))
            }
        );
    }

    #[test]
    fn a_delay_is_stricter_than_admit_and_looser_than_any_share() {
        let delay = d(Action::Delay(Duration::from_millis(200)));
        let longer = d(Action::Delay(Duration::from_millis(900)));
        let out = combine(Directive::Admit, Route::Reject, [(0, &delay)]);
        assert_eq!(
            out,
            Directive::Delay {
                by: Duration::from_millis(200)
            }
        );
        let out = combine(Directive::Admit, Route::Reject, [(0, &delay), (0, &longer)]);
        assert_eq!(
            out,
            Directive::Delay {
                by: Duration::from_millis(900)
            }
        );
        let frac = Directive::AdmitFraction {
            fraction: 0.9,
            reason: Reason::Recovering,
            route: Route::Reject,
            retry_after: None,
        };
        assert_eq!(combine(frac, Route::Reject, [(0, &delay)]), frac);
    }

    #[test]
    fn shares_are_clamped() {
        assert_eq!(d(Action::Degrade(3.0)).admitted_share(), 0.0);
        assert_eq!(d(Action::AdmitFraction(f64::NAN)).admitted_share(), 0.0);
    }
}
