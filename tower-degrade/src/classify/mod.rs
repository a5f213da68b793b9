//! Request classification: which class a request belongs to.
//!
//! Classifiers resolve class names when they are built, so classifying a request is a lookup
//! that neither allocates nor locks, and only configured classes can come out of it: whatever
//! a client sends (paths, headers), label cardinality stays bounded.

mod http;
pub(crate) mod pattern;
mod view;

pub use self::http::{HttpClassifier, HttpClassifierBuilder};
pub use self::view::RequestView;
use crate::admit::AdmissionKey;
use crate::class::{ClassId, Registry};

/// Decides the class of a request.
///
/// Closures `Fn(&Req) -> ClassId` implement it, and so does a [`ClassId`] (a fixed class).
///
/// ```
/// use tower_degrade::{ClassConfig, ClassId, Degrader, classify::ClassifyRequest};
///
/// # fn main() -> Result<(), tower_degrade::error::ConfigError> {
/// let (degrader, _worker) = Degrader::builder("jobs")
///     .class(ClassConfig::gold("payment_callback"))
///     .build_with_worker()?;
/// let payment = degrader.class_id("payment_callback")?;
///
/// struct Job { kind: &'static str }
/// let classify = move |job: &Job| if job.kind == "pay" { payment } else { ClassId::DEFAULT };
/// assert_eq!(classify.classify(&Job { kind: "pay" }), payment);
/// assert_eq!(classify.classify(&Job { kind: "log" }), ClassId::DEFAULT);
/// # Ok(())
/// # }
/// ```
pub trait ClassifyRequest<Req> {
    /// The class of `req`.
    fn classify(&self, req: &Req) -> ClassId;

    /// What per-request policy rules may see of `req`: its rollout key and group, and for
    /// `on_request` hooks its method, path, headers and start time. Only called for classes
    /// that have such rules; the default sees nothing.
    fn describe<'a>(&self, _req: &'a Req) -> RequestView<'a> {
        RequestView::default()
    }

    /// What [admission](crate::admit) may know of `req` besides its class: an upstream's
    /// priority, the user key and the caller's deadline. Only called for calls that have to
    /// wait for a permit; the default knows nothing (the class's tier, the default user bucket,
    /// the class's wait bound). [`HttpClassifier`] reads a gRPC call's `grpc-timeout`.
    fn admission_key(&self, _req: &Req) -> AdmissionKey {
        AdmissionKey::none()
    }

    /// The registry whose ids this classifier hands out, when it was built from one (as
    /// [`HttpClassifier`] is). A layer of a degrader whose classes are not the same (another
    /// degrader's) then counts the calls in `default` and says so, rather than in whichever of
    /// its classes has the id. The default: not known. A classifier that wraps another
    /// should return the inner one's, or the check is off for it.
    fn registry(&self) -> Option<&Registry> {
        None
    }
}

impl<Req, F> ClassifyRequest<Req> for F
where
    F: Fn(&Req) -> ClassId,
{
    #[inline]
    fn classify(&self, req: &Req) -> ClassId {
        self(req)
    }
}

/// A fixed class is a classifier: every request belongs to it.
impl<Req> ClassifyRequest<Req> for ClassId {
    #[inline]
    fn classify(&self, _req: &Req) -> ClassId {
        *self
    }
}
