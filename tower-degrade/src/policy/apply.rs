//! Running the policies on the tick: decide per class, combine, quarantine failures, and the
//! policies as a control-loop stage (within the tick's budget, on a stack that fits the limits).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rhai::Dynamic;

use super::decision::{self, Action, Decision};
use super::request::Overlay;
use super::{
    ClassPolicyState, Core, DEADLINE_REASON, Failure, HookTurn, Mode, Policy, PolicySet, Runtime,
    TickCtx, unwrap_error,
};
use crate::class::ClassId;
use crate::classify::RequestView;
use crate::control::{Batch, ClassTick, Stage};
use crate::gate::{Directive, Packed};
use crate::metrics::{
    POLICY_ALERTS, POLICY_ERRORS, POLICY_LOAD_FAILING, POLICY_LOG_DROPPED, POLICY_RELOADS,
    POLICY_SHADOW_DECISIONS, POLICY_SKIPPED, POLICY_VERSION,
};

/// Calls in a row stopped at their deadline that quarantine a policy for its class (one
/// could be the machine, not the policy).
const LATE_QUARANTINE: u32 = 3;

/// What a tick's policies want said: collected while they run, said after (logs and metrics).
#[derive(Debug)]
pub(super) enum Note {
    Alert(usize, Arc<str>),
    Shadow(usize, Decision),
    Failed(usize, Option<usize>, String, Failure),
    Skipped(usize),
    Hook(usize, HookTurn),
}

/// A policy's decision this tick: made now, or its last one (its turn skipped).
pub(super) enum Made {
    Fresh(Decision),
    Remembered(Decision),
}
use Made::{Fresh, Remembered};

/// One class's outcome of a tick's policies.
#[derive(Debug)]
pub(super) struct Outcome {
    id: ClassId,
    directive: Directive,
    overlay: Option<Overlay>,
    notes: Vec<Note>,
}

impl Core {
    /// One `on_tick` call: `Ok(None)` for no opinion.
    pub(super) fn decide(
        &self,
        policy: &Policy,
        ctx: TickCtx,
        deadline: Instant,
    ) -> Result<Option<Decision>, (Option<usize>, String)> {
        let out = self
            .call(&policy.ast, "on_tick", (ctx,), deadline)
            .map_err(|e| unwrap_error(*e))?;
        self.as_decision(out, "on_tick")
    }

