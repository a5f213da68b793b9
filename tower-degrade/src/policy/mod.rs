//! Policies as sandboxed Rhai scripts, run on the control tick.
//!
#![doc = include_str!("../../../docs/policies.md")]

mod decision;
mod engine;
mod request;
mod watch;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, ImmutableString, Scope};

pub use self::decision::{Action, Decision};
pub use self::engine::{Limits, PolicyWindow, TickCtx};
pub(crate) use self::request::Overlay;
use self::request::Selector;
pub use self::request::{RequestInfo, rollout_bucket};
pub(crate) use self::watch::Loader;
pub use self::watch::{PolicyWatcher, ReloadOutcome};
use crate::breaker::State;
use crate::class::{ClassId, Registry, Tier};
use crate::classify::RequestView;
use crate::control::{ClassTick, Stage};
use crate::error::PolicyError;
use crate::gate::{Directive, Packed};
use crate::metrics::{
    POLICY_ALERTS, POLICY_ERRORS, POLICY_RELOADS, POLICY_SHADOW_DECISIONS, POLICY_VERSION,
};
use crate::window::{History, WindowSnapshot};

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

/// A compiled, validated set of policies, bound to a degrader's classes.
#[derive(Debug)]
pub struct PolicySet {
    version: u64,
    policies: Vec<Policy>,
    /// Per policy: its `on_request` hook failed and is off until the next load.
    hook_failed: Vec<std::sync::atomic::AtomicBool>,
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

/// For an error Rhai gave no position (a blown operation budget, a wrong return type, bad
/// metadata), the line defining the function it is about.
fn hook_line(text: &str, reason: &str) -> Option<usize> {
    let hook = ["on_request", "on_tick", "policy"]
        .into_iter()
        .find(|h| reason.starts_with(h) || reason.starts_with(&format!("`{h}`")))?;
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix("fn ")
                .and_then(|rest| rest.trim_start().strip_prefix(hook))
                .is_some_and(|rest| rest.trim_start().starts_with('('))
        })
        .map(|i| i + 1)
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
            service: self.service.clone(),
            env: self.env.clone(),
        }
    }

    /// Compile and validate `sources` (name, file label, text) into a set for `registry`.
    pub(crate) fn compile(
        &self,
        registry: &Registry,
        sources: &[(String, String, String)],
    ) -> Result<PolicySet, PolicyError> {
        let mut policies = Vec::with_capacity(sources.len());
        for (name, file, text) in sources {
            let policy = self
                .compile_one(registry, name, file, text)
                .map_err(|mut e| {
                    if e.line.is_none() {
                        e.line = hook_line(text, &e.reason);
                    }
                    e
                })?;
            policies.push(policy);
        }
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let mut by_class = vec![Vec::new(); registry.len()];
        for (id, class) in registry.iter() {
            let list = &mut by_class[id.index()];
            for (i, p) in policies.iter().enumerate() {
                let governs = p.targets.iter().any(|t| match t {
                    Target::All => true,
                    Target::Tier(tier) => *tier == class.tier(),
                    Target::Class(c) => *c == id,
                });
                if governs {
                    list.push(i);
                }
            }
            list.sort_by(|&a, &b| {
                policies[b]
                    .priority
                    .cmp(&policies[a].priority)
                    .then(a.cmp(&b))
            });
        }
        let hook_failed = policies.iter().map(|_| Default::default()).collect();
        Ok(PolicySet {
            version: 0,
            policies,
            hook_failed,
            by_class,
        })
    }

    fn compile_one(
        &self,
        registry: &Registry,
        name: &str,
        file: &str,
        text: &str,
    ) -> Result<Policy, PolicyError> {
        let mut ast = self.engine.compile(text).map_err(|e| {
            PolicyError::new(
                file,
                e.position().line(),
                format!("syntax error: {}", e.err_type()),
            )
        })?;
        ast.set_source(file);
        let arity = |fname: &str| {
            ast.iter_functions()
                .find(|f| f.name == fname)
                .map(|f| f.params.len())
        };
        match arity("on_tick") {
            Some(1) => {}
            Some(n) => {
                return Err(PolicyError::new(
                    file,
                    None,
                    format!("`on_tick` must take 1 parameter (ctx), not {n}"),
                ));
            }
            None => return Err(PolicyError::new(file, None, "missing `fn on_tick(ctx)`")),
        }
        let has_on_request = match arity("on_request") {
            None => false,
            Some(2) => true,
            Some(n) => {
                return Err(PolicyError::new(
                    file,
                    None,
                    format!("`on_request` must take 2 parameters (ctx, req), not {n}"),
                ));
            }
        };
        if arity("policy") != Some(0) {
            return Err(PolicyError::new(
                file,
                None,
                "missing `fn policy()` returning a map",
            ));
        }
        let meta: Dynamic = self.call(&ast, "policy", ()).map_err(|e| {
            let (line, reason) = unwrap_error(*e);
            PolicyError::new(file, line, format!("policy(): {reason}"))
        })?;
        let Some(meta) = meta.try_cast::<rhai::Map>() else {
            return Err(PolicyError::new(
                file,
                None,
                "policy() must return a map like #{ governs: [\"gold\"] }",
            ));
        };
        let (mut targets, mut priority, mut mode) = (None, 0, Mode::Enforce);
        let mut selector = Selector::default();
        for (key, value) in meta {
            let bad =
                |what: &str| PolicyError::new(file, None, format!("policy(): `{key}` {what}"));
            match key.as_str() {
                "governs" => {
                    let list = value
                        .try_cast::<rhai::Array>()
                        .ok_or_else(|| bad("must be an array of class names, tiers or \"*\""))?;
                    let mut ts = Vec::new();
                    for item in list {
                        let s = item.into_string().map_err(|_| bad("must hold strings"))?;
                        ts.push(match s.as_str() {
                            "*" => Target::All,
                            "gold" => Target::Tier(Tier::Gold),
                            "silver" => Target::Tier(Tier::Silver),
                            "bronze" => Target::Tier(Tier::Bronze),
                            class => {
                                Target::Class(registry.get(class).ok_or_else(|| {
                                    bad(&format!("names unknown class `{class}`"))
                                })?)
                            }
                        });
                    }
                    if ts.is_empty() {
                        return Err(bad("is empty"));
                    }
                    targets = Some(ts);
                }
                "priority" => priority = value.as_int().map_err(|_| bad("must be an integer"))?,
                "mode" => {
                    mode = match value.into_string().as_deref() {
                        Ok("enforce") => Mode::Enforce,
                        Ok("shadow") => Mode::Shadow,
                        _ => return Err(bad("must be \"enforce\" or \"shadow\"")),
                    }
                }
                "rollout" => {
                    let pct = value
                        .as_float()
                        .or_else(|_| value.as_int().map(|i| i as f64))
                        .map_err(|_| bad("must be a percentage"))?;
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(bad("must be within 0..=100"));
                    }
                    selector.rollout_bp = Some((pct * 100.0).round() as u32);
                }
                "groups" => {
                    let list = value
                        .try_cast::<rhai::Array>()
                        .ok_or_else(|| bad("must be an array of group names"))?;
                    for item in list {
                        let group = item.into_string().map_err(|_| bad("must hold strings"))?;
                        selector.groups.push(group);
                    }
                }
                other => {
                    return Err(PolicyError::new(
                        file,
                        None,
                        format!(
                            "policy(): unknown field `{other}` \
                             (expected governs, priority, mode, rollout, groups)"
                        ),
                    ));
                }
            }
        }
        let targets =
            targets.ok_or_else(|| PolicyError::new(file, None, "policy(): missing `governs`"))?;
        let policy = Policy {
            name: name.to_owned(),
            file: file.to_owned(),
            ast,
            targets,
            priority,
            mode,
            selector,
            has_on_request,
        };
        self.validate(&policy)?;
        Ok(policy)
    }

    /// Run `on_tick` against sample contexts: it must return a decision or () within budget.
    fn validate(&self, policy: &Policy) -> Result<(), PolicyError> {
        let sample = |success: u64, errors: u64, p99_ms: u64, n: usize| {
            let mut h = History::default();
            for tick in 0..n as u64 {
                let w = WindowSnapshot {
                    tick,
                    period: Duration::from_millis(500),
                    successes: success,
                    errors,
                    p50: Duration::from_millis(p99_ms / 4),
                    p90: Duration::from_millis(p99_ms / 2),
                    p99: Duration::from_millis(p99_ms),
                    max: Duration::from_millis(p99_ms * 2),
                    ..Default::default()
                };
                h.push(w);
            }
            Arc::new(h)
        };
        // A class the policy governs, so `ctx` looks like the real thing.
        let class = (0..self.classes.len())
            .find(|&i| {
                policy.targets.iter().any(|t| match t {
                    Target::All => true,
                    Target::Tier(tier) => *tier == self.classes[i].tier,
                    Target::Class(id) => id.index() == i,
                })
            })
            .unwrap_or(0);
        let samples = [
            ("an empty history", sample(0, 0, 0, 0), State::Closed),
            ("healthy windows", sample(95, 0, 20, 64), State::Closed),
            ("failing windows", sample(40, 60, 900, 64), State::Closed),
            ("an open breaker", sample(0, 30, 2000, 5), State::Open),
        ];
        for (what, history, state) in samples {
            let ctx = self.ctx(class, history, state, None);
            self.decide(policy, ctx.clone()).map_err(|(line, reason)| {
                PolicyError::new(&policy.file, line, format!("on_tick with {what}: {reason}"))
            })?;
            if policy.has_on_request {
                self.validate_request_hook(policy, ctx)
                    .map_err(|(line, reason)| {
                        PolicyError::new(
                            &policy.file,
                            line,
                            format!("on_request with {what}: {reason}"),
                        )
                    })?;
            }
        }
        Ok(())
    }

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

    /// One `on_tick` call: `Ok(None)` for no opinion.
    fn decide(
        &self,
        policy: &Policy,
        ctx: TickCtx,
    ) -> Result<Option<Decision>, (Option<usize>, String)> {
        let out = self
            .call(&policy.ast, "on_tick", (ctx,))
            .map_err(|e| unwrap_error(*e))?;
        self.as_decision(out, "on_tick")
    }

    fn as_decision(
        &self,
        out: Dynamic,
        hook: &str,
    ) -> Result<Option<Decision>, (Option<usize>, String)> {
        if out.is_unit() {
            return Ok(None);
        }
        let type_name = self.engine.map_type_name(out.type_name()).to_owned();
        out.try_cast::<Decision>().map(Some).ok_or_else(|| {
            (
                None,
                format!("{hook} must return a decision or (), not {type_name}"),
            )
        })
    }

    fn report_failure(
        &self,
        class: &str,
        policy: &Policy,
        line: Option<usize>,
        reason: &str,
        hook: &str,
    ) {
        let at = line
            .map(|l| format!("{}:{l}", policy.file))
            .unwrap_or_else(|| policy.file.clone());
        tracing::warn!(
            service = %self.service, class, policy = %policy.name, hook, at, reason,
            "policy failed; quarantined for this class until the next load"
        );
        metrics::counter!(POLICY_ERRORS, "service" => self.service.to_string(), "class" => class.to_owned(), "policy" => policy.name.clone()).increment(1);
    }

    fn record_shadow(&self, class: &str, policy: &Policy, decision: &Decision) {
        if decision.action() == Action::Admit {
            return;
        }
        tracing::info!(
            service = %self.service, class, policy = %policy.name, decision = %decision,
            "shadow policy decision (not enforced)"
        );
        let action = decision.to_string();
        let action = action.split(['(', ' ']).next().unwrap_or("").to_owned();
        metrics::counter!(POLICY_SHADOW_DECISIONS, "service" => self.service.to_string(), "class" => class.to_owned(), "policy" => policy.name.clone(), "action" => action).increment(1);
    }

    /// Run the policies governing `class`: the directive for everyone (the breaker's combined with
    /// the policies that apply to all requests) and, when some policies apply per request
    /// (rollouts, groups, `on_request`), the overlay the data path consults.
    fn apply(
        &self,
        set: &Arc<PolicySet>,
        class: ClassId,
        tick: &ClassTick<'_>,
        breaker: Directive,
        memo: &mut ClassPolicyState,
    ) -> (Directive, Option<Overlay>) {
        if memo.version != set.version {
            *memo = ClassPolicyState {
                version: set.version,
                quarantined: Vec::new(),
            };
        }
        let info = &self.classes[class.index()];
        let ctx = self.ctx(
            class.index(),
            tick.history.clone(),
            tick.state,
            tick.prediction,
        );
        let mut everyone: Vec<(i64, Decision)> = Vec::new();
        let mut rules = Vec::new();
        let mut hooks = Vec::new();
        for &i in &set.by_class[class.index()] {
            if memo.quarantined.contains(&i) {
                continue;
            }
            let policy = &set.policies[i];
            if policy.has_on_request && !set.hook_failed[i].load(Ordering::Relaxed) {
                hooks.push(i);
            }
            let decision = match self.decide(policy, ctx.clone()) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err((line, reason)) => {
                    memo.quarantined.push(i);
                    hooks.retain(|&h| h != i);
                    self.report_failure(&info.name, policy, line, &reason, "on_tick");
                    continue;
                }
            };
            for alert in decision.alerts() {
                tracing::warn!(service = %self.service, class = %info.name, policy = %policy.name, alert = %alert, "policy alert");
                metrics::counter!(POLICY_ALERTS, "service" => self.service.to_string(), "class" => info.name.to_string(), "policy" => policy.name.clone()).increment(1);
            }
            match policy.mode {
                Mode::Shadow => self.record_shadow(&info.name, policy, &decision),
                Mode::Enforce if policy.selector.is_everyone() => {
                    everyone.push((policy.priority, decision))
                }
                Mode::Enforce => rules.push((policy.selector.clone(), policy.priority, decision)),
            }
        }
        let directive =
            decision::combine(breaker, info.route, everyone.iter().map(|(p, d)| (*p, d)));
        let overlay = (!rules.is_empty() || !hooks.is_empty()).then(|| Overlay {
            route: info.route,
            rules,
            hooks,
            set: set.clone(),
            ctx,
        });
        (directive, overlay)
    }

    /// Install `set` as the new version; the old one becomes the rollback target.
    pub(crate) fn install(&self, mut set: PolicySet) -> u64 {
        let version = self.versions.fetch_add(1, Ordering::AcqRel) + 1;
        set.version = version;
        let old = self.current.swap(Some(Arc::new(set)));
        *self.previous.lock().unwrap_or_else(|e| e.into_inner()) = old;
        metrics::gauge!(POLICY_VERSION, "service" => self.service.to_string()).set(version as f64);
        version
    }

    /// Put the previous set back in force; the current one becomes the rollback target.
    pub(crate) fn rollback(&self) -> Option<u64> {
        let mut prev = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        let back = prev.take()?;
        let version = back.version;
        *prev = self.current.swap(Some(back));
        metrics::gauge!(POLICY_VERSION, "service" => self.service.to_string()).set(version as f64);
        Some(version)
    }

    pub(crate) fn count_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        metrics::counter!(POLICY_RELOADS, "service" => self.service.to_string(), "result" => result)
            .increment(1);
    }
}

