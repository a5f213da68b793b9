//! [`ServiceBuilderExt`]: `ServiceBuilder::new().degrade_http(&degrader, classifier)`, the way
//! tower-http's layers read in a tower stack.

use tower::ServiceBuilder;
use tower::layer::util::Stack;

use crate::degrader::Degrader;
use crate::layer::DegradeLayer;
use crate::protocol::{Grpc, Http};

mod sealed {
    pub trait Sealed<T> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Adds the degradation layer to a [`ServiceBuilder`].
///
/// Sealed: implemented for `ServiceBuilder` only.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_degrade::{ClassConfig, Degrader, ServiceBuilderExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let degrader = Degrader::builder("shop").class(ClassConfig::gold("payment")).build()?;
/// let classify = degrader.http_classifier().route(None, "/pay", "payment")?.build();
/// let svc = ServiceBuilder::new()
///     .degrade_http(&degrader, classify)
///     .service(service_fn(|_req: Request<String>| async {
///         Ok::<_, Infallible>(Response::new(String::from("paid")))
///     }));
/// let res = svc.oneshot(Request::post("/pay").body(String::new())?).await?;
/// assert_eq!(res.into_body(), "paid");
/// # Ok(())
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Degrade any service: errors become [`BoxError`](crate::error::BoxError), calls not served fail
    /// with [`Degraded`](crate::Degraded) ([`Degrader::layer`]).
    fn degrade<C>(
        self,
        degrader: &Degrader,
        classifier: C,
    ) -> ServiceBuilder<Stack<DegradeLayer<C>, L>>;

    /// Degrade an HTTP service: 5xx are failures, calls not served get 503 + `Retry-After`
    /// ([`DegradeLayer::http`]).
    fn degrade_http<C>(
        self,
        degrader: &Degrader,
        classifier: C,
    ) -> ServiceBuilder<Stack<DegradeLayer<C, Http>, L>>;

    /// Degrade a gRPC service: failing statuses (headers or trailers) are failures, calls not
    /// served get `UNAVAILABLE` + `grpc-retry-pushback-ms` ([`DegradeLayer::grpc`]).
    fn degrade_grpc<C>(
        self,
        degrader: &Degrader,
        classifier: C,
    ) -> ServiceBuilder<Stack<DegradeLayer<C, Grpc>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn degrade<C>(
        self,
        degrader: &Degrader,
        classifier: C,
    ) -> ServiceBuilder<Stack<DegradeLayer<C>, L>> {
        self.layer(degrader.layer(classifier))
    }

    fn degrade_http<C>(
        self,
        degrader: &Degrader,
        classifier: C,
    ) -> ServiceBuilder<Stack<DegradeLayer<C, Http>, L>> {
        self.layer(degrader.layer(classifier).http())
    }

    fn degrade_grpc<C>(
        self,
        degrader: &Degrader,
        classifier: C,
    ) -> ServiceBuilder<Stack<DegradeLayer<C, Grpc>, L>> {
        self.layer(degrader.layer(classifier).grpc())
    }
}
