//! Policies as sandboxed Rhai scripts, run on the control tick.
//!
#![doc = include_str!("../../../docs/policies.md")]

mod apply;
mod compile;
mod contain;
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

pub(crate) use self::compile::read_dir;
pub use self::compile::{MAX_SET_BYTES, MAX_SOURCE_BYTES, Overlap};
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
    /// The lines defining `on_tick` and `on_request`, for errors Rhai gives no position.
    lines: [Option<usize>; 2],
}

impl Policy {
    /// Whether the policy governs class `i`.
    fn governs(&self, i: usize, class: &ClassInfo) -> bool {
        self.targets.iter().any(|t| match t {
            Target::All => class.selected,
            Target::Tier(tier) => class.selected && *tier == class.tier,
            Target::Class(id) => id.index() == i,
        })
    }
}

/// How a policy's `on_request` hook fares since the last tick. A hook that fails fails open for
/// that request only. One that runs out of its budget ([`exhausted`]) on most requests of a
/// tick (at least [`HookHealth::MIN_CALLS`]) is switched off, with a logged reason: each such
/// call cost the request path the whole budget. It is switched on again after
/// [`HookHealth::OFF_TICKS`] ticks, twice as long each time it is switched off again (at most
/// [`HookHealth::MAX_OFF_TICKS`]), and at the next load: off for good, a client that made it
/// run out of its budget for one tick lifted its rule for everyone until someone reloaded.
/// A hook that fails cheaply (a header it cannot parse, a division by zero) is never switched
/// off: it costs what a working one does, and switching it off would let one client that
/// sends enough odd requests lift the hook's rule for everyone.
#[derive(Debug, Default)]
pub(crate) struct HookHealth {
    calls: std::sync::atomic::AtomicU64,
    /// Failed calls that ran out of their budget.
    exhausted: std::sync::atomic::AtomicU64,
    off: std::sync::atomic::AtomicBool,
    /// The tick from which a hook switched off is on again (written and read by the tick).
    back_at: std::sync::atomic::AtomicU64,
    /// Times switched off since the load.
    strikes: std::sync::atomic::AtomicU32,
    /// A failure was logged since the last tick (one warning per tick, not per request).
    reported: std::sync::atomic::AtomicBool,
}

/// What a tick did to a hook ([`HookHealth::tick`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookTurn {
    /// Nothing changed.
    Same,
    /// Switched off for `ticks`: `exhausted` of the last tick's `calls` ran out of their budget.
    Off {
        exhausted: u64,
        calls: u64,
        ticks: u64,
    },
    /// On again, its time off over.
    On,
}

impl HookHealth {
    /// Calls in a tick below which a hook is never switched off (a few unlucky requests).
    pub(crate) const MIN_CALLS: u64 = 20;
    /// Ticks a hook is first switched off for (a minute at the default 500 ms tick).
    pub(crate) const OFF_TICKS: u64 = 120;
    /// The longest a hook is switched off for (an hour at the default tick).
    pub(crate) const MAX_OFF_TICKS: u64 = 7_200;

