//! The task API for work that is not a request: cron jobs, queue consumers (the seed's
//! `Manager.Run`).
//!
//! [`Tasks::run`] wraps the handler in a [`Degrade`](crate::Degrade) service with the class as a
//! fixed classifier and the class's fallback as the fallback service, and drives it once: the
//! same data path as HTTP traffic, not a second implementation.
//!
//! **Set each class's SLA to what its jobs take.** The tier defaults (50 / 200 / 1,000 ms) are
//! request latencies, and a class's SLA is also what counts as slow and when a running call is
//! overdue (a failure): 30 healthy 1.2 s email jobs in a gold class with the default 50 ms SLA
//! are all overdue and open it. `ClassConfig::gold("order_email").sla(Duration::from_secs(5))`.
//!
//! **Give a low-rate class a low `min_requests`.** A breaker opens on failures over at least
//! [`BreakerConfig::min_requests`](crate::breaker::BreakerConfig::min_requests) calls in one
//! tick (20 by default; 500 ms): a consumer that runs one job at a time, or a cron job,
//! never reaches it, and its class is never opened by failures alone (in a trial at 5, 40 jobs
//! of 1 s in a row against a 300 ms timeout all timed out, the class stayed closed and
//! nothing was kept). `DegraderBuilder::class_breaker("order_email",
//! BreakerConfig::default().min_requests(1))`: the first failing job opens it, and the next
//! ones go to its fallback.
//!
//! **Give a class of tasks a `timeout`.** No class has one by default: a job that hangs holds
//! its worker for ever. `ClassConfig::silver("order_events").timeout(Duration::from_secs(10))`:
//! a job past it fails with a [`Degraded`](crate::Degraded) error whose reason is
//! [`Timeout`](crate::gate::Reason::Timeout). That job **ran** (and may have done part of its
//! work), and is not kept: only a job the class turned away is.
//!
//! **A low-rate class recovers at its own pace.** A breaker closes again through
//! `half_open_probes` probes (5) that each need a job, and a `Recovering` ramp that admits a
//! growing share: a cron job every 25 s took minutes to be run again after its dependency
//! healed, in a trial (a class no call comes to waits half-open for its next call, so a job
//! slower than the open duration is the probe when it comes). Give such a class
//! `half_open_probes(1)` and a `max_open_duration` near its period.
//!
//! **A handler that panics** counts as a failure of its class, and the panic goes on to the
//! caller of [`Tasks::run`] (a `JoinError` from a spawned task): catch it there if the loop
//! must go on. So does a panic in the job's `Serialize` or in the
//! [`idempotency_key`](TasksBuilder::idempotency_key) closure, when a turned-away job is kept.
//!
//! **What cannot be kept is found out in an outage.** A job's value and key are read only
//! when the class turns the job away: a value JSON cannot hold (a NaN, a map with keys that are
//! not strings), over the router's `Capture::body_limit`, or a key that is empty, over 255
//! bytes or not visible ASCII, runs while the class is healthy and fails once it is not (a
//! [`CannotKeep`](crate::fallback::CannotKeep) error naming the field). Try each kind of job once with its class forced open
//! (`Degrader::force_open`) before you ship it.
//!
//! Kept jobs ([`TasksBuilder::keep`]): give jobs that a queue may deliver twice an
//! [`idempotency_key`](TasksBuilder::idempotency_key), and a router that keeps jobs of
//! several types a [`ReplayByClass`](crate::fallback::ReplayByClass).
//!
//! **A worker loop waits before it tries a turned-away job again.** A job shed or refused by
//! an open breaker is answered at once, with a [`Degraded`](crate::Degraded) error: a loop that
//! retries it at once spins its threads (a 64-worker trial made 11 million calls in a second,
//! which also starves the control loop that would close the breaker). Wait what the answer
//! says, then try again; any other error (the job's own, a timeout, a job that cannot be kept:
//! a [`CannotKeep`](crate::fallback::CannotKeep), for a value that does not serialize or an
//! invalid or reused idempotency key) carries no `retry_after`, and retried as is may fail for
//! ever, so give those up (a `CannotKeep` at once: it fails the same way each time), or retry
//! them a bounded number of times:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use tower_degrade::{BoxError, Degraded};
//! # async fn job(n: u64) -> Result<u64, BoxError> { Ok(n) }
//! # async fn example(tasks: tower_degrade::task::Tasks<u64, u64>) {
//! let mut failed = 0;
//! loop {
//!     match tasks.run("inventory_sync", 42, job).await {
//!         Ok(_) => break,
//!         Err(e) => match e.downcast_ref::<Degraded>().and_then(Degraded::retry_after) {
//!             // Turned away: back when the answer says.
//!             Some(wait) => tokio::time::sleep(wait).await,
//!             // Ran and failed, or cannot be kept: a few more tries at most.
//!             None if failed < 3 => {
//!                 failed += 1;
//!                 tokio::time::sleep(Duration::from_secs(1)).await;
//!             }
//!             None => break,
//!         },
//!     }
//! }
//! # }
//! ```
//!
//! **In a spawned task, call through `Tasks::run`.** The layer put directly around a service
//! whose error type is `BoxError`, called as `tokio::spawn(async move { svc.oneshot(x).await })`,
//! can fail to compile with "implementation of `From` is not general enough" (rustc forgets
//! the error's lifetime when it checks that the block is `Send`: rust-lang/rust#64552; any
//! layer that converts errors `Into<BoxError>` meets it). `Tasks::run` compiles there; so does
//! the call boxed outside the block, `let call: Pin<Box<dyn Future<Output = Result<R,
//! BoxError>> + Send>> = Box::pin(svc.oneshot(x));`, then `call.await` inside it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::util::BoxCloneSyncService;

