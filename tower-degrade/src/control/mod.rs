//! The control loop: once per tick, windows -> snapshots -> stages -> breakers -> directives.
//!
//! ```text
//! read every class's window (shards -> snapshot -> history, features)
//!   -> Stage::observe for every stage (the predictor's batched run)
//!   -> per class: breaker step -> Stage::decide for every stage (policies) -> publish
//!   -> metrics, status
//! ```
//!
//! Nothing here runs on the request path, nor on the async runtime's workers: each tick runs on
//! the runtime's blocking pool. The stages plug in through [`Stage`]: the loop names no
//! feature.

mod stage;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

pub(crate) use self::stage::{Batch, ClassTick, Stage};
use crate::breaker::{State, Transition};
use crate::class::ClassConfig;
use crate::class::{ClassId, Tier};
use crate::degrader::{ClassControl, ClassStatus, Shared, Shutdown, Status, health_score};
use crate::gate::{Directive, Packed};
use crate::metrics::{ClassMetrics, LimiterMetrics, ServiceMetrics};
use crate::window::History;
use crate::window::TickContext;

/// The control loop: ticks every `period` until the degrader is dropped or shut down.
pub(crate) async fn run(shared: Weak<Shared>, shutdown: Arc<Shutdown>, period: Duration) {
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let late = crate::every::Every::new(crate::every::LOG_EVERY);
    let mut last: Option<Instant> = None;
    loop {
        if shutdown.flag.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.notify.notified() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Off the runtime's workers: a tick runs policy scripts (each bounded by its deadline,
        // the tick by its budget) and reads every class, and a worker that ran it would hold
        // back the requests scheduled on it for as long.
        let service = shared.service.clone();
        let tick = move || {
            // When the windows are read, after any wait for a thread of the blocking pool: a
            // tick a whole tick (and 100 ms) or more behind the last reads windows that span
            // as much longer (the last tick ran long, or the process or its runtime stalled).
            let now = Instant::now();
            let gap = last.map_or(period, |l| now.saturating_duration_since(l));
            let read_late = is_late(gap, period);
            // The work's length in real time (not the runtime's clock, which a paused test
            // stops; nor the wait for a thread of the blocking pool, which it cannot shorten).
            let started = std::time::Instant::now();
            shared.tick(now, read_late);
            (started.elapsed(), now, gap, read_late)
        };
        let (took, gap, read_late) = match tokio::task::spawn_blocking(tick).await {
            Ok((took, now, gap, read_late)) => {
                last = Some(now);
                (took, gap, read_late)
            }
            // The runtime is shutting down.
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                tracing::error!(error = %e, "a control-loop tick panicked; ticking on");
                continue;
            }
        };
        if (took > period || read_late)
            && let Some(held) = late.ready()
        {
            tracing::warn!(service = %service, took_ms = took.as_secs_f64() * 1e3,
                since_last_ms = gap.as_secs_f64() * 1e3,
                tick_ms = period.as_secs_f64() * 1e3, also_late = held,
                "a control-loop tick took longer than the tick, or started late: ticks run \
                 late, and what is read per tick (`ctx.rps`, the windows' rates) overstates \
                 the traffic (the predictions whose input holds a window read a tick or more \
                 late are not used, for 68 ticks from it: the status's \
                 `predictor.unused_ticks_left`); lengthen the tick, govern fewer classes with \
                 the policies, or give the process the CPU it needs (said at most every 10 s; \
                 `also_late`: late ticks since the last line)");
        } else if took <= period && !read_late {
            late.reset();
        }
    }
}

/// Whether windows read `gap` after the last ones were read late: a whole tick or more behind
/// (they span at least two), and at least 100 ms (a short tick's timer jitter is not a stall).
fn is_late(gap: Duration, period: Duration) -> bool {
    gap >= 2 * period && gap - period >= Duration::from_millis(100)
}

/// A tick's directives, decided, and each class's count of manual commands when its was.
struct Decided {
    directives: Vec<Packed>,
    commands: Vec<u64>,
}

