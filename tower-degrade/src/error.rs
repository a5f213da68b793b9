//! Errors produced by the degradation layer.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::class::Route;
use crate::directive::Reason;

/// A call was not served by the inner service: it was rejected, timed out, or its route has no
/// handler.
///
/// Services using the generic protocol return it boxed in a [`BoxError`](crate::BoxError): find it with
/// [`is_degraded`] or `err.downcast_ref::<Degraded>()` (the error type is
/// [`BoxError`](crate::BoxError)). HTTP services answer with a degraded
/// response instead and put a clone of this value in the response extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degraded {
    class: Arc<str>,
    reason: Reason,
    route: Route,
    retry_after: Option<Duration>,
}

impl Degraded {
    pub(crate) fn new(
        class: Arc<str>,
        reason: Reason,
        route: Route,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            class,
            reason,
            route,
            retry_after,
        }
    }

    /// The class of the call.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// Why the call was not served.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The route the call was sent to.
    pub fn route(&self) -> Route {
        self.route
    }

    /// When the caller may retry, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Degraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "class `{}` degraded: {}", self.class, self.reason)?;
        if !matches!(self.route, Route::Reject) {
            write!(f, " (route `{}` has no handler)", self.route)?;
        }
        if let Some(d) = self.retry_after {
            write!(f, ", retry after {} ms", d.as_millis())?;
        }
        Ok(())
    }
}

impl std::error::Error for Degraded {}

/// Whether `err` is, or wraps (through [`std::error::Error::source`]), a [`Degraded`] error.
///
/// ```
/// use tower_degrade::{error::is_degraded, BoxError};
///
/// let err: BoxError = "database down".into();
/// assert!(!is_degraded(&*err));
/// ```
pub fn is_degraded(err: &(dyn std::error::Error + 'static)) -> bool {
    degraded(err).is_some()
}

/// The [`Degraded`] error inside `err`, if any.
pub fn degraded<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Degraded> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<Degraded>() {
            return Some(d);
        }
        cur = e.source();
    }
    None
}
