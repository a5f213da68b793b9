//! Compiling and validating policy files: metadata, hooks, sample runs within the budget.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rhai::Dynamic;

use super::request::Selector;
use super::{Core, DEADLINE_REASON, Mode, Policy, PolicySet, Runtime, Target, unwrap_error};
use crate::breaker::State;
use crate::class::{Registry, Tier};
use crate::error::PolicyError;
use crate::window::{History, WindowSnapshot};

/// Whether `line` starts the definition of the function `name`.
fn defines_fn(line: &str, name: &str) -> bool {
    line.trim_start()
        .strip_prefix("fn ")
        .and_then(|rest| rest.trim_start().strip_prefix(name))
        .is_some_and(|rest| rest.trim_start().starts_with('('))
}

/// The line defining the function `hook`.
fn hook_line(text: &str, hook: &str) -> Option<usize> {
    text.lines()
        .position(|l| defines_fn(l, hook))
        .map(|i| i + 1)
}

/// For an error Rhai gave no position (a blown operation budget, a wrong return type, bad
/// metadata), the line defining the function it is about.
fn reason_line(text: &str, reason: &str) -> Option<usize> {
    let hook = ["on_request", "on_tick", "policy"]
        .into_iter()
        .find(|h| reason.starts_with(h) || reason.starts_with(&format!("`{h}`")))?;
    hook_line(text, hook)
}

/// A validation call stopped at its wall-clock deadline gets a second try: a thread descheduled
/// on a busy machine is not a slow policy. A second stop is the policy's.
fn retry_late<T>(
    call: impl Fn() -> Result<T, (Option<usize>, String)>,
) -> Result<T, (Option<usize>, String)> {
    match call() {
        Err((_, reason)) if reason.starts_with(DEADLINE_REASON) => call(),
        other => other,
    }
}

/// What a load does when two files govern the same class at the same priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overlap {
    /// Load, with a warning naming both files ([`PolicySet::warnings`] and the log).
    #[default]
    Warn,
    /// Refuse the load, naming both files.
    Error,
}

impl Runtime {
    /// Compile and validate `sources` (name, file label, text) into a set for `registry`, on
    /// a thread with the stack the limits call for (never the caller's, never a runtime
    /// worker).
    pub(crate) fn compile(
        &self,
        registry: &Registry,
        sources: &[(String, String, String)],
    ) -> Result<PolicySet, PolicyError> {
        let stack = self.limits.thread_stack();
        super::contain::on_policy_stack(stack, || self.core.compile(registry, sources))
            .unwrap_or_else(|e| {
                Err(PolicyError::new(
                    "policies",
                    None,
                    format!("cannot start a thread to validate them: {e}"),
                ))
            })
    }
}

