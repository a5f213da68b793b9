//! The Rhai engine: configured once, sandboxed, with the `ctx` API and the decision functions.

use std::collections::HashMap;
use std::sync::Arc;

use rhai::{
    Dynamic, Engine, EvalAltResult, FnPtr, ImmutableString, NativeCallContext, Position,
    module_resolvers::DummyModuleResolver,
};

use super::contain;
use super::decision::{Action, Decision};
use crate::breaker::State;
use crate::class::{LatencyTolerance, Route, Tier};
use crate::window::{History, WindowSnapshot};

/// Limits applied to every policy call. `docs/policies.md` lists what happens at each.
///
/// The depth limits also size the stack policies run on (the deeper a script may nest, the
/// more stack the engine's recursion needs): ticks and validation run on threads given twice
/// what the limits allow a script to reach, so raising a depth limit costs address space, not
/// safety.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct Limits {
    /// Operations per `on_tick` call (a loop iteration, a function call, an expression...);
    /// at most 2,000,000 (closures a script nests, each capturing the last, are as deep as its
    /// operations allow, and the stack a call is given grows with it).
    pub max_operations: u64,
    /// Operations per `on_request` call (it runs on the request's path); at most 200,000.
    pub max_request_operations: u64,
    /// Nested function calls (`on_request` gets at most 4).
    pub max_call_levels: usize,
    /// Expression nesting depth (statements, and inside functions).
    pub max_expr_depth: usize,
    /// Bytes in a string.
    pub max_string_size: usize,
    /// Elements in an array.
    pub max_array_size: usize,
    /// Entries in a map.
    pub max_map_size: usize,
    /// Wall-clock time one `on_tick` call (or one validation run) may take: a call past it is
    /// stopped; three in a row quarantine the policy for its class.
    pub max_call_time: std::time::Duration,
    /// Wall-clock time one `on_request` call may take (it runs on the request's path): a call
    /// past it is stopped and that request decided without the hook.
    pub max_request_time: std::time::Duration,
    /// Wall-clock time all policies of one tick may take together: policies not run by then
    /// are skipped for that tick (counted), each keeping its last decision.
    pub max_tick_time: std::time::Duration,
    /// Lines `print` and `debug` may write per second, for all policies together.
    pub max_log_lines: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: 50_000,
            max_request_operations: 5_000,
            max_call_levels: 16,
            max_expr_depth: 32,
            max_string_size: 4 * 1024,
            max_array_size: 1024,
            max_map_size: 256,
            // A call within the operation budget takes about 3 ms in a release build, 35 ms
            // in a debug build: the deadline stops only what the budget does not count.
            max_call_time: std::time::Duration::from_millis(100),
            max_tick_time: std::time::Duration::from_millis(250),
            // Within its operation budget a hook takes well under 1 ms in a release build (a
            // few in a debug build): the deadline stops only native work the budget misses.
            max_request_time: std::time::Duration::from_millis(10),
            max_log_lines: 10,
        }
    }
}

/// The most levels of script recursion the limits may allow together (see [`Limits::validate`]):
/// the stack they need stays within what a thread can be given.
const MAX_LEVELS: usize = 16_384;

/// The most operations a call may be given (see [`Limits::validate`]): a chain of closures
/// each capturing the one before is as deep as its operations let a script build it, and
/// dropping it recurses a level per closure.
const MAX_OPERATIONS: u64 = 2_000_000;

/// The most operations an `on_request` call may be given: it runs on the request's thread,
/// whose stack it uses when enough is left and otherwise maps one for the call.
const MAX_REQUEST_OPERATIONS: u64 = 200_000;