use crate::layer::{Queued, ResponseFuture};
use crate::protocol::Generic;
use tower::{Layer, Service, ServiceExt};

use crate::class::{ClassId, Route};
use crate::degrader::Shared;
use crate::error::BoxError;
use crate::error::ConfigError;
use crate::fallback::{Diverted, Fallback};
use crate::layer::DegradeLayer;

type FallbackSvc<T, R> = BoxCloneSyncService<T, R, BoxError>;

/// The future of a task's fallback (boxed: only diverted tasks build one).
type FallbackFuture<R> =
    std::pin::Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send + 'static>>;

/// Keeps diverted tasks (the fallback router's `delayed_retry`, `spool`, `manual_review`), or
/// gives them back.
type Keeper<T, R> =
    Arc<dyn Fn(Diverted<T>) -> Result<FallbackFuture<R>, Diverted<T>> + Send + Sync>;

/// Runs tasks of type `T` producing `R` through a [`Degrader`](crate::Degrader), with per-class fallbacks.
///
/// ```
/// use tower_degrade::{BoxError, ClassConfig, Degrader, Route};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let degrader = Degrader::builder("order-fulfillment")
///     .class(ClassConfig::gold("payment_callback").fallback_route(Route::Service))
///     .build()?;
/// let tasks = degrader
///     .tasks::<String, &'static str>()
///     .fallback("payment_callback", |_task: String| async { Ok::<_, BoxError>("queued for manual review") })?
///     .build();
///
/// let out = tasks
///     .run("payment_callback", "order-42".to_owned(), |task| async move {
///         assert_eq!(task, "order-42");
///         Ok::<_, BoxError>("paid")
///     })
///     .await?;
/// assert_eq!(out, "paid");
///
/// degrader.force_open("payment_callback")?;
/// let out = tasks
///     .run("payment_callback", "order-43".to_owned(), |_| async { Ok::<_, BoxError>("paid") })
///     .await?;
/// assert_eq!(out, "queued for manual review");
/// # Ok(())
/// # }
/// ```
pub struct Tasks<T, R> {
    shared: Arc<Shared>,
    fallback: TaskFallback<T, R>,
}

impl<T, R> Clone for Tasks<T, R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            fallback: self.fallback.clone(),
        }
    }
}

impl<T, R> std::fmt::Debug for Tasks<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("service", &self.shared.service)
            .field("fallbacks", &self.fallback.services.len())
            .field("keeps", &self.fallback.keeper.is_some())
            .finish()
    }
}

/// A task's idempotency key.
type KeyFn<T> = Arc<dyn Fn(&T) -> String + Send + Sync>;

/// Makes the keeper once the idempotency key (if any) is known.
type MakeKeeper<T, R> = Box<dyn FnOnce(Option<KeyFn<T>>) -> Keeper<T, R> + Send>;

/// Builds [`Tasks`].
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct TasksBuilder<T, R> {
    shared: Arc<Shared>,
    fallbacks: HashMap<ClassId, FallbackSvc<T, R>>,
    /// Builds the keeper once the key is known.
    keep: Option<MakeKeeper<T, R>>,
    key: Option<KeyFn<T>>,
}

impl<T, R> std::fmt::Debug for TasksBuilder<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TasksBuilder")
            .field("fallbacks", &self.fallbacks.len())
            .finish()
    }
}

impl<T, R> TasksBuilder<T, R> {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            fallbacks: HashMap::new(),
            keep: None,
            key: None,
        }
    }
}

