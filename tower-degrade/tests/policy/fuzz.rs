//! A long-running randomized test of the loader and the tick: generated policies (statements,
//! expressions, hostile values, deep nesting, garbage) are loaded and ticked; the host must
//! survive and every tick return within the budget. Ignored by default; run it with
//!
//! ```text
//! TD_FUZZ_SECS=1800 cargo test -p tower-degrade --features rhai --release --test policy \
//!     fuzz::generated_policies_never_crash_or_stall_the_host -- --ignored --nocapture
//! ```
//!
//! `TD_FUZZ_SEED` picks the first seed; a failure prints the seed and the source.

use std::time::{Duration, Instant};

use tower_degrade::policy::Limits;

use super::support::Rng;
use super::*;

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "7",
    "1000",
    "60000",
    "60001",
    "3600000",
    "3600001",
    "4294967294",
    "1000000000000",
    "9223372036854775807",
    "-9223372036854775808",
    "0.5",
    "1.5",
    "-0.1",
    "1e300",
];

const CTX: &[&str] = &[
    "ctx.rps",
    "ctx.success_rate",
    "ctx.failure_rate",
    "ctx.p99_ms",
    "ctx.requests",
    "ctx.inflight",
    "ctx.sla_ms",
    "ctx.breaker",
    "ctx.tier",
    "ctx.class",
    "ctx.prediction",
    "ctx.history_len",
    "ctx.window(-1)",
    "ctx.window(5)",
    "ctx.tag(\"team\")",
    "ctx.admission_limit",
];

const DECISIONS: &[&str] = &[
    "admit()",
    "shed()",
    "open()",
    "close()",
    "fallback(\"spool\")",
    "fallback(\"nowhere\")",
    "degrade(N)",
    "admit_fraction(N)",
    "retry_after(N)",
    "delay(N)",
    "shed().retry_after(N)",
    "degrade(0.5).via(\"delayed_retry\")",
    "alert(S)",
    "admit().alert(S).alert(S)",
];

/// An expression up to `depth` deep.
fn expr(r: &mut Rng, depth: usize) -> String {
    if depth == 0 {
        return match r.below(4) {
            0 => r.pick(NUMBERS).to_owned(),
            1 => r.pick(CTX).to_owned(),
            2 => "x".to_owned(),
            _ => "\"s\"".to_owned(),
        };
    }
    let d = depth - 1;
    match r.below(12) {
        0 => format!("({} + {})", expr(r, d), expr(r, d)),
        1 => format!("({} * {})", expr(r, d), expr(r, d)),
        2 => format!("({} / {})", expr(r, d), expr(r, d)),
        3 => format!("({} == {})", expr(r, d), expr(r, d)),
        4 => format!("[{}, {}]", expr(r, d), expr(r, d)),
        5 => format!("#{{ a: {} }}", expr(r, d)),
        6 => format!("h({})", expr(r, d)),
        7 => format!("{}.to_string()", expr(r, d)),
        8 => format!(
            "ctx.consecutive({}, |w| w.p99_ms > {})",
            r.pick(NUMBERS),
            expr(r, d)
        ),
        9 => format!(
            "if {} {{ {} }} else {{ {} }}",
            expr(r, d),
            expr(r, d),
            expr(r, d)
        ),
        10 => r.pick(DECISIONS).replace('N', r.pick(NUMBERS)).replace(
            'S',
            if r.below(2) == 0 {
                "\"\\u001b[31m\\n\""
            } else {
                "m"
            },
        ),
        _ => expr(r, 0),
    }
}

/// A statement: ordinary, or one of the hostile shapes. Most hostile ones wait for a window
/// validation never shows (7 calls), so they load and strike on the tick.
fn statement(r: &mut Rng) -> String {
    let s = raw_statement(r);
    if r.below(5) != 0 && !s.starts_with("x = ") && !s.starts_with("return") {
        format!("if ctx.requests == 7 {{ {s} }}")
    } else {
        s
    }
}

fn raw_statement(r: &mut Rng) -> String {
    let n = r.pick(NUMBERS);
    match r.below(16) {
        0 => "loop { x += 1; }".to_owned(),
        1 => format!(
            "for i in 0..{} {{ x = [x]; }}",
            r.pick(&["10", "1020", "100000"])
        ),
        2 => format!("for i in 0..{} {{ m += m; }}", r.pick(&["3", "12", "40"])),
        3 => format!("for i in 0..{} {{ print(m); }}", r.pick(&["5", "12000"])),
        4 => format!(
            "for i in 0..{} {{ d = d.alert(m); }}",
            r.pick(&["5", "4000"])
        ),
        5 => "x = rec(0);".to_owned(),
        6 => format!("x = h({});", n),
        7 => "eval(\"1\");".to_owned(),
        8 => "let z = #{}; for i in 0..1000 { z[`k${i}`] = i; }".to_owned(),
        9 => format!("if ctx.requests == 7 {{ {} }}", statement(r)),
        10 => format!("return {};", expr(r, 2)),
        _ => {
            let depth = r.below(6);
            format!("x = {};", expr(r, depth))
        }
    }
}