impl Shared {
    /// One control-loop tick: snapshot every class, run the stages, step its breaker, publish
    /// its directive.
    /// `read_late`: the windows read now span two ticks or more (the control loop's, not a
    /// manual [`tick_now`](crate::Degrader::tick_now)).
    pub(crate) fn tick(&self, now: Instant, read_late: bool) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        // Every class's window, history and features.
        let mut unused_ticks_left = 0;
        for (id, class) in self.registry.iter() {
            let mut ctl = self.control(id);
            let ctl = &mut *ctl;
            let mut snap = ctl.reader.read(
                &self.shards,
                id.index(),
                &self.gauges[id.index()],
                TickContext {
                    tick,
                    period: self.period,
                    sla_micros: class.sla_target().as_micros() as u64,
                    abandon_micros: class.abandon_after().map_or(u64::MAX, |d| {
                        u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
                    }),
                },
            );
            let gate = &self.gates[id.index()];
            (snap.probe_successes, snap.probe_failures) = gate.take_probes();
            snap.probe_permits = u64::from(gate.probes_left());
            Arc::make_mut(&mut ctl.history).push(snap);
            ctl.features.push(&snap, class.sla_target());
            if read_late {
                ctl.features.read_late();
            }
            unused_ticks_left = unused_ticks_left.max(ctl.features.unused_ticks_left());
        }
        self.predictor.inputs(read_late, unused_ticks_left);
        // Stages that work over every class at once (one batched prediction).
        let mut predictions = vec![None; self.registry.len()];
        let features = |i: usize, out: &mut [f32]| {
            self.control(ClassId(i as u16)).features.write(out);
        };
        let mut batch = Batch {
            classes: self.registry.len(),
            features: &features,
            predictions: &mut predictions,
        };
        for stage in self.stages() {
            stage.observe(&mut batch);
        }
        // Admission limits first, so policies see this tick's.
        let admission = self.tick_admission();
        let decided = self.decide(predictions, &admission, now);
        self.publish_decided(&decided, now);
        // Registered on the first tick, like the class handles, so a recorder installed after
        // the degrader was built is used.
        {
            let mut metrics = self
                .service_metrics
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let metrics = metrics.get_or_insert_with(|| ServiceMetrics::new(&self.service));
            if read_late {
                metrics.late_tick();
            }
        }
        self.publish_status();
    }

    /// Per class: breaker, then the stages over every class at once (the policies within the
    /// tick's budget; a class under a manual command keeps its directive, its policies run for
    /// their alerts). Each class's manual commands so far are noted
    /// with its directive, for [`publish_decided`](Self::publish_decided).
    fn decide(
        &self,
        predictions: Vec<Option<f64>>,
        admission: &[crate::admit::LimiterState],
        now: Instant,
    ) -> Decided {
        let mut directives = Vec::with_capacity(self.registry.len());
        let mut commands = Vec::with_capacity(self.registry.len());
        let mut views = Vec::new();
        for (id, class) in self.registry.iter() {
            let mut ctl = self.control(id);
            let ctl = &mut *ctl;
            commands.push(ctl.commands);
            let snap = ctl.history.latest().copied().unwrap_or_default();
            let prediction = predictions[id.index()];
            ctl.prediction = prediction;
            // Until a class has a whole window of history its input is zero-padded, and zeros
            // read as an outage (success rate 0): a model that does not leave the padding out
            // degraded every class at start-up, and the calibration learnt those scores as
            // healthy. The breaker uses (and learns) predictions from then on, once a batch
            // that overran can no longer stand for one made before (`is_full`).
            let prediction = prediction.filter(|_| ctl.features.is_full());
            if !self.limiters.is_empty() {
                let gate = &self.gates[id.index()];
                gate.score
                    .store(admission_score(class, &ctl.history), Ordering::Relaxed);
                // How long the class's calls have been turned away for overload: a tick more
                // for each tick that turned one away, halved by each that did not.
                let was = Duration::from_millis(gate.overloaded_ms.load(Ordering::Relaxed).into());
                let lasted = if snap.overloaded > 0 {
                    (was + self.period).min(crate::gate::MAX_OVERLOAD_PUSHBACK)
                } else {
                    was / 2
                };
                let ms = u32::try_from(lasted.as_millis()).unwrap_or(u32::MAX);
                gate.overloaded_ms.store(ms, Ordering::Relaxed);
            }
            // A trial takes the predictions; the breaker in force then goes by its rules.
            let trial = if ctl.trial_running() {
                ctl.trial
                    .as_mut()
                    .and_then(|t| t.step_predicted(&snap, prediction, now))
            } else {
                None
            };
            let used = if ctl.trial.is_some() {
                None
            } else {
                prediction
            };
            let acted = ctl.breaker.step_predicted(&snap, used, now);
            if let Some(t) = &acted {
                self.on_transition(id, class.tier(), ctl, t);
            }
            // The trial's own transitions: one into the state the breaker in force entered
            // this tick too (a rule's trip, seen by both, from wherever each was) is reported
            // once, as the breaker in force made it.
            if let Some(t) = trial.filter(|t| acted.as_ref().is_none_or(|a| a.to != t.to)) {
                self.on_transition(id, class.tier(), ctl, &t);
            }
            directives.push(ctl.breaker.directive(now).pack());
            // A manual command always wins over the stages: they see the class (its policies'
            // alerts are raised), and leave its directive as it is.
            views.push(ClassTick {
                id,
                history: ctl.history.clone(),
                state: ctl.breaker.state(),
                prediction,
                admission: self.gates[id.index()]
                    .limiter
                    .and_then(|l| admission.get(usize::from(l)).cloned()),
                manual: ctl.breaker.is_manual(),
            });
        }
        for stage in self.stages() {
            stage.decide(&views, &mut directives);
        }
        Decided {
            directives,
            commands,
        }
    }

    /// Publish what [`decide`](Self::decide) decided, under each class's lock: a class given a
    /// manual command since (the stages ran outside the lock) publishes its breaker's own
    /// directive instead, so that the command, which published at once, is not undone for a
    /// tick by a decision made before it.
    fn publish_decided(&self, decided: &Decided, now: Instant) {
        for (id, class) in self.registry.iter() {
            let mut ctl = self.control(id);
            let ctl = &mut *ctl;
            if ctl.commands == decided.commands[id.index()] {
                self.publish(id, decided.directives[id.index()]);
            } else {
                self.publish(id, ctl.breaker.directive(now).pack());
            }
            let snap = ctl.history.latest().copied().unwrap_or_default();
            let predicting = ctl.predicting_mut();
            match predicting.reach_changed() {
                Some(true) => tracing::warn!(
                    service = %self.service, class = %self.names[id.index()],
                    threshold = predicting.predict_threshold().unwrap_or(1.0),
                    "the calibrated prediction threshold is beyond every probability the model \
                     can answer: its scores on this class's healthy ticks reach 1, or a few far \
                     above the rest lifted the fitted tail, so it cannot warn of this class (it \
                     reports only) until newer healthy scores replace them; if it lasts, a model \
                     that separates this class's healthy ticks from trouble is needed"
                ),
                Some(false) => tracing::info!(
                    service = %self.service, class = %self.names[id.index()],
                    "the calibrated prediction threshold is within reach again"
                ),
                None => {}
            }
            let (threshold, record) = (
                ctl.predicting().predict_threshold(),
                ctl.predicting().prediction_record(),
            );
            let metrics = ctl.metrics.get_or_insert_with(|| {
                ClassMetrics::new(
                    &self.service,
                    &self.names[id.index()],
                    class.tier(),
                    self.predictor.is_attached(),
                )
            });
            metrics.record_tick(
                &snap,
                ctl.reader.last_histogram(),
                ctl.breaker.state(),
                ctl.prediction,
                threshold,
                record,
            );
        }
    }

    /// Update every admission limiter from what its tick measured (and the system signal).
    fn tick_admission(&self) -> Vec<crate::admit::LimiterState> {
        if self.limiters.is_empty() {
            return Vec::new();
        }
        let mut adm = self.admission.lock().unwrap_or_else(|e| e.into_inner());
        let adm = &mut *adm;
        let pressure = adm
            .cpu
            .as_mut()
            .and_then(|(signal, threshold)| signal.usage().map(|u| u > *threshold))
            .unwrap_or(false);
        adm.states = self
            .limiters
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let samples = self
                    .shards
                    .iter()
                    .fold(0u64, |sum, s| sum.wrapping_add(s.take_samples(i)));
                l.tick(pressure, samples, self.period)
            })
            .collect();
        if adm.metrics.is_empty() {
            adm.metrics = self
                .limiters
                .iter()
                .map(|l| LimiterMetrics::new(&self.service, &l.name))
                .collect();
        }
        for (m, s) in adm.metrics.iter().zip(&adm.states) {
            m.record(s);
        }
        adm.states.clone()
    }

    /// Publish a class's directive for the data path. A directive that turns calls away without
    /// saying when to come back, or saying sooner, gets the next tick, when it may change.
    /// Once the loop is shut down no tick comes to lift it: the class admits instead
    /// ([`stand_down`](Self::stand_down)).
    pub(crate) fn publish(&self, id: ClassId, directive: Packed) {
        let directive = if self.shutdown.flag.load(Ordering::Acquire) {
            Packed::ADMIT
        } else {
            directive.with_retry_at_least(self.period)
        };
        self.gates[id.index()].directive.store_packed(directive);
    }

    /// The control loop has stopped for good: every class admits its calls, as a class
    /// closed at that moment does. An open class's refusal said to come back after the open
    /// duration, which only a tick ends: refused for ever, told each time to retry within a
    /// second (found by a user's trial of the task API). A tick still running publishes
    /// admits too ([`publish`](Self::publish)).
    pub(crate) fn stand_down(&self) {
        for (id, _) in self.registry.iter() {
            self.gates[id.index()].directive.store_packed(Packed::ADMIT);
        }
        self.publish_status();
    }

    pub(crate) fn on_transition(
        &self,
        id: ClassId,
        tier: Tier,
        ctl: &mut ClassControl,
        t: &Transition,
    ) {
        if t.enforced && t.to == State::HalfOpen {
            self.gates[id.index()].set_probes(ctl.breaker.config().half_open_probes);
        }
        crate::metrics::transition(&self.service, &self.names[id.index()], tier, t);
    }

    pub(crate) fn publish_status(&self) {
        let attached = self.predictor.is_attached();
        let classes: Vec<ClassStatus> = self
            .registry
            .iter()
            .map(|(id, c)| {
                let ctl = self.control(id);
                ClassStatus {
                    name: self.names[id.index()].clone(),
                    tier: c.tier(),
                    state: ctl.breaker.state(),
                    // A trial's state is what the class would be in with the predictor
                    // acting: the shadow asked for.
                    shadow_state: ctl.shadow_state(),
                    manual: ctl.breaker.is_manual(),
                    directive: Directive::unpack(self.gates[id.index()].directive.load()),
                    window: ctl.history.latest().copied().unwrap_or_default(),
                    prediction: ctl.prediction,
                    // As the metrics report them: with a predictor attached, whether or not
                    // it answered this tick.
                    prediction_threshold: attached
                        .then(|| ctl.predicting().predict_threshold())
                        .flatten(),
                    calibrating: attached && ctl.predicting().predict_threshold().is_none(),
                    calibration_left: attached
                        .then(|| ctl.predicting().calibration_left())
                        .flatten(),
                    calibration_restored: attached && ctl.predicting().calibration_restored(),
                    prediction_record: attached.then(|| ctl.predicting().prediction_record()),
                    predict_trial: ctl.trial.is_some(),
                }
            })
            .collect();
        let health_score = health_score(&classes);
        if let Some(sm) = &*self
            .service_metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            sm.health(health_score);
        }
        let admission = self
            .admission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .states
            .clone();
        self.status.store(Arc::new(Status {
            service: self.service.clone(),
            tick: self.tick.load(Ordering::Relaxed),
            stopped: self.shutdown.flag.load(Ordering::Acquire),
            health_score,
            classes,
            admission,
            predictor: self.predictor.status(),
        }));
    }
}

