//! The [`Degrader`]: the handle to one service's degradation state. Every `impl Degrader`
//! block is in this module; the state it shares is in `shared`, its builder in `builder`, the
//! status it publishes in `status`.

mod builder;
mod shared;
mod status;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

pub use self::builder::{DEFAULT_TICK, DegraderBuilder};
#[cfg(feature = "config")]
pub(crate) use self::builder::{check_dependency_limiters, check_env, check_service_and_tick};
pub(crate) use self::shared::{ClassControl, Shared, Shutdown};
pub(crate) use self::status::health_score;
pub use self::status::{ClassStatus, PredictorBatch, PredictorStatus, Status};
use crate::breaker::{Command, State};
use crate::class::{ClassId, Registry};
use crate::classify::{HttpClassifier, HttpClassifierBuilder};
use crate::error::ConfigError;
#[cfg(feature = "rhai")]
use crate::error::PolicyError;
use crate::layer::DegradeLayer;
use crate::task::TasksBuilder;
use crate::window::History;

/// The handle to one service's degradation state: build layers from it, run tasks through it,
/// and control and read its breakers.
///
/// Cloning is cheap and every clone, layer and service shares one state (one breaker per class,
/// whatever number of times `Layer::layer` is called).
#[derive(Clone)]
pub struct Degrader {
    pub(crate) shared: Arc<Shared>,
}

/// The service, its classes and tick (not their histories).
impl std::fmt::Debug for Degrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt(f)
    }
}