impl Limits {
    /// Check the values, as building the degrader does: every bound at least 1 (a 0 is not
    /// "no limit"), every time at most an hour, operations at most 2,000,000 a call (200,000
    /// for `on_request`), and depth limits that together keep the stack a script can need
    /// within what a thread can be given.
    pub fn validate(&self) -> Result<(), crate::error::ConfigError> {
        let bad = |field: &'static str, reason: String| {
            Err(crate::error::ConfigError::InvalidValue { field, reason })
        };
        for (field, n) in [
            ("policy.max_operations", self.max_operations),
            ("policy.max_request_operations", self.max_request_operations),
            ("policy.max_call_levels", self.max_call_levels as u64),
            ("policy.max_expr_depth", self.max_expr_depth as u64),
            ("policy.max_string_size", self.max_string_size as u64),
            ("policy.max_array_size", self.max_array_size as u64),
            ("policy.max_map_size", self.max_map_size as u64),
        ] {
            if n == 0 {
                return bad(field, "must be at least 1 (0 would not be a limit)".into());
            }
        }
        let hour = std::time::Duration::from_secs(3600);
        for (field, d) in [
            ("policy.max_call_time", self.max_call_time),
            ("policy.max_tick_time", self.max_tick_time),
            ("policy.max_request_time", self.max_request_time),
        ] {
            if d.is_zero() || d > hour {
                return bad(field, "must be non-zero and at most an hour".into());
            }
        }
        for (field, n, max) in [
            ("policy.max_operations", self.max_operations, MAX_OPERATIONS),
            (
                "policy.max_request_operations",
                self.max_request_operations,
                MAX_REQUEST_OPERATIONS,
            ),
        ] {
            if n > max {
                return bad(
                    field,
                    format!(
                        "{n} is over {max}: a script can nest closures as deep as its operations \
                         allow, and the stack to drop them grows with it"
                    ),
                );
            }
        }
        let levels = self.levels(self.max_call_levels, self.max_array_size, self.max_map_size);
        if levels > MAX_LEVELS {
            return bad(
                "policy.max_expr_depth",
                format!(
                    "(max_call_levels + 1) x max_expr_depth + max_array_size + max_map_size is \
                     {levels}, over {MAX_LEVELS}: the levels of recursion a script could reach \
                     need more stack than a thread is given"
                ),
            );
        }
        Ok(())
    }

    /// The deepest recursion a script can reach, in levels: every call level nests
    /// expressions as deep as allowed, and data nests as deep as it has elements.
    fn levels(&self, call_levels: usize, arrays: usize, maps: usize) -> usize {
        call_levels
            .saturating_add(1)
            .saturating_mul(self.max_expr_depth)
            .saturating_add(arrays)
            .saturating_add(maps)
    }

    /// The stack for `levels` of recursion, and for dropping a chain of closures built with
    /// `operations`.
    fn bytes(levels: usize, operations: u64) -> usize {
        let chain =
            usize::try_from(operations / contain::OPS_PER_CHAIN_LEVEL).unwrap_or(usize::MAX);
        levels
            .saturating_mul(contain::LEVEL_BYTES)
            .saturating_add(chain.saturating_mul(contain::CHAIN_BYTES))
            .saturating_add(contain::BASE_BYTES)
    }

    /// The stack an `on_tick` call (or a validation run, which calls `on_request` hooks too)
    /// can need.
    pub(crate) fn stack_need(&self) -> usize {
        Self::bytes(
            self.levels(self.max_call_levels, self.max_array_size, self.max_map_size),
            self.max_operations.max(self.max_request_operations),
        )
    }

    /// The stack an `on_request` call can need.
    pub(crate) fn request_stack_need(&self) -> usize {
        Self::bytes(
            self.levels(
                contain::REQUEST_CALL_LEVELS.min(self.max_call_levels),
                contain::REQUEST_ARRAY_SIZE.min(self.max_array_size),
                contain::REQUEST_MAP_SIZE.min(self.max_map_size),
            ),
            self.max_request_operations,
        )
    }

    /// The stack given to the thread that validates a load: twice the need (a thread's stack
    /// is reserved, not committed: only the pages a script touches cost memory).
    pub(crate) fn thread_stack(&self) -> usize {
        const MAX: usize = 1 << 30;
        self.stack_need().saturating_mul(2).min(MAX)
    }
}

/// One window as policies see it (`ctx.window(-1)`, the argument of `ctx.consecutive`).
#[derive(Debug, Clone, Copy)]
pub struct PolicyWindow(pub(crate) WindowSnapshot);

