//! Rhai policies on the control tick: directives, loading errors, rollback, shadow, sandbox.
#![cfg(feature = "rhai")]

use std::time::Duration;

use tower::{Layer, Service, ServiceExt, service_fn};
use tower_degrade::error::degraded;
use tower_degrade::fallback::Diverted;
use tower_degrade::{
    BoxError, ClassConfig, Degrader, Route, breaker::State, clock::LatencyClock, gate::Reason,
};

#[path = "../logs.rs"]
mod logs;
#[path = "../support.rs"]
mod support;

use support::{failing_after, window};

mod containment;
mod fuzz;

fn degrader() -> Degrader {
    Degrader::builder("shop")
        .env("test")
        .latency_clock(LatencyClock::Tokio)
        .class(
            ClassConfig::gold("pay")
                .depends_on("db")
                .tag("team", "payments"),
        )
        .class(ClassConfig::silver("stock").fallback_route(Route::Service))
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0
}

fn echo() -> impl Service<bool, Response = (), Error = BoxError, Future: Send> + Clone + Send {
    failing_after(0)
}

/// How many of `n` calls of `class` were admitted by the inner service.
async fn admitted(d: &Degrader, class: &str, n: usize) -> usize {
    let mut svc = d.layer(d.class_id(class).unwrap()).layer(echo());
    let mut ok = 0;
    for _ in 0..n {
        if svc.ready().await.unwrap().call(false).await.is_ok() {
            ok += 1;
        }
    }
    ok
}

/// A metrics snapshot's entries (`Snapshot::into_vec`).
type Entries = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    metrics_util::debugging::DebugValue,
)>;

/// The value of the counter `name` in a metrics snapshot (the first series of that name).
fn counter(snapshot: &Entries, name: &str) -> Option<u64> {
    snapshot.iter().find_map(|(k, _, _, v)| match v {
        metrics_util::debugging::DebugValue::Counter(n) if k.key().name() == name => Some(*n),
        _ => None,
    })
}

fn policy(governs: &str, body: &str) -> String {
    format!("fn policy() {{ #{{ governs: [{governs}] }} }}\nfn on_tick(ctx) {{\n{body}\n}}\n")
}