    pub(crate) fn is_off(&self) -> bool {
        self.off.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn called(&self) {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A failed call, `exhausted` if it ran out of its budget: `true` if it is the first
    /// failure of this tick (to be logged).
    pub(crate) fn failed(&self, exhausted: bool) -> bool {
        if exhausted {
            self.exhausted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        !self
            .reported
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// At tick number `now` (called for each class the policy governs: the first call of a
    /// tick reads and clears the counts).
    pub(crate) fn tick(&self, now: u64) -> HookTurn {
        use std::sync::atomic::Ordering::Relaxed;
        let calls = self.calls.swap(0, Relaxed);
        let exhausted = self.exhausted.swap(0, Relaxed);
        self.reported.store(false, Relaxed);
        if self.is_off() {
            if now >= self.back_at.load(Relaxed) && self.off.swap(false, Relaxed) {
                return HookTurn::On;
            }
            return HookTurn::Same;
        }
        if calls >= Self::MIN_CALLS && exhausted * 2 > calls {
            let strikes = self.strikes.fetch_add(1, Relaxed).min(16);
            let ticks = (Self::OFF_TICKS << strikes).min(Self::MAX_OFF_TICKS);
            self.back_at.store(now.saturating_add(ticks), Relaxed);
            self.off.store(true, Relaxed);
            return HookTurn::Off {
                exhausted,
                calls,
                ticks,
            };
        }
        HookTurn::Same
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
    /// What the load noticed but accepted (two files governing one class).
    warnings: Vec<String>,
    /// Policy calls skipped because the tick's budget was spent.
    skipped: AtomicU64,
    /// (class, policy) pairs quarantined since this set was loaded.
    quarantined: Mutex<Vec<(ClassId, usize)>>,
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

    /// What the load noticed and accepted, one line each (also logged as warnings): today, two
    /// files governing the same class, unless [`Overlap::Error`] refused them.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Policy calls skipped since this set was loaded: the tick's budget
    /// ([`Limits::max_tick_time`]) was spent before their turn. Each skipped policy's last
    /// decision held for that tick, for up to 20 ticks in a row, unless it was `close()`
    /// (none yet, `close()` or held too long: the breaker's directive).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The policies quarantined since this set was loaded, each for the class it failed on
    /// (a run-time error, or its deadline too many ticks in a row): they stay out of that
    /// class's decisions until the next load (or until this set is rolled back to, when they
    /// run again).
    pub fn quarantined(&self) -> Vec<(ClassId, &str)> {
        let q = self.quarantined.lock().unwrap_or_else(|e| e.into_inner());
        q.iter()
            .map(|&(class, i)| (class, self.policies[i].name.as_str()))
            .collect()
    }

    /// The policies whose `on_request` hook ran out of its budget on most requests of a tick
    /// and is switched off now (on again after its time off, or at the next load).
    pub fn hooks_off(&self) -> Vec<&str> {
        self.hooks
            .iter()
            .zip(&self.policies)
            .filter(|(h, _)| h.is_off())
            .map(|(_, p)| p.name.as_str())
            .collect()
    }

    pub(crate) fn unquarantine(&self, class: ClassId) {
        self.quarantined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&(c, _)| c != class);
    }

    pub(crate) fn quarantine(&self, class: ClassId, policy: usize) {
        self.quarantined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((class, policy));
    }
}

/// How a policy call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// `on_request` failed on one request, decided without it.
    Request,
    /// `on_tick` failed: quarantined for the class until the next load.
    Quarantined,
    /// `on_tick` ran past its deadline: skipped this tick.
    Late,
}

/// The reason of a call stopped at its wall-clock deadline (its start: [`AT_THE_FUNCTION`]
/// follows it, so it is matched as a prefix).
const DEADLINE_REASON: &str =
    "ran past its wall-clock deadline (max_call_time; max_request_time for on_request)";

/// The innermost error of a call chain.
fn innermost(mut err: EvalAltResult) -> EvalAltResult {
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = err {
        err = *inner;
    }
    err
}

/// Whether a script's call failed by running out of its budget (operations, wall-clock
/// deadline, call depth, data size, variables): a failure that cost the whole budget.
/// `err` is the innermost error of its chain ([`innermost`]).
fn exhausted(err: &EvalAltResult) -> bool {
    matches!(
        err,
        EvalAltResult::ErrorTooManyOperations(_)
            | EvalAltResult::ErrorTerminated(..)
            | EvalAltResult::ErrorStackOverflow(_)
            | EvalAltResult::ErrorDataTooLarge(..)
            | EvalAltResult::ErrorTooManyVariables(_)
            | EvalAltResult::ErrorTooManyModules(_)
    )
}

/// Said of a budget run out: Rhai puts such an error at the line the outermost function
/// starts on (it sets the call's position on it as it leaves each function), not where the
/// budget ran out.
const AT_THE_FUNCTION: &str =
    " (the line is the function's: the engine does not say where in it the budget ran out)";

/// The innermost error of a call chain, with its position cleared, and that position's line.
fn unwrap_error(err: EvalAltResult) -> (Option<usize>, String) {
    let mut err = innermost(err);
    let pos = err.take_position();
    let at = if exhausted(&err) { AT_THE_FUNCTION } else { "" };
    let reason = match &err {
        EvalAltResult::ErrorTooManyOperations(_) => "operation budget exceeded".to_owned(),
        // Rhai's words for a closure that captured `ctx` and is called by a method of `ctx`.
        EvalAltResult::ErrorDataRace(..) => format!(
            "{err} (a closure that captures `ctx` cannot run while `ctx` is in use: capture \
             the plain values it needs, `let limit = ctx.sla_ms;`, not `ctx`)"
        ),
        EvalAltResult::ErrorTerminated(token, _) if token.is::<contain::Deadline>() => {
            DEADLINE_REASON.to_owned()
        }
        // The two errors that hold a script's value: said without formatting it (`described`).
        EvalAltResult::ErrorRuntime(value, _)
            if value.is_unit()
                || value
                    .read_lock::<ImmutableString>()
                    .is_some_and(|s| s.is_empty()) =>
        {
            "Runtime error".to_owned()
        }
        EvalAltResult::ErrorRuntime(value, _) => format!("Runtime error: {}", described(value)),
        EvalAltResult::ErrorIndexNotFound(value, _) => {
            format!("Invalid index: {}", described(value))
        }
        other => other.to_string(),
    };
    // Escaped and cut, as an alert is: what a script throws reaches the log.
    (pos.line(), decision::sanitize(&(reason + at)))
}

/// A call's result, and whether the engine was told to stop it at its deadline
/// ([`contain::with_deadline`]): one stopped so is late even where it came back without the
/// error (an array's `sort` drops its comparator's errors), and what it returned is dropped;
/// any error it came back with is the deadline's.
fn late(
    (out, stopped): (Result<Dynamic, Box<EvalAltResult>>, bool),
) -> Result<Dynamic, Box<EvalAltResult>> {
    match out {
        // (An error after a swallowed stop, the operation budget running out before the next
        // check, is the deadline's too.)
        _ if stopped => Err(Box::new(EvalAltResult::ErrorTerminated(
            Dynamic::from(contain::Deadline),
            rhai::Position::NONE,
        ))),
        out => out,
    }
}

/// The most bytes of a thrown string an error repeats.
const THROWN_BYTES: usize = 256;

/// A value a script threw (or indexed with), said without formatting what it holds: a string
/// (its first [`THROWN_BYTES`]), a number, a boolean or a character as it is, anything else by
/// its type. Formatting an array, a map or a closure formats everything in it, the values a
/// closure captured included, which no size limit counts: a few lines of script made that
/// gigabytes, outside every deadline.
fn described(value: &Dynamic) -> String {
    if let Some(s) = value.read_lock::<ImmutableString>() {
        return crate::error::escape_cut(&s, THROWN_BYTES);
    }
    if value.is_int() || value.is_float() || value.is_bool() || value.is_char() {
        return value.to_string();
    }
    format!("a value of type {}", value.type_name())
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
    /// Tier and `*` selectors reach it: every class but the implied default one (the calls no
    /// rule matched, 404s and scanners among them), which a policy governs only by name.
    selected: bool,
}

/// What policy code runs with: the engines, the sets, per-class data.
pub(crate) struct Core {
    /// `policy()` and `on_tick` (validation and ticks).
    engine: Engine,
    /// `on_request`, on the request's thread.
    request_engine: Engine,
    limits: Limits,
    overlap: Overlap,
    /// The stack an `on_request` call may need (see [`contain`]).
    request_stack: usize,
    current: ArcSwapOption<PolicySet>,
    previous: Mutex<Option<Arc<PolicySet>>>,
    versions: AtomicU64,
    classes: Vec<ClassInfo>,
    service: ImmutableString,
    env: ImmutableString,
    /// Per class: the quarantined policies.
    memos: Box<[Mutex<ClassPolicyState>]>,
    log: Arc<contain::LogLimiter>,
    /// Ticks run: where the next tick starts among the classes.
    turn: std::sync::atomic::AtomicU64,
    /// The latest load was refused.
    load_failing: std::sync::atomic::AtomicBool,
}

/// The policy state of a degrader: the engines and sets ([`Core`]) and what the data path
/// reads.
pub(crate) struct Runtime {
    core: Core,
    /// The set this tick runs (taken once per tick, so every class sees the same version).
    tick_set: ArcSwapOption<PolicySet>,
    /// Per class: the per-request rules the data path consults when the directive says so.
    overlays: Box<[ArcSwapOption<Overlay>]>,
}

impl std::ops::Deref for Runtime {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
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
    /// Per policy: calls in a row stopped at their deadline.
    late: Vec<(usize, u32)>,
    /// Per policy: its last decision (`None`: no opinion), held while its turn is skipped,
    /// and the ticks it has been held so.
    last: Vec<(usize, Option<Decision>, u32)>,
}

/// Ticks in a row a skipped policy's last decision is held (10 s at the 500 ms tick): then
/// its class gets the breaker's directive, as a policy that has not decided yet.
const HOLD_SKIPPED: u32 = 20;

impl ClassPolicyState {
    fn remember(&mut self, policy: usize, decision: Option<Decision>) {
        match self.last.iter_mut().find(|(p, _, _)| *p == policy) {
            Some((_, d, held)) => (*d, *held) = (decision, 0),
            None => self.last.push((policy, decision, 0)),
        }
    }

    fn forget(&mut self, policy: usize) {
        self.last.retain(|(p, _, _)| *p != policy);
    }

    /// The decision a skipped policy holds: its last, unless that admits everything over the
    /// breaker (`close()`: a breaker that trips meanwhile must not be overruled by a decision
    /// made before), or it has been held [`HOLD_SKIPPED`] ticks.
    fn last_decision(&mut self, policy: usize) -> Option<apply::Made> {
        let (_, d, held) = self.last.iter_mut().find(|(p, _, _)| *p == policy)?;
        *held = held.saturating_add(1);
        d.clone()
            .filter(|d| d.action() != Action::Close && *held <= HOLD_SKIPPED)
            .map(apply::Made::Remembered)
    }
}

impl Runtime {
    pub(crate) fn new(
        registry: &Registry,
        service: &str,
        env: &str,
        limits: Limits,
        overlap: Overlap,
    ) -> Self {
        let classes: Vec<ClassInfo> = registry
            .iter()
            .map(|(id, c)| ClassInfo {
                selected: id != ClassId::DEFAULT || registry.default_configured(),
                name: c.name().into(),
                tier: c.tier(),
                sla_ms: c.sla_target().as_secs_f64() * 1e3,
                tolerance: c.latency_tolerance(),
                dependencies: c.dependencies().into(),
                tags: Arc::new(c.tags().iter().cloned().collect()),
                route: c.route(),
            })
            .collect();
        let log = Arc::new(contain::LogLimiter::new(limits.max_log_lines));
        let build = |hooks| {
            let mut engine = engine::build_engine(&limits, hooks, log.clone());
            request::register(&mut engine, limits.max_string_size);
            engine
        };
        let overlays = classes.iter().map(|_| ArcSwapOption::empty()).collect();
        let core = Core {
            engine: build(engine::Hooks::Tick),
            request_engine: build(engine::Hooks::Request),
            limits,
            overlap,
            request_stack: limits.request_stack_need(),
            current: ArcSwapOption::empty(),
            previous: Mutex::new(None),
            versions: AtomicU64::new(0),
            memos: classes.iter().map(|_| Mutex::default()).collect(),
            turn: Default::default(),
            load_failing: Default::default(),
            classes,
            service: service.into(),
            env: env.into(),
            log,
        };
        Self {
            core,
            tick_set: ArcSwapOption::empty(),
            overlays,
        }
    }
}

impl Core {
    pub(crate) fn current(&self) -> Option<Arc<PolicySet>> {
        self.current.load_full()
    }

    /// Whether the latest load was refused (the files differ from the set in force).
    #[cfg(feature = "admin")]
    pub(crate) fn load_failing(&self) -> bool {
        self.load_failing.load(std::sync::atomic::Ordering::Relaxed)
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

    /// Call `policy()` or `on_tick` of `ast` with a fresh scope, stopped at `deadline`.
    fn call(
        &self,
        ast: &AST,
        name: &str,
        args: impl rhai::FuncArgs,
        deadline: std::time::Instant,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        let mut scope = Scope::new();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        late(contain::with_deadline(deadline, || {
            self.engine
                .call_fn_with_options(options, &mut scope, ast, name, args)
        }))
    }

    /// Call `on_request` of `ast`, with enough stack whatever thread this is, and `then` with
    /// what it returned, on that stack too: a value a script returns or throws can be nested
    /// as deep as its budget let it build (closures capturing closures), and so can dropping
    /// it go.
    fn call_request<T>(
        &self,
        ast: &AST,
        args: impl rhai::FuncArgs,
        then: impl FnOnce(Result<Dynamic, Box<EvalAltResult>>) -> T,
    ) -> T {
        let deadline = std::time::Instant::now() + self.limits.max_request_time;
        contain::with_stack(self.request_stack, || {
            let mut scope = Scope::new();
            let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
            then(late(contain::with_deadline(deadline, || {
                self.request_engine.call_fn_with_options(
                    options,
                    &mut scope,
                    ast,
                    "on_request",
                    args,
                )
            })))
        })
    }

    /// The deadline of a call starting now.
    fn call_deadline(&self) -> std::time::Instant {
        std::time::Instant::now() + self.limits.max_call_time
    }
}
