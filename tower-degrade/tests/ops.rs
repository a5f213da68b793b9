//! The ops files in `ops/` (alert rules, their unit tests, the Alertmanager route, the Grafana
//! dashboard) checked with the tools operators run them with, and against the metrics this
//! library emits: a renamed metric or label value breaks this test, not a production alert.
//!
//! Needs `promtool` (Debian's `prometheus`) and `amtool` (Debian's `prometheus-alertmanager`);
//! `scripts/test` installs them. Without them the test fails, naming the package. It needs the
//! `fallback` feature, whose metrics the files query.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tower_degrade::metrics;

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Run a tool; fail with its output, or with the package to install when it is missing.
fn run(tool: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `{tool}` ({e}): install Debian's `{package}` (scripts/test does)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`{tool} {}` failed:\n{text}",
        args.join(" ")
    );
    text
}

fn promtool(args: &[&str]) -> String {
    run("promtool", "prometheus", args)
}

fn amtool(args: &[&str]) -> String {
    run("amtool", "prometheus-alertmanager", args)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

const RULES: &str = "prometheus/tower-degrade.rules.yml";
const RULE_TESTS: &str = "prometheus/tower-degrade.rules.test.yml";
const ALERTMANAGER: &str = "alertmanager/alertmanager.yml";
const DASHBOARD: &str = "grafana/tower-degrade.json";

/// Every metric this library emits (the constants of [`tower_degrade::metrics`]).
fn emitted() -> BTreeSet<&'static str> {
    use metrics::*;
    BTreeSet::from([
        REQUESTS,
        OVERLOADED,
        LATENCY,
        INFLIGHT,
        QUEUE_DEPTH,
        BREAKER_STATE,
        TRANSITIONS,
        HEALTH_SCORE,
        LATE_TICKS,
        PREDICTION,
        PREDICT_THRESHOLD,
        PREDICT_CALIBRATING,
        PREDICTIONS,
        PREDICTOR_OVERRUNS,
        PREDICTOR_FAILURES,
        PREDICTOR_INVALID,
        POLICY_RELOADS,
        POLICY_VERSION,
        POLICY_LOAD_FAILING,
        POLICY_ERRORS,
        POLICY_ALERTS,
        POLICY_SHADOW_DECISIONS,
        POLICY_SKIPPED,
        POLICY_LOG_DROPPED,
        QUEUE_DELAY,
        ADMISSION_LIMIT,
        ADMISSION_INFLIGHT,
        ADMISSION_WAITING,
        PRIORITY_INVALID,
        FALLBACK_KEPT,
        FALLBACK_DEPTH,
        FALLBACK_OLDEST,
        FALLBACK_REPLAYS,
        FALLBACK_BACKFILL_RATE,
        FALLBACK_BATCH_WRITES,
        FALLBACK_CACHED,
    ])
}

/// The `degrade_*` metric names a text mentions, with a histogram's `_bucket`/`_sum`/`_count`
/// series named by their histogram.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("degrade_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `tower-degrade_` or `x_degrade_` is not a metric name.
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            let name = &tail[..len];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|n| n.ends_with("_seconds")))
                .unwrap_or(name);
            names.insert(name.to_owned());
        }
        rest = &tail[len..];
    }
    names
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let dir = ops();
    promtool(&["check", "rules", path_str(&dir.join(RULES))]);
    let out = promtool(&["test", "rules", path_str(&dir.join(RULE_TESTS))]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The alerts docs/operations.md and the issue promise are defined, and each has a unit test
/// that expects it to fire.
#[test]
fn every_alert_is_defined_and_tested() {
    let rules = read(&ops().join(RULES));
    let tests = read(&ops().join(RULE_TESTS));
    let defined: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    for wanted in [
        "DegradeHealthScoreLow",
        "DegradeClassOpenTooLong",
        "DegradeGoldRefused",
        "DegradeClassOverloaded",
        "DegradeManualReviewBacklog",
        "DegradeSpoolOldestTooOld",
        "DegradePredictorOverruns",
        "DegradeControlTicksLate",
        "DegradePredictorFailing",
        "DegradePredictorInvalid",
        "DegradePolicyReloadFailed",
        "DegradePolicyAlert",
        "DegradePolicyErrors",
    ] {
        assert!(defined.contains(&wanted), "{wanted} is not in {RULES}");
    }
    for alert in &defined {
        // A test that expects it to fire: its name followed by a non-empty `exp_alerts`.
        let fires = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(alert) && t.contains("exp_labels"));
        assert!(
            fires,
            "no unit test in {RULE_TESTS} expects {alert} to fire"
        );
    }
}