impl<T, R> TasksBuilder<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    /// Calls of `class` that are diverted to the fallback route run `fallback` instead (set the
    /// class's route to [`Route::Service`]).
    pub fn fallback<Fun, Fut, E>(self, class: &str, fallback: Fun) -> Result<Self, ConfigError>
    where
        Fun: Fn(T) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let svc = tower::service_fn(move |t: T| {
            let fut = fallback(t);
            async move { fut.await.map_err(Into::into) }
        });
        self.fallback_service(class, svc)
    }

    /// Like [`fallback`](Self::fallback), with a tower service.
    pub fn fallback_service<S>(mut self, class: &str, service: S) -> Result<Self, ConfigError>
    where
        S: Service<T, Response = R> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let id = self.shared.registry.require(class)?;
        let svc = BoxCloneSyncService::new(service.map_err(Into::into));
        self.fallbacks.insert(id, svc);
        Ok(self)
    }

    /// Keep the tasks diverted to `delayed_retry`, `spool` or `manual_review` with `router`:
    /// the task is serialized (JSON, through `serde`) and durably stored before the call
    /// returns `Ok(accepted(..))`; if it cannot be stored the call fails with a
    /// [`Degraded`](crate::error::Degraded) error (`not_kept`), and a value that does not
    /// serialize, or holds a float that is NaN or infinite (JSON has no such number), fails
    /// with a [`CannotKeep`](crate::fallback::CannotKeep) error saying so and naming the field;
    /// so does one whose JSON would not read
    /// back (nested deeper than `serde_json` reads, 128 levels) or is over the router's
    /// [`Capture::body_limit`](crate::fallback::Capture::body_limit) (64 KiB by default). Replay kept tasks with
    /// [`replay_task`](crate::fallback::replay_task) given to the router's builder, or, for
    /// tasks of several types on one router, with
    /// [`ReplayByClass`](crate::fallback::ReplayByClass).
    ///
    /// A task delivered twice (a queue that delivers at least once) is kept twice unless it
    /// has an [`idempotency_key`](Self::idempotency_key).
    #[cfg(feature = "fallback")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
    pub fn keep<F, A>(mut self, router: &crate::fallback::FallbackRouter<F>, accepted: A) -> Self
    where
        T: serde::Serialize,
        A: Fn(crate::fallback::Accepted) -> R + Send + Sync + 'static,
    {
        let router = router.clone_without_service();
        let accepted = Arc::new(accepted);
        self.keep = Some(Box::new(move |key: Option<KeyFn<T>>| -> Keeper<T, R> {
            Arc::new(move |call: Diverted<T>| {
                let key = key.as_ref().map(|k| k(call.request()));
                let kept = router.keep_task(call, key)?;
                let accepted = accepted.clone();
                Ok(Box::pin(async move { kept.await.map(|a| accepted(a)) }) as FallbackFuture<R>)
            })
        }));
        self
    }

    /// The idempotency key of a kept task (1 to 255 bytes of visible ASCII and spaces, not spaces alone), such as the id
    /// of the message it came from: a task kept again under the same key while the first is
    /// still kept is that task (the same [`Accepted`](crate::fallback::Accepted) id), not a
    /// second one, and the same key on another value is refused with a
    /// [`CannotKeep`](crate::fallback::CannotKeep) error (as is a key that is not one). The key is
    /// scoped by class and stored with the task ([`Task::client_key`](crate::fallback::Task::client_key)).
    #[cfg(feature = "fallback")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
    pub fn idempotency_key(mut self, key: impl Fn(&T) -> String + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(key));
        self
    }

    /// Finish.
    pub fn build(self) -> Tasks<T, R> {
        let key = self.key;
        Tasks {
            shared: self.shared,
            fallback: TaskFallback {
                services: Arc::new(self.fallbacks),
                keeper: self.keep.map(|keep| keep(key)),
            },
        }
    }
}

impl<T, R> Tasks<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    /// Run `task` of `class` through the degrader: `handler(task)` when admitted, the class's
    /// fallback when diverted to it, else a [`Degraded`](crate::error::Degraded) error.
    ///
    /// A class name that is not configured fails with
    /// [`ConfigError::UnknownClass`] (boxed) and runs
    /// nothing; look the class up once with [`class`](Self::class) to find out at start-up.
    ///
    /// The returned future is `Send` whenever the handler's future, the task and the result
    /// are, so it can be handed to `tokio::spawn`.
    pub fn run<H, Fut, E>(&self, class: &str, task: T, handler: H) -> Run<T, R, Fut, H>
    where
        H: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        E: Into<BoxError>,
    {
        match self.class(class) {
            Ok(class) => class.run(task, handler),
            Err(e) => Run {
                state: RunState::Failed {
                    error: Some(Box::new(e)),
                },
            },
        }
    }

    /// A handle on one class's tasks, checked once: `tasks.class("payment_callback")?`.
    pub fn class(&self, class: &str) -> Result<TaskClass<T, R>, ConfigError> {
        let id = self.shared.registry.require(class)?;
        Ok(TaskClass {
            tasks: self.clone(),
            id,
        })
    }
}

