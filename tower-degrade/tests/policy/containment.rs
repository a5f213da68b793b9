//! Containment: hostile policies are rejected or quarantined, the process stays up and the
//! tick keeps its period. One test per shape that once aborted the host or stalled the tick.
//!
//! Hostile work is gated on `ctx.requests == 7`, a window validation's samples never show:
//! such a policy passes validation and does its damage on the first tick with 7 calls, on the
//! control loop's thread, on the stack grown for the tick.

use std::time::{Duration, Instant};

use tower_degrade::policy::{Limits, Overlap};

use super::*;

/// `depth` nested parentheses around `inner`.
fn nest(depth: usize, inner: &str) -> String {
    (0..depth).fold(inner.to_owned(), |s, _| format!("(1 + {s})"))
}

/// The deepest nesting of `shape(depth)` a load accepts (the engine's expression limit).
fn deepest(shape: impl Fn(usize) -> String) -> usize {
    let d = degrader();
    (1..200)
        .take_while(|&n| {
            d.load_policy_sources([("probe", shape(n).as_str())])
                .is_ok()
        })
        .last()
        .expect("some depth loads")
}

/// A policy whose helper `g` recurses through `depth` nested parentheses.
fn parens(depth: usize) -> String {
    format!(
        "{}\nfn g(n) {{ if n <= 0 {{ return 0; }} let r = {}; r }}",
        policy("\"log\"", "if ctx.requests == 7 { g(14); } shed()"),
        nest(depth, "g(n - 1)")
    )
}

/// Run `test` on a thread with a runtime worker's 2 MiB of stack (whatever thread the test
/// harness gives), on a paused single-threaded runtime.
fn on_worker_stack<F, T>(test: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    on_thread_with_stack(2 * 1024 * 1024, test)
}

/// `test` on a thread of its own with `stack` bytes of stack, on a paused single-threaded
/// runtime: what a hook does on a thread with less stack than the test harness gives.
fn on_thread_with_stack<F, T>(stack: usize, test: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap()
                .block_on(test())
        })
        .unwrap()
        .join()
        .unwrap()
}

/// A degrader with a `log` class whose policy runs `body` once the window shows 7 calls.
fn trapped(name: &str, helpers: &str, body: &str) -> Degrader {
    trapped_with(Limits::default(), name, helpers, body)
}

/// Limits whose deadlines never stop a script here: what keeps the host alive is the stack.
fn patient() -> Limits {
    let mut limits = Limits::default();
    limits.max_call_time = Duration::from_secs(60);
    limits.max_tick_time = Duration::from_secs(60);
    limits.max_request_time = Duration::from_secs(60);
    limits
}

/// A degrader with one class, `log`, and these policy limits.
fn log_degrader(limits: Limits) -> Degrader {
    Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .policy_limits(limits)
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0
}

fn trapped_with(limits: Limits, name: &str, helpers: &str, body: &str) -> Degrader {
    let d = log_degrader(limits);
    let src = format!(
        "fn policy() {{ #{{ governs: [\"log\"] }} }}\n{helpers}\nfn on_tick(ctx) {{\n if ctx.requests == 7 {{ {body} }}\n shed()\n}}\n"
    );
    d.load_policy_sources([(name, src.as_str())])
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    d
}

/// Spring the trap: 7 calls (shed by the policy), then the tick that runs the hostile code.
/// Returns how long that tick took.
async fn spring(d: &Degrader) -> Duration {
    d.tick_now();
    assert_eq!(admitted(d, "log", 7).await, 0, "the policy sheds");
    let start = Instant::now();
    d.tick_now();
    start.elapsed()
}

/// After the trap: the policy is out of the way (quarantined or skipped), the breaker decides.
async fn breaker_decides(d: &Degrader) {
    assert_eq!(
        admitted(d, "log", 5).await,
        5,
        "the breaker (closed) decides"
    );
}

#[test]
fn recursion_through_nested_expressions_runs_on_a_stack_that_holds_it() {
    on_worker_stack(recursion_through_nested_expressions);
}