/// Read every `*.rhai` file of `dir` (name order) as (policy name, file label, text).
pub(crate) fn read_dir(dir: &Path) -> Result<Vec<(String, String, String)>, PolicyError> {
    let label = dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        PolicyError::new(
            &label,
            None,
            format!("cannot read the policy directory: {e}"),
        )
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rhai") && p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let file = p.display().to_string();
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&p)
                .map_err(|e| PolicyError::new(&file, None, format!("cannot read: {e}")))?;
            Ok((name, file, text))
        })
        .collect()
}

/// The policies as a control-loop stage: `on_tick` per class after its breaker, the overlay of
/// per-request rules for the data path.
impl Stage for Runtime {
    fn observe(&self, _batch: &mut crate::control::Batch<'_>) {
        self.tick_set.store(self.current());
    }

    fn decide(&self, tick: &ClassTick<'_>, directive: Packed) -> Packed {
        let i = tick.id.index();
        let Some(set) = self.tick_set.load_full() else {
            self.overlays[i].store(None);
            return directive;
        };
        let mut memo = self.memos[i].lock().unwrap_or_else(|e| e.into_inner());
        let (d, overlay) = self.apply(&set, tick.id, tick, Directive::unpack(directive), &mut memo);
        let has_overlay = overlay.is_some();
        // The overlay first: a directive with the bit set always finds it.
        self.overlays[i].store(overlay.map(Arc::new));
        d.pack().with_overlay(has_overlay)
    }

    fn per_request(&self, class: usize, directive: Packed, req: &RequestView<'_>) -> Packed {
        match self.overlays[class].load().as_deref() {
            Some(overlay) => self.apply_overlay(overlay, directive, req),
            None => directive.with_overlay(false),
        }
    }
}