/// The tasks of one class, from [`Tasks::class`]: running through it cannot name a class that
/// does not exist.
pub struct TaskClass<T, R> {
    tasks: Tasks<T, R>,
    id: ClassId,
}

impl<T, R> Clone for TaskClass<T, R> {
    fn clone(&self) -> Self {
        Self {
            tasks: self.tasks.clone(),
            id: self.id,
        }
    }
}

impl<T, R> std::fmt::Debug for TaskClass<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskClass").field("id", &self.id).finish()
    }
}

impl<T, R> TaskClass<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    /// The class.
    pub fn id(&self) -> ClassId {
        self.id
    }

    /// Run `task` through the degrader, as [`Tasks::run`] does.
    pub fn run<H, Fut, E>(&self, task: T, handler: H) -> Run<T, R, Fut, H>
    where
        H: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        E: Into<BoxError>,
    {
        let fallback = self.tasks.fallback.clone();
        let mut svc = DegradeLayer::new(self.tasks.shared.clone(), self.id)
            .fallback_with(fallback)
            .layer(Handler(Some(handler)));
        // The handler is always ready and the layer passes readiness through, so the call is
        // made here: the future holds no service, only concrete futures, and so is `Send`
        // whenever they are (a future naming `Service` projections is not, in some async
        // contexts: "implementation of `From` is not general enough").
        let ready = svc.poll_ready(&mut Context::from_waker(std::task::Waker::noop()));
        debug_assert!(matches!(ready, Poll::Ready(Ok(()))));
        Run {
            state: RunState::Running {
                fut: svc.call(task),
            },
        }
    }
}

type TaskFuture<T, R, Fut, H> = ResponseFuture<
    HandlerFuture<Fut>,
    FallbackFuture<R>,
    Generic,
    Queued<Handler<H>, T, TaskFallback<T, R>>,
>;

pin_project_lite::pin_project! {
    /// The future of [`Tasks::run`]: the task's result, or why it was not run. `Send` when the
    /// handler's future, the task and the result are.
    pub struct Run<T, R, Fut, H> {
        #[pin]
        state: RunState<T, R, Fut, H>,
    }
}

pin_project_lite::pin_project! {
    #[project = RunProj]
    enum RunState<T, R, Fut, H> {
        Running {
            #[pin]
            fut: TaskFuture<T, R, Fut, H>,
        },
        Failed {
            error: Option<BoxError>,
        },
    }
}

impl<T, R, Fut, H> std::fmt::Debug for Run<T, R, Fut, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").finish_non_exhaustive()
    }
}

impl<T, R, Fut, H, E> Future for Run<T, R, Fut, H>
where
    T: Send + 'static,
    R: Send + 'static,
    H: FnOnce(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            RunProj::Running { fut } => fut.poll(cx),
            RunProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

/// A one-shot service around the task handler.
struct Handler<H>(Option<H>);

/// A clone is spent: [`Degrade`](crate::Degrade) clones its inner service only to leave the
/// clone behind when a call waiting for admission takes the original (see its docs), and the
/// task's service is dropped after its one call.
impl<H> Clone for Handler<H> {
    fn clone(&self) -> Self {
        Self(None)
    }
}

impl<H, T, Fut, R, E> Service<T> for Handler<H>
where
    H: FnOnce(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Response = R;
    type Error = BoxError;
    type Future = HandlerFuture<Fut>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: T) -> Self::Future {
        let handler = self.0.take().expect("a task handler runs once");
        HandlerFuture { fut: handler(task) }
    }
}

pin_project_lite::pin_project! {
    struct HandlerFuture<F> {
        #[pin]
        fut: F,
    }
}

impl<F, R, E> Future for HandlerFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().fut.poll(cx).map_err(Into::into)
    }
}

struct TaskFallback<T, R> {
    services: Arc<HashMap<ClassId, FallbackSvc<T, R>>>,
    keeper: Option<Keeper<T, R>>,
}

impl<T, R> Clone for TaskFallback<T, R> {
    fn clone(&self) -> Self {
        Self {
            services: self.services.clone(),
            keeper: self.keeper.clone(),
        }
    }
}

impl<T, R> Fallback<T, R, BoxError> for TaskFallback<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    type Future = FallbackFuture<R>;

    fn call(&mut self, call: Diverted<T>) -> Result<Self::Future, Diverted<T>> {
        if call.route() == Route::Service {
            return match self.services.get(&call.class()) {
                Some(svc) => Ok(Box::pin(svc.clone().oneshot(call.into_request()))),
                None => Err(call),
            };
        }
        match &self.keeper {
            Some(keep) => keep(call),
            None => Err(call),
        }
    }
}
