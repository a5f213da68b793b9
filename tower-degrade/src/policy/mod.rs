//! Policies as sandboxed Rhai scripts, run on the control tick.
//!
#![doc = include_str!("../../../docs/policies.md")]

mod apply;
mod compile;
mod decision;
mod engine;
mod request;
mod watch;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, ImmutableString, Scope};

pub use self::compile::MAX_SOURCE_BYTES;
pub(crate) use self::compile::read_dir;
pub use self::decision::{Action, Decision, MAX_ALERT_BYTES, MAX_ALERTS};
pub use self::engine::{Limits, MAX_DELAY, MAX_RETRY_AFTER, PolicyWindow, TickCtx};
pub(crate) use self::request::Overlay;
use self::request::Selector;
pub use self::request::{RequestInfo, rollout_bucket};
pub(crate) use self::watch::Loader;
pub use self::watch::{PolicyWatcher, RESCAN, ReloadOutcome};
use crate::breaker::State;
use crate::class::{ClassId, Registry, Tier};
use crate::window::History;

/// Whether a policy's decisions are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Decisions are enforced.
    Enforce,
    /// Decisions are logged and counted, never enforced.
    Shadow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    All,
    Tier(Tier),
    Class(ClassId),
}

/// One compiled policy.
#[derive(Debug)]
pub(crate) struct Policy {
    name: String,
    file: String,
    ast: AST,
    targets: Vec<Target>,
    priority: i64,
    mode: Mode,
    selector: Selector,
    has_on_request: bool,
}

/// How a policy's `on_request` hook fares since the last tick. A hook that fails fails open for
/// that request only; one that fails on most requests of a tick (at least
/// [`HookHealth::MIN_CALLS`]) is switched off until the next load, with a logged reason.
#[derive(Debug, Default)]
pub(crate) struct HookHealth {
    calls: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    off: std::sync::atomic::AtomicBool,
    /// A failure was logged since the last tick (one warning per tick, not per request).
    reported: std::sync::atomic::AtomicBool,
}

impl HookHealth {
    /// Calls in a tick below which a hook is never switched off (a few unlucky requests).
    pub(crate) const MIN_CALLS: u64 = 20;

    pub(crate) fn is_off(&self) -> bool {
        self.off.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn called(&self) {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A failed call: `true` if it is the first of this tick (to be logged).
    pub(crate) fn failed(&self) -> bool {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        !self
            .reported
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// At the tick: the counts since the last one, and whether the hook was just switched off.
    pub(crate) fn tick(&self) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let calls = self.calls.swap(0, Relaxed);
        let errors = self.errors.swap(0, Relaxed);
        self.reported.store(false, Relaxed);
        if calls >= Self::MIN_CALLS && errors * 2 > calls && !self.off.swap(true, Relaxed) {
            return Some((errors, calls));
        }
        None
    }
}

/// A compiled, validated set of policies, bound to a degrader's classes.
#[derive(Debug)]
pub struct PolicySet {
    version: u64,
    policies: Vec<Policy>,
    /// Per policy: how its `on_request` hook fares (see [`HookHealth`]).
    hooks: Vec<HookHealth>,
    /// Per class: indices into `policies`, by priority (highest first), then name.
    by_class: Vec<Vec<usize>>,
}

impl PolicySet {
    /// The version (1 for the first set loaded into a degrader, +1 per load).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The policy names, in name order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(|p| p.name.as_str()).collect()
    }

    /// The names of the policies governing a class, by priority then name.
    pub fn governing(&self, class: ClassId) -> Vec<&str> {
        self.by_class
            .get(class.index())
            .map(|ps| ps.iter().map(|&i| self.policies[i].name.as_str()).collect())
            .unwrap_or_default()
    }
}

/// The innermost error of a call chain, with its position cleared, and that position's line.
fn unwrap_error(mut err: EvalAltResult) -> (Option<usize>, String) {
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = err {
        err = *inner;
    }
    let pos = err.take_position();
    let reason = match &err {
        EvalAltResult::ErrorTooManyOperations(_) => "operation budget exceeded".to_owned(),
        other => other.to_string(),
    };
    (pos.line(), reason)
}

/// Per-class data for building contexts, fixed when the degrader is built.
#[derive(Debug)]
pub(crate) struct ClassInfo {
    name: ImmutableString,
    tier: Tier,
    sla_ms: f64,
    tolerance: crate::class::LatencyTolerance,
    dependencies: Arc<[String]>,
    tags: Arc<HashMap<String, String>>,
    route: crate::class::Route,
}

/// The policy state of a degrader: the engine, the set in force and the one before.
pub(crate) struct Runtime {
    engine: Engine,
    limits: Limits,
    current: ArcSwapOption<PolicySet>,
    previous: Mutex<Option<Arc<PolicySet>>>,
    versions: AtomicU64,
    classes: Vec<ClassInfo>,
    service: ImmutableString,
    env: ImmutableString,
    /// The set this tick runs (taken once per tick, so every class sees the same version).
    tick_set: ArcSwapOption<PolicySet>,
    /// Per class: the quarantined policies.
    memos: Box<[Mutex<ClassPolicyState>]>,
    /// Per class: the per-request rules the data path consults when the directive says so.
    overlays: Box<[ArcSwapOption<Overlay>]>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("limits", &self.limits)
            .field("version", &self.current.load().as_ref().map(|s| s.version))
            .finish_non_exhaustive()
    }
}

