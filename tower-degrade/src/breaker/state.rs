//! Breaker states and transitions.

use std::fmt;

/// A breaker state. *Closed* means traffic flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Every call is admitted.
    Closed,
    /// No call is admitted until the open duration elapses.
    Open,
    /// A fixed number of probe calls is admitted.
    HalfOpen,
    /// A growing fraction of calls is admitted (slow start).
    Recovering,
    /// A share of calls goes to the fallback route while the rest stays observable.
    Degraded,
    /// Open, set by hand; stays until reset.
    ForcedOpen,
    /// The breaker is off: every call is admitted, metrics are still recorded.
    Disabled,
    /// Dry run: the breaker decides and reports, but every call is admitted.
    MetricsOnly,
}

impl State {
    const ALL: [State; 8] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::Recovering,
        State::Degraded,
        State::ForcedOpen,
        State::Disabled,
        State::MetricsOnly,
    ];

    /// The state's name as used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Recovering => "recovering",
            State::Degraded => "degraded",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics_only",
        }
    }

    /// The numeric value exported by the `degrade_breaker_state` gauge (the index in the
    /// declaration order: closed = 0 … metrics_only = 7).
    pub fn as_gauge(self) -> f64 {
        State::ALL.iter().position(|s| *s == self).unwrap_or(0) as f64
    }

    /// The breaker component of the health score, 0.0 (not serving) to 1.0 (healthy).
    pub const fn health(self) -> f64 {
        match self {
            State::Closed | State::Disabled | State::MetricsOnly => 1.0,
            State::Recovering => 0.75,
            State::Degraded | State::HalfOpen => 0.5,
            State::Open | State::ForcedOpen => 0.0,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change and why it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// Why, in words (with the numbers that decided it).
    pub reason: String,
    /// False when the transition happened in the shadow machine of a `MetricsOnly` breaker.
    pub enforced: bool,
}