/// The class's dynamic score within its tier for the admission queue, from its latest window:
/// the burst ratio is the window's rate over the mean rate of the last 10 windows.
fn admission_score(class: &ClassConfig, history: &History) -> u16 {
    let Some(latest) = history.latest() else {
        return 0;
    };
    let (sum, n) = history
        .iter()
        .take(10)
        .fold((0.0, 0u32), |(s, n), w| (s + w.rps(), n + 1));
    let mean = sum / f64::from(n.max(1));
    let burst = if mean > 0.0 { latest.rps() / mean } else { 1.0 };
    crate::admit::score(
        class.tier(),
        class.sla_target().as_secs_f64(),
        latest.rps(),
        latest.p99.as_secs_f64(),
        burst,
    )
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use crate::gate::Packed;
    use crate::{ClassConfig, Degrader};

    /// A tick decides outside the classes' locks (its stages run over every class at once) and
    /// then publishes: a command given in between published at once, and was overwritten by
    /// the older decision for a whole tick (forced open, calls still admitted; reset, calls
    /// still refused).
    #[tokio::test]
    async fn a_command_given_while_a_tick_decides_is_not_undone_when_it_publishes() {
        let (d, _worker) = Degrader::builder("shop")
            .class(ClassConfig::gold("pay"))
            .build_with_worker()
            .unwrap();
        let shared = &d.shared;
        let pay = d.class_id("pay").unwrap().index();
        let published = || shared.gates[pay].directive.load();
        let decide = || {
            let now = Instant::now();
            (
                shared.decide(vec![None; shared.registry.len()], &[], now),
                now,
            )
        };
        type Command =
            fn(&Degrader, &str) -> Result<crate::breaker::State, crate::error::ConfigError>;
        let commands: [(&str, Command); 2] = [
            ("force_open", Degrader::force_open),
            ("reset", Degrader::reset),
        ];
        for (name, command) in commands {
            let (decided, now) = decide();
            command(&d, "pay").unwrap();
            let commanded = published();
            assert_ne!(
                decided.directives[pay].kind(),
                commanded.kind(),
                "{name}: the decision made before it differs"
            );
            shared.publish_decided(&decided, now);
            assert_eq!(published(), commanded, "{name} stands");
        }
        // With no command since, the tick's own decision is published.
        let (decided, now) = decide();
        shared.publish_decided(&decided, now);
        assert_eq!(
            published(),
            Packed::ADMIT.with_retry_at_least(shared.period)
        );
    }
}
