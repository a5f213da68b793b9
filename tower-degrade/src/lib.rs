//! Task-aware graceful degradation for [tower] services.
//!
//! `async fn(Request) -> Result<Response, Error>`, classified and protected per task class.
//!
//! # Overview
//!
//! Instead of one coarse on/off breaker, every request is classified into a **task class**
//! (business importance, latency tolerance, resource dependencies) and each class is watched
//! through lock-free sliding windows and governed by its own breaker: admitted, shed, degraded
//! to a fallback route, or probed back to health. Gold work (payment callbacks) keeps flowing
//! while bronze work (browse logs) gives way.
//!
//! Two loops do the work (see `docs/architecture.md`):
//!
//! * the **data path**, per request: classify, read the class directive with one atomic load,
//!   admit or divert, time the call, record the outcome. No lock, no allocation;
//! * the **control loop**, per tick (500 ms): turn windows into snapshots, step the breakers,
//!   publish one directive per class, export metrics.
//!
//! # Usage
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use tower::{Layer, ServiceExt, service_fn};
//! use tower_degrade::{ClassConfig, Degrader};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let degrader = Degrader::builder("shop")
//!     .class(ClassConfig::gold("payment"))
//!     .class(ClassConfig::bronze("browse_log"))
//!     .build()?;
//! let classify = degrader
//!     .http_classifier()
//!     .route(None, "/pay/{id}", "payment")?
//!     .route(None, "/log", "browse_log")?
//!     .build();
//! let svc = degrader.layer(classify).http().layer(service_fn(|_req: Request<String>| async {
//!     Ok::<_, Infallible>(Response::new(String::from("ok")))
//! }));
//!
//! degrader.force_open("browse_log")?;
//! let res = svc.clone().oneshot(Request::get("/log").body(String::new())?).await?;
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! let res = svc.oneshot(Request::post("/pay/7").body(String::new())?).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! # Ok(())
//! # }
//! ```
//!
//! The same with [`ServiceBuilderExt`]:
//! `ServiceBuilder::new().degrade_http(&degrader, classify).service(handler)`. For axum, add the
//! layer with `Router::layer` (not `route_layer`) so that requests no route matches reach the
//! `default` class too.
//!
//! ## gRPC with tonic
//!
//! One layer on the server; classes by `/package.Service/Method` (or a whole service with
//! `/package.Service/*`). A class that is not served answers `UNAVAILABLE` with
//! `grpc-retry-pushback-ms` (`examples/grpc` runs this against a real tonic client):
//!
//! ```ignore
//! let classify = degrader
//!     .http_classifier()
//!     .grpc("/orders.v1.Orders/Pay", "payment")?
//!     .grpc("/orders.v1.Orders/*", "status")?
//!     .build();
//! tonic::transport::Server::builder()
//!     .layer(degrader.layer(classify).grpc())
//!     .add_service(OrdersServer::new(OrderService))
//!     .serve(addr)
//!     .await?;
//! ```
//!
//! # Modules
//!
//! [`class`] and [`classify`] say what a call is; [`gate`] is what the data path reads per
//! class; [`window`] what it records; [`breaker`] and the control loop (with its stages:
//! [`predict`] and, with `rhai`, [`policy`]) decide; [`layer`] and [`protocol`] apply the
//! decision; [`fallback`] receives what is diverted; [`task`] runs non-request work through the
//! same layer; [`degrader`] ties them together. Every error is in [`error`], every metric in
//! [`metrics`]. `docs/architecture.md` maps the folders onto the two loops.
//!
//! # Feature flags
//!
//! | feature | what |
//! |---|---|
//! | `axum` | classify by axum's `MatchedPath`; the manual-review admin router |
//! | `rhai` | policies as sandboxed Rhai scripts run on the control tick ([`policy`]) |
//! | `fallback` | the fallback router: keep diverted calls, replay them ([`fallback`]) |
//! | `embedded` | `fallback` with the durable embedded store (redb) |
//! | `redis` | `fallback` with Redis Streams as the store, shared by several instances |
//! | `chaos` | fault injection: latency, errors, aborts, hangs at seeded rates ([`chaos`]) |
//! | `admin` | the admin API over HTTP: status, breaker commands, faults ([`admin`]) |
//! | `config` | classes, breakers, admission and routes from a TOML file ([`config`]) |
//!
//! # Dependencies, and why
//!
//! `tower` (the service model, `Oneshot` for fallbacks), `tower-http` (response classifiers for
//! HTTP 5xx and gRPC status in headers or trailers, rather than re-implementing them), `http` /
//! `http-body` (the HTTP protocol), `pin-project-lite` (hand-written futures without boxing),
//! `tokio` (time and the control loop), `metrics` (the metrics facade: users pick the exporter),
//! `tracing` (events for every transition), `arc-swap` (the per-tick status read by admin
//! endpoints without locks), `quanta` (a TSC clock for timing calls, see [`clock`]), `bytes`,
//! `crc32fast` (the checksum of a saved [`Calibrations`](breaker::Calibrations) file), `tempfile`
//! (the temporary file of its own each save writes, then renames over the record).
//!
//! With `fallback`: `serde` + `postcard` (kept tasks as compact binary records; task-API
//! payloads as JSON with `serde_json`, readable in manual review), `http-body-util` (reading a
//! diverted body up to the capture limit), `quick_cache` (the bounded last-good cache). With
//! `embedded`: `redb` (an ACID B-tree in one file: one sync per group commit, nothing written in
//! the background; why not fjall is in `docs/fallback.md`). With `redis`: `redis` (streams,
//! scripts, a reconnecting connection manager). With `config`: `serde`, `toml` (parses with the
//! span of every key: the line in every error), `serde_path_to_error` (the path of the field
//! serde refused) and `serde_ignored` (keys an application's own settings type would skip). With `axum`: `subtle` (the admin routers' bearer
//! tokens compared in constant time).
//!
//! The latency histogram is hand-written (`window::histogram`): recording must be one relaxed
//! atomic add on shared memory, which the `hdrhistogram` crate's `&mut self` recorder does not
//! offer.
//!
//! [tower]: https://docs.rs/tower

#![cfg_attr(docsrs, feature(doc_cfg))]

// Leaves: they name nothing above them.
pub mod admit;
pub mod class;
pub mod classify;
pub mod clock;
pub mod error;
mod every;
pub mod gate;
pub mod metrics;
mod mix;
pub mod window;

// The breaker, the control loop and its stages.
pub mod breaker;
mod control;
#[cfg(feature = "rhai")]
#[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
pub mod policy;
pub mod predict;

// The degrader, the data-path layer and what it answers with.
#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub mod admin;
#[cfg(any(feature = "admin", all(feature = "fallback", feature = "axum")))]
mod auth;
mod builder;
#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
pub mod chaos;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;
pub mod degrader;
pub mod fallback;
pub mod layer;
pub mod protocol;
pub mod task;

pub use crate::builder::ServiceBuilderExt;
pub use crate::class::{ClassConfig, ClassId, Route, Tier};
pub use crate::degrader::{Degrader, DegraderBuilder};
pub use crate::error::{BoxError, Degraded};
pub use crate::layer::{Degrade, DegradeLayer};

// The README's examples are compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../docs/admission.md")]
struct AdmissionDoctests;

#[cfg(all(doctest, feature = "embedded", feature = "axum"))]
#[doc = include_str!("../../docs/fallback.md")]
struct FallbackDoctests;