impl Degrader {
    /// Start building a degrader for the service `service` (the `service` label of every
    /// metric and log line: not empty, no control characters). Two degraders alive in one
    /// process (one for HTTP, one for gRPC) need names of their own: with one name, their
    /// metrics overwrite each other's (a warning says so at build).
    pub fn builder(service: impl Into<String>) -> DegraderBuilder {
        DegraderBuilder::new(service.into())
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// The deployment environment given to the builder (empty by default).
    pub fn env(&self) -> &str {
        &self.shared.env
    }

    /// The configured classes.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// The id of a class by name.
    pub fn class_id(&self, name: &str) -> Result<ClassId, ConfigError> {
        self.shared.registry.require(name)
    }

    /// The status published at the last tick (or after the last manual command).
    pub fn status(&self) -> Arc<Status> {
        self.shared.status.load_full()
    }

    /// Every admission limiter now, the service's first: its limit, the calls holding a permit
    /// and those waiting for one, and the latency baseline measured at the last tick (empty
    /// without [`admission`](crate::DegraderBuilder::admission)).
    pub fn admission(&self) -> Vec<crate::admit::LimiterState> {
        let adm = self
            .shared
            .admission
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared
            .limiters
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut s = l.state();
                s.baseline_micros = adm.states.get(i).and_then(|t| t.baseline_micros);
                s
            })
            .collect()
    }

    /// `degrade_health_score` at the last tick, 0–100.
    pub fn health_score(&self) -> f64 {
        self.shared.status.load().health_score
    }

    /// The breaker state of a class now.
    pub fn state(&self, class: &str) -> Result<State, ConfigError> {
        let id = self.class_id(class)?;
        Ok(self.shared.control(id).breaker.state())
    }

    /// The last [`HISTORY_LEN`](crate::window::HISTORY_LEN) windows of a class.
    pub fn history(&self, class: &str) -> Result<History, ConfigError> {
        let id = self.class_id(class)?;
        Ok((*self.shared.control(id).history).clone())
    }

    /// Apply a manual command to a class's breaker; it takes effect at once.
    pub fn command(&self, class: &str, cmd: Command) -> Result<State, ConfigError> {
        let id = self.class_id(class)?;
        let now = Instant::now();
        let tier = self.shared.registry.class(id).tier();
        {
            let mut ctl = self.shared.control(id);
            ctl.commands += 1;
            ctl.command_trial(cmd);
            if let Some(t) = ctl.breaker.command(cmd) {
                tracing::warn!(
                    service = %self.shared.service, class, from = %t.from, to = %t.to,
                    reason = %t.reason, "manual breaker command"
                );
                self.shared.on_transition(id, tier, &mut ctl, &t);
            }
            self.shared.publish(id, ctl.breaker.directive(now).pack());
        }
        self.shared.publish_status();
        self.state(class)
    }

    /// Force a class open: nothing is admitted until [`Degrader::reset`].
    pub fn force_open(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::ForceOpen)
    }

    /// Force a class closed (breaker disabled): everything is admitted until reset.
    pub fn force_closed(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::ForceClosed)
    }

    /// Degrade a class by hand until reset.
    pub fn degrade(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::Degrade)
    }

    /// Put a class in dry-run mode: its breaker decides and reports but enforces nothing.
    pub fn metrics_only(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::MetricsOnly)
    }

    /// Return a class to automatic control, closed.
    pub fn reset(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::Reset)
    }

    /// What every class's calibrated prediction threshold has learnt so far (a class on trial
    /// gives its trial's), with the tick and the predictor's fingerprint, to
    /// [save](crate::breaker::Calibrations::save) and restore in the next process
    /// ([`DegraderBuilder::restore_calibrations`]). A copy: taking it locks each class's
    /// control state for as long as copying its scores takes (a warming class's, as many as its
    /// warm-up: 3,600 by default; a fitted one's, at most 2,048 excesses), never the request
    /// path. Save it before the process ends, and now and then (a crash saves
    /// nothing).
    ///
    /// A build without a predictor gives no class (nothing learnt, and
    /// [`save`](crate::breaker::Calibrations::save) refuses it rather than write empty
    /// warm-ups over a file another build learnt).
    pub fn calibrations(&self) -> crate::breaker::Calibrations {
        // As the status reads it: without a predictor, no class calibrates.
        let classes = if self.shared.predictor.is_attached() {
            self.shared
                .registry
                .iter()
                .filter_map(|(id, c)| {
                    let learnt = self.shared.control(id).predicting().learnt()?;
                    Some((c.name().to_owned(), learnt))
                })
                .collect()
        } else {
            Vec::new()
        };
        crate::breaker::Calibrations {
            service: self.shared.service.to_string(),
            tick: self.shared.period,
            predictor: self.shared.fingerprint.clone(),
            classes,
        }
    }

    /// Report a class's queue depth and queueing delay (for queue consumers and admission
    /// queues); it appears in the next window.
    pub fn report_queue(
        &self,
        class: &str,
        depth: u64,
        delay: Duration,
    ) -> Result<(), ConfigError> {
        let id = self.class_id(class)?;
        let g = &self.shared.gauges[id.index()];
        g.queue_depth.store(depth, Ordering::Relaxed);
        g.queue_delay_micros
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Load every `*.rhai` policy in `dir` (once; see [`policy`](crate::policy)) and put the set
    /// in force atomically from the next tick. A bad file rejects the whole load with an error
    /// naming the file, line and reason; the set in force keeps serving. A directory without
    /// any `*.rhai` file is an empty set: it removes every policy in force (with a warning in
    /// the log). Returns the version.
    ///
    /// Validation runs the policies on a thread of its own, within their limits (up to
    /// [`Limits::max_call_time`](crate::policy::Limits::max_call_time) a call); this call
    /// blocks until it is done. [`watch_policies`](Self::watch_policies) and
    /// [`reload_policies_on_demand`](Self::reload_policies_on_demand) do their first load so
    /// too, and every reload after it off the runtime's workers.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn load_policies(&self, dir: impl AsRef<std::path::Path>) -> Result<u64, PolicyError> {
        let sources = crate::policy::read_dir(dir.as_ref());
        self.install_policies(sources)
    }

    /// Like [`load_policies`](Self::load_policies), from `(name, source text)` pairs.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn load_policy_sources<'a>(
        &self,
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<u64, PolicyError> {
        let mut seen = std::collections::HashSet::new();
        let sources = sources
            .into_iter()
            .map(|(name, text)| {
                // A name is a policy's identity (metrics, quarantine, logs), as a file's is.
                if name.trim().is_empty() || !seen.insert(name) {
                    let why = if name.trim().is_empty() {
                        "a policy needs a name"
                    } else {
                        "two policies have this name"
                    };
                    return Err(PolicyError::new(&format!("{name}.rhai"), None, why));
                }
                Ok((name.to_owned(), format!("{name}.rhai"), text.to_owned()))
            })
            .collect();
        self.install_policies(sources)
    }

    #[cfg(feature = "rhai")]
    fn install_policies(
        &self,
        sources: Result<Vec<(String, String, String)>, PolicyError>,
    ) -> Result<u64, PolicyError> {
        let rt = &self.shared.policies;
        let compiled = sources.and_then(|s| rt.compile(&self.shared.registry, &s));
        rt.count_reload(compiled.is_ok());
        match compiled {
            Ok(set) => {
                let names = set.names().join(", ");
                for warning in set.warnings() {
                    tracing::warn!(service = %self.shared.service, "{warning}");
                }
                if set.names().is_empty()
                    && let Some(old) = rt.current().filter(|old| !old.names().is_empty())
                {
                    // Deleting every file is a way to remove every policy; a wrong directory
                    // looks the same, so say what it did.
                    tracing::warn!(
                        service = %self.shared.service,
                        removed = %old.names().join(", "),
                        "no policy in the new set: every policy in force is removed"
                    );
                }
                let version = rt.install(set);
                tracing::info!(service = %self.shared.service, version, policies = %names, "policies loaded");
                Ok(version)
            }
            Err(e) => {
                if rt.current().is_some() {
                    tracing::warn!(service = %self.shared.service, error = %e, "policy load rejected; the previous set keeps serving");
                } else {
                    tracing::warn!(service = %self.shared.service, error = %e, "policy load rejected; no policy is in force");
                }
                Err(e)
            }
        }
    }

    /// Put the previous policy set back in force (from the next tick). Returns its version,
    /// or `None` when there is nothing to roll back to.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn rollback_policies(&self) -> Option<u64> {
        self.shared.policies.rollback()
    }

    /// The policy set in force, if any.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn policies(&self) -> Option<Arc<crate::policy::PolicySet>> {
        self.shared.policies.current()
    }

    /// Stop the control loop now, for good, and stand down: from then on every class admits
    /// its calls (the layer and the task API pass them through, with no breaker, policy or
    /// prediction), as no tick would come to lift a refusal, and
    /// [`Status::stopped`](crate::degrader::Status::stopped) says so. Admission limiters keep
    /// their last limit. For the end of a process: stop the server first (and the fallback
    /// worker), then this.
    pub fn shutdown(&self) {
        self.shared.shutdown.trigger();
        self.shared.stand_down();
    }

    /// Run one control-loop tick now, as the loop would. For tests and benchmarks that drive
    /// the loop by hand (with [`DegraderBuilder::build_with_worker`] and the worker not spawned).
    pub fn tick_now(&self) {
        self.shared.tick(Instant::now(), false);
    }
    /// Start building an HTTP / gRPC classifier over this degrader's classes (the same as
    /// [`HttpClassifier::builder`] with [`registry`](Self::registry)).
    pub fn http_classifier(&self) -> HttpClassifierBuilder {
        HttpClassifier::builder(&self.shared.registry)
    }

    /// A layer classifying requests with `classifier`, using the [`Generic`](crate::protocol::Generic) protocol (errors
    /// become [`BoxError`](crate::error::BoxError)) and no fallback service.
    pub fn layer<C>(&self, classifier: C) -> DegradeLayer<C> {
        DegradeLayer::new(self.shared.clone(), classifier)
    }

    /// Start building a task runner for tasks `T` with results `R` (see [`task`](crate::task)).
    pub fn tasks<T, R>(&self) -> TasksBuilder<T, R> {
        TasksBuilder::new(self.shared.clone())
    }

    /// Load the policies of `dir` now, then reload them whenever a `.rhai` file there is
    /// created, changed or removed (debounced by `debounce`). Fails if the first load fails or
    /// the directory cannot be watched; to start and keep watching when the first load fails,
    /// [`keep_watching_policies`](Self::keep_watching_policies). The first load runs on the
    /// calling thread (it blocks while the policies validate); reloads run off the runtime's
    /// workers.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn watch_policies(
        &self,
        dir: impl Into<std::path::PathBuf>,
        debounce: Duration,
    ) -> Result<crate::policy::PolicyWatcher, PolicyError> {
        self.policy_watcher(dir.into(), debounce, true, true)
    }

    /// Like [`watch_policies`](Self::watch_policies), but a first load that fails does not
    /// stop the watch: it is logged (as every rejected load is) and is the watcher's first
    /// outcome ([`subscribe`](crate::policy::PolicyWatcher::subscribe)); the service runs
    /// without policies, protected by its breakers, and the directory's next change is
    /// loaded. For deployments where the policies on disk may be broken when a process starts
    /// (a pod rescheduled while a bad file sits in its ConfigMap): with `watch_policies`, such
    /// a process either refuses to start or starts without a watcher and never picks up the
    /// fix. Nor does a directory that cannot be watched stop it (one not there yet, a volume
    /// mounted after the process starts, or one past the system's limit of watches): that
    /// is logged, and the directory is rescanned every [`RESCAN`](crate::policy::RESCAN)
    /// instead, its policies loaded once they are there. So this does not fail today; it
    /// returns a `Result` as `watch_policies` does, so that either stands where the other was.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn keep_watching_policies(
        &self,
        dir: impl Into<std::path::PathBuf>,
        debounce: Duration,
    ) -> Result<crate::policy::PolicyWatcher, PolicyError> {
        self.policy_watcher(dir.into(), debounce, true, false)
    }

    /// Load the policies of `dir` now, then reload them whenever
    /// [`PolicyWatcher::reload_now`](crate::policy::PolicyWatcher::reload_now) is called (after
    /// `debounce`), without watching the file system: for deployments that reload on a signal
    /// or an admin call. Fails if the first load fails.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn reload_policies_on_demand(
        &self,
        dir: impl Into<std::path::PathBuf>,
        debounce: Duration,
    ) -> Result<crate::policy::PolicyWatcher, PolicyError> {
        self.policy_watcher(dir.into(), debounce, false, true)
    }

    #[cfg(feature = "rhai")]
    fn policy_watcher(
        &self,
        dir: std::path::PathBuf,
        debounce: Duration,
        watch_fs: bool,
        must_load: bool,
    ) -> Result<crate::policy::PolicyWatcher, PolicyError> {
        let this = self.clone();
        let load: crate::policy::Loader = Arc::new(move |dir| this.load_policies(dir));
        crate::policy::PolicyWatcher::start(load, dir, debounce, watch_fs, must_load)
    }
}