/// A whole policy file, or garbage.
fn source(r: &mut Rng) -> String {
    let governs = r.pick(&[
        "\"*\"", "\"*\"", "\"log\"", "\"log\"", "\"gold\"", "\"nope\"", "1",
    ]);
    let mut meta = format!("governs: [{governs}]");
    if r.below(3) == 0 {
        meta += &format!(", priority: {}", r.pick(NUMBERS));
    }
    if r.below(5) == 0 {
        meta += &format!(", rollout: {}", r.pick(NUMBERS));
    }
    if r.below(5) == 0 {
        meta += ", mode: \"shadow\"";
    }
    let body: Vec<String> = (0..1 + r.below(4)).map(|_| statement(r)).collect();
    let depth = r.below(4);
    let ret = if r.below(2) == 0 {
        r.pick(DECISIONS)
            .replace('N', r.pick(&["0", "1", "500", "0.5"]))
            .replace('S', "m")
    } else {
        expr(r, depth)
    };
    let mut src = format!(
        "fn policy() {{ #{{ {meta} }} }}\n\
         fn h(n) {{ if n <= 0 {{ 0 }} else {{ (1 + (1 + h(n - 1))) }} }}\n\
         fn rec(n) {{ rec(n + 1) }}\n\
         fn on_tick(ctx) {{\n let x = 0; let m = \"xxxx\"; let d = admit();\n {}\n {ret}\n}}\n",
        body.join("\n ")
    );
    if r.below(4) == 0 {
        let hook = statement(r);
        src += &format!(
            "fn on_request(ctx, req) {{ let x = req.header(\"x\"); let m = \"y\"; let d = admit(); {hook} }}\n"
        );
    }
    match r.below(30) {
        // Mangled: cut short, a byte flipped, top-level code, a BOM.
        0 => src.truncate(r.below(src.len())),
        1 => {
            let i = r.below(src.len());
            if src.is_char_boundary(i) && src.is_char_boundary(i + 1) {
                src.replace_range(i..i + 1, r.pick(&["{", "}", "(", "\"", "\u{202e}", ";"]));
            }
        }
        2 => src.insert_str(0, "let top = 1;\n"),
        3 => src.insert(0, '\u{feff}'),
        _ => {}
    }
    src
}

#[tokio::test(start_paused = true)]
#[ignore = "long-running; see the module docs"]
async fn generated_policies_never_crash_or_stall_the_host() {
    let secs: u64 = std::env::var("TD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let first: u64 = std::env::var("TD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let limits = Limits::default();
    let bound = limits.max_tick_time + Duration::from_millis(300);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut generated, mut loaded, mut ticks, mut slowest) = (0u64, 0u64, 0u64, Duration::ZERO);
    let mut seed = first;
    let d = degrader();
    while Instant::now() < end {
        let mut r = Rng(seed);
        // One to three files per load.
        let files = if r.below(10) < 7 { 1 } else { 2 + r.below(2) };
        let sources: Vec<(String, String)> = (0..files)
            .map(|i| (format!("gen{i}"), source(&mut r)))
            .collect();
        generated += sources.len() as u64;
        let result = d.load_policy_sources(sources.iter().map(|(n, s)| (n.as_str(), s.as_str())));
        if result.is_ok() {
            loaded += 1;
            for _ in 0..3 {
                for class in ["pay", "stock", "log"] {
                    admitted(&d, class, 7).await;
                }
                let start = Instant::now();
                d.tick_now();
                let took = start.elapsed();
                slowest = slowest.max(took);
                ticks += 1;
                assert!(
                    took < bound,
                    "seed {seed}: a tick took {took:?}\n{}",
                    sources
                        .iter()
                        .map(|(_, s)| s.as_str())
                        .collect::<Vec<_>>()
                        .join("\n----\n")
                );
            }
        }
        seed += 1;
    }
    println!(
        "fuzz: seeds {first}..{seed}: {generated} policies generated, {loaded} loads accepted, \
         {ticks} ticks, slowest tick {slowest:?}, in {secs} s"
    );
    assert!(d.state("log").is_ok(), "the host is alive");
}