impl Core {
    fn compile(
        &self,
        registry: &Registry,
        sources: &[(String, String, String)],
    ) -> Result<PolicySet, PolicyError> {
        let mut policies = Vec::with_capacity(sources.len());
        let mut total = 0;
        for (name, file, text) in sources {
            total += text.len();
            if total > MAX_SET_BYTES {
                return Err(set_too_large(file, total));
            }
            // File names reach logs and metric labels: escaped like alerts.
            let (name, file) = (
                super::decision::sanitize(name),
                super::decision::sanitize(file),
            );
            let policy = self
                .compile_one(registry, &name, &file, text)
                .map_err(|mut e| {
                    if e.line.is_none() {
                        e.line = reason_line(text, &e.reason);
                    }
                    e
                })?;
            policies.push(policy);
        }
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let mut by_class = vec![Vec::new(); registry.len()];
        for (c, class) in self.classes.iter().enumerate() {
            let list = &mut by_class[c];
            for (i, p) in policies.iter().enumerate() {
                if p.governs(c, class) {
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
        let warnings = self.overlaps(registry, &policies, &by_class)?;
        let hooks = policies.iter().map(|_| Default::default()).collect();
        Ok(PolicySet {
            version: 0,
            policies,
            hooks,
            by_class,
            warnings,
            skipped: Default::default(),
            quarantined: Default::default(),
        })
    }

    /// Pairs of enforced policies governing a class at the same priority: their order is the
    /// files' names, which is rarely meant (a stale copy left beside the real file). Policies
    /// at different priorities are layered on purpose; a shadow policy beside the one it would
    /// replace is how a change is tried.
    fn overlaps(
        &self,
        registry: &Registry,
        policies: &[Policy],
        by_class: &[Vec<usize>],
    ) -> Result<Vec<String>, PolicyError> {
        let mut pairs: Vec<((usize, usize), Vec<&str>)> = Vec::new();
        for (id, class) in registry.iter() {
            let list = &by_class[id.index()];
            for (k, &a) in list.iter().enumerate() {
                for &b in &list[k + 1..] {
                    let (pa, pb) = (&policies[a], &policies[b]);
                    if pa.priority != pb.priority
                        || pa.mode != Mode::Enforce
                        || pb.mode != Mode::Enforce
                    {
                        continue;
                    }
                    let key = (a.min(b), a.max(b));
                    match pairs.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, classes)) => classes.push(class.name()),
                        None => pairs.push((key, vec![class.name()])),
                    }
                }
            }
        }
        let warnings: Vec<String> = pairs
            .iter()
            .map(|((a, b), classes)| {
                format!(
                    "{} and {} both govern {} at priority {}: both decide, the most restrictive \
                     wins (give one a higher priority, make one a shadow, or remove the stale one)",
                    policies[*a].file,
                    policies[*b].file,
                    classes.join(", "),
                    policies[*a].priority
                )
            })
            .collect();
        if self.overlap == Overlap::Error
            && let Some(((a, _), _)) = pairs.first()
        {
            return Err(PolicyError::new(
                &policies[*a].file,
                None,
                warnings[0].clone(),
            ));
        }
        Ok(warnings)
    }

    fn compile_one(
        &self,
        registry: &Registry,
        name: &str,
        file: &str,
        text: &str,
    ) -> Result<Policy, PolicyError> {
        if text.len() > MAX_SOURCE_BYTES {
            return Err(too_large(file, text.len() as u64));
        }
        // A byte-order mark (Windows editors) is not code.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let defines = |hook: &str| text.lines().any(|l| defines_fn(l, hook));
        let mut ast = self.engine.compile(text).map_err(|e| {
            // A file that defines no hook is not a policy (a symlink to /etc/passwd, a
            // config file with the wrong extension): its content is not quoted.
            let mut line = e.position().line();
            let reason = if defines("policy") || defines("on_tick") {
                // Rhai puts an error at the end of the input on the line after the last one
                // (line 8 of a 7-line file): it is named as the last line's, and said.
                let last = text.lines().count().max(1);
                let at_end = line.is_some_and(|l| l > last);
                if at_end {
                    line = Some(last);
                }
                let end = if at_end {
                    " (at the end of the file)"
                } else {
                    ""
                };
                format!("syntax error: {}{end}", e.err_type())
            } else {
                "not a policy: no `fn policy()` or `fn on_tick(ctx)` (its content is not quoted)"
                    .to_owned()
            };
            PolicyError::new(file, line, reason)
        })?;
        ast.set_source(file);
        // Rhai would run top-level code on `eval` only, which policies never do: it would be
        // silently ignored. An error says so instead.
        if let Some(stmt) = ast.statements().first() {
            let reason = if matches!(stmt, rhai::Stmt::Import(..)) {
                // No module resolver is set (one would read files): an import could only
                // fail where it ran.
                "`import` is not available: a policy is one sandboxed file, with no modules"
            } else {
                "code outside a function is never run: put it in `on_tick` or `on_request`"
            };
            return Err(PolicyError::new(
                file,
                Some(stmt.position().line().unwrap_or(1)),
                reason,
            ));
        }
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
        match arity("policy") {
            Some(0) => {}
            Some(n) => {
                return Err(PolicyError::new(
                    file,
                    hook_line(text, "policy"),
                    format!("`policy` must take no parameters, not {n}"),
                ));
            }
            None => {
                return Err(PolicyError::new(
                    file,
                    None,
                    "missing `fn policy()` returning a map",
                ));
            }
        }
        let meta: Dynamic = retry_late(|| {
            self.call(&ast, "policy", (), self.call_deadline())
                .map_err(|e| unwrap_error(*e))
        })
        .map_err(|(line, reason)| PolicyError::new(file, line, format!("policy(): {reason}")))?;
        let Some(meta) = meta.try_cast::<rhai::Map>() else {
            return Err(PolicyError::new(
                file,
                None,
                "policy() must return a map like #{ governs: [\"gold\"] }",
            ));
        };
        let (mut targets, mut priority, mut mode) = (None, 0, Mode::Enforce);
        let mut selector = Selector::default();
        // The line of a field of `policy()`'s map, for its errors: the first line from
        // `fn policy` on that names it (`governs:` or `"governs":`).
        let field_line = |key: &str| {
            let from = text.lines().position(|l| defines_fn(l, "policy"))?;
            let keyed = [format!("{key}:"), format!("\"{key}\":"), format!("{key} :")];
            text.lines()
                .enumerate()
                .skip(from)
                .find(|(_, l)| keyed.iter().any(|k| l.contains(k.as_str())))
                .map(|(i, _)| i + 1)
        };
        for (key, value) in meta {
            let bad = |what: &str| {
                PolicyError::new(file, field_line(&key), format!("policy(): `{key}` {what}"))
            };
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
                        field_line(other),
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
            lines: [hook_line(text, "on_tick"), hook_line(text, "on_request")],
        };
        self.validate(&policy)?;
        Ok(policy)
    }

