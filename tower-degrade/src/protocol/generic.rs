//! The protocol for any service: errors become [`BoxError`], degraded calls fail with
//! [`Degraded`].

use super::{ClassifyOutcome, OkIsSuccess, Protocol};
use crate::error::BoxError;
use crate::error::Degraded;
use crate::window::Recording;

/// The protocol for any service: errors become [`BoxError`], degraded calls fail with
/// [`Degraded`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Generic<C = OkIsSuccess> {
    classify: C,
}

impl Generic {
    /// `Ok` is a success, `Err` an error.
    pub const fn new() -> Self {
        Self {
            classify: OkIsSuccess,
        }
    }
}

impl<C> Generic<C> {
    /// Classify outcomes with `classify`.
    pub const fn with_classifier(classify: C) -> Self {
        Self { classify }
    }
}

impl<Res, E, C> Protocol<Res, E> for Generic<C>
where
    E: Into<BoxError>,
    C: ClassifyOutcome<Res, E>,
{
    type Response = Res;
    type Error = BoxError;

    #[inline]
    fn on_response(&self, result: Result<Res, E>, rec: Recording) -> Result<Res, BoxError> {
        rec.finish(self.classify.classify(&result));
        result.map_err(Into::into)
    }

    fn on_fallback(&self, result: Result<Res, E>) -> Result<Res, BoxError> {
        result.map_err(Into::into)
    }

    fn on_degraded(&self, degraded: Degraded) -> Result<Res, BoxError> {
        Err(Box::new(degraded))
    }

    fn on_ready_error(&self, error: E) -> BoxError {
        error.into()
    }
}
