//! Per-request policy rules: percentage and group rollouts, and `on_request` hooks.
//!
//! The control loop publishes, per class and per tick, the directive in force for everyone and,
//! only when the class has per-request rules, an [`Overlay`]: the decisions of policies rolled
//! out to a slice of traffic, and the policies with an `on_request` hook. A bit in the published
//! directive tells the data path to consult it; classes without such rules never pay for it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rhai::{Dynamic, ImmutableString};

use super::decision::{Decision, combine};
use super::engine::TickCtx;
use super::{Core, Mode, PolicySet, unwrap_error};
use crate::class::Route;
use crate::classify::RequestView;
use crate::gate::{Directive, Packed};

/// Which requests a policy applies to.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Selector {
    /// Basis points (0..=10_000) of rollout keys; `None` for everyone.
    pub(crate) rollout_bp: Option<u32>,
    /// Groups; empty for every group.
    pub(crate) groups: Vec<String>,
}

impl Selector {
    pub(crate) fn is_everyone(&self) -> bool {
        self.rollout_bp.is_none() && self.groups.is_empty()
    }

    /// Whether a request with this key bucket and group is in the slice.
    fn selects(&self, bucket: Option<u32>, group: Option<&str>) -> bool {
        let in_groups =
            self.groups.is_empty() || group.is_some_and(|g| self.groups.iter().any(|x| x == g));
        let in_rollout = match self.rollout_bp {
            None => true,
            Some(bp) => bucket.is_some_and(|b| b < bp),
        };
        in_groups && in_rollout
    }
}

/// The stable bucket (0..10_000) of a rollout key: FNV-1a, the same in every process and
/// version, so a key always falls on the same side of a rollout.
pub fn rollout_bucket(key: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 10_000) as u32
}

/// The per-request rules of one class for one tick.
#[derive(Debug)]
pub(crate) struct Overlay {
    pub(crate) route: Route,
    /// Decisions of policies rolled out to a slice, with their priority.
    pub(crate) rules: Vec<(Selector, i64, Decision)>,
    /// Policies (indices into `set`) with an `on_request` hook, and the context they see.
    pub(crate) hooks: Vec<usize>,
    pub(crate) set: Arc<PolicySet>,
    pub(crate) ctx: TickCtx,
}

/// What `on_request(ctx, req)` sees of the request.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub(crate) method: ImmutableString,
    pub(crate) path: ImmutableString,
    pub(crate) key: Option<ImmutableString>,
    pub(crate) group: Option<ImmutableString>,
    pub(crate) elapsed: Option<Duration>,
    pub(crate) headers: Option<http::HeaderMap>,
}

/// A start time further back than this is no request's (a proxy gives up on a request long
/// before): unknown, as a client's `x-request-start: 0` is.
const MAX_ELAPSED: Duration = Duration::from_secs(3600);

/// A start time ahead of this host's clock by more than this is not another host's clock
/// running a little ahead: unknown.
const MAX_AHEAD: Duration = Duration::from_secs(60);

/// How long ago a request started at `start_ms`, both in ms since the Unix epoch: `None` for
/// a start time no request has (more than an hour ago, or more than a minute ahead), zero
/// for one a little ahead (another host's clock).
fn elapsed_since(start_ms: u64, now_ms: u64) -> Option<Duration> {
    if start_ms > now_ms {
        return (start_ms - now_ms <= MAX_AHEAD.as_millis() as u64).then_some(Duration::ZERO);
    }
    let elapsed = Duration::from_millis(now_ms - start_ms);
    (elapsed <= MAX_ELAPSED).then_some(elapsed)
}

impl RequestInfo {
    fn new(view: &RequestView<'_>, with_headers: bool) -> Self {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            method: view.method.into(),
            path: view.path.into(),
            key: view.key.map(Into::into),
            group: view.group.map(Into::into),
            elapsed: view.started_unix_ms.and_then(|s| elapsed_since(s, now_ms)),
            headers: if with_headers {
                view.headers.cloned()
            } else {
                None
            },
        }
    }

    /// A sample request for validation.
    pub(crate) fn sample(elapsed_ms: u64) -> Self {
        Self {
            method: "POST".into(),
            path: "/sample".into(),
            key: Some("user-1".into()),
            group: None,
            elapsed: Some(Duration::from_millis(elapsed_ms)),
            headers: Some(http::HeaderMap::new()),
        }
    }
}