/// The read-only context of `on_tick(ctx)`.
#[derive(Debug, Clone)]
pub struct TickCtx {
    pub(crate) history: Arc<History>,
    pub(crate) state: State,
    pub(crate) class: ImmutableString,
    pub(crate) tier: Tier,
    pub(crate) sla_ms: f64,
    pub(crate) tolerance: LatencyTolerance,
    pub(crate) dependencies: Arc<[String]>,
    pub(crate) tags: Arc<HashMap<String, String>>,
    pub(crate) prediction: Option<f64>,
    pub(crate) admission: Option<crate::admit::LimiterState>,
    pub(crate) service: ImmutableString,
    pub(crate) env: ImmutableString,
}

impl TickCtx {
    fn latest(&self) -> WindowSnapshot {
        self.history.latest().copied().unwrap_or_default()
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

macro_rules! window_getters {
    ($engine:ident, $ty:ty, $get:expr) => {{
        let get = $get;
        $engine
            .register_get("rps", move |c: &mut $ty| get(c).rps())
            .register_get("success_rate", move |c: &mut $ty| get(c).success_rate())
            .register_get("error_rate", move |c: &mut $ty| get(c).error_rate())
            .register_get("timeout_rate", move |c: &mut $ty| get(c).timeout_rate())
            .register_get("failure_rate", move |c: &mut $ty| get(c).failure_rate())
            .register_get("slow_rate", move |c: &mut $ty| get(c).slow_rate())
            .register_get("p50_ms", move |c: &mut $ty| ms(get(c).p50))
            .register_get("p90_ms", move |c: &mut $ty| ms(get(c).p90))
            .register_get("p99_ms", move |c: &mut $ty| ms(get(c).p99))
            .register_get("max_ms", move |c: &mut $ty| ms(get(c).max))
            .register_get("requests", move |c: &mut $ty| get(c).requests() as i64)
            .register_get("completed", move |c: &mut $ty| get(c).completed() as i64)
            .register_get("inflight", move |c: &mut $ty| get(c).inflight)
            .register_get("overdue", move |c: &mut $ty| get(c).overdue as i64)
            .register_get("queue_depth", move |c: &mut $ty| get(c).queue_depth as i64)
            .register_get("queue_delay_ms", move |c: &mut $ty| ms(get(c).queue_delay));
    }};
}

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

fn runtime_error(msg: String) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(msg.into(), Position::NONE))
}

fn route_named(name: &str) -> RhaiResult<Route> {
    Route::ALL
        .iter()
        .copied()
        .find(|r| r.as_str() == name)
        .ok_or_else(|| {
            let names: Vec<_> = Route::ALL.iter().map(|r| r.as_str()).collect();
            runtime_error(format!(
                "unknown route `{name}`: expected one of {}",
                names.join(", ")
            ))
        })
}

fn degrade(level: f64) -> RhaiResult<Decision> {
    Ok(Decision::new(Action::Degrade(share(
        level,
        "degrade level",
    )?)))
}

fn admit_fraction(f: f64) -> RhaiResult<Decision> {
    Ok(Decision::new(Action::AdmitFraction(share(
        f,
        "admit_fraction",
    )?)))
}

fn share(v: f64, what: &str) -> RhaiResult<f64> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(runtime_error(format!(
            "{what} must be within 0.0..=1.0, got {v}"
        )))
    }
}

fn millis(v: i64, what: &str, max: std::time::Duration) -> RhaiResult<std::time::Duration> {
    let d = u64::try_from(v)
        .map(std::time::Duration::from_millis)
        .map_err(|_| {
            runtime_error(format!(
                "{what}: milliseconds must not be negative, got {v}"
            ))
        })?;
    if d > max {
        return Err(runtime_error(format!(
            "{what}: {v} ms is over the maximum of {} ms",
            max.as_millis()
        )));
    }
    Ok(d)
}

/// The longest `delay` a policy may ask for: calls are held, so minutes would be an outage.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest `retry_after` a policy may tell clients.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Which calls an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hooks {
    /// `policy()` and `on_tick`: validation and ticks, with a wall-clock deadline.
    Tick,
    /// `on_request`: on the request's thread, with tighter limits.
    Request,
}