/// Per class, what the control loop remembers between ticks: the policies quarantined for the
/// set of this version.
#[derive(Debug, Default)]
pub(crate) struct ClassPolicyState {
    version: u64,
    quarantined: Vec<usize>,
}

impl Runtime {
    pub(crate) fn new(registry: &Registry, service: &str, env: &str, limits: Limits) -> Self {
        let classes: Vec<ClassInfo> = registry
            .iter()
            .map(|(_, c)| ClassInfo {
                name: c.name().into(),
                tier: c.tier(),
                sla_ms: c.sla_target().as_secs_f64() * 1e3,
                tolerance: c.latency_tolerance(),
                dependencies: c.dependencies().into(),
                tags: Arc::new(c.tags().iter().cloned().collect()),
                route: c.route(),
            })
            .collect();
        Self {
            engine: {
                let mut engine = engine::build_engine(&limits);
                request::register(&mut engine);
                engine
            },
            limits,
            current: ArcSwapOption::empty(),
            previous: Mutex::new(None),
            versions: AtomicU64::new(0),
            tick_set: ArcSwapOption::empty(),
            memos: classes.iter().map(|_| Mutex::default()).collect(),
            overlays: classes.iter().map(|_| ArcSwapOption::empty()).collect(),
            classes,
            service: service.into(),
            env: env.into(),
        }
    }

    pub(crate) fn current(&self) -> Option<Arc<PolicySet>> {
        self.current.load_full()
    }

    fn ctx(
        &self,
        class: usize,
        history: Arc<History>,
        state: State,
        prediction: Option<f64>,
        admission: Option<crate::admit::LimiterState>,
    ) -> TickCtx {
        let c = &self.classes[class];
        TickCtx {
            history,
            state,
            class: c.name.clone(),
            tier: c.tier,
            sla_ms: c.sla_ms,
            tolerance: c.tolerance,
            dependencies: c.dependencies.clone(),
            tags: c.tags.clone(),
            prediction,
            admission,
            service: self.service.clone(),
            env: self.env.clone(),
        }
    }

    /// Call the function `name` of `ast` with a fresh scope.
    fn call(
        &self,
        ast: &AST,
        name: &str,
        args: impl rhai::FuncArgs,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        let mut scope = Scope::new();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        self.engine
            .call_fn_with_options(options, &mut scope, ast, name, args)
    }
}