    /// Run `on_tick` against sample contexts: it must return a decision or () within budget.
    ///
    /// The contexts are the states a class reaches in production, each window alike within
    /// one: the first window, healthy, failing (errors, timeouts, slow and overdue calls, a
    /// queue), a stalled dependency (nothing completes), very slow calls, each breaker state,
    /// and admission both saturated and idle, so that a division by a count that can be 0 or a
    /// bound passed on a latency fails here rather than on a live tick.
    fn validate(&self, policy: &Policy) -> Result<(), PolicyError> {
        // A class the policy governs, so `ctx` looks like the real thing.
        let class = (0..self.classes.len())
            .find(|&i| policy.governs(i, &self.classes[i]))
            .unwrap_or(0);
        let sla = self.classes[class].sla_ms.max(1.0);
        let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
        // `n` windows of `ok` successes, `errors`, `timeouts` and `overdue` calls, the slow
        // ones those over the SLA at a p99 of `p99` SLAs, `inflight` calls and a queue.
        let windows = |n: u64, [ok, errors, timeouts, overdue]: [u64; 4], p99: f64, queue: u64| {
            let mut h = History::default();
            let completed = ok + errors + timeouts;
            let p99_ms = if completed == 0 { 0.0 } else { p99 * sla };
            let slow = if p99 > 1.0 {
                completed / 2 + timeouts
            } else {
                0
            };
            for tick in 0..n {
                h.push(WindowSnapshot {
                    tick,
                    period: Duration::from_millis(500),
                    successes: ok,
                    errors,
                    timeouts,
                    slow: slow.min(completed),
                    overdue,
                    p50: ms(p99_ms / 4.0),
                    p90: ms(p99_ms / 2.0),
                    p99: ms(p99_ms),
                    max: ms(p99_ms * 2.0),
                    inflight: (overdue + completed / 10) as i64,
                    queue_depth: queue,
                    queue_delay: ms(if queue > 0 { 1.5 * sla } else { 0.0 }),
                    ..Default::default()
                });
            }
            Arc::new(h)
        };
        let limiter = |inflight: u32, waiting: u32| crate::admit::LimiterState {
            name: Arc::from("service"),
            limit: 16,
            inflight,
            waiting,
            baseline_micros: Some(10_000.0),
        };
        let healthy = |n| windows(n, [95, 0, 0, 0], 0.5, 0);
        let failing = || windows(64, [40, 40, 20, 5], 4.5, 2_000);
        let samples = [
            (
                "an empty history",
                windows(0, [0; 4], 0.0, 0),
                State::Closed,
                None,
                None,
            ),
            ("the first window", healthy(1), State::Closed, None, None),
            ("healthy windows", healthy(64), State::Closed, None, None),
            ("failing windows", failing(), State::Closed, None, None),
            (
                "a stalled dependency (nothing completes)",
                windows(8, [0, 0, 0, 20], 0.0, 0),
                State::Closed,
                None,
                None,
            ),
            // 100 SLAs: a bound passed on a latency (`delay(p99 * 10)`) is met here.
            (
                "very slow calls",
                windows(64, [50, 0, 10, 0], 100.0, 50),
                State::Closed,
                None,
                None,
            ),
            (
                "an open breaker",
                windows(5, [0, 30, 0, 0], 10.0, 0),
                State::Open,
                None,
                None,
            ),
            (
                "a half-open breaker",
                failing(),
                State::HalfOpen,
                None,
                None,
            ),
            (
                "a recovering breaker",
                healthy(64),
                State::Recovering,
                None,
                None,
            ),
            ("a degraded class", failing(), State::Degraded, None, None),
            // The last two have a prediction and an admission limiter, so the branches that
            // read them are run too (a service may have neither): saturated, and idle.
            (
                "a predicted failure under admission",
                windows(64, [90, 10, 0, 0], 1.5, 0),
                State::Closed,
                Some(0.95),
                Some(limiter(16, 40)),
            ),
            (
                "an idle service under admission",
                healthy(64),
                State::Closed,
                Some(0.0),
                Some(limiter(0, 0)),
            ),
        ];
        for (what, history, state, prediction, admission) in samples {
            let ctx = self.ctx(class, history, state, prediction, admission);
            retry_late(|| self.decide(policy, ctx.clone(), self.call_deadline())).map_err(
                |(line, reason)| {
                    PolicyError::new(&policy.file, line, format!("on_tick with {what}: {reason}"))
                },
            )?;
            if policy.has_on_request {
                retry_late(|| self.validate_request_hook(policy, ctx.clone())).map_err(
                    |(line, reason)| {
                        PolicyError::new(
                            &policy.file,
                            line,
                            format!("on_request with {what}: {reason}"),
                        )
                    },
                )?;
            }
        }
        Ok(())
    }
}