/// Build the sandboxed engine with the policy API. Called once per degrader and [`Hooks`].
pub(crate) fn build_engine(limits: &Limits, hooks: Hooks, log: Arc<contain::LogLimiter>) -> Engine {
    let mut engine = Engine::new();
    let (operations, call_levels, arrays, maps) = match hooks {
        Hooks::Tick => (
            limits.max_operations,
            limits.max_call_levels,
            limits.max_array_size,
            limits.max_map_size,
        ),
        Hooks::Request => (
            limits.max_request_operations,
            contain::REQUEST_CALL_LEVELS.min(limits.max_call_levels),
            contain::REQUEST_ARRAY_SIZE.min(limits.max_array_size),
            contain::REQUEST_MAP_SIZE.min(limits.max_map_size),
        ),
    };
    // Sandbox: no `eval`, no modules; Rhai has no file, network or process access of its own.
    // No function pointers made by name, called or curried: a pointer's curried arguments are
    // not counted by the size limits, so pointers curried with arrays of pointers grew to
    // gigabytes in a few operations. Closures (`ctx.consecutive(3, |w| ...)`) stay: what
    // they capture is shared, not copied.
    engine
        .disable_symbol("eval")
        .disable_symbol("Fn")
        .disable_symbol("call")
        .disable_symbol("curry")
        .set_module_resolver(DummyModuleResolver::new())
        .set_max_modules(0)
        .set_max_operations(operations)
        .set_max_call_levels(call_levels)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(arrays)
        .set_max_map_size(maps)
        .set_max_functions(64)
        .set_max_variables(256)
        .set_fail_on_invalid_map_property(true)
        .set_strict_variables(true);
    // The wall-clock deadline, checked every 8 operations (a clock read is ~25 ns).
    engine.on_progress(|ops| {
        (ops % 8 == 0 && contain::past_deadline()).then(|| Dynamic::from(contain::stop()))
    });
    // `print` and `debug`: rate-limited, escaped and cut like alerts.
    let print_log = log.clone();
    engine.on_print(move |s| {
        if print_log.allow() {
            tracing::info!(target: "tower_degrade::policy", "{}", super::decision::sanitize(s));
        }
    });
    engine.on_debug(move |s, src, pos| {
        if log.allow() {
            tracing::debug!(target: "tower_degrade::policy", source = src.unwrap_or(""), %pos, "{}", super::decision::sanitize(s));
        }
    });

    // Rhai's `sleep` blocks the thread, and the deadline is only checked between operations:
    // a policy decides, it never waits (`delay(ms)` holds calls instead).
    let no_sleep = || -> RhaiResult<()> {
        Err(runtime_error(
            "`sleep` is not available to policies: they must never block (use `delay(ms)` to \
             hold calls)"
                .to_owned(),
        ))
    };
    engine
        .register_fn("sleep", move |_: i64| no_sleep())
        .register_fn("sleep", move |_: f64| no_sleep());

    engine.register_type_with_name::<TickCtx>("Ctx");
    engine.register_type_with_name::<PolicyWindow>("Window");
    engine.register_type_with_name::<Decision>("Decision");

    window_getters!(engine, TickCtx, |c: &mut TickCtx| c.latest());
    window_getters!(engine, PolicyWindow, |w: &mut PolicyWindow| w.0);

    engine
        .register_get("breaker", |c: &mut TickCtx| c.state.as_str())
        .register_get("class", |c: &mut TickCtx| c.class.clone())
        .register_get("tier", |c: &mut TickCtx| c.tier.as_str())
        .register_get("sla_ms", |c: &mut TickCtx| c.sla_ms)
        .register_get("tolerance", |c: &mut TickCtx| match c.tolerance {
            LatencyTolerance::Milliseconds => "ms",
            LatencyTolerance::Seconds => "s",
            LatencyTolerance::Minutes => "min",
        })
        .register_get("dependencies", |c: &mut TickCtx| -> rhai::Array {
            c.dependencies
                .iter()
                .map(|d| Dynamic::from(d.clone()))
                .collect()
        })
        .register_get("prediction", |c: &mut TickCtx| c.prediction.unwrap_or(0.0))
        .register_get("has_prediction", |c: &mut TickCtx| c.prediction.is_some())
        // The class's admission limiter (0 when admission is off): its limit, the calls holding
        // a permit and the calls waiting for one.
        .register_get("has_admission", |c: &mut TickCtx| c.admission.is_some())
        .register_get("admission_limit", |c: &mut TickCtx| {
            c.admission.as_ref().map_or(0, |a| i64::from(a.limit))
        })
        .register_get("admission_inflight", |c: &mut TickCtx| {
            c.admission.as_ref().map_or(0, |a| i64::from(a.inflight))
        })
        .register_get("admission_waiting", |c: &mut TickCtx| {
            c.admission.as_ref().map_or(0, |a| i64::from(a.waiting))
        })
        .register_get("service", |c: &mut TickCtx| c.service.clone())
        .register_get("env", |c: &mut TickCtx| c.env.clone())
        .register_get("history_len", |c: &mut TickCtx| c.history.len() as i64)
        .register_fn("depends_on", |c: &mut TickCtx, dep: &str| {
            c.dependencies.iter().any(|d| d == dep)
        })
        .register_fn("tag", |c: &mut TickCtx, key: &str| -> Dynamic {
            c.tags
                .get(key)
                .map_or(Dynamic::UNIT, |v| Dynamic::from(v.clone()))
        })
        // ctx.window(0) is the current window, ctx.window(-1) the one before; () when absent.
        .register_fn("window", |c: &mut TickCtx, k: i64| -> Dynamic {
            if k > 0 {
                return Dynamic::UNIT;
            }
            c.history
                .get(k.unsigned_abs() as usize)
                .map_or(Dynamic::UNIT, |w| Dynamic::from(PolicyWindow(*w)))
        })
        // ctx.consecutive(n, |w| ...): the newest n windows exist and all satisfy the predicate.
        .register_fn(
            "consecutive",
            |context: NativeCallContext<'_>,
             c: &mut TickCtx,
             n: i64,
             pred: FnPtr|
             -> RhaiResult<bool> {
                let n = usize::try_from(n).map_err(|_| {
                    runtime_error(format!("consecutive: n must not be negative, got {n}"))
                })?;
                if n > c.history.len() {
                    return Ok(false);
                }
                for ago in 0..n {
                    let w = PolicyWindow(*c.history.get(ago).expect("checked length"));
                    if !pred.call_within_context::<bool>(&context, (w,))? {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        );

    // Decisions.
    engine
        .register_fn("admit", || Decision::new(Action::Admit))
        .register_fn("close", || Decision::new(Action::Close))
        .register_fn("open", || Decision::new(Action::Open))
        .register_fn("shed", || Decision::new(Action::Shed))
        .register_fn("fallback", |route: &str| -> RhaiResult<Decision> {
            Ok(Decision::new(Action::Fallback(route_named(route)?)))
        })
        .register_fn("degrade", degrade)
        .register_fn("admit_fraction", admit_fraction)
        // A whole number is a share too (`degrade(1)`): Rhai does not convert an integer to a
        // float argument, and "Function not found: degrade (i64)" says nothing of why.
        .register_fn("degrade", |level: i64| degrade(level as f64))
        .register_fn("admit_fraction", |f: i64| admit_fraction(f as f64))
        .register_fn("retry_after", |ms: i64| -> RhaiResult<Decision> {
            Ok(Decision::new(Action::Shed).with_retry_after(millis(
                ms,
                "retry_after",
                MAX_RETRY_AFTER,
            )?))
        })
        .register_fn("delay", |ms: i64| -> RhaiResult<Decision> {
            Ok(Decision::new(Action::Delay(millis(
                ms, "delay", MAX_DELAY,
            )?)))
        })
        .register_fn("alert", |msg: ImmutableString| {
            Decision::new(Action::Admit).with_alert(msg.as_str())
        })
        // Modifiers, chained: `degrade(0.8).via("spool").retry_after(500).alert("db slow")`.
        .register_fn(
            "retry_after",
            |d: &mut Decision, ms: i64| -> RhaiResult<Decision> {
                Ok(d.clone()
                    .with_retry_after(millis(ms, "retry_after", MAX_RETRY_AFTER)?))
            },
        )
        .register_fn(
            "via",
            |d: &mut Decision, route: &str| -> RhaiResult<Decision> {
                Ok(d.clone().with_route(route_named(route)?))
            },
        )
        .register_fn("alert", |d: &mut Decision, msg: ImmutableString| {
            d.clone().with_alert(msg.as_str())
        })
        .register_fn("to_string", |d: &mut Decision| d.to_string());
    engine
}