async fn recursion_through_nested_expressions() {
    // The deepest expression the limits allow inside a function recursing to the deepest call
    // level: the shape that took 3.5 MiB of stack in a debug build, on a 2 MiB runtime worker.
    let depth = deepest(parens);
    let d = trapped_with(patient(), "parens", "", "");
    d.load_policy_sources([("parens", parens(depth).as_str())])
        .unwrap();
    spring(&d).await;
    // It ran to the end: within every limit, so the policy still sheds.
    assert_eq!(admitted(&d, "log", 3).await, 0);
    // One level deeper is refused at load, with the line.
    let err = load_err(&d, "deeper", &parens(depth + 1));
    assert!(err.starts_with("deeper.rhai:6:"), "{err}");
    assert!(err.contains("maximum complexity"), "{err}");
}

#[test]
fn data_nested_a_thousand_deep_is_printed_and_compared_without_overflow() {
    on_worker_stack(data_nested_a_thousand_deep);
}

async fn data_nested_a_thousand_deep() {
    for (name, op) in [
        ("printed", "let s = a.to_string(); s.len()"),
        ("compared", "let same = a == a; same"),
    ] {
        // With deadlines out of the way, the array is built and printing or comparing it
        // recurses 1,020 deep: 8 to 16 MiB of stack in a debug build, on this 2 MiB thread.
        let d = trapped_with(
            patient(),
            name,
            &format!("fn deep() {{ let a = []; for i in 0..1020 {{ a = [a]; }} {op} }}"),
            "deep(); return fallback(\"spool\");",
        );
        spring(&d).await;
        assert_eq!(
            diverted(&d, "log").await,
            Some((Route::Spool, Reason::Policy)),
            "{name}: it ran to the end"
        );
    }
}

#[test]
fn deeply_nested_call_arguments_are_contained() {
    on_worker_stack(deeply_nested_call_arguments);
}