/// Every metric the ops files query is one this library emits, and the label values they
/// match on are the ones it writes.
#[test]
fn the_ops_files_only_query_metrics_the_library_emits() {
    let emitted = emitted();
    for file in [RULES, RULE_TESTS, DASHBOARD] {
        let text = read(&ops().join(file));
        let names = mentioned(&text);
        assert!(!names.is_empty(), "{file} mentions no metric");
        for name in names {
            assert!(
                emitted.contains(name.as_str()),
                "{file} queries `{name}`, which tower-degrade does not emit"
            );
        }
    }
    // The label values the rules and the dashboard match on.
    let all = [RULES, DASHBOARD].map(|f| read(&ops().join(f))).join("\n");
    for queue in [
        tower_degrade::fallback::Queue::Review,
        tower_degrade::fallback::Queue::Spool,
    ] {
        assert!(
            all.contains(&format!("queue=\\\"{}\\\"", queue.as_str()))
                || all.contains(&format!("queue=\"{}\"", queue.as_str())),
            "the ops files do not name the `{}` queue as the library does",
            queue.as_str()
        );
    }
    use tower_degrade::breaker::State;
    // The encoding the rules' comments and comparisons rely on.
    for (state, value) in [
        (State::Open, 1.0),
        (State::HalfOpen, 2.0),
        (State::ForcedOpen, 5.0),
    ] {
        assert_eq!(state.as_gauge(), value, "{state}");
    }
    for outcome in ["success", "rejected", "timeout", "degraded"] {
        assert!(all.contains(outcome), "{outcome}");
    }
}

#[test]
fn the_alertmanager_config_is_valid_and_routes_pages_and_tickets() {
    let config = ops().join(ALERTMANAGER);
    let config = path_str(&config);
    amtool(&["check-config", config]);
    let config_flag = format!("--config.file={config}");
    let rules = read(&ops().join(RULES));
    // Each alert goes to the receiver its severity names.
    let mut alert = None;
    let mut checked = 0;
    for line in rules.lines().map(str::trim) {
        if let Some(a) = line.strip_prefix("- alert: ") {
            alert = Some(a);
        }
        if let (Some(a), Some(severity)) = (alert, line.strip_prefix("severity: ")) {
            let receiver = match severity {
                "page" => "oncall-pager",
                "ticket" => "team-tickets",
                other => panic!("{a}: severity `{other}` has no route"),
            };
            amtool(&[
                "config",
                "routes",
                "test",
                &config_flag,
                &format!("--verify.receivers={receiver}"),
                &format!("alertname={a}"),
                &format!("severity={severity}"),
                "service=shop",
            ]);
            checked += 1;
            alert = None;
        }
    }
    assert!(checked >= 5, "{checked} alerts routed");
}

/// Every panel of the dashboard queries valid PromQL: the expressions, with Grafana's variables
/// given values, are checked by promtool as recording rules.
#[test]
fn the_dashboard_is_valid_json_and_every_query_parses() {
    let text = read(&ops().join(DASHBOARD));
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    let mut titles = BTreeSet::new();
    for p in panels {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("a panel title");
        assert!(titles.insert(title), "two panels are called `{title}`");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel `{title}` has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            exprs.push((title, expr.to_owned()));
        }
        let pos = &p["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{title}"
        );
    }
    // What an operator looks for first (issue: health, state, success, p99, shed and
    // diverted, prediction, queue depths).
    for needed in [
        metrics::HEALTH_SCORE,
        metrics::BREAKER_STATE,
        metrics::REQUESTS,
        "degrade_latency_seconds_bucket",
        metrics::PREDICTION,
        metrics::QUEUE_DEPTH,
    ] {
        assert!(
            exprs.iter().any(|(_, e)| e.contains(needed)),
            "no panel queries {needed}"
        );
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$service", ".*")
            .replace("$class", ".*");
        assert!(
            !expr.contains('$'),
            "panel `{title}`: unknown variable in {expr}"
        );
        let quoted = serde_json::to_string(&expr).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:panel_{i}\n        expr: {quoted}\n"
        ));
    }
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-queries.rules.yml");
    std::fs::write(&file, rules).unwrap();
    promtool(&["check", "rules", path_str(&file)]);
}
