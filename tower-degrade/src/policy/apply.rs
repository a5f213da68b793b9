//! Running the policies on the tick: decide per class, combine, quarantine failures, and the
//! policies as a control-loop stage.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rhai::Dynamic;

use super::decision::{self, Action, Decision};
use super::request::Overlay;
use super::{ClassPolicyState, Mode, Policy, PolicySet, Runtime, TickCtx, unwrap_error};
use crate::class::ClassId;
use crate::classify::RequestView;
use crate::control::{Batch, ClassTick, Stage};
use crate::gate::{Directive, Packed};
use crate::metrics::{
    POLICY_ALERTS, POLICY_ERRORS, POLICY_RELOADS, POLICY_SHADOW_DECISIONS, POLICY_VERSION,
};

impl Runtime {
    /// One `on_tick` call: `Ok(None)` for no opinion.
    pub(super) fn decide(
        &self,
        policy: &Policy,
        ctx: TickCtx,
    ) -> Result<Option<Decision>, (Option<usize>, String)> {
        let out = self
            .call(&policy.ast, "on_tick", (ctx,))
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
        hook: &str,
    ) {
        let at = line
            .map(|l| format!("{}:{l}", policy.file))
            .unwrap_or_else(|| policy.file.clone());
        if hook == "on_request" {
            tracing::warn!(
                service = %self.service, class, policy = %policy.name, hook, at, reason,
                "policy hook failed on a request, which was decided without it (logged once per tick)"
            );
        } else {
            tracing::warn!(
                service = %self.service, class, policy = %policy.name, hook, at, reason,
                "policy failed; quarantined for this class until the next load"
            );
        }
        metrics::counter!(POLICY_ERRORS, "service" => self.service.to_string(), "class" => class.to_owned(), "policy" => policy.name.clone()).increment(1);
    }

    pub(super) fn record_shadow(&self, class: &str, policy: &Policy, decision: &Decision) {
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
            tick.admission.cloned(),
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
                if let Some((errors, calls)) = set.hooks[i].tick() {
                    tracing::warn!(service = %self.service, class = %info.name, policy = %policy.name,
                        errors, calls, "on_request failed on most requests of a tick; switched off until the next load");
                }
                if !set.hooks[i].is_off() {
                    hooks.push(i);
                }
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

/// The policies as a control-loop stage: `on_tick` per class after its breaker, the overlay of
/// per-request rules for the data path.
impl Stage for Runtime {
    fn observe(&self, _batch: &mut Batch<'_>) {
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