async fn deeply_nested_call_arguments() {
    let args = |depth: usize| {
        let call = (0..depth).fold("1".to_owned(), |s, _| format!("f({s})"));
        format!(
            "{}\nfn f(x) {{ x }}",
            policy(
                "\"log\"",
                &format!("if ctx.requests == 7 {{ {call}; }} shed()")
            )
        )
    };
    let depth = deepest(args);
    let d = degrader();
    d.load_policy_sources([("args", args(depth).as_str())])
        .unwrap();
    spring(&d).await;
    assert_eq!(admitted(&d, "log", 3).await, 0, "within the limits: it ran");
    let err = load_err(&d, "deeper", &args(depth + 1));
    assert!(err.contains("maximum complexity"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_reload_validates_deep_policies_off_the_runtime() {
    let dir = temp_dir("deep-reload");
    let src = parens(deepest(parens)).replace("if ctx.requests == 7 { g(14); }", "g(14);");
    std::fs::write(dir.join("a.rhai"), policy("\"log\"", "()")).unwrap();
    let d = degrader();
    let watcher = d
        .reload_policies_on_demand(&dir, Duration::from_millis(1))
        .unwrap();
    let mut outcomes = watcher.subscribe();
    outcomes.borrow_and_update();
    std::fs::write(dir.join("a.rhai"), &src).unwrap();
    watcher.reload_now();
    outcomes.changed().await.unwrap();
    let outcome = outcomes.borrow_and_update().clone();
    assert_eq!(outcome, tower_degrade::policy::ReloadOutcome::Loaded(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_on_request_hook_gets_the_stack_it_needs_on_any_thread() {
    // A hook that nests data as deep as a request hook may (arrays of 128 elements) and prints
    // it, on a thread with a quarter of a runtime worker's stack.
    let src = r#"
fn policy() { #{ governs: ["log"] } }
fn on_tick(ctx) { }
fn on_request(ctx, req) {
    let a = [];
    for i in 0..120 { a = [a]; }
    let s = a.to_string();
    if a == a { shed() }
}
"#;
    let admitted_calls = on_thread_with_stack(512 * 1024, move || async move {
        // Its deadline (10 ms) is not what this is about: a debug build under a busy test
        // run took longer and admitted the calls.
        let d = log_degrader(patient());
        d.load_policy_sources([("deep_hook", src)]).unwrap();
        d.tick_now();
        admitted(&d, "log", 3).await
    });
    assert_eq!(admitted_calls, 0, "the hook ran and shed every call");
}

#[test]
fn a_thrown_value_is_said_by_its_type_and_never_formatted() {
    // Formatting an array of closures formats what each captured, which no size limit
    // counts: thrown at the host, six levels of 100 closures made 10^12 elements to print,
    // outside every deadline, and the tick never ended (at 20 levels of 1,000, the process
    // aborted on memory). It is said by its type; a string is cut.
    on_worker_stack(|| async {
        let d = trapped(
            "thrower",
            "",
            "let a = []; for i in 0..6 { let b = a; let f = || b; a = []; a.pad(100, f); } throw a;",
        );
        d.tick_now();
        assert_eq!(admitted(&d, "log", 7).await, 0, "the policy sheds");
        let out = logs(|| d.tick_now());
        assert!(
            out.contains("reason=\"Runtime error: a value of type array\""),
            "{out}"
        );
        assert_eq!(d.policies().unwrap().quarantined().len(), 1);
        breaker_decides(&d).await;
        let d = trapped("shouter", "", "let s = \"x\"; s.pad(4000, \"y\"); throw s;");
        d.tick_now();
        assert_eq!(admitted(&d, "log", 7).await, 0);
        let out = logs(|| d.tick_now());
        let line = out.lines().find(|l| l.contains("policy failed")).unwrap();
        assert!(line.contains("reason=\"Runtime error: xyyy"), "{line}");
        assert!(
            line.len() < 1_000,
            "the thrown string is cut: {} bytes",
            line.len()
        );
    });
}

#[test]
fn a_policy_throwing_closures_at_load_is_refused_at_once() {
    // The same value thrown by `policy()` hung the load (and every reload) while it was
    // formatted.
    let src = "fn policy() {\n let a = [];\n for i in 0..6 { let b = a; let f = || b; a = []; a.pad(100, f); }\n throw a;\n}\nfn on_tick(ctx) { }\n";
    let err = degrader()
        .load_policy_sources([("bomb", src)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bomb.rhai:4") && err.contains("Runtime error: a value of type array"),
        "{err}"
    );
}

#[test]
fn an_on_request_hook_throwing_a_chain_of_closures_is_contained() {
    // A chain of closures each capturing the last is as deep as the operation budget lets a
    // script make it, and no size limit counts it: thrown from a hook, formatting it outran
    // the stack (or took 50 ms a request and 30 MB of log), and dropping it recurses a
    // level per closure, on the stack the hook is given.
    let mut limits = patient();
    limits.max_request_operations = 200_000;
    let src = r#"
fn policy() { #{ governs: ["log"] } }
fn on_tick(ctx) { }
fn on_request(ctx, req) {
    if ctx.requests == 7 {
        let a = 0;
        for i in 0..20000 { let b = a; a = || b; }
        throw [a];
    }
    shed()
}
"#;
    let admitted_calls = on_worker_stack(move || async move {
        let d = log_degrader(limits);
        d.load_policy_sources([("chain", src)]).unwrap();
        d.tick_now();
        assert_eq!(admitted(&d, "log", 7).await, 0, "the hook sheds");
        d.tick_now();
        admitted(&d, "log", 2).await
    });
    assert_eq!(
        admitted_calls, 2,
        "the hook failed and the calls were decided without it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deadline_a_native_function_swallows_still_counts() {
    // An array's `sort` drops its comparator's errors, the deadline's among them: a policy
    // sorting with a slow comparator came back on time as far as the engine said, past its
    // deadline at every tick, with no warning and no quarantine.
    let mut limits = Limits::default();
    limits.max_call_time = Duration::from_millis(50);
    let d = trapped_with(
        limits,
        "sorter",
        "",
        "let a = []; a.pad(1000, 1); a.sort(|x, y| { let z = 0; for i in 0..1000 { z += 1; } 0 });",
    );
    d.tick_now();
    assert_eq!(admitted(&d, "log", 7).await, 0);
    let out = logs(|| d.tick_now());
    assert!(out.contains("wall-clock deadline"), "{out}");
}

#[test]
fn an_operation_budget_over_two_million_is_refused() {
    let mut on_tick = Limits::default();
    on_tick.max_operations = 2_000_001;
    let mut on_request = Limits::default();
    on_request.max_request_operations = 200_001;
    for (limits, field) in [
        (on_tick, "policy.max_operations"),
        (on_request, "policy.max_request_operations"),
    ] {
        let err = Degrader::builder("shop")
            .policy_limits(limits)
            .class(ClassConfig::bronze("log"))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn print_is_rate_limited() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let d = trapped(
        "chatty",
        "",
        r#"let m = "x"; for i in 0..12 { m += m; } for i in 0..12000 { print(m); }"#,
    );
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    d.tick_now();
    assert_eq!(admitted(&d, "log", 7).await, 0);
    metrics::with_local_recorder(&recorder, || d.tick_now());
    let dropped = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(k, _, _, _)| k.key().name() == "degrade_policy_log_dropped_total")
        .map(|(_, _, _, v)| v);
    // 12,000 lines asked for, at most 10 a second written (the tick may have been stopped at
    // its deadline before printing them all).
    match dropped {
        Some(DebugValue::Counter(n)) => assert!(n > 100, "{n} dropped"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_that_copies_without_end_is_stopped_at_its_deadline_and_then_quarantined() {
    // Each `[a]` copies all of `a`: quadratic work in few operations, which only the
    // wall-clock deadline bounds. Three late calls in a row quarantine it.
    let d = trapped(
        "copier",
        "",
        "let a = []; for i in 0..1020 { a = [a]; } let b = []; for i in 0..1020 { b = [b]; }",
    );
    let took = spring(&d).await;
    let limits = Limits::default();
    assert!(
        took < limits.max_tick_time + Duration::from_millis(300),
        "the tick took {took:?}"
    );
    breaker_decides(&d).await;
}

#[tokio::test(start_paused = true)]
async fn a_late_call_is_skipped_and_only_the_third_in_a_row_quarantines() {
    // A call stopped at its deadline may be the machine's fault (a descheduled thread): that
    // tick goes to the breaker, and the policy is quarantined only when it happens three times
    // in a row. (When a reason's words changed, every late call quarantined at once.)
    let d = trapped(
        "copier",
        "",
        "let a = []; for i in 0..1020 { a = [a]; } let b = []; for i in 0..1020 { b = [b]; }",
    );
    spring(&d).await;
    for late in 2..=3 {
        assert!(
            d.policies().unwrap().quarantined().is_empty(),
            "quarantined after {} late calls",
            late - 1
        );
        // That tick was the breaker's: the next 7 calls are admitted, and spring the trap.
        assert_eq!(admitted(&d, "log", 7).await, 7);
        d.tick_now();
    }
    let set = d.policies().unwrap();
    assert_eq!(set.quarantined().len(), 1, "{:?}", set.quarantined());
    breaker_decides(&d).await;
}

#[tokio::test(start_paused = true)]
async fn policies_over_the_tick_budget_are_skipped_and_their_classes_get_the_breaker() {
    // Ten policies, each inside its own operation budget; together over a (tiny) tick budget.
    let mut limits = patient();
    limits.max_tick_time = Duration::from_millis(1);
    let d = log_degrader(limits);
    let sources: Vec<(String, String)> = (0..10)
        .map(|i| {
            let src = format!(
                "fn policy() {{ #{{ governs: [\"log\"], priority: {i} }} }}\nfn on_tick(ctx) {{ let x = 0; for i in 0..15000 {{ x += 1; }} shed() }}"
            );
            (format!("busy{i}"), src)
        })
        .collect();
    d.load_policy_sources(sources.iter().map(|(n, s)| (n.as_str(), s.as_str())))
        .unwrap();
    d.tick_now();
    let set = d.policies().unwrap();
    assert!(set.skipped() >= 9, "{} skipped", set.skipped());
}

#[tokio::test(start_paused = true)]
async fn a_policy_skipped_for_the_budget_keeps_its_last_decision() {
    // `pay`'s policy turns slow (over the whole tick's budget) once its class has 7 calls in
    // a window; `log`'s sheds. A skipped `log` policy gave its class the breaker's directive:
    // the shed was lifted while the loop was under strain.
    let mut limits = patient();
    limits.max_tick_time = Duration::from_millis(1);
    let d = Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .policy_limits(limits)
        .class(ClassConfig::gold("pay"))
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0;
    let slow = "fn policy() { #{ governs: [\"pay\"] } }\nfn on_tick(ctx) {\n if ctx.requests == 7 { let x = 0; for i in 0..15000 { x += 1; } }\n ()\n}";
    let shed = policy("\"log\"", "shed()");
    d.load_policy_sources([("slow", slow), ("shed", shed.as_str())])
        .unwrap();
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let tick = || metrics::with_local_recorder(&recorder, || d.tick_now());
    tick(); // `pay` first, quick: `log` sheds
    assert_eq!(admitted(&d, "log", 7).await, 0);
    for _ in 0..2 {
        // Each tick starts one class further on: `log` first, then `pay` first (slow).
        assert_eq!(admitted(&d, "pay", 7).await, 7);
        tick();
        assert_eq!(admitted(&d, "log", 7).await, 0, "the shed holds");
    }
    // `shed` itself was skipped (not only `slow`): its held decision is what shed.
    let skipped = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(k, _, _, v)| {
            let key = k.key();
            (key.name() == "degrade_policy_skipped_total"
                && key
                    .labels()
                    .any(|l| l.key() == "policy" && l.value() == "shed"))
            .then_some(v)
        });
    assert_eq!(
        skipped,
        Some(metrics_util::debugging::DebugValue::Counter(1)),
        "shed skipped once"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_control_loop_ticks_while_a_reload_validates() {
    // Twenty policies whose validation takes a while (each run near its operation budget).
    let dir = temp_dir("slow-validation");
    let body = "let x = 0; for i in 0..12000 { x += 1; } ()";
    std::fs::write(dir.join("p00.rhai"), policy("\"log\"", "()")).unwrap();
    let d = Degrader::builder("shop")
        .tick(Duration::from_millis(20))
        .policy_limits(patient())
        .class(ClassConfig::bronze("log"))
        .build()
        .unwrap();
    let watcher = d
        .reload_policies_on_demand(&dir, Duration::from_millis(1))
        .unwrap();
    for i in 0..20 {
        let src = format!(
            "fn policy() {{ #{{ governs: [\"log\"], priority: {i} }} }}\nfn on_tick(ctx) {{ {body} }}"
        );
        std::fs::write(dir.join(format!("p{i:02}.rhai")), src).unwrap();
    }
    let mut outcomes = watcher.subscribe();
    outcomes.borrow_and_update();
    let before = d.status().tick;
    let started = Instant::now();
    watcher.reload_now();
    outcomes.changed().await.unwrap();
    let took = started.elapsed();
    let ticks = d.status().tick - before;
    assert!(
        matches!(
            *outcomes.borrow(),
            tower_degrade::policy::ReloadOutcome::Loaded(_)
        ),
        "{:?}",
        *outcomes.borrow()
    );
    // On this single-threaded runtime, a validation on the worker would have stopped the loop.
    let expected = (took.as_millis() / 20 / 3) as u64;
    assert!(
        ticks >= expected.max(1),
        "{ticks} ticks while the reload took {took:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What the degrader logs while `f` runs on this thread.
pub(crate) fn logs(f: impl FnOnce()) -> String {
    let (logs, guard) = crate::logs::Logs::capture();
    f();
    drop(guard);
    logs.text()
}

#[tokio::test(start_paused = true)]
async fn a_run_time_budget_error_names_its_line() {
    let d = trapped("spin", "", "loop { }");
    d.tick_now();
    assert_eq!(admitted(&d, "log", 7).await, 0);
    let out = logs(|| d.tick_now());
    // The loop is on line 4 (or Rhai gives no position and the hook's line, 3, stands in).
    assert!(
        out.contains("spin.rhai:4") || out.contains("spin.rhai:3"),
        "{out}"
    );
    assert!(out.contains("operation budget exceeded"), "{out}");
    breaker_decides(&d).await;
}

#[tokio::test(start_paused = true)]
async fn two_files_governing_a_class_at_one_priority_are_named() {
    let good = policy("\"log\"", "shed()");
    let d = degrader();
    d.load_policy_sources([("good", good.as_str()), ("good.old", good.as_str())])
        .unwrap();
    let set = d.policies().unwrap();
    let warnings = set.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("good.rhai") && warnings[0].contains("good.old.rhai"),
        "{warnings:?}"
    );
    // Layered on purpose (another priority, or a shadow copy): no warning.
    let layered = "fn policy() { #{ governs: [\"log\"], priority: 5 } }\nfn on_tick(ctx) { }";
    let shadow = "fn policy() { #{ governs: [\"log\"], mode: \"shadow\" } }\nfn on_tick(ctx) { }";
    d.load_policy_sources([
        ("good", good.as_str()),
        ("layered", layered),
        ("shadow", shadow),
    ])
    .unwrap();
    assert!(d.policies().unwrap().warnings().is_empty());
    // By setting, an error naming both.
    let strict = Degrader::builder("shop")
        .policy_overlap(Overlap::Error)
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0;
    let err = strict
        .load_policy_sources([("good", good.as_str()), ("good.old", good.as_str())])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("good.rhai") && err.contains("good.old.rhai"),
        "{err}"
    );
}

#[cfg(unix)]
#[tokio::test(start_paused = true)]
async fn a_file_that_is_not_a_policy_is_refused_without_quoting_it() {
    let dir = temp_dir("not-a-policy");
    let secret = dir.join("secret.txt");
    std::fs::write(
        &secret,
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("passwd.rhai")).unwrap();
    let d = degrader();
    let err = d.load_policies(&dir).unwrap_err().to_string();
    assert!(err.contains("not a policy"), "{err}");
    for word in ["root", "daemon", "bash", "nologin"] {
        assert!(!err.contains(word), "quotes `{word}`: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_fifty_megabyte_file_is_refused_before_it_is_read() {
    let dir = temp_dir("fifty-mb");
    // Sparse: 50 MB on paper, nothing on disk.
    let f = std::fs::File::create(dir.join("big.rhai")).unwrap();
    f.set_len(50 * 1024 * 1024).unwrap();
    let d = degrader();
    let err = d.load_policies(&dir).unwrap_err();
    assert!(err.reason().contains("over the limit"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn reload_follows_an_edit_to_a_symlinked_files_target() {
    let dir = temp_dir("symlinked-target");
    let elsewhere = temp_dir("symlinked-target-source");
    std::fs::write(elsewhere.join("log.rhai"), policy("\"log\"", "shed()")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("log.rhai"), dir.join("log.rhai")).unwrap();
    let (_d, _watcher, mut outcomes) = watching(&dir, Duration::from_millis(20));
    // The edit happens outside the watched directory: no event there; the rescan sees it.
    std::fs::write(elsewhere.join("log.rhai"), policy("\"log\"", "admit()")).unwrap();
    assert_eq!(
        next_reload(&mut outcomes).await,
        tower_degrade::policy::ReloadOutcome::Loaded(2)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&elsewhere).unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_tick_keeps_its_period_with_the_worst_policy_of_each_kind_loaded() {
    let d = degrader();
    let parens = format!(
        "fn g(n) {{ if n <= 0 {{ return 0; }} let r = {}; r }}",
        nest(deepest(parens), "g(n - 1)")
    );
    let worst = [
        ("spin", "", "loop { }".to_owned()),
        (
            "copier",
            "",
            "let a = []; for i in 0..1020 { a = [a]; }".to_owned(),
        ),
        (
            "printer",
            "",
            r#"let m = "x"; for i in 0..12 { m += m; } for i in 0..12000 { print(m); }"#.to_owned(),
        ),
        (
            "alerter",
            "",
            r#"let m = "x"; for i in 0..12 { m += m; } let d = admit(); for i in 0..4000 { d = d.alert(m); } return d;"#.to_owned(),
        ),
        (
            "recursion",
            "fn f(n) { f(n + 1) }",
            "f(0);".to_owned(),
        ),
        ("parens", parens.as_str(), "g(14);".to_owned()),
        (
            "strings",
            "",
            r#"let s = "x"; loop { s += s; }"#.to_owned(),
        ),
    ];
    let sources: Vec<(String, String)> = worst
        .iter()
        .enumerate()
        .map(|(i, (name, helpers, body))| {
            (
                (*name).to_owned(),
                format!(
                    "fn policy() {{ #{{ governs: [\"*\"], priority: {i} }} }}\n{helpers}\nfn on_tick(ctx) {{\n if ctx.requests == 7 {{ {body} }}\n}}\n"
                ),
            )
        })
        .collect();
    d.load_policy_sources(sources.iter().map(|(n, s)| (n.as_str(), s.as_str())))
        .unwrap();
    let limits = Limits::default();
    for class in ["pay", "stock", "log"] {
        assert_eq!(admitted(&d, class, 7).await, 7);
    }
    // Every class runs every hostile policy on this tick (and the next ones, until they are
    // quarantined): each tick returns within the budget and a grace, well inside the 500 ms
    // period.
    for _ in 0..4 {
        let start = Instant::now();
        d.tick_now();
        let took = start.elapsed();
        assert!(
            took < limits.max_tick_time + Duration::from_millis(300),
            "a tick took {took:?}"
        );
        for class in ["pay", "stock", "log"] {
            admitted(&d, class, 7).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn file_names_are_escaped_before_they_reach_logs_and_labels() {
    let d = degrader();
    d.load_policy_sources([("evil\n\u{1b}[31m", policy("\"log\"", "()").as_str())])
        .unwrap();
    let set = d.policies().unwrap();
    assert_eq!(set.names(), ["evil\\u{a}\\u{1b}[31m"]);
}

#[tokio::test(start_paused = true)]
async fn a_policy_cannot_sleep() {
    // Rhai's `sleep` blocked the control loop for as long as it was asked (the deadline is
    // only checked between operations): a tick of 5 s, never quarantined.
    let d = degrader();
    let err = d
        .load_policy_sources([("nap", policy("\"log\"", "sleep(1); shed()").as_str())])
        .unwrap_err();
    assert!(
        err.to_string().contains("`sleep` is not available"),
        "{err}"
    );
    let d = trapped("sleeper", "", "sleep(5); sleep(0.5);");
    let took = spring(&d).await;
    assert!(took < Duration::from_millis(500), "the tick took {took:?}");
    breaker_decides(&d).await;
}

#[test]
fn function_pointers_made_by_name_called_or_curried_are_refused_at_load() {
    // A pointer's curried arguments escape the size limits: pointers curried with arrays of
    // pointers grew to gigabytes in a few operations and aborted the host.
    let d = degrader();
    for (body, names) in [
        ("let f = Fn(\"x\"); shed()", "'Fn'"),
        ("let a = []; let f = |v| v; f.curry(a); shed()", "property"),
        ("let f = |v| v + 1; call(f, 1); shed()", "'call'"),
    ] {
        let src = format!("fn x() {{ 1 }}\n{}", policy("\"log\"", body));
        let err = d
            .load_policy_sources([("ptr", src.as_str())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(names) && err.contains("ptr.rhai:"),
            "{body}: {err}"
        );
    }
}

#[test]
fn closures_nested_in_closures_stay_small() {
    // Closures capture by sharing: nesting them does not copy what they capture, and
    // printing, comparing or copying them is bounded.
    on_worker_stack(|| async {
        for (name, body) in [
            (
                "nest",
                "let a = []; for i in 0..12 { let b = a; let f = |x| b; a = []; a.pad(400, f); } print(a); let c = a; let same = c == a; shed();",
            ),
            (
                "cycle",
                "let a = 1; let f = || a; a = f; print(a); let t = `${a}`; shed();",
            ),
        ] {
            let d = trapped(name, "", body);
            let took = spring(&d).await;
            assert!(
                took < Duration::from_millis(1_500),
                "{name}: the tick took {took:?}"
            );
        }
    });
}

#[tokio::test(flavor = "current_thread")]
async fn a_slow_tick_does_not_hold_back_the_runtime() {
    // A policy slow on purpose (within generous limits) on a single-threaded runtime: the
    // tick ran on the runtime's only worker, and nothing else ran until it ended.
    // The slow tick is stopped at 4 s.
    let mut limits = Limits::default();
    // The largest budget allowed, each operation made slow (an array of 15,000 written).
    limits.max_operations = 2_000_000;
    limits.max_array_size = 15_000;
    limits.max_call_time = Duration::from_secs(4);
    limits.max_tick_time = Duration::from_secs(4);
    let d = Degrader::builder("shop")
        .tick(Duration::from_millis(20))
        .policy_limits(limits)
        .class(ClassConfig::bronze("log"))
        .build()
        .unwrap();
    let slow = policy(
        "\"log\"",
        "if ctx.requests == 7 { let a = []; for i in 0..2000000000 { a = []; a.pad(15000, i); } } ()",
    );
    d.load_policy_sources([("slow", slow.as_str())]).unwrap();
    assert_eq!(admitted(&d, "log", 7).await, 7);
    // The slow tick starts within 20 ms, then see how late short sleeps wake meanwhile.
    let before = d.status().tick;
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(10)).await;
        worst = worst.max(t.elapsed());
    }
    let ticks = d.status().tick - before;
    assert!(ticks <= 2, "the policy is slow: {ticks} ticks in 3 s");
    assert!(
        worst < Duration::from_millis(1_000),
        "a 10 ms sleep woke after {worst:?}"
    );
}

#[test]
fn policy_files_are_read_to_their_limit_and_odd_entries_are_named() {
    let d = degrader();
    let dir = temp_dir("odd-entries");
    std::fs::write(dir.join("ok.rhai"), policy("\"log\"", "()")).unwrap();
    d.load_policies(&dir).unwrap();
    // A file that reports 0 bytes and holds gigabytes (a link into /proc) is read to the
    // limit only: each rescan read it whole before.
    #[cfg(target_os = "linux")]
    {
        std::os::unix::fs::symlink("/proc/self/pagemap", dir.join("big.rhai")).unwrap();
        let err = d.load_policies(&dir).unwrap_err().to_string();
        assert!(
            err.contains("big.rhai") && err.contains("over the limit"),
            "{err}"
        );
        std::fs::remove_file(dir.join("big.rhai")).unwrap();
    }
    // A dangling link or a directory named like a policy was left out without a word.
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.join("gone"), dir.join("linked.rhai")).unwrap();
    #[cfg(not(unix))]
    std::fs::create_dir(dir.join("linked.rhai")).unwrap();
    let err = d.load_policies(&dir).unwrap_err().to_string();
    assert!(
        err.contains("linked.rhai") && err.contains("not a regular file"),
        "{err}"
    );
    #[cfg(unix)]
    std::fs::remove_file(dir.join("linked.rhai")).unwrap();
    #[cfg(not(unix))]
    std::fs::remove_dir(dir.join("linked.rhai")).unwrap();
    // Hidden entries are not policies: Emacs' lock link (dangling while a buffer has unsaved
    // edits) failed every reload and every start; a deploy tool's hidden temporary copy went
    // live as a policy of its own.
    #[cfg(unix)]
    std::os::unix::fs::symlink("user@host.123:1", dir.join(".#p.rhai")).unwrap();
    std::fs::write(dir.join(".tmp-copy.rhai"), policy("\"log\"", "shed()")).unwrap();
    let version = d.load_policies(&dir).unwrap();
    let set = d.policies().unwrap();
    assert_eq!(set.version(), version);
    assert!(
        set.names().iter().all(|n| !n.starts_with('.')),
        "{:?}",
        set.names()
    );
    #[cfg(unix)]
    std::fs::remove_file(dir.join(".#p.rhai")).unwrap();
    std::fs::remove_file(dir.join(".tmp-copy.rhai")).unwrap();
    // Two names that are not UTF-8 read lossily as one (`a\u{fffd}`): a name is a policy's
    // identity, so such a file is refused, named.
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = dir.join(std::ffi::OsStr::from_bytes(b"a\xff.rhai"));
        std::fs::write(&odd, policy("\"log\"", "()")).unwrap();
        let err = d.load_policies(&dir).unwrap_err().to_string();
        assert!(err.contains("not UTF-8") && err.contains("rename"), "{err}");
        std::fs::remove_file(&odd).unwrap();
        d.load_policies(&dir).unwrap();
    }
    // What a script throws at load is written to logs: its control characters are escaped.
    let src = policy("\"log\"", "throw \"\\x1b[31mLOAD\\nFAKE LOG LINE\"; ()");
    let err = d
        .load_policy_sources([("esc", src.as_str())])
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\u{1b}') && !err.contains('\n'), "{err:?}");
    assert!(err.contains("FAKE LOG LINE"), "{err:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_directory_that_never_goes_quiet_is_still_reloaded() {
    // A writer touching the directory every 10 ms postponed the reload for as long as it
    // wrote: the debounce waits for quiet, now for at most 10 x itself (at least 1 s).
    let dir = temp_dir("busy-dir");
    std::fs::write(dir.join("p.rhai"), policy("\"log\"", "()")).unwrap();
    let d = log_degrader(Limits::default());
    let watcher = d
        .reload_policies_on_demand(&dir, Duration::from_millis(50))
        .unwrap();
    let mut outcomes = watcher.subscribe();
    outcomes.borrow_and_update();
    let started = tokio::time::Instant::now();
    loop {
        watcher.reload_now();
        tokio::select! {
            changed = outcomes.changed() => { changed.unwrap(); break; }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no reload while the directory stayed busy"
        );
    }
    let took = started.elapsed();
    assert!(
        took <= Duration::from_millis(1_100),
        "reloaded after {took:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