/// Register the request of `on_request(ctx, req)` with the engine. Strings longer than the
/// scripts' own limit (`max_string_size`; 0: none) are cut to it on a character boundary: a
/// client's 5,000-byte header read whole failed the hook with "data too large", which counts
/// as running out of its budget, so a client sending a few dozen such calls in a tick
/// switched the hook off for everyone.
pub(super) fn register(engine: &mut rhai::Engine, max_string_size: usize) {
    let cut = move |s: &str| -> ImmutableString {
        if max_string_size == 0 || s.len() <= max_string_size {
            return s.into();
        }
        let mut end = max_string_size;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].into()
    };
    let within = move |s: &ImmutableString| -> ImmutableString {
        if max_string_size == 0 || s.len() <= max_string_size {
            s.clone()
        } else {
            cut(s)
        }
    };
    // The request of `on_request(ctx, req)`.
    engine.register_type_with_name::<RequestInfo>("Request");
    engine
        .register_get("method", move |r: &mut RequestInfo| within(&r.method))
        .register_get("path", move |r: &mut RequestInfo| within(&r.path))
        .register_get("key", move |r: &mut RequestInfo| {
            r.key
                .as_ref()
                .map_or(Dynamic::UNIT, |k| Dynamic::from(within(k)))
        })
        .register_get("group", move |r: &mut RequestInfo| {
            r.group
                .as_ref()
                .map_or(Dynamic::UNIT, |g| Dynamic::from(within(g)))
        })
        .register_get("elapsed_ms", |r: &mut RequestInfo| {
            r.elapsed.map_or(0.0, |d| d.as_secs_f64() * 1e3)
        })
        .register_get("has_elapsed", |r: &mut RequestInfo| r.elapsed.is_some())
        .register_fn(
            "header",
            move |r: &mut RequestInfo, name: &str| -> Dynamic {
                r.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .and_then(|v| v.to_str().ok())
                    .map_or(Dynamic::UNIT, |v| Dynamic::from(cut(v)))
            },
        );
}

impl Core {
    /// Decide one request of a class whose directive carries the overlay bit.
    pub(crate) fn apply_overlay(
        &self,
        overlay: &Overlay,
        packed: Packed,
        view: &RequestView<'_>,
    ) -> Packed {
        let base = Directive::unpack(packed.with_overlay(false));
        let bucket = view.key.map(rollout_bucket);
        let mut decisions: Vec<(i64, Decision)> = overlay
            .rules
            .iter()
            .filter(|(sel, _, _)| sel.selects(bucket, view.group))
            .map(|(_, p, d)| (*p, d.clone()))
            .collect();
        if !overlay.hooks.is_empty() {
            let info = RequestInfo::new(view, true);
            for &i in &overlay.hooks {
                let policy = &overlay.set.policies[i];
                let health = &overlay.set.hooks[i];
                if !policy.selector.selects(bucket, view.group) || health.is_off() {
                    continue;
                }
                health.called();
                match self.decide_request(policy, overlay.ctx.clone(), info.clone()) {
                    Ok(Some(d)) => match policy.mode {
                        Mode::Enforce => {
                            for alert in d.alerts() {
                                self.raise(&overlay.ctx.class, policy, alert, true);
                            }
                            decisions.push((policy.priority, d));
                        }
                        Mode::Shadow => self.record_shadow(&overlay.ctx.class, policy, &d, true),
                    },
                    Ok(None) => {}
                    Err((line, reason, exhausted)) => {
                        // Fails open for this request only; counted each time, logged once
                        // per tick. The tick switches the hook off if it ran out of its
                        // budget on most requests (`HookHealth`).
                        if health.failed(exhausted) {
                            self.report_failure(
                                &overlay.ctx.class,
                                policy,
                                line.or(policy.lines[1]),
                                &reason,
                                super::Failure::Request,
                            );
                        } else {
                            self.count_error(&overlay.ctx.class, policy);
                        }
                    }
                }
            }
        }
        if decisions.is_empty() {
            return packed.with_overlay(false);
        }
        decisions.sort_by_key(|d| std::cmp::Reverse(d.0));
        combine(base, overlay.route, decisions.iter().map(|(p, d)| (*p, d))).pack()
    }

    /// One call of `on_request`; a failure's line, reason, and whether it ran out of its
    /// budget.
    fn decide_request(
        &self,
        policy: &super::Policy,
        ctx: TickCtx,
        req: RequestInfo,
    ) -> Result<Option<Decision>, (Option<usize>, String, bool)> {
        self.call_request(&policy.ast, (ctx, req), |out| {
            let out = out.map_err(|e| {
                let err = super::innermost(*e);
                let exhausted = super::exhausted(&err);
                let (line, reason) = unwrap_error(err);
                (line, reason, exhausted)
            })?;
            self.as_decision(out, "on_request")
                .map_err(|(line, reason)| (line, reason, false))
        })
    }

    /// Run `on_request` against sample requests at load.
    pub(crate) fn validate_request_hook(
        &self,
        policy: &super::Policy,
        ctx: TickCtx,
    ) -> Result<(), (Option<usize>, String)> {
        for elapsed in [0, 5_000] {
            self.decide_request(policy, ctx.clone(), RequestInfo::sample(elapsed))
                .map_err(|(line, reason, _)| (line, reason))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_time_no_request_has_is_unknown() {
        let now = 1_700_000_000_000;
        assert_eq!(
            elapsed_since(now - 3_000, now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(elapsed_since(now - 3_600_000, now), Some(MAX_ELAPSED));
        assert_eq!(
            elapsed_since(now - 3_600_001, now),
            None,
            "over an hour ago"
        );
        assert_eq!(elapsed_since(0, now), None, "1970");
        assert_eq!(
            elapsed_since(now + 5_000, now),
            Some(Duration::ZERO),
            "a clock ahead"
        );
        assert_eq!(
            elapsed_since(now + 60_001, now),
            None,
            "no clock is that far ahead"
        );
    }
}