#[test]
fn policies_loaded_from_memory_need_distinct_names() {
    let d = degrader();
    let p = policy("\"log\"", "()");
    let e = d
        .load_policy_sources([("a", p.as_str()), ("a", p.as_str())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.rhai") && e.contains("two policies"), "{e}");
    let e = d.load_policy_sources([(" ", p.as_str())]).unwrap_err();
    assert!(e.to_string().contains("needs a name"), "{e}");
}

#[test]
fn a_closure_that_captures_ctx_is_refused_saying_what_to_capture_instead() {
    let d = degrader();
    let src = policy(
        "\"log\"",
        "if ctx.consecutive(2, |w| w.p99_ms > ctx.sla_ms) { shed() } else { () }",
    );
    let e = d
        .load_policy_sources([("capture", src.as_str())])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("capture.rhai") && e.contains("captures `ctx`") && e.contains("let limit"),
        "{e}"
    );
    // Capturing the value instead works.
    let src = policy(
        "\"log\"",
        "let sla = ctx.sla_ms; if ctx.consecutive(2, |w| w.p99_ms > sla) { shed() } else { () }",
    );
    d.load_policy_sources([("capture", src.as_str())]).unwrap();
}

#[tokio::test(start_paused = true)]
async fn each_directive_drives_the_layer() {
    let cases: &[(&str, usize)] = &[
        ("admit()", 100),
        ("()", 100),
        ("shed()", 0),
        ("open()", 0),
        ("degrade(0.75)", 25),
        // Whole numbers are shares too: `degrade(1)` is `degrade(1.0)`.
        ("degrade(1)", 0),
        ("degrade(0)", 100),
        ("admit_fraction(0.3)", 30),
        ("admit_fraction(1)", 100),
        ("retry_after(1500)", 0),
        ("delay(100)", 100),
        ("alert(\"just saying\")", 100),
    ];
    for (decision, expected) in cases {
        let d = degrader();
        d.load_policy_sources([("p", policy("\"log\"", decision).as_str())])
            .unwrap();
        d.tick_now();
        let got = admitted(&d, "log", 100).await;
        // The admission sequence is low-discrepancy: within a few calls of the exact share.
        assert!(
            got.abs_diff(*expected) <= 3,
            "{decision}: admitted {got}, expected {expected}"
        );
        // Other classes are not governed.
        assert_eq!(admitted(&d, "pay", 10).await, 10, "{decision}");
    }
}

#[tokio::test(start_paused = true)]
async fn shed_and_retry_after_answer_with_the_reason_and_hint() {
    let d = degrader();
    d.load_policy_sources([("p", policy("\"bronze\"", "retry_after(1500)").as_str())])
        .unwrap();
    d.tick_now();
    let err = d
        .layer(d.class_id("log").unwrap())
        .layer(echo())
        .oneshot(false)
        .await
        .unwrap_err();
    let deg = degraded(&*err).unwrap();
    assert_eq!(
        (deg.reason(), deg.retry_after()),
        (Reason::Shed, Some(Duration::from_millis(1500)))
    );
}

#[tokio::test(start_paused = true)]
async fn tier_and_star_selectors_leave_the_implied_default_class_alone() {
    // The implied `default` class (bronze) holds the calls no rule matched, 404s and scanners
    // among them: a policy for "bronze" or "*" is about the classes you configured. Named, or
    // configured with `default_class`, it is governed like any other.
    let shed = |d: &Degrader, class: &str| {
        let d = d.clone();
        let class = class.to_owned();
        async move {
            d.layer(d.class_id(&class).unwrap())
                .layer(echo())
                .oneshot(false)
                .await
                .is_err()
        }
    };
    for governs in ["\"bronze\"", "\"*\""] {
        let d = degrader();
        d.load_policy_sources([("p", policy(governs, "shed()").as_str())])
            .unwrap();
        d.tick_now();
        assert!(shed(&d, "log").await, "{governs}");
        assert!(
            !shed(&d, "default").await,
            "{governs}: the default class is not bronze work"
        );
    }
    let d = degrader();
    d.load_policy_sources([("p", policy("\"default\"", "shed()").as_str())])
        .unwrap();
    d.tick_now();
    assert!(shed(&d, "default").await, "named");
    let d = Degrader::builder("shop")
        .default_class(ClassConfig::bronze("other"))
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0;
    d.load_policy_sources([("p", policy("\"bronze\"", "shed()").as_str())])
        .unwrap();
    d.tick_now();
    assert!(shed(&d, "default").await, "configured");
}

#[tokio::test(start_paused = true)]
async fn fallback_route_goes_to_the_fallback_service() {
    let d = degrader();
    d.load_policy_sources([("p", policy("\"stock\"", "fallback(\"service\")").as_str())])
        .unwrap();
    d.tick_now();
    let svc = d
        .layer(d.class_id("stock").unwrap())
        .fallback_service(service_fn(|_: Diverted<bool>| async {
            Err::<(), BoxError>("from fallback".into())
        }))
        .layer(echo());
    let err = svc.oneshot(false).await.unwrap_err();
    assert_eq!(err.to_string(), "from fallback");
    d.tick_now();
    assert_eq!(d.history("stock").unwrap().latest().unwrap().degraded, 1);
}

#[tokio::test(start_paused = true)]
async fn close_overrides_an_open_breaker_but_not_a_manual_command() {
    let d = degrader();
    let mut svc = d.layer(d.class_id("log").unwrap()).layer(echo());
    for _ in 0..30 {
        let _ = svc.ready().await.unwrap().call(true).await;
    }
    d.tick_now();
    assert_eq!(d.state("log").unwrap(), State::Open);
    assert_eq!(admitted(&d, "log", 10).await, 0);
    d.load_policy_sources([("p", policy("\"log\"", "close()").as_str())])
        .unwrap();
    d.tick_now();
    assert_eq!(
        admitted(&d, "log", 10).await,
        10,
        "close() overrides the breaker"
    );
    d.force_open("log").unwrap();
    d.tick_now();
    assert_eq!(
        admitted(&d, "log", 10).await,
        0,
        "a manual command wins over policies"
    );
}

#[tokio::test(start_paused = true)]
async fn a_degrade_never_loosens_an_open_breaker() {
    let d = degrader();
    let mut svc = d.layer(d.class_id("log").unwrap()).layer(echo());
    for _ in 0..30 {
        let _ = svc.ready().await.unwrap().call(true).await;
    }
    d.load_policy_sources([("p", policy("\"log\"", "degrade(0.5)").as_str())])
        .unwrap();
    d.tick_now();
    assert_eq!(d.state("log").unwrap(), State::Open);
    assert_eq!(admitted(&d, "log", 10).await, 0);
}

#[tokio::test(start_paused = true)]
async fn priority_then_most_restrictive() {
    let d = degrader();
    let hi =
        "fn policy() { #{ governs: [\"log\"], priority: 10 } }\nfn on_tick(ctx) { degrade(0.5) }";
    let lo = "fn policy() { #{ governs: [\"*\"] } }\nfn on_tick(ctx) { shed() }";
    let same = "fn policy() { #{ governs: [\"bronze\"], priority: 10 } }\nfn on_tick(ctx) { degrade(0.9) }";
    d.load_policy_sources([("hi", hi), ("lo", lo)]).unwrap();
    d.tick_now();
    let got = admitted(&d, "log", 100).await;
    assert!(
        got.abs_diff(50) <= 3,
        "priority 10 beats the shed at 0: {got}"
    );
    assert_eq!(admitted(&d, "pay", 10).await, 0, "only `lo` governs pay");
    d.load_policy_sources([("hi", hi), ("lo", lo), ("same", same)])
        .unwrap();
    d.tick_now();
    let got = admitted(&d, "log", 100).await;
    assert!(
        got.abs_diff(10) <= 3,
        "same priority: the most restrictive: {got}"
    );
    assert_eq!(
        d.policies().unwrap().governing(d.class_id("log").unwrap()),
        ["hi", "same", "lo"]
    );
}

#[tokio::test(start_paused = true)]
async fn the_ctx_api() {
    let d = degrader();
    let body = r#"
        if ctx.class != "pay" || ctx.tier != "gold" || ctx.sla_ms != 50.0 || ctx.tolerance != "ms" { throw "identity"; }
        if ctx.service != "shop" || ctx.env != "test" || ctx.tag("team") != "payments" || ctx.tag("none") != () { throw "labels"; }
        if !ctx.depends_on("db") || ctx.dependencies.len() != 1 { throw "dependencies"; }
        if !["closed", "open", "half_open", "recovering", "degraded"].contains(ctx.breaker) { throw "state"; }
        // The validation samples have 0, 1, 5, 8 or 64 windows (two with a prediction); the
        // test's traffic makes exactly 3, without a predictor.
        if ctx.history_len != 3 { return; }
        if ctx.has_prediction || ctx.prediction != 0.0 { throw "prediction"; }
        if ctx.requests != 20 || ctx.completed != 20 || ctx.window(-1).requests != 10 || ctx.window(1) != () { throw "windows"; }
        if ctx.window(-63) != () && ctx.history_len < 64 { throw "history"; }
        // The seed's rule, literally and relative to the SLA.
        let seed = ctx.consecutive(3, |w| w.success_rate < 0.92 && w.p99_ms > 800.0);
        let sla = ctx.consecutive(3, |w| w.failure_rate > 0.08 && w.p99_ms > 16.0 * 50.0);
        if seed != sla { throw "rules disagree"; }
        if seed { degrade(1.0).alert("seed rule") } else { admit() }
    "#;
    d.load_policy_sources([("ctx", policy("\"pay\"", body).as_str())])
        .unwrap();
    let mut svc = d
        .layer(d.class_id("pay").unwrap())
        .layer(failing_after(900));
    for n in [10usize, 10, 20] {
        for i in 0..n {
            let _ = svc.ready().await.unwrap().call(i % 5 == 0).await;
        }
        d.tick_now();
    }
    // Three windows at 80 % success and p99 900 ms: the breaker's own seed rule degrades the
    // class (admitting 20 %), and the policy, more restrictive, degrades everything.
    assert_eq!(d.state("pay").unwrap(), State::Degraded);
    let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
    assert_eq!(degraded(&*err).unwrap().reason(), Reason::Policy);
}

fn load_err(d: &Degrader, name: &str, src: &str) -> String {
    d.load_policy_sources([(name, src)])
        .unwrap_err()
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn bad_files_are_rejected_with_file_line_and_reason_and_the_old_set_serves() {
    let d = degrader();
    let good = policy("\"log\"", "shed()");
    assert_eq!(d.load_policy_sources([("good", good.as_str())]).unwrap(), 1);
    let cases = [
        (
            "syntax",
            "fn policy() { #{ governs: [\"log\"] } }\nfn on_tick(ctx) {\n  let x = ;\n}",
            "syntax.rhai:3: syntax error",
        ),
        (
            // An unclosed block: Rhai puts its error past the last line (on line 4 here).
            "unclosed",
            "fn policy() { #{ governs: [\"log\"] } }\nfn on_tick(ctx) {\n  ()\n",
            "unclosed.rhai:3: syntax error: Expecting ';' to terminate this statement (at the end of the file)",
        ),
        (
            "type",
            &policy("\"log\"", "42") as &str,
            "type.rhai:2: on_tick with an empty history: on_tick must return a decision or (), not i64",
        ),
        (
            "runtime",
            &policy("\"log\"", "\n\nlet x = 1 / 0;"),
            "runtime.rhai:5: on_tick with an empty history: Division by zero",
        ),
        (
            "budget",
            &policy("\"log\"", "loop { }"),
            "budget.rhai:2: on_tick with an empty history: operation budget exceeded (the line \
             is the function's: the engine does not say where in it the budget ran out)",
        ),
        (
            // Only reached with a prediction: the validation runs a context that has one.
            "predicted",
            &policy(
                "\"log\"",
                "if ctx.has_prediction && ctx.prediction > 0.9 { shed(0.5) }",
            ),
            "predicted.rhai:3: on_tick with a predicted failure under admission: Function not found: shed (f64)",
        ),
        // States the samples reach since a trial's policies that loaded failed on live
        // ticks: the first window (the average of the windows before it), admission that is
        // idle, a slow class, latencies far over the SLA, a half-open breaker.
        (
            "first",
            &policy(
                "\"log\"",
                "let t = 0; for k in 1..ctx.history_len { t += ctx.window(-k).requests; } \
                 let avg = t / (ctx.history_len - 1);",
            ),
            "first.rhai:3: on_tick with the first window: Division by zero",
        ),
        (
            "idle",
            &policy(
                "\"log\"",
                "if ctx.has_admission { let room = ctx.admission_limit / ctx.admission_waiting; }",
            ),
            "idle.rhai:3: on_tick with an idle service under admission: Division by zero",
        ),
        (
            "slow",
            &policy("\"log\"", "if ctx.slow_rate > 0.2 { return 42; }"),
            "on_tick with failing windows: on_tick must return a decision or (), not i64",
        ),
        (
            "latency",
            &policy("\"log\"", "delay(ctx.p99_ms.to_int() * 10)"),
            "latency.rhai:3: on_tick with very slow calls",
        ),
        (
            "half_open",
            &policy(
                "\"log\"",
                "if ctx.breaker == \"half_open\" { degrade(2.0) }",
            ),
            "half_open.rhai:3: on_tick with a half-open breaker",
        ),
        (
            "unknown_class",
            &policy("\"nope\"", "()"),
            "unknown_class.rhai:1: policy(): `governs` names unknown class `nope`",
        ),
        (
            "unknown_field",
            "fn policy() { #{ governs: [\"log\"], rolout: 5 } }\nfn on_tick(ctx) { }",
            "unknown field `rolout`",
        ),
        // A field's error names its line, not `fn policy`'s.
        (
            "field_line",
            "fn policy() {\n  #{\n    governs: [\"log\"],\n    rolout: 5,\n  }\n}\nfn on_tick(ctx) { }",
            "field_line.rhai:4: policy(): unknown field `rolout`",
        ),
        (
            "field_value",
            "fn policy() {\n  #{\n    \"priority\": \"high\",\n    governs: [\"log\"],\n  }\n}\nfn on_tick(ctx) { }",
            "field_value.rhai:3: policy(): `priority` must be an integer",
        ),
        (
            "no_on_tick",
            "fn policy() { #{ governs: [\"log\"] } }",
            "missing `fn on_tick(ctx)`",
        ),
        // A parameter on `policy` is said as such (it was "missing `fn policy()`").
        (
            "policy_arity",
            "fn on_tick(ctx) { }\nfn policy(x) { #{ governs: [\"log\"] } }",
            "policy_arity.rhai:2: `policy` must take no parameters, not 1",
        ),
        (
            "bad_route",
            &policy("\"log\"", "fallback(\"nowhere\")"),
            "unknown route `nowhere`",
        ),
        (
            "bad_share",
            &policy("\"log\"", "degrade(2.0)"),
            "degrade level must be within 0.0..=1.0",
        ),
    ];
    for (name, src, expected) in cases {
        let err = load_err(&d, name, src);
        assert!(
            err.contains(expected),
            "{name}: `{err}` does not contain `{expected}`"
        );
        let e = d.load_policy_sources([(name, src)]).unwrap_err();
        assert_eq!(e.file(), format!("{name}.rhai"));
        if name != "no_on_tick" {
            assert!(e.line().is_some(), "{name}: no line in `{e}`");
        }
        assert_eq!(
            d.policies().unwrap().version(),
            1,
            "{name}: the old set keeps serving"
        );
    }
    d.tick_now();
    assert_eq!(
        admitted(&d, "log", 10).await,
        0,
        "still shedding per `good`"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hostile_corpus_never_stalls_or_crashes_the_host() {
    let d = degrader();
    let corpus = [
        ("infinite_loop", "loop { }", "operation budget exceeded"),
        (
            "while_true",
            "let i = 0; while true { i += 1; }",
            "operation budget exceeded",
        ),
        (
            "deep_recursion",
            "fn f(n) { f(n + 1) } f(0)",
            "Stack overflow",
        ),
        (
            "huge_string",
            "let s = \"x\"; loop { s += s; }",
            "Length of string",
        ),
        (
            "huge_array",
            "let a = []; loop { a.push(1); }",
            "Size of array",
        ),
        (
            "huge_map",
            "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }",
            "on_tick",
        ),
        ("eval", "eval(\"shed()\")", "'eval' is disabled"),
        ("import", "import \"std\" as s; ()", "Too many modules"),
        (
            "file_io",
            "open_file(\"/etc/passwd\")",
            "Function not found",
        ),
        ("process", "system(\"rm -rf /\")", "Function not found"),
    ];
    for (name, body, expected) in corpus {
        let src = if name == "deep_recursion" {
            format!("fn policy() {{ #{{ governs: [\"*\"] }} }}\n{body}\nfn on_tick(ctx) {{ f(0) }}")
                .replace(" f(0)\nfn on_tick", "\nfn on_tick")
        } else {
            policy("\"*\"", body)
        };
        let err = load_err(&d, name, &src);
        assert!(err.starts_with(&format!("{name}.rhai")), "{name}: {err}");
        assert!(
            err.contains(expected),
            "{name}: `{err}` does not contain `{expected}`"
        );
    }
    assert!(d.policies().is_none(), "nothing hostile was installed");
}

#[tokio::test(start_paused = true)]
async fn a_policy_failing_at_run_time_is_quarantined_and_the_breaker_takes_over() {
    let d = degrader();
    // Passes validation (which never has more than 64 windows of these shapes), then loops
    // forever once real traffic shows up.
    let body = "if ctx.requests == 7 { loop { } } shed()";
    d.load_policy_sources([("trap", policy("\"log\"", body).as_str())])
        .unwrap();
    d.tick_now();
    assert_eq!(admitted(&d, "log", 7).await, 0, "shedding");
    // The 7 rejections make the next window's requests == 7: the policy blows its budget.
    d.tick_now();
    assert_eq!(
        admitted(&d, "log", 5).await,
        5,
        "quarantined: the breaker (closed) decides"
    );
    d.tick_now();
    assert_eq!(admitted(&d, "log", 5).await, 5, "still quarantined");
    // A new load lifts the quarantine.
    d.load_policy_sources([("trap", policy("\"log\"", body).as_str())])
        .unwrap();
    d.tick_now();
    assert_eq!(admitted(&d, "log", 3).await, 0);
}

#[tokio::test(start_paused = true)]
async fn rollback_restores_the_previous_set_and_stats_survive_reloads() {
    let d = degrader();
    assert_eq!(d.rollback_policies(), None);
    d.load_policy_sources([("a", policy("\"log\"", "shed()").as_str())])
        .unwrap();
    d.tick_now();
    assert_eq!(admitted(&d, "log", 4).await, 0);
    d.load_policy_sources([("b", policy("\"log\"", "admit()").as_str())])
        .unwrap();
    d.tick_now();
    assert_eq!(admitted(&d, "log", 4).await, 4);
    assert_eq!(d.rollback_policies(), Some(1));
    d.tick_now();
    assert_eq!(admitted(&d, "log", 4).await, 0);
    assert_eq!(d.policies().unwrap().names(), ["a"]);
    // Rolling back again returns to `b`.
    assert_eq!(d.rollback_policies(), Some(2));
    d.tick_now();
    // Windows kept counting across the three sets.
    let history = d.history("log").unwrap();
    assert_eq!(history.len(), 4);
    let rejected: u64 = history.iter().map(|w| w.rejected).sum();
    let completed: u64 = history.iter().map(|w| w.completed()).sum();
    assert_eq!((rejected, completed), (8, 4));
}

#[tokio::test(start_paused = true)]
async fn a_class_under_a_manual_command_runs_its_policies_for_their_alerts_only() {
    // `ctx.breaker` reads `forced_open`, and the policy's alert is raised (an operator's
    // command does not silence it), but its `close()` is not applied.
    use metrics_util::debugging::DebuggingRecorder;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let d = degrader();
    let body =
        "if ctx.breaker == \"forced_open\" { close().alert(\"forced open\") } else { close() }";
    d.load_policy_sources([("p", policy("\"log\"", body).as_str())])
        .unwrap();
    d.force_open("log").unwrap();
    metrics::with_local_recorder(&recorder, || {
        d.tick_now();
        d.tick_now();
    });
    assert_eq!(admitted(&d, "log", 10).await, 0, "the command wins");
    let snap = snapshotter.snapshot().into_vec();
    assert_eq!(counter(&snap, "degrade_policy_alerts_total"), Some(2));
    // Reset: the policy's decision applies again.
    d.reset("log").unwrap();
    d.tick_now();
    assert_eq!(admitted(&d, "log", 10).await, 10);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_decides_and_counts_but_enforces_nothing() {
    use metrics_util::debugging::DebuggingRecorder;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let d = degrader();
    let src = "fn policy() { #{ governs: [\"log\"], mode: \"shadow\" } }\nfn on_tick(ctx) { shed().alert(\"would shed\") }";
    d.load_policy_sources([("dry", src)]).unwrap();
    metrics::with_local_recorder(&recorder, || {
        d.tick_now();
        d.tick_now();
    });
    assert_eq!(admitted(&d, "log", 10).await, 10, "nothing enforced");
    let snap = snapshotter.snapshot().into_vec();
    assert_eq!(
        counter(&snap, "degrade_policy_shadow_decisions_total"),
        Some(2)
    );
    assert_eq!(counter(&snap, "degrade_policy_alerts_total"), Some(2));
}

#[test]
fn a_refused_load_is_flagged_until_one_is_accepted() {
    // The alert on refused reloads let go after 10 minutes while the bad file stayed on disk.
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let d = degrader();
    let failing = || {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(k, _, _, _)| k.key().name() == "degrade_policy_load_failing")
            .map(|(_, _, _, v)| v)
    };
    let good = policy("\"log\"", "()");
    metrics::with_local_recorder(&recorder, || {
        d.load_policy_sources([("p", "fn on_tick(ctx) {")])
            .unwrap_err();
    });
    assert_eq!(failing(), Some(DebugValue::Gauge(1.0.into())));
    metrics::with_local_recorder(&recorder, || {
        d.load_policy_sources([("p", good.as_str())]).unwrap();
    });
    assert_eq!(failing(), Some(DebugValue::Gauge(0.0.into())));
}

#[test]
fn a_load_creates_the_counters_alerts_read_at_zero() {
    // A counter created at its first increment starts at 1, which `rate()` and `increase()`
    // never see: the first refused reload, and a policy's first alert, reached no alert.
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let d = degrader();
    let good = policy("\"log\"", "()");
    metrics::with_local_recorder(&recorder, || {
        d.load_policy_sources([("p", good.as_str())]).unwrap();
    });
    let snap = snapshotter.snapshot().into_vec();
    let value = |name: &str, labels: &[(&str, &str)]| {
        snap.iter().find_map(|(k, _, _, v)| {
            let key = k.key();
            let all = labels
                .iter()
                .all(|(n, want)| key.labels().any(|l| l.key() == *n && l.value() == *want));
            (key.name() == name && all).then_some(v)
        })
    };
    let zero = Some(&DebugValue::Counter(0));
    assert_eq!(
        value("degrade_policy_reloads_total", &[("result", "ok")]),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        value("degrade_policy_reloads_total", &[("result", "error")]),
        zero
    );
    for name in [
        "degrade_policy_alerts_total",
        "degrade_policy_errors_total",
        "degrade_policy_skipped_total",
    ] {
        assert_eq!(
            value(name, &[("class", "log"), ("policy", "p")]),
            zero,
            "{name}"
        );
        // Only the classes the policy governs.
        assert_eq!(value(name, &[("class", "pay")]), None, "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn loads_a_directory_once() {
    let dir = std::env::temp_dir().join(format!("tower-degrade-policies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("b_shed_log.rhai"), policy("\"log\"", "shed()")).unwrap();
    std::fs::write(dir.join("a_admit.rhai"), policy("\"*\"", "admit()")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a policy").unwrap();
    let d = degrader();
    assert_eq!(d.load_policies(&dir).unwrap(), 1);
    assert_eq!(d.policies().unwrap().names(), ["a_admit", "b_shed_log"]);
    d.tick_now();
    assert_eq!(admitted(&d, "log", 3).await, 0);
    std::fs::write(dir.join("c_broken.rhai"), "fn policy( {").unwrap();
    let err = d.load_policies(&dir).unwrap_err();
    assert!(err.file().ends_with("c_broken.rhai"), "{err}");
    assert_eq!(err.line(), Some(1));
    // No policy file left: an empty set, which removes the policies in force, and says so.
    for f in ["a_admit.rhai", "b_shed_log.rhai", "c_broken.rhai"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let log = containment::logs(|| assert_eq!(d.load_policies(&dir).unwrap(), 2));
    assert!(d.policies().unwrap().names().is_empty());
    assert!(
        log.contains("every policy in force is removed") && log.contains("a_admit, b_shed_log"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let err = d.load_policies(&dir).unwrap_err();
    assert!(
        err.reason().contains("cannot read the policy directory"),
        "{err}"
    );
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-degrade-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A degrader with one class, `log`, watching `dir` with this debounce, and the outcomes of
/// its reloads after the first load.
fn watching(
    dir: &std::path::Path,
    debounce: Duration,
) -> (
    Degrader,
    tower_degrade::policy::PolicyWatcher,
    tokio::sync::watch::Receiver<tower_degrade::policy::ReloadOutcome>,
) {
    let d = Degrader::builder("shop")
        .class(ClassConfig::bronze("log"))
        .build()
        .unwrap();
    let watcher = d.watch_policies(dir, debounce).unwrap();
    let mut outcomes = watcher.subscribe();
    outcomes.borrow_and_update();
    (d, watcher, outcomes)
}

/// The outcome of the next reload; the timeout only bounds a broken watcher.
async fn next_reload(
    outcomes: &mut tokio::sync::watch::Receiver<tower_degrade::policy::ReloadOutcome>,
) -> tower_degrade::policy::ReloadOutcome {
    tokio::time::timeout(Duration::from_secs(10), outcomes.changed())
        .await
        .expect("a reload")
        .unwrap();
    outcomes.borrow_and_update().clone()
}

#[tokio::test(start_paused = true)]
async fn a_reload_takes_effect_within_a_second_and_fails_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower_degrade::policy::ReloadOutcome;

    let dir = temp_dir("reload");
    std::fs::write(dir.join("log.rhai"), policy("\"log\"", "shed()")).unwrap();
    let d = Degrader::builder("shop")
        .class(ClassConfig::gold("pay"))
        .class(ClassConfig::bronze("log"))
        .build()
        .unwrap(); // the control loop runs, on paused time
    let watcher = d
        .reload_policies_on_demand(&dir, Duration::from_millis(200))
        .unwrap();
    let mut outcomes = watcher.subscribe();
    assert_eq!(*outcomes.borrow_and_update(), ReloadOutcome::Loaded(1));

    // Gold traffic all along, across every reload.
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (d, failures, served) = (d.clone(), failures.clone(), served.clone());
        tokio::spawn(async move {
            let mut svc = d.layer(d.class_id("pay").unwrap()).layer(echo());
            for _ in 0..400 {
                match svc.ready().await.unwrap().call(false).await {
                    Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(admitted(&d, "log", 3).await, 0, "shedding");

    for (version, body, expect) in [(2, "admit()", 3), (3, "shed()", 0), (4, "degrade(0.0)", 3)] {
        std::fs::write(dir.join("log.rhai"), policy("\"log\"", body)).unwrap();
        let written = tokio::time::Instant::now();
        watcher.reload_now();
        outcomes.changed().await.unwrap();
        assert_eq!(
            *outcomes.borrow_and_update(),
            ReloadOutcome::Loaded(version)
        );
        // In force from the next tick: poll every 50 ms until it is.
        while admitted(&d, "log", 3).await != expect {
            assert!(
                written.elapsed() < Duration::from_secs(1),
                "v{version} not in force after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            written.elapsed() <= Duration::from_millis(700),
            "{:?}",
            written.elapsed()
        );
    }

    // A broken file is rejected, with file and line, and the set in force keeps serving.
    std::fs::write(
        dir.join("log.rhai"),
        "fn policy() {\n  #{ governs: [\"log\"] \n}",
    )
    .unwrap();
    watcher.reload_now();
    outcomes.changed().await.unwrap();
    match &*outcomes.borrow_and_update() {
        ReloadOutcome::Rejected(e) => {
            assert!(e.file().ends_with("log.rhai") && e.line().is_some(), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.policies().unwrap().version(), 4);

    traffic.await.unwrap();
    assert_eq!(
        (
            failures.load(Ordering::Relaxed),
            served.load(Ordering::Relaxed)
        ),
        (0, 400)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_watcher_reloads_on_file_changes() {
    use tower_degrade::policy::ReloadOutcome;

    let dir = temp_dir("watch");
    std::fs::write(dir.join("log.rhai"), policy("\"log\"", "shed()")).unwrap();
    let (_d, watcher, mut outcomes) = watching(&dir, Duration::from_millis(50));
    std::fs::write(dir.join("log.rhai"), policy("\"log\"", "admit()")).unwrap();
    // The event-driven reload.
    assert_eq!(next_reload(&mut outcomes).await, ReloadOutcome::Loaded(2));
    drop(watcher);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_kept_through_a_broken_first_load_loads_the_fix() {
    // `watch_policies` returns the error of a broken first load, and with it no watcher: a
    // process started while a bad file was on disk never loaded the fix.
    use tower_degrade::policy::ReloadOutcome;

    let dir = temp_dir("broken-at-start");
    std::fs::write(dir.join("log.rhai"), policy("\"log\"", "shed(")).unwrap();
    let d = Degrader::builder("shop")
        .class(ClassConfig::bronze("log"))
        .build()
        .unwrap();
    assert!(d.watch_policies(&dir, Duration::from_millis(50)).is_err());
    let watcher = d
        .keep_watching_policies(&dir, Duration::from_millis(50))
        .unwrap();
    let mut outcomes = watcher.subscribe();
    match &*outcomes.borrow_and_update() {
        ReloadOutcome::Rejected(e) => assert!(e.to_string().contains("log.rhai"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(d.policies().is_none());
    std::fs::write(dir.join("log.rhai"), policy("\"log\"", "shed()")).unwrap();
    assert_eq!(next_reload(&mut outcomes).await, ReloadOutcome::Loaded(1));
    assert_eq!(admitted(&d, "log", 5).await, 5, "not before the next tick");
    d.tick_now();
    assert_eq!(admitted(&d, "log", 5).await, 0);
    drop(watcher);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_kept_on_a_directory_not_there_yet_loads_it_once_it_is() {
    // In a trial, `keep_watching_policies` on a directory mounted after start-up returned
    // notify's "No path was found" and the service did not start.
    use tower_degrade::policy::ReloadOutcome;

    let dir = temp_dir("not-yet");
    std::fs::remove_dir_all(&dir).unwrap();
    let d = Degrader::builder("shop")
        .class(ClassConfig::bronze("log"))
        .build()
        .unwrap();
    let err = d
        .watch_policies(&dir, Duration::from_millis(50))
        .unwrap_err();
    assert!(
        err.reason().contains("cannot read the policy directory"),
        "{err}"
    );
    let watcher = d
        .keep_watching_policies(&dir, Duration::from_millis(50))
        .unwrap();
    let mut outcomes = watcher.subscribe();
    match &*outcomes.borrow_and_update() {
        ReloadOutcome::Rejected(e) => assert_eq!(e.file(), dir.display().to_string()),
        other => panic!("{other:?}"),
    }
    // The directory arrives with its policy: the rescan loads it.
    let staging = temp_dir("not-yet-staging");
    std::fs::write(staging.join("log.rhai"), policy("\"log\"", "shed()")).unwrap();
    std::fs::rename(&staging, &dir).unwrap();
    assert_eq!(next_reload(&mut outcomes).await, ReloadOutcome::Loaded(1));
    d.tick_now();
    assert_eq!(admitted(&d, "log", 5).await, 0);
    drop(watcher);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ===== the shipped policies (policies/*.rhai) =====

fn shipped(name: &str) -> String {
    let path = format!("{}/../policies/{name}.rhai", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn shipped_degrader(name: &str) -> Degrader {
    // The breaker's own thresholds out of the way: the policy under test decides.
    let mut breaker = tower_degrade::breaker::BreakerConfig::default();
    breaker.min_requests = 1_000;
    breaker.degrade_rule = None;
    let d = Degrader::builder("shop")
        .breaker(breaker)
        .latency_clock(LatencyClock::Tokio)
        .class(ClassConfig::gold("pay").fallback_route(Route::Service))
        .class(ClassConfig::silver("stock"))
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0;
    d.load_policy_sources([(name, shipped(name).as_str())])
        .unwrap();
    d
}

/// Of 20 calls of `class`, at most 3 (the policy's probing share) are admitted, and the others
/// go to `route` by the policy.
async fn assert_mostly_diverted(d: &Degrader, class: &str, route: Route) {
    let (admitted, diverted) = routes(d, class, 20).await;
    assert!(
        admitted <= 3 && diverted.iter().all(|r| *r == (route, Reason::Policy)),
        "{admitted} {diverted:?}"
    );
}

/// Of `n` calls of `class`: how many were admitted, and the route and reason of the others.
async fn routes(d: &Degrader, class: &str, n: usize) -> (usize, Vec<(Route, Reason)>) {
    let (mut admitted, mut diverted_to) = (0, Vec::new());
    for _ in 0..n {
        match diverted(d, class).await {
            None => admitted += 1,
            Some(r) => diverted_to.push(r),
        }
    }
    (admitted, diverted_to)
}

/// The route and reason of a diverted call of `class`, or `None` if it was admitted.
async fn diverted(d: &Degrader, class: &str) -> Option<(Route, Reason)> {
    let err = d
        .layer(d.class_id(class).unwrap())
        .layer(echo())
        .oneshot(false)
        .await
        .err()?;
    let deg = degraded(&*err).expect("degraded");
    Some((deg.route(), deg.reason()))
}

#[test]
fn every_shipped_policy_loads_together() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let d = shipped_degrader("seed_rule");
    let dir = format!("{}/../policies", env!("CARGO_MANIFEST_DIR"));
    d.load_policies(&dir).unwrap();
    assert_eq!(
        d.policies().unwrap().names(),
        [
            "bronze_spool",
            "gold_guaranteed_retry",
            "seed_elapsed",
            "seed_rule",
            "seed_rule_sla",
            "silver_batch_merge"
        ]
    );
    // Layered by priority, never two at one: `Overlap::Error` takes them too.
    assert_eq!(d.policies().unwrap().warnings(), [] as [String; 0]);
}

#[tokio::test(start_paused = true)]
async fn shipped_seed_rule_delays_after_three_bad_windows() {
    let d = shipped_degrader("seed_rule");
    for _ in 0..2 {
        window(&d, "stock", 20, 5, 900).await;
        assert_eq!(diverted(&d, "stock").await, None);
    }
    window(&d, "stock", 20, 5, 900).await;
    assert_mostly_diverted(&d, "stock", Route::DelayedRetry).await;
    // And it holds while the dependency stays bad: with `degrade(1.0)` the next window had no
    // completed call, the rule let go, and the class was readmitted one tick in four.
    for _ in 0..6 {
        window(&d, "stock", 40, 2, 900).await;
        assert_mostly_diverted(&d, "stock", Route::DelayedRetry).await;
    }
}

#[tokio::test(start_paused = true)]
async fn shipped_sla_relative_seed_rule_scales_with_the_sla() {
    let d = shipped_degrader("seed_rule_sla");
    // Gold's SLA is 50 ms: 300 ms p99 is over 4x; the literal 800 ms rule would not fire.
    for _ in 0..3 {
        window(&d, "pay", 20, 5, 300).await;
    }
    assert_eq!(d.state("pay").unwrap(), State::Closed);
    assert_mostly_diverted(&d, "pay", Route::DelayedRetry).await;
    // Bronze's SLA is 1 s: 300 ms is fine.
    for _ in 0..3 {
        window(&d, "log", 20, 5, 300).await;
    }
    assert_eq!(diverted(&d, "log").await, None);
}

#[tokio::test(start_paused = true)]
async fn shipped_gold_policy_retries_then_escalates_to_manual_review() {
    let d = shipped_degrader("gold_guaranteed_retry");
    // The dependency fails every call.
    window(&d, "pay", 30, 1, 10).await;
    assert_eq!(
        routes(&d, "pay", 20).await,
        (20, vec![]),
        "one failing window is not enough"
    );
    window(&d, "pay", 30, 1, 10).await;
    assert_mostly_diverted(&d, "pay", Route::DelayedRetry).await;
    // The 10 % still called keep failing: after 10 failing windows, manual review.
    for _ in 0..8 {
        window(&d, "pay", 30, 1, 10).await;
    }
    assert_mostly_diverted(&d, "pay", Route::ManualReview).await;
    // Recovery: healthy windows end the escalation.
    for _ in 0..2 {
        window(&d, "pay", 30, 0, 10).await;
    }
    assert_eq!(routes(&d, "pay", 20).await, (20, vec![]));
}

#[tokio::test(start_paused = true)]
async fn shipped_silver_policy_merges_a_share_when_the_database_is_slow() {
    let d = shipped_degrader("silver_batch_merge");
    window(&d, "stock", 20, 0, 500).await;
    assert_eq!(diverted(&d, "stock").await, None);
    window(&d, "stock", 20, 0, 500).await;
    let mut merged = 0usize;
    for _ in 0..100 {
        if let Some(r) = diverted(&d, "stock").await {
            assert_eq!(r, (Route::BatchMerge, Reason::Policy));
            merged += 1;
        }
    }
    assert!(merged.abs_diff(70) <= 3, "{merged}");
}

#[tokio::test(start_paused = true)]
async fn shipped_bronze_policy_spools_at_the_first_sign_of_trouble() {
    let d = shipped_degrader("bronze_spool");
    window(&d, "log", 10, 0, 100).await;
    assert_eq!(routes(&d, "log", 20).await, (20, vec![]));
    window(&d, "log", 10, 0, 1_500).await;
    assert_mostly_diverted(&d, "log", Route::Spool).await;
    // Healthy again: nothing spooled.
    window(&d, "log", 10, 0, 100).await;
    assert_eq!(routes(&d, "log", 20).await, (20, vec![]));
}

#[tokio::test(start_paused = true)]
async fn every_example_in_the_policy_docs_loads() {
    let doc = std::fs::read_to_string(format!(
        "{}/../docs/policies.md",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut examples = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```rhai") => current = Some(String::new()),
            (Some(_), "```") => examples.push(current.take().unwrap()),
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(examples.len() >= 4, "found {} examples", examples.len());
    let d = Degrader::builder("docs")
        .env("prod")
        .class(ClassConfig::gold("payment_callback"))
        .class(ClassConfig::silver("inventory"))
        .class(ClassConfig::bronze("browse_log").tag("team", "growth"))
        .build_with_worker()
        .unwrap()
        .0;
    for (i, example) in examples.iter().enumerate() {
        let name = format!("example_{i}");
        d.load_policy_sources([(name.as_str(), example.as_str())])
            .unwrap_or_else(|e| panic!("example {i} of docs/policies.md: {e}\n{example}"));
        d.tick_now();
    }
}

// ===== per-request rules: rollouts, groups, on_request =====

fn http_degrader(service: &str) -> (Degrader, tower_degrade::classify::HttpClassifier) {
    http_degrader_with(service, tower_degrade::policy::Limits::default())
}

fn http_degrader_with(
    service: &str,
    limits: tower_degrade::policy::Limits,
) -> (Degrader, tower_degrade::classify::HttpClassifier) {
    let d = Degrader::builder(service)
        .policy_limits(limits)
        .class(ClassConfig::gold("pay"))
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0;
    let classify = d
        .http_classifier()
        .route(None, "/pay", "pay")
        .unwrap()
        .route(None, "/log", "log")
        .unwrap()
        .request_key("x-user-id")
        .unwrap()
        .group_header("x-group")
        .unwrap()
        .start_header("x-request-start")
        .unwrap()
        .build();
    (d, classify)
}

fn http_ok()
-> impl Service<http::Request<()>, Response = http::Response<String>, Error = std::convert::Infallible>
+ Clone {
    service_fn(|_req: http::Request<()>| async { Ok(http::Response::new(String::from("ok"))) })
}

/// Send one request and return the route it was diverted to, if any.
async fn send<S>(svc: &mut S, req: http::Request<()>) -> Option<Route>
where
    S: Service<
            http::Request<()>,
            Response = http::Response<String>,
            Error = std::convert::Infallible,
        >,
{
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    res.extensions()
        .get::<tower_degrade::Degraded>()
        .map(|d| d.route())
}

#[tokio::test(start_paused = true)]
async fn a_ten_percent_rollout_applies_to_ten_percent_of_keys_always_the_same() {
    let (d, classify) = http_degrader("shop");
    let src = "fn policy() { #{ governs: [\"log\"], rollout: 10 } }\nfn on_tick(ctx) { shed() }";
    d.load_policy_sources([("canary", src)]).unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    let mut shed = Vec::new();
    for round in 0..2 {
        let mut hit = Vec::new();
        for user in 0..10_000 {
            let req = http::Request::post("/log")
                .header("x-user-id", format!("user-{user}"))
                .body(())
                .unwrap();
            if send(&mut svc, req).await.is_some() {
                hit.push(user);
            }
        }
        assert!(
            hit.len().abs_diff(1_000) <= 200,
            "round {round}: {} of 10,000 keys",
            hit.len()
        );
        shed.push(hit);
    }
    assert_eq!(shed[0], shed[1], "the same keys every time");
    // Without a key, a request is never in a partial rollout; other classes are untouched.
    assert_eq!(
        send(&mut svc, http::Request::post("/log").body(()).unwrap()).await,
        None
    );
    let req = http::Request::post("/pay")
        .header("x-user-id", "user-1")
        .body(())
        .unwrap();
    assert_eq!(send(&mut svc, req).await, None);
    // The bucket of a key is pinned (FNV-1a 64 mod 10,000, computed independently): it must not
    // change across processes or versions, or rollouts would move users between slices.
    assert_eq!(tower_degrade::policy::rollout_bucket("user-42"), 7419);
    assert_eq!(
        tower_degrade::policy::rollout_bucket(""),
        (0xcbf2_9ce4_8422_2325u64 % 10_000) as u32
    );
}

#[tokio::test(start_paused = true)]
async fn a_group_rollout_applies_to_its_groups_only() {
    let (d, classify) = http_degrader("shop");
    let src = "fn policy() { #{ governs: [\"*\"], groups: [\"beta\"] } }\nfn on_tick(ctx) { fallback(\"spool\") }";
    d.load_policy_sources([("beta", src)]).unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    let req = |group: Option<&str>| {
        let mut b = http::Request::post("/log");
        if let Some(g) = group {
            b = b.header("x-group", g);
        }
        b.body(()).unwrap()
    };
    assert_eq!(send(&mut svc, req(Some("beta"))).await, Some(Route::Spool));
    assert_eq!(send(&mut svc, req(Some("stable"))).await, None);
    assert_eq!(send(&mut svc, req(None)).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_call_a_request_hook_or_a_rollout_turns_away_is_told_when_to_come_back() {
    // `shed()` from `on_request` answered a 503 with no `Retry-After` (a hostile trial), where
    // the same from `on_tick` said the next tick.
    let (d, classify) = http_degrader("shop");
    let hook = "fn policy() { #{ governs: [\"log\"] } }\n\
                fn on_tick(ctx) { admit() }\n\
                fn on_request(ctx, req) { if req.header(\"x-evil\") == \"shed\" { return shed(); } }";
    let canary =
        "fn policy() { #{ governs: [\"pay\"], groups: [\"beta\"] } }\nfn on_tick(ctx) { shed() }";
    d.load_policy_sources([("hook", hook), ("canary", canary)])
        .unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    let call = |path: &str, evil: bool| {
        let mut b = http::Request::post(path).header("x-group", "beta");
        if evil {
            b = b.header("x-evil", "shed");
        }
        b.body(()).unwrap()
    };
    for (path, evil) in [("/log", true), ("/pay", false)] {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(call(path, evil))
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            http::StatusCode::SERVICE_UNAVAILABLE,
            "{path}"
        );
        assert_eq!(res.headers()["x-degrade-reason"], "shed", "{path}");
        assert_eq!(res.headers()["retry-after"], "1", "{path}");
    }
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(call("/log", false))
        .await
        .unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    assert!(!res.headers().contains_key("retry-after"));
}

fn started_ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (now.as_millis() as u64 - ms).to_string()
}

#[tokio::test(start_paused = true)]
async fn the_seed_elapsed_time_hook_runs_per_request() {
    let (d, classify) = http_degrader("payment");
    d.load_policy_sources([("seed_elapsed", shipped("seed_elapsed").as_str())])
        .unwrap();
    d.tick_now();
    let mut svc = d.layer(classify.clone()).http().layer(http_ok());
    let req = |ago: u64| {
        http::Request::post("/pay")
            .header("x-request-start", started_ago(ago))
            .body(())
            .unwrap()
    };
    assert_eq!(send(&mut svc, req(5_000)).await, Some(Route::ManualReview));
    assert_eq!(send(&mut svc, req(100)).await, None);
    assert_eq!(
        send(&mut svc, http::Request::post("/pay").body(()).unwrap()).await,
        None,
        "no start header"
    );
    // A start time no request has is unknown: in a hostile trial, `x-request-start: 0` sent
    // a client's every call to manual review (56 years "waited").
    let at = |start: String| {
        http::Request::post("/pay")
            .header("x-request-start", start)
            .body(())
            .unwrap()
    };
    assert_eq!(send(&mut svc, at("0".into())).await, None, "1970");
    assert_eq!(send(&mut svc, req(3_601_000)).await, None, "over an hour");
    assert_eq!(
        send(&mut svc, req(3_599_000)).await,
        Some(Route::ManualReview),
        "within an hour"
    );
    // bronze is not governed.
    let late_log = http::Request::post("/log")
        .header("x-request-start", started_ago(5_000))
        .body(())
        .unwrap();
    assert_eq!(send(&mut svc, late_log).await, None);
    // Another service name: the condition is false.
    let (other, classify) = http_degrader("checkout");
    other
        .load_policy_sources([("seed_elapsed", shipped("seed_elapsed").as_str())])
        .unwrap();
    other.tick_now();
    let mut svc = other.layer(classify).http().layer(http_ok());
    assert_eq!(send(&mut svc, req(5_000)).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_request_hook_s_alerts_are_raised_and_its_lines_kept_to_the_log_rate() {
    // An alert from `on_request` was dropped (the call diverted, nothing said), and a shadow
    // hook logged a line for every request.
    let (d, classify) = http_degrader("shop");
    let enforce = r#"
        fn policy() { #{ governs: ["log"], priority: 10 } }
        fn on_tick(ctx) { }
        fn on_request(ctx, req) {
            if req.header("x-alert") != () { return shed().alert("checkout stalled"); }
        }
    "#;
    let shadow = r#"
        fn policy() { #{ governs: ["log"], mode: "shadow" } }
        fn on_tick(ctx) { }
        fn on_request(ctx, req) { shed() }
    "#;
    d.load_policy_sources([("stall", enforce), ("watch", shadow)])
        .unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let local = metrics::set_default_local_recorder(&recorder);
    let (logs, guard) = logs::Logs::capture();
    let alerting = http::Request::post("/log")
        .header("x-alert", "1")
        .body(())
        .unwrap();
    assert_eq!(send(&mut svc, alerting).await, Some(Route::Reject));
    for _ in 0..200 {
        send(&mut svc, http::Request::post("/log").body(()).unwrap()).await;
    }
    drop(guard);
    drop(local);
    let text = logs.text();
    assert!(
        text.contains("policy alert") && text.contains("checkout stalled"),
        "{text}"
    );
    let snap = snapshotter.snapshot().into_vec();
    assert_eq!(counter(&snap, "degrade_policy_alerts_total"), Some(1));
    assert_eq!(
        counter(&snap, "degrade_policy_shadow_decisions_total"),
        Some(201),
        "every shadow decision counted, whatever is logged"
    );
    let shadow_lines = text.matches("shadow policy decision").count();
    assert!(
        (1..=10).contains(&shadow_lines),
        "{shadow_lines} shadow lines for 201 requests"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_hook_is_stopped_at_its_wall_clock_deadline() {
    // The operation budget bounds what a hook does, not how long native work takes: the
    // request path also has a deadline. Here the largest budget allowed, which the loop takes
    // tens of ms to spend on any machine, and a deadline of 5 ms that stops it first.
    let mut limits = tower_degrade::policy::Limits::default();
    limits.max_request_operations = 200_000;
    limits.max_request_time = std::time::Duration::from_millis(5);
    let (d, classify) = http_degrader_with("shop", limits);
    let src = r#"
        fn policy() { #{ governs: ["log"] } }
        fn on_tick(ctx) { }
        fn on_request(ctx, req) {
            if req.header("x-slow") == () { return; }
            let x = 0;
            for i in 0..1000000 { x += 1; }
            shed()
        }
    "#;
    d.load_policy_sources([("slow", src)]).unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    let (logs, guard) = logs::Logs::capture();
    let slow = http::Request::post("/log")
        .header("x-slow", "1")
        .body(())
        .unwrap();
    assert_eq!(send(&mut svc, slow).await, None, "decided without the hook");
    drop(guard);
    let text = logs.text();
    assert!(text.contains("wall-clock deadline"), "{text}");
}

/// A request the `on_request` hooks below fail on when it carries `header`.
fn post_log(header: Option<&str>) -> http::Request<()> {
    let mut req = http::Request::post("/log");
    if let Some(h) = header {
        req = req.header(h, "1");
    }
    req.body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_request_hook_that_fails_cheaply_fails_open_for_that_request_and_is_never_switched_off() {
    let (d, classify) = http_degrader("shop");
    // Fine on the validation samples (no x-boom header), fails on real requests that have it.
    let src = r#"
        fn policy() { #{ governs: ["log"] } }
        fn on_tick(ctx) { }
        fn on_request(ctx, req) {
            if req.header("x-boom") != () { let x = 1 / 0; }
            shed()
        }
    "#;
    d.load_policy_sources([("boom", src)]).unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    assert_eq!(send(&mut svc, post_log(None)).await, Some(Route::Reject));
    assert_eq!(
        send(&mut svc, post_log(Some("x-boom"))).await,
        None,
        "the failing call admits"
    );
    assert_eq!(
        send(&mut svc, post_log(None)).await,
        Some(Route::Reject),
        "one failing request does not switch the hook off"
    );
    d.tick_now();
    // One client's odd requests, every request of a tick: each fails open and is counted,
    // and the rule still holds for everyone else after the tick (had the hook been switched
    // off, the client would have lifted the rule for all).
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let local = metrics::set_default_local_recorder(&recorder);
    for _ in 0..30 {
        assert_eq!(send(&mut svc, post_log(Some("x-boom"))).await, None);
    }
    drop(local);
    let snap = snapshotter.snapshot().into_vec();
    assert_eq!(counter(&snap, "degrade_policy_errors_total"), Some(30));
    for _ in 0..3 {
        d.tick_now();
        assert_eq!(
            send(&mut svc, post_log(None)).await,
            Some(Route::Reject),
            "cheap failures never switch the hook off"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_s_oversized_header_does_not_switch_a_request_hook_off() {
    let (d, classify) = http_degrader("shop");
    // A fixed-cost hook: one header read, one comparison. A 5,000-byte header read whole was
    // "data too large" (over `max_string_size`, 4 KiB), which counts as running out of the
    // budget: 30 such calls in a tick switched the hook off, and the abuser was let in.
    let src = r#"
        fn policy() { #{ governs: ["log"] } }
        fn on_tick(ctx) { }
        fn on_request(ctx, req) {
            let t = req.header("x-tenant");
            if t == "abuser" { return shed(); }
        }
    "#;
    d.load_policy_sources([("block_abuser", src)]).unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    let tenant = |v: &str| {
        http::Request::post("/log")
            .header("x-tenant", v)
            .body(())
            .unwrap()
    };
    let long = "x".repeat(5_000);
    assert_eq!(send(&mut svc, tenant("abuser")).await, Some(Route::Reject));
    let (logs, guard) = logs::Logs::capture();
    for _ in 0..30 {
        // Read cut to the scripts' 4 KiB: served, not failed.
        assert_eq!(send(&mut svc, tenant(&long)).await, None);
    }
    d.tick_now();
    drop(guard);
    let text = logs.text();
    assert!(!text.contains("switched off"), "{text}");
    assert!(d.policies().unwrap().hooks_off().is_empty());
    assert_eq!(
        send(&mut svc, tenant("abuser")).await,
        Some(Route::Reject),
        "the rule still holds"
    );
}

/// Ticks from the one that switched the hook off (`since_off` ticks ago) until `svc` sheds
/// an ordinary request of `log` again: the hook on again.
async fn ticks_until_on<S>(d: &Degrader, svc: &mut S, since_off: u32) -> u32
where
    S: Service<
            http::Request<()>,
            Response = http::Response<String>,
            Error = std::convert::Infallible,
        >,
{
    let mut ticks = since_off;
    while send(svc, post_log(None)).await.is_none() {
        d.tick_now();
        ticks += 1;
        assert!(ticks <= 1_000, "never on again");
    }
    ticks
}

#[tokio::test(start_paused = true)]
async fn a_request_hook_that_runs_out_of_its_budget_on_most_requests_is_switched_off() {
    let (d, classify) = http_degrader("shop");
    // Within the validation samples' budget (no x-loop header); past the 5,000 operations of
    // `max_request_operations` on real requests that have it.
    let src = r#"
        fn policy() { #{ governs: ["log"] } }
        fn on_tick(ctx) { }
        fn on_request(ctx, req) {
            if req.header("x-loop") != () {
                let x = 0;
                for i in 0..1000000 { x += 1; }
            }
            shed()
        }
    "#;
    d.load_policy_sources([("spin", src)]).unwrap();
    d.tick_now();
    let mut svc = d.layer(classify).http().layer(http_ok());
    // A few in a tick: each fails open, and the hook stays on.
    for _ in 0..5 {
        assert_eq!(send(&mut svc, post_log(Some("x-loop"))).await, None);
    }
    d.tick_now();
    assert_eq!(send(&mut svc, post_log(None)).await, Some(Route::Reject));
    d.tick_now();
    // Most of a tick's requests each cost the whole budget: off, with a logged reason.
    let (logs, guard) = logs::Logs::capture();
    for _ in 0..30 {
        assert_eq!(send(&mut svc, post_log(Some("x-loop"))).await, None);
    }
    send(&mut svc, post_log(None)).await;
    d.tick_now();
    drop(guard);
    let text = logs.text();
    assert!(
        text.contains("ran out of its budget on most requests") && text.contains("exhausted=30"),
        "{text}"
    );
    assert_eq!(
        send(&mut svc, post_log(None)).await,
        None,
        "off after that tick"
    );
    d.tick_now();
    assert_eq!(
        send(&mut svc, post_log(None)).await,
        None,
        "still off after a tick"
    );
    // On again after its time off, 120 ticks (a minute at 500 ms): off for good, one tick's
    // burst from one client lifted the rule for everyone until someone reloaded.
    assert_eq!(ticks_until_on(&d, &mut svc, 1).await, 120);
    // Off again: twice as long.
    for _ in 0..30 {
        assert_eq!(send(&mut svc, post_log(Some("x-loop"))).await, None);
    }
    d.tick_now();
    assert_eq!(ticks_until_on(&d, &mut svc, 0).await, 240);
    for _ in 0..30 {
        send(&mut svc, post_log(Some("x-loop"))).await;
    }
    d.tick_now();
    assert_eq!(send(&mut svc, post_log(None)).await, None, "off");
    d.load_policy_sources([("spin", src)]).unwrap();
    d.tick_now();
    assert_eq!(
        send(&mut svc, post_log(None)).await,
        Some(Route::Reject),
        "on again after a load"
    );
}

#[tokio::test(start_paused = true)]
async fn delay_holds_calls_and_the_timeout_starts_after_it() {
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    let d = Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .class(ClassConfig::bronze("log").timeout(Duration::from_millis(100)))
        .class(ClassConfig::gold("pay"))
        .build_with_worker()
        .unwrap()
        .0;
    d.load_policy_sources([("pace", policy("\"log\"", "delay(200)").as_str())])
        .unwrap();
    d.tick_now();
    let started = Arc::new(Mutex::new(Vec::new()));
    let svc = |class: &str| {
        let started = started.clone();
        d.layer(d.class_id(class).unwrap())
            .layer(service_fn(move |work_ms: u64| {
                let started = started.clone();
                // The work starts when the future is first polled.
                async move {
                    started.lock().unwrap().push(Instant::now());
                    tokio::time::sleep(Duration::from_millis(work_ms)).await;
                    Ok::<_, BoxError>(())
                }
            }))
    };
    let t0 = Instant::now();
    svc("log").oneshot(50).await.unwrap();
    assert_eq!(
        started.lock().unwrap()[0] - t0,
        Duration::from_millis(200),
        "held 200 ms"
    );
    assert_eq!(t0.elapsed(), Duration::from_millis(250));
    // 150 ms of work against the 100 ms timeout, which starts after the delay.
    let t1 = Instant::now();
    let err = svc("log").oneshot(150).await.unwrap_err();
    assert_eq!(degraded(&*err).unwrap().reason(), Reason::Timeout);
    assert_eq!(t1.elapsed(), Duration::from_millis(300));
    d.tick_now();
    let w = *d.history("log").unwrap().latest().unwrap();
    // Latency is the service's, not the policy's delay; the delay is the class's queueing delay.
    assert_eq!(
        (w.successes, w.timeouts, w.max),
        (1, 1, Duration::from_millis(100))
    );
    assert_eq!(w.queue_delay, Duration::from_millis(200));
    // Other classes are not held.
    let t2 = Instant::now();
    svc("pay").oneshot(0).await.unwrap();
    assert_eq!(t2.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn absurd_values_are_refused_at_load_naming_the_line() {
    let (d, _) = http_degrader("shop");
    for (body, what) in [
        ("delay(1000000000000)", "delay"),
        ("shed().retry_after(4294967294)", "retry_after"),
        ("retry_after(-5)", "retry_after"),
    ] {
        let src = policy("\"log\"", body);
        let err = d
            .load_policy_sources([("absurd", src.as_str())])
            .unwrap_err();
        assert_eq!(err.line(), Some(3), "{body}: {err}");
        assert!(err.to_string().contains(what), "{body}: {err}");
    }
    // At the maxima: accepted.
    let ok = policy("\"log\"", "delay(60000).retry_after(3600000)");
    d.load_policy_sources([("edge", ok.as_str())]).unwrap();
}

#[tokio::test(start_paused = true)]
async fn alerts_neither_pile_up_nor_forge_log_lines() {
    // Deadlines out of the way (4,000 calls take tens of milliseconds in a debug build on a
    // busy machine): what is shown is that the chain copies no text and keeps 8 alerts.
    let mut limits = tower_degrade::policy::Limits::default();
    limits.max_call_time = Duration::from_secs(60);
    limits.max_tick_time = Duration::from_secs(60);
    let d = Degrader::builder("shop")
        .policy_limits(limits)
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0;
    let src = policy(
        "\"log\"",
        r#"let m = "x"; for i in 0..12 { m += m; }
        let d = admit();
        for i in 0..4000 { d = d.alert(m); }
        d.alert("forged\n\u001b[31mline")"#,
    );
    let started = std::time::Instant::now();
    d.load_policy_sources([("noisy", src.as_str())]).unwrap();
    d.tick_now();
    // Once 19 s to validate and 20 s a tick; now a few tens of milliseconds.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(d.state("log").is_ok(), "the tick completes");
}

#[tokio::test(start_paused = true)]
async fn top_level_code_a_bom_and_oversized_files_are_handled_at_load() {
    let (d, _) = http_degrader("shop");
    // Top-level code would never run: an error naming its line.
    let src = format!("let x = 1;\n{}", policy("\"log\"", "shed()"));
    let err = d.load_policy_sources([("top", src.as_str())]).unwrap_err();
    assert_eq!(err.line(), Some(1), "{err}");
    assert!(err.reason().contains("outside a function"), "{err}");
    // An import is said to be unavailable, not to be code that never runs.
    let src = format!("import \"os\" as os;\n{}", policy("\"log\"", "shed()"));
    let err = d.load_policy_sources([("imp", src.as_str())]).unwrap_err();
    assert_eq!(err.line(), Some(1), "{err}");
    assert!(err.reason().contains("`import` is not available"), "{err}");
    // A byte-order mark is not an error.
    let bom = format!("\u{feff}{}", policy("\"log\"", "shed()"));
    d.load_policy_sources([("bom", bom.as_str())]).unwrap();
    // Too large: refused before it is parsed, and before it is read from a directory.
    let huge = format!(
        "{}//{}",
        policy("\"log\"", "shed()"),
        "x".repeat(300 * 1024)
    );
    let err = d
        .load_policy_sources([("huge", huge.as_str())])
        .unwrap_err();
    assert!(err.reason().contains("over the limit"), "{err}");
    let dir = std::env::temp_dir().join(format!("td-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("huge.rhai"), &huge).unwrap();
    let err = d.load_policies(&dir).unwrap_err();
    assert!(err.file().ends_with("huge.rhai"), "{err}");
    assert!(err.reason().contains("over the limit"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    // The limit is 64 KiB (it was 256 KiB: Rhai's parser is quadratic in a function's
    // parameters, and a file of one function's parameters took 20 s to validate).
    let sized = |bytes: usize| {
        let head = policy("\"log\"", "shed()");
        format!("{head}//{}", "x".repeat(bytes - head.len() - 2))
    };
    let limit = tower_degrade::policy::MAX_SOURCE_BYTES;
    assert_eq!(limit, 64 * 1024);
    d.load_policy_sources([("just", sized(limit).as_str())])
        .unwrap();
    let err = d
        .load_policy_sources([("over", sized(limit + 1).as_str())])
        .unwrap_err();
    assert!(err.reason().contains("over the limit"), "{err}");
    // A set, all its files together, is at most 1 MiB: sixteen files at the limit load, a
    // seventeenth is refused, named, from sources and from a directory (read no further).
    let set_limit = tower_degrade::policy::MAX_SET_BYTES;
    assert_eq!(set_limit, 16 * limit);
    let names: Vec<String> = (0..17).map(|i| format!("p{i:02}")).collect();
    let full = sized(limit);
    let sources = |n: usize| names[..n].iter().map(|name| (name.as_str(), full.as_str()));
    d.load_policy_sources(sources(16)).unwrap();
    let err = d.load_policy_sources(sources(17)).unwrap_err();
    assert_eq!(err.file(), "p16.rhai", "{err}");
    assert!(
        err.reason().contains(&format!(
            "{} bytes, over the limit of {set_limit}",
            17 * limit
        )),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("td-set-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in &names {
        std::fs::write(dir.join(format!("{name}.rhai")), &full).unwrap();
    }
    let err = d.load_policies(&dir).unwrap_err();
    assert!(err.file().ends_with("p16.rhai"), "{err}");
    assert!(
        err.reason().contains("for all of a set's files together"),
        "{err}"
    );
    std::fs::remove_file(dir.join("p16.rhai")).unwrap();
    d.load_policies(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn reload_follows_a_configmap_update_and_a_recreated_directory() {
    use std::os::unix::fs::symlink;
    use tower_degrade::policy::ReloadOutcome;

    // A mounted ConfigMap: the files are symlinks through `..data`, itself a symlink to the
    // current version's directory; an update swaps `..data` atomically.
    let dir = temp_dir("configmap");
    std::fs::create_dir(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/log.rhai"), policy("\"log\"", "shed()")).unwrap();
    symlink("..v1", dir.join("..data")).unwrap();
    symlink("..data/log.rhai", dir.join("log.rhai")).unwrap();
    let (_d, watcher, mut outcomes) = watching(&dir, Duration::from_millis(50));

    std::fs::create_dir(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/log.rhai"), policy("\"log\"", "admit()")).unwrap();
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    assert_eq!(next_reload(&mut outcomes).await, ReloadOutcome::Loaded(2));

    // The directory removed and created again (its watch is gone): the rescan finds it.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("log.rhai"), policy("\"log\"", "shed()")).unwrap();
    assert_eq!(next_reload(&mut outcomes).await, ReloadOutcome::Loaded(3));
    drop(watcher);
    std::fs::remove_dir_all(&dir).unwrap();
}