/// The largest policy source accepted (checked before it is read or parsed): 64 KiB. Rhai's
/// parser checks some names against lists in time that grows with the square of their
/// length (a function's or closure's parameters, the variables in scope), so the file's size
/// bounds how long validating it can take: at 256 KiB, one function of 65,938 parameters took
/// 20 s to validate, with every reload waiting on it.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;

/// The largest policy set accepted, all its files together: 1 MiB, sixteen files at
/// [`MAX_SOURCE_BYTES`]. It bounds how long a set takes to validate (and a directory's rescan
/// to read) as that limit bounds a file's: a directory of many files at the limit, each of
/// the worst parse, made every reload wait on it for as long as there were files.
pub const MAX_SET_BYTES: usize = 16 * MAX_SOURCE_BYTES;

fn set_too_large(file: &str, total: usize) -> PolicyError {
    PolicyError::new(
        file,
        None,
        format!(
            "the policies up to this one hold {total} bytes, over the limit of {MAX_SET_BYTES} \
             bytes for all of a set's files together"
        ),
    )
}

fn too_large(file: &str, len: u64) -> PolicyError {
    PolicyError::new(
        file,
        None,
        format!(
            "{len} bytes, over the limit of {} bytes for a policy file",
            MAX_SOURCE_BYTES
        ),
    )
}