    pub(super) fn as_decision(
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

    pub(super) fn report_failure(
        &self,
        class: &str,
        policy: &Policy,
        line: Option<usize>,
        reason: &str,
        failure: Failure,
    ) {
        let at = line
            .map(|l| format!("{}:{l}", policy.file))
            .unwrap_or_else(|| policy.file.clone());
        match failure {
            Failure::Request => tracing::warn!(
                service = %self.service, class, policy = %policy.name, hook = "on_request", at, reason,
                "policy hook failed on a request, which was decided without it (logged once per tick)"
            ),
            Failure::Quarantined => tracing::warn!(
                service = %self.service, class, policy = %policy.name, hook = "on_tick", at, reason,
                "policy failed; quarantined for this class until the next load"
            ),
            Failure::Late => tracing::warn!(
                service = %self.service, class, policy = %policy.name, hook = "on_tick", at, reason,
                "policy stopped at its deadline and skipped this tick (quarantined after {LATE_QUARANTINE} in a row)"
            ),
        }
        self.count_error(class, policy);
    }

    /// One failed call in `degrade_policy_errors_total`.
    pub(super) fn count_error(&self, class: &str, policy: &Policy) {
        metrics::counter!(POLICY_ERRORS, "service" => self.service.to_string(), "class" => class.to_owned(), "policy" => policy.name.clone()).increment(1);
    }

    /// A shadow policy's decision: logged and counted. `limited`: the log line is rate-limited
    /// (an `on_request` hook decides once per request).
    pub(super) fn record_shadow(
        &self,
        class: &str,
        policy: &Policy,
        decision: &Decision,
        limited: bool,
    ) {
        if decision.action() == Action::Admit {
            return;
        }
        if !limited || self.log.allow() {
            tracing::info!(
                service = %self.service, class, policy = %policy.name, decision = %decision,
                "shadow policy decision (not enforced)"
            );
        }
        let action = decision.to_string();
        let action = action.split(['(', ' ']).next().unwrap_or("").to_owned();
        metrics::counter!(POLICY_SHADOW_DECISIONS, "service" => self.service.to_string(), "class" => class.to_owned(), "policy" => policy.name.clone(), "action" => action).increment(1);
    }

    /// Run the policies of `classes`, each class's with the breaker's directive so far, until
    /// `deadline`.
    pub(super) fn run_tick(
        &self,
        set: &Arc<PolicySet>,
        classes: Vec<(ClassTick, Directive)>,
        deadline: Instant,
    ) -> Vec<Outcome> {
        // Each tick starts one class further on: classes whose policies spend the budget
        // do not leave the same others skipped every tick.
        let now = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut classes = classes;
        if classes.len() > 1 {
            let first = (now % classes.len() as u64) as usize;
            classes.rotate_left(first);
        }
        classes
            .into_iter()
            .map(|(tick, breaker)| {
                let mut memo = self.memos[tick.id.index()]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let mut notes = Vec::new();
                let (directive, overlay) =
                    self.apply(set, &tick, breaker, &mut memo, (now, deadline), &mut notes);
                Outcome {
                    id: tick.id,
                    directive,
                    overlay,
                    notes,
                }
            })
            .collect()
    }

    /// Run the policies governing a class: the directive for everyone (the breaker's combined
    /// with the policies that apply to all requests) and, when some policies apply per request
    /// (rollouts, groups, `on_request`), the overlay the data path consults. Policies whose
    /// turn comes after `deadline` are skipped. `now` numbers the tick.
    fn apply(
        &self,
        set: &Arc<PolicySet>,
        tick: &ClassTick,
        breaker: Directive,
        memo: &mut ClassPolicyState,
        (now, deadline): (u64, Instant),
        notes: &mut Vec<Note>,
    ) -> (Directive, Option<Overlay>) {
        if memo.version != set.version {
            *memo = ClassPolicyState {
                version: set.version,
                ..Default::default()
            };
            // A set put back in force (a rollback) runs its policies afresh: what it had
            // quarantined for this class is no longer.
            set.unquarantine(tick.id);
        }
        let class = tick.id;
        let info = &self.classes[class.index()];
        let ctx = self.ctx(
            class.index(),
            tick.history.clone(),
            tick.state,
            tick.prediction,
            tick.admission.clone(),
        );
        let mut everyone: Vec<(i64, Decision)> = Vec::new();
        let mut rules = Vec::new();
        let mut hooks = Vec::new();
        for &i in &set.by_class[class.index()] {
            if memo.quarantined.contains(&i) {
                continue;
            }
            let policy = &set.policies[i];
            if policy.has_on_request {
                match set.hooks[i].tick(now) {
                    HookTurn::Same => {}
                    turn => notes.push(Note::Hook(i, turn)),
                }
                if !set.hooks[i].is_off() {
                    hooks.push(i);
                }
            }
            // A policy skipped (the tick's budget spent by those before it) keeps its last
            // decision: a bronze class's shed is not lifted because the loop is under strain.
            let decision = if Instant::now() >= deadline {
                notes.push(Note::Skipped(i));
                memo.last_decision(i)
            } else {
                let call_deadline = self.call_deadline().min(deadline);
                let result = self.decide(policy, ctx.clone(), call_deadline);
                if result.is_ok() {
                    memo.late.retain(|&(p, _)| p != i);
                }
                match result {
                    Ok(d) => {
                        memo.remember(i, d.clone());
                        d.map(Fresh)
                    }
                    // Stopped as the tick's budget ran out during this call: not this policy's
                    // fault alone. (A failure of its own is one, whenever it came.)
                    Err((_, reason))
                        if Instant::now() >= deadline && reason.starts_with(DEADLINE_REASON) =>
                    {
                        notes.push(Note::Skipped(i));
                        memo.last_decision(i)
                    }
                    Err((line, reason)) => {
                        let late = reason.starts_with(DEADLINE_REASON) && {
                            let n = match memo.late.iter_mut().find(|(p, _)| *p == i) {
                                Some((_, n)) => {
                                    *n += 1;
                                    *n
                                }
                                None => {
                                    memo.late.push((i, 1));
                                    1
                                }
                            };
                            n < LATE_QUARANTINE
                        };
                        if late {
                            // Its own call ran out of time: no decision this tick (the others'
                            // and the breaker's stand), quarantined after a few in a row.
                            notes.push(Note::Failed(
                                i,
                                line.or(policy.lines[0]),
                                reason,
                                Failure::Late,
                            ));
                            continue;
                        } else {
                            memo.quarantined.push(i);
                            set.quarantine(class, i);
                            memo.forget(i);
                            hooks.retain(|&h| h != i);
                            notes.push(Note::Failed(
                                i,
                                line.or(policy.lines[0]),
                                reason,
                                Failure::Quarantined,
                            ));
                            continue;
                        }
                    }
                }
            };
            let decision = match decision {
                Some(Fresh(d)) => {
                    for alert in d.alerts() {
                        notes.push(Note::Alert(i, alert.clone()));
                    }
                    d
                }
                // Said when it was decided.
                Some(Remembered(_)) if matches!(policy.mode, Mode::Shadow) => continue,
                Some(Remembered(d)) => d,
                None => continue,
            };
            match policy.mode {
                Mode::Shadow => notes.push(Note::Shadow(i, decision)),
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

    /// Say what a class's policies noted this tick: logs and metrics.
    fn emit(&self, set: &PolicySet, class: ClassId, notes: Vec<Note>) {
        let name = &self.classes[class.index()].name;
        for note in notes {
            match note {
                Note::Alert(i, alert) => self.raise(name, &set.policies[i], &alert, false),
                Note::Shadow(i, decision) => {
                    self.record_shadow(name, &set.policies[i], &decision, false)
                }
                Note::Failed(i, line, reason, failure) => {
                    self.report_failure(name, &set.policies[i], line, &reason, failure)
                }
                Note::Skipped(i) => self.count_skipped(set, class, i),
                Note::Hook(
                    i,
                    HookTurn::Off {
                        exhausted,
                        calls,
                        ticks,
                    },
                ) => {
                    tracing::warn!(service = %self.service, class = %name, policy = %set.policies[i].name,
                        exhausted, calls, off_for_ticks = ticks,
                        "on_request ran out of its budget on most requests of a tick; switched off \
                         (on again after off_for_ticks, or at the next load)");
                }
                Note::Hook(i, HookTurn::On) => {
                    tracing::info!(service = %self.service, class = %name, policy = %set.policies[i].name,
                        "on_request is on again after its time off");
                }
                Note::Hook(_, HookTurn::Same) => {}
            }
        }
    }

    /// A policy's alert: counted in `degrade_policy_alerts_total`, and a warning unless
    /// `limited` and over the policies' log rate (an `on_request` hook alerts per request).
    pub(super) fn raise(&self, class: &str, policy: &Policy, alert: &str, limited: bool) {
        if !limited || self.log.allow() {
            tracing::warn!(service = %self.service, class, policy = %policy.name, alert, "policy alert");
        }
        metrics::counter!(POLICY_ALERTS, "service" => self.service.to_string(), "class" => class.to_owned(), "policy" => policy.name.clone()).increment(1);
    }

    fn count_skipped(&self, set: &PolicySet, class: ClassId, policy: usize) {
        set.skipped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(POLICY_SKIPPED, "service" => self.service.to_string(), "class" => self.classes[class.index()].name.to_string(), "policy" => set.policies[policy].name.clone()).increment(1);
    }

    /// Install `set` as the new version; the old one becomes the rollback target.
    pub(crate) fn install(&self, mut set: PolicySet) -> u64 {
        let version = self.versions.fetch_add(1, Ordering::AcqRel) + 1;
        set.version = version;
        // Each (class, policy) pair's alert, error and skip counters exist from the load, at
        // 0: a counter created at its first increment starts at 1, and `rate()` or
        // `increase()` over it never sees that first alert.
        for (class, policies) in set.by_class.iter().enumerate() {
            let Some(c) = self.classes.get(class) else {
                continue;
            };
            for &i in policies {
                for name in [POLICY_ALERTS, POLICY_ERRORS, POLICY_SKIPPED] {
                    metrics::counter!(name, "service" => self.service.to_string(), "class" => c.name.to_string(), "policy" => set.policies[i].name.clone()).increment(0);
                }
            }
        }
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
        crate::metrics::count_result(
            POLICY_RELOADS,
            &[metrics::Label::new("service", self.service.to_string())],
            &["ok", "error"],
            if ok { "ok" } else { "error" },
        );
        self.load_failing.store(!ok, Ordering::Relaxed);
        metrics::gauge!(POLICY_LOAD_FAILING, "service" => self.service.to_string()).set(if ok {
            0.0
        } else {
            1.0
        });
    }
}

/// The policies as a control-loop stage: `on_tick` for every class within the tick's budget,
/// the overlay of per-request rules for the data path.
impl Stage for Runtime {
    fn observe(&self, _batch: &mut Batch<'_>) {
        self.tick_set.store(self.current());
    }

    fn decide(&self, classes: &[ClassTick], directives: &mut [Packed]) {
        let Some(set) = self.tick_set.load_full() else {
            for c in classes {
                self.overlays[c.id.index()].store(None);
            }
            return;
        };
        let mut work = Vec::new();
        for c in classes {
            if c.manual {
                // A manual command beats every policy: no overlay for its calls; its
                // policies still run, for their alerts.
                self.overlays[c.id.index()].store(None);
            }
            if set.by_class[c.id.index()].is_empty() {
                // Without policies, a class has no overlay and keeps the breaker's directive.
                self.overlays[c.id.index()].store(None);
            } else {
                // Its overlay stays in place while the policies run (the directive in force
                // may point to it), and is replaced with what they decide.
                work.push((c.clone(), Directive::unpack(directives[c.id.index()])));
            }
        }
        if work.is_empty() {
            return;
        }
        let mut manual = vec![false; directives.len()];
        for c in classes.iter().filter(|c| c.manual) {
            manual[c.id.index()] = true;
        }
        let deadline = Instant::now() + self.limits.max_tick_time;
        // On the control loop's thread, on a stack grown to what the limits let a script
        // reach (a runtime worker has 2 MiB); every call stops at its deadline, and policies
        // whose turn comes after the tick's budget are skipped.
        let outcomes = super::contain::with_stack(self.limits.stack_need(), || {
            self.core.run_tick(&set, work, deadline)
        });
        let mut skipped = 0usize;
        for o in outcomes {
            let i = o.id.index();
            if !manual[i] {
                let has_overlay = o.overlay.is_some();
                // The overlay first: a directive with the bit set always finds it.
                self.overlays[i].store(o.overlay.map(Arc::new));
                directives[i] = o.directive.pack().with_overlay(has_overlay);
            }
            skipped += o
                .notes
                .iter()
                .filter(|n| matches!(n, Note::Skipped(_)))
                .count();
            self.emit(&set, o.id, o.notes);
        }
        if skipped > 0 {
            tracing::warn!(service = %self.service, skipped, budget_ms = self.limits.max_tick_time.as_millis() as u64,
                "policies skipped: the tick's budget was spent; each kept its last decision");
        }
        metrics::counter!(POLICY_LOG_DROPPED, "service" => self.service.to_string())
            .absolute(self.log.dropped());
    }

    fn per_request(&self, class: usize, directive: Packed, req: &RequestView<'_>) -> Packed {
        match self.overlays[class].load().as_deref() {
            Some(overlay) => self.apply_overlay(overlay, directive, req),
            None => directive.with_overlay(false),
        }
    }
}