/// The `*.rhai` entries of `dir` in name order (symlinks followed), each with whether it is a
/// regular file: a directory, a FIFO or a dangling symlink named like a policy is an error,
/// not a policy silently left out. Hidden entries (a name starting with `.`) are not
/// policies: Emacs' lock link `.#p.rhai` (dangling while a buffer has unsaved edits), an
/// editor's or a deploy tool's temporary copy, Kubernetes' `..data`.
pub(crate) fn entries(dir: &Path) -> std::io::Result<Vec<(PathBuf, bool)>> {
    let mut paths: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
        })
        .map(|p| {
            let regular = p.is_file();
            (p, regular)
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// A policy file's bytes, at most [`MAX_SOURCE_BYTES`] read: `Err(Some(n))` if it holds
/// more (a length a file system reports is not trusted: `/proc` files report 0).
pub(crate) fn read_source(path: &Path) -> Result<Vec<u8>, Result<std::io::Error, u64>> {
    use std::io::Read;
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    // Without waiting: a kernel file whose reads wait for data (a link to `/proc/kmsg`) or a
    // FIFO put in a policy's place held this read, and every later load and reload, for good;
    // it now fails at once (`WouldBlock`). A regular file reads as ever.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK);
    let file = open.open(path).map_err(Ok)?;
    let reported = file.metadata().map(|m| m.len()).unwrap_or(0);
    if reported > MAX_SOURCE_BYTES as u64 {
        return Err(Err(reported));
    }
    // Whole blocks (some `/proc` files refuse reads of odd sizes), until past the limit.
    let mut file = file;
    let (mut bytes, mut block) = (Vec::new(), [0u8; 8192]);
    loop {
        match file.read(&mut block) {
            Ok(0) => return Ok(bytes),
            Ok(n) => bytes.extend_from_slice(&block[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Ok(e)),
        }
        if bytes.len() > MAX_SOURCE_BYTES {
            return Err(Err(bytes.len() as u64));
        }
    }
}

/// Read every `*.rhai` file of `dir` (name order) as (policy name, file label, text).
pub(crate) fn read_dir(dir: &Path) -> Result<Vec<(String, String, String)>, PolicyError> {
    let label = dir.display().to_string();
    let paths = entries(dir).map_err(|e| {
        PolicyError::new(
            &label,
            None,
            format!("cannot read the policy directory: {e}"),
        )
    })?;
    let mut total = 0;
    paths
        .into_iter()
        .map(|(p, regular)| {
            let file = p.display().to_string();
            if !regular {
                return Err(PolicyError::new(
                    &file,
                    None,
                    "not a regular file (a directory, a FIFO, or a symlink dangling or in a \
                     loop): name it other than `*.rhai`, or point it at a policy",
                ));
            }
            // A name is a policy's identity (metrics, quarantine, logs): read lossily, two
            // files whose names are not UTF-8 could be taken for one policy.
            let name = match p.file_stem().map(|s| s.to_str()) {
                Some(Some(name)) => name.to_owned(),
                _ => {
                    return Err(PolicyError::new(
                        &file,
                        None,
                        "the file's name is not UTF-8, and a policy's name is its file's: \
                         rename it",
                    ));
                }
            };
            let bytes = read_source(&p).map_err(|e| match e {
                Ok(e) => PolicyError::new(&file, None, format!("cannot read: {e}")),
                Err(len) => too_large(&file, len),
            })?;
            // Read no further than the set's limit either.
            total += bytes.len();
            if total > MAX_SET_BYTES {
                return Err(set_too_large(&file, total));
            }
            let text = String::from_utf8(bytes).map_err(|e| {
                PolicyError::new(
                    &file,
                    None,
                    format!(
                        "cannot read: not UTF-8 (byte {})",
                        e.utf8_error().valid_up_to()
                    ),
                )
            })?;
            Ok((name, file, text))
        })
        .collect()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_file_whose_reads_would_wait_is_an_error_not_a_wait() {
        // A FIFO with a writer that never writes stands for `/proc/kmsg`: its read waited for
        // good, and every later load and reload behind it (found by a hostile-input trial).
        let dir = std::env::temp_dir().join(format!("td-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("p.rhai");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        // Opened read and write, the FIFO has a writer and no reader waits on opening it.
        let _writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        match read_source(&fifo) {
            Err(Ok(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
