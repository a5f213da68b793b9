//! The predictor's plug-in point: batched per tick, within a budget, driving the breaker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};
use tower_degrade::breaker::{BreakerConfig, Calibration, Calibrations, PredictionRecord};
use tower_degrade::predict::{N_FEATURES, Predictor, PredictorConfig, WINDOW};
use tower_degrade::{BoxError, ClassConfig, Degrader, breaker::State, clock::LatencyClock};

#[path = "../support.rs"]
mod support;

#[path = "../logs.rs"]
mod logs;

use support::{failing_after, slow_failing};

/// Records every batch it sees and answers with fixed probabilities.
#[derive(Clone, Default)]
struct Recorder {
    batches: Arc<Mutex<Vec<Vec<f32>>>>,
    answer: Arc<Mutex<Vec<f32>>>,
}

impl Predictor for Recorder {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        self.batches.lock().unwrap().push(input.to_vec());
        let answer = self.answer.lock().unwrap();
        for (o, a) in out.iter_mut().zip(answer.iter()) {
            *o = *a;
        }
        Ok(())
    }
}

/// The default predictor settings with a budget no host is too slow for: the tick waits for
/// the model in real time, and under a busy test run a mock's answer came after the default
/// 8 ms (the tick then keeps the last prediction, which a test of what is learnt when does not
/// expect). The tests of overruns and of a model that fails or dies keep the default: they
/// are about the budget.
fn patient() -> PredictorConfig {
    let mut config = PredictorConfig::default();
    config.budget = Duration::from_secs(10);
    config
}

/// `d` after two windows of quiet ticks: the breaker uses a class's predictions once its
/// input is no longer zero-padded (a window and the few ticks a late batch stands for).
fn filled(d: Degrader) -> Degrader {
    for _ in 0..2 * WINDOW {
        d.tick_now();
    }
    d
}

/// A degrader with `p` attached and the seed's fixed threshold (0.87).
fn with_predictor(p: impl Predictor) -> Degrader {
    Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .breaker(BreakerConfig::default().predict_threshold(0.87))
        .class(ClassConfig::gold("pay"))
        .class(ClassConfig::silver("stock"))
        .predictor(p, PredictorConfig::default())
        .build_with_worker()
        .unwrap()
        .0
}

#[tokio::test(start_paused = true)]
async fn one_batch_per_tick_over_every_class_newest_window_last() {
    let rec = Recorder::default();
    *rec.answer.lock().unwrap() = vec![0.1, 0.2, 0.9];
    let d = with_predictor(rec.clone());
    let warmups = rec.batches.lock().unwrap().len();
    assert_eq!(warmups, 1, "warmed up once at build");
    let mut svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(failing_after(0));
    for i in 0..10 {
        svc.ready().await.unwrap().call(i < 3).await.ok();
    }
    d.tick_now();
    let batches = rec.batches.lock().unwrap();
    assert_eq!(batches.len(), 2);
    let input = &batches[1];
    assert_eq!(
        input.len(),
        3 * WINDOW * N_FEATURES,
        "[default, pay, stock] x 64 x 8"
    );
    let stock_newest = (2 * WINDOW + WINDOW - 1) * N_FEATURES;
    assert!(
        (input[stock_newest + 1] - 0.7).abs() < 1e-6,
        "success rate 7/10"
    );
    assert!(
        (input[stock_newest + 2] - 0.3).abs() < 1e-6,
        "error rate 3/10"
    );
    assert!(
        input[2 * WINDOW * N_FEATURES..stock_newest]
            .iter()
            .all(|v| *v == 0.0),
        "zero-padded"
    );
    let status = d.status();
    let preds: Vec<_> = status.classes.iter().map(|c| c.prediction).collect();
    assert_eq!(
        preds,
        [
            Some(0.1f32 as f64),
            Some(0.2f32 as f64),
            Some(0.9f32 as f64)
        ]
    );
}

/// Predicts failure from the trend: p99 over the SLA rose for 3 ticks in a row and is above 2x.
struct Trend;

impl Predictor for Trend {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        for (class, p) in out.iter_mut().enumerate() {
            let p99 = |ago: usize| input[(class * WINDOW + WINDOW - 1 - ago) * N_FEATURES + 5];
            let rising = p99(0) > p99(1) && p99(1) > p99(2) && p99(2) > p99(3);
            *p = if rising && p99(0) > 2.0 { 0.95 } else { 0.05 };
        }
        Ok(())
    }
}

/// `stock` with [`Trend`] at the seed's fixed threshold (no warm-up).
fn trend() -> Degrader {
    stock_with(Trend, BreakerConfig::default().predict_threshold(0.87))
}

/// `stock` with `p` attached and `breaker`, filled.
fn stock_with(p: impl Predictor, breaker: BreakerConfig) -> Degrader {
    filled(
        Degrader::builder("shop")
            .latency_clock(LatencyClock::Tokio)
            .breaker(breaker)
            .class(ClassConfig::silver("stock"))
            .predictor(p, patient())
            .build_with_worker()
            .unwrap()
            .0,
    )
}

/// The seed's fixed threshold, the predictor as a trial.
fn on_trial() -> BreakerConfig {
    BreakerConfig::default()
        .predict_threshold(0.87)
        .predict_shadow(true)
}

/// The same class with no predictor: the threshold rule alone.
fn without_predictor() -> Degrader {
    filled(
        Degrader::builder("shop")
            .latency_clock(LatencyClock::Tokio)
            .class(ClassConfig::silver("stock"))
            .build_with_worker()
            .unwrap()
            .0,
    )
}

/// A slow leak on `stock` (SLA 200 ms): latency grows 100 ms per tick, errors grow with it.
/// Returns the tick at which the class left Closed.
async fn leak(d: &Degrader) -> usize {
    leak_until(d, |d| d.state("stock").unwrap() != State::Closed).await
}

/// The leak until `done` holds after a tick; returns that tick.
async fn leak_until(d: &Degrader, mut done: impl FnMut(&Degrader) -> bool) -> usize {
    let mut svc = d.layer(d.class_id("stock").unwrap()).layer(slow_failing());
    for tick in 1..=30 {
        let ms = 100 * tick as u64;
        let fail_every = if tick > 4 { 8 } else { 1_000 };
        for i in 0..20 {
            let _ = svc
                .ready()
                .await
                .unwrap()
                .call((ms, i % fail_every == 0))
                .await;
        }
        d.tick_now();
        if done(d) {
            return tick;
        }
    }
    panic!("the leak ended first");
}

/// `stock`'s prediction record.
fn record(d: &Degrader) -> PredictionRecord {
    let status = d.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    stock.prediction_record.expect("a predictor is attached")
}

#[tokio::test(start_paused = true)]
async fn the_predictor_degrades_before_the_threshold_rule_would() {
    let rule_tick = leak(&without_predictor()).await;

    // The seed's fixed threshold: no warm-up (the calibrated default is shown below).
    let predicted = trend();
    let predicted_tick = leak(&predicted).await;
    assert_eq!(predicted.state("stock").unwrap(), State::Degraded);
    let lead = rule_tick - predicted_tick;
    eprintln!(
        "threshold rule degraded at tick {rule_tick}, the predictor at tick {predicted_tick}: lead {lead} ticks"
    );
    assert!(
        lead >= 2,
        "lead {lead} ticks (rule {rule_tick}, predictor {predicted_tick})"
    );
}

#[tokio::test(start_paused = true)]
async fn the_record_shows_a_warning_the_breach_confirmed_and_its_lead() {
    let none = without_predictor();
    assert!(
        none.status()
            .classes
            .iter()
            .all(|c| c.prediction_record.is_none()),
        "no predictor, no record"
    );
    // The rule alone: the leak's first breaching window is the first of the rule's three.
    let first_breach = leak(&none).await - 2;
    let d = trend();
    let mut warned = None;
    let confirmed_at = leak_until(&d, |d| {
        if d.state("stock").unwrap() != State::Closed {
            warned.get_or_insert(d.status().tick);
        }
        record(d).confirmed > 0
    })
    .await;
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (1, 0, 0), "{r:?}");
    let lead = r.last_lead_ticks.unwrap();
    eprintln!(
        "warned {lead} ticks before the breach (tick {confirmed_at}, the rule's first breaching window: {first_breach})"
    );
    assert_eq!(
        u64::from(lead),
        d.status().tick - warned.unwrap(),
        "the ticks from the warning to the breach"
    );
    assert!(lead >= 2, "{r:?}");
    // Degraded early, the class admits a share of its calls, which can move the breach a
    // tick or so; it is still the leak's.
    assert!(
        (first_breach..first_breach + 3).contains(&confirmed_at),
        "{confirmed_at}"
    );

    // In MetricsOnly the class is a trial that changes nothing: the shadow machine warns,
    // the class serves every call, and the breach comes when the rule alone sees it.
    let shadow = trend();
    shadow.metrics_only("stock").unwrap();
    let confirmed_at = leak_until(&shadow, |d| record(d).confirmed > 0).await;
    assert_eq!(shadow.state("stock").unwrap(), State::MetricsOnly);
    assert_eq!(confirmed_at, first_breach);
    let r = record(&shadow);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (1, 0, 0), "{r:?}");
    assert!(r.last_lead_ticks.unwrap() >= 2, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_predictor_on_trial_warns_and_keeps_its_record_while_the_rules_alone_act() {
    let rule_tick = leak(&without_predictor()).await;
    let first_breach = rule_tick - 2;
    let d = stock_with(Trend, on_trial());
    let mut warned = None;
    let left = leak_until(&d, |d| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        assert!(stock.predict_trial, "the status says it is on trial");
        if stock.shadow_state != State::Closed {
            warned.get_or_insert(status.tick);
        }
        stock.state != State::Closed
    })
    .await;
    let rules = without_predictor().status();
    assert!(!rules.classes[1].predict_trial, "{:?}", rules.classes[1]);
    // The class is left to the rules: degraded when the rule alone degrades it, not before.
    assert_eq!(left, rule_tick);
    assert_eq!(d.state("stock").unwrap(), State::Degraded);
    // Its trial warned ticks before, and the breach confirmed the warning with that lead.
    let warned = warned.expect("the trial warned");
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (1, 0, 0), "{r:?}");
    assert!(r.last_lead_ticks.unwrap() >= 2, "{r:?}");
    // In the leak's ticks: before the first breaching window.
    let warned = left as u64 - (d.status().tick - warned);
    assert!(
        warned < first_breach as u64,
        "warned at {warned}, breached at {first_breach}"
    );
}

#[test]
fn a_trial_reports_a_trip_both_see_once_and_follows_the_class_through_manual_commands() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let shadow = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        stock.shadow_state
    };
    let (d, recorded) = metrics_during(|| {
        rt.block_on(async {
            let d = stock_with(Constant(0.05, Duration::ZERO), on_trial());
            // Every call failing: the breaker in force and its trial open in the same tick.
            support::window(&d, "stock", 40, 1, 0).await;
            d
        })
    });
    assert_eq!(d.state("stock").unwrap(), State::Open);
    assert_eq!(shadow(&d), State::Open);
    let trips = |enforced| {
        counter(
            &recorded,
            "degrade_breaker_transitions_total",
            &[("from", "closed"), ("to", "open"), ("enforced", enforced)],
        )
    };
    assert_eq!(trips("true"), Some(1));
    assert_eq!(trips("false"), None, "the trial's trip is the same one");
    // Under a manual command, the state in force; a reset closes the trial with the class.
    d.force_open("stock").unwrap();
    assert_eq!(shadow(&d), State::ForcedOpen);
    d.reset("stock").unwrap();
    assert_eq!(d.state("stock").unwrap(), State::Closed);
    assert_eq!(shadow(&d), State::Closed, "the trial reset with the class");

    // The trial degraded by its predictions, then the same trip: from closed in force, from
    // degraded in the trial, one trip into open all the same.
    let (d, recorded) = metrics_during(|| {
        rt.block_on(async {
            let d = stock_with(Constant(0.95, Duration::ZERO), on_trial());
            assert_eq!(shadow(&d), State::Degraded);
            support::window(&d, "stock", 40, 1, 0).await;
            d
        })
    });
    assert_eq!(
        (d.state("stock").unwrap(), shadow(&d)),
        (State::Open, State::Open)
    );
    let to_open = |enforced| {
        counter(
            &recorded,
            "degrade_breaker_transitions_total",
            &[("to", "open"), ("enforced", enforced)],
        )
    };
    assert_eq!(to_open("true"), Some(1));
    assert_eq!(
        to_open("false"),
        None,
        "the trial's degraded -> open is the same trip"
    );
    let warned = counter(
        &recorded,
        "degrade_breaker_transitions_total",
        &[
            ("from", "closed"),
            ("to", "degraded"),
            ("enforced", "false"),
        ],
    );
    assert_eq!(warned, Some(1), "the trial's warning, not enforced");
}

#[test]
fn a_breach_the_predictor_did_not_warn_of_is_missed_and_counted() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let (d, recorded) = metrics_during(|| {
        rt.block_on(async {
            // The model sees nothing coming; the class fails outright and opens.
            let dial = Dial::default();
            *dial.0.lock().unwrap() = 0.05;
            let d = filled(
                Degrader::builder("shop")
                    .latency_clock(LatencyClock::Tokio)
                    .breaker(BreakerConfig::default().predict_threshold(0.87))
                    .class(ClassConfig::silver("stock"))
                    .predictor(dial, patient())
                    .build_with_worker()
                    .unwrap()
                    .0,
            );
            healthy(&d, 5).await;
            let mut svc = d.layer(d.class_id("stock").unwrap()).layer(slow_failing());
            for _ in 0..3 {
                for _ in 0..20 {
                    let _ = svc.ready().await.unwrap().call((900, true)).await;
                }
                d.tick_now();
            }
            d
        })
    });
    assert_ne!(d.state("stock").unwrap(), State::Closed);
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (0, 0, 1), "{r:?}");
    assert_eq!(r.last_lead_ticks, None);
    let counted = |result: &str| {
        counter(
            &recorded,
            tower_degrade::metrics::PREDICTIONS,
            &[("class", "stock"), ("result", result)],
        )
    };
    assert_eq!(counted("missed"), Some(1));
    assert_eq!(counted("confirmed"), Some(0));
}

/// [`Trend`] for a model that scores this service high even when it is healthy (0.88 to 0.92):
/// what a model trained elsewhere does to a service it has not seen.
struct Biased(u64);

impl Predictor for Biased {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        Trend.predict(input, out)?;
        for p in out.iter_mut() {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let noise = (self.0 >> 40) as f32 / (1u64 << 24) as f32;
            *p = if *p > 0.5 { 0.999 } else { 0.88 + 0.04 * noise };
        }
        Ok(())
    }
}

/// `ticks` healthy ticks of `stock`: 5 calls of 50 ms each, no error.
async fn healthy(d: &Degrader, ticks: usize) {
    let mut svc = d.layer(d.class_id("stock").unwrap()).layer(slow_failing());
    for _ in 0..ticks {
        for _ in 0..5 {
            let _ = svc.ready().await.unwrap().call((50, false)).await;
        }
        d.tick_now();
    }
}

fn biased(breaker: BreakerConfig) -> Degrader {
    filled(
        Degrader::builder("shop")
            .latency_clock(LatencyClock::Tokio)
            .breaker(breaker)
            .class(ClassConfig::silver("stock"))
            .predictor(Biased(1), patient())
            .build_with_worker()
            .unwrap()
            .0,
    )
}

#[tokio::test(start_paused = true)]
async fn the_default_threshold_calibrates_per_class_then_warns_early() {
    // A fixed 0.87 trips this service while it is healthy.
    let fixed = biased(BreakerConfig::default().predict_threshold(0.87));
    healthy(&fixed, 5).await;
    assert_eq!(
        fixed.state("stock").unwrap(),
        State::Degraded,
        "a false trip"
    );

    // Calibrated (the default, with the shortest warm-up, 2,500 healthy ticks): while it
    // learns, the predictor only reports, and says so.
    let calibrated = biased(
        BreakerConfig::default().predict_calibrated(Calibration::default().warm_up_ticks(1)),
    );
    healthy(&calibrated, 2_499).await;
    let status = calibrated.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    assert!(stock.calibrating, "{stock:?}");
    assert_eq!(stock.prediction_threshold, None);
    assert_eq!(stock.state, State::Closed, "no trip while calibrating");
    // Warmed up: a threshold above this class's healthy scores, and a day's worth of
    // healthy ticks' budget kept over the next 600.
    healthy(&calibrated, 601).await;
    let status = calibrated.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    assert!(!stock.calibrating, "{stock:?}");
    let threshold = stock.prediction_threshold.unwrap();
    assert!(threshold > 0.92 && threshold < 0.999, "{threshold}");
    assert_eq!(stock.state, State::Closed, "no false trip");
    // And the leak is still caught ahead of the threshold rule.
    let rule_tick = leak(&without_predictor()).await;
    let predicted_tick = leak(&calibrated).await;
    assert!(
        predicted_tick + 2 <= rule_tick,
        "rule {rule_tick}, calibrated predictor {predicted_tick}"
    );
}

/// Answers what the test sets, for every class, give or take a little noise (a model's
/// scores are never flat).
#[derive(Clone, Default)]
struct Dial(Arc<Mutex<f32>>, usize);

impl Predictor for Dial {
    fn predict(&mut self, _: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        self.1 += 1;
        let noise = ((self.1 * 37) % 11) as f32 / 10.0 - 0.5; // -0.5..=0.5
        let p = *self.0.lock().unwrap();
        out.fill((p * (1.0 + 0.1 * noise)).clamp(0.0, 1.0));
        Ok(())
    }
}

/// `stock` with a [`Dial`] at 0.05, `breaker` and a control loop ticking every `tick`.
fn on_a_dial(tick: Duration, breaker: BreakerConfig) -> (Degrader, Dial) {
    let dial = Dial::default();
    *dial.0.lock().unwrap() = 0.05;
    let d = filled(
        Degrader::builder("shop")
            .latency_clock(LatencyClock::Tokio)
            .tick(tick)
            .breaker(breaker)
            .class(ClassConfig::silver("stock"))
            .predictor(dial.clone(), patient())
            .build_with_worker()
            .unwrap()
            .0,
    );
    (d, dial)
}

/// `stock` with a [`Dial`] at 0.05 and the calibrated default (the shortest warm-up), after
/// 2,600 healthy ticks: calibrated.
async fn calibrated_on_a_dial() -> (Degrader, Dial) {
    let (d, dial) = on_a_dial(
        Duration::from_millis(500),
        BreakerConfig::default().predict_calibrated(Calibration::default().warm_up_ticks(1)),
    );
    healthy(&d, 2_600).await;
    (d, dial)
}

#[tokio::test(start_paused = true)]
async fn warnings_that_flap_are_one_false_alarm_and_a_later_one_is_judged_on_its_own() {
    let (d, dial) = calibrated_on_a_dial().await;
    let set = |p: f32| *dial.0.lock().unwrap() = p;
    // A short warning, then 30 quiet ticks, then a higher one that lasts (a real precursor):
    // merged into the first, it was judged a false alarm 40 ticks after the first began, 8
    // ticks into itself. Now the first is judged apart, and the second on its own 40 ticks.
    set(0.6);
    healthy(&d, 3).await;
    assert_eq!(d.state("stock").unwrap(), State::Degraded);
    set(0.05);
    healthy(&d, 30).await;
    assert_eq!(d.state("stock").unwrap(), State::Closed);
    set(0.9);
    healthy(&d, 2).await;
    let mut degraded = 0;
    while d.state("stock").unwrap() == State::Degraded && degraded < 200 {
        healthy(&d, 1).await;
        degraded += 1;
    }
    assert!(
        degraded + 2 >= tower_degrade::breaker::FALSE_ALARM_TICKS as usize,
        "judged after {degraded} ticks of its own"
    );

    // A score flapping about the threshold (4 ticks over, 4 under): one alarm, judged false
    // after FALSE_ALARM_TICKS healthy ticks; then the class stays closed. Each warning was
    // shorter than the exit: the class flapped for good.
    set(0.05);
    healthy(&d, 100).await;
    let (mut trips, mut was_closed) = (0, true);
    for tick in 0..200 {
        set(if tick % 8 < 4 { 0.7 } else { 0.05 });
        healthy(&d, 1).await;
        let closed = d.state("stock").unwrap() == State::Closed;
        trips += usize::from(was_closed && !closed);
        was_closed = closed;
    }
    assert!(trips <= 6, "{trips} trips");
    assert_eq!(d.state("stock").unwrap(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_prediction_the_class_does_not_confirm_is_a_false_alarm_and_raises_its_threshold() {
    // Calibrated on scores of 0.05, the model then scores the healthy class 0.6 for good (a
    // benign change it reads as trouble). Degraded for it, the class stays healthy: after
    // FALSE_ALARM_TICKS healthy ticks the alarm is taken for false, the threshold goes above
    // 0.6, and the class closes and stays closed on the same scores.
    let (d, dial) = calibrated_on_a_dial().await;
    let threshold = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        stock.prediction_threshold.unwrap()
    };
    assert!(threshold(&d) < 0.6, "{}", threshold(&d));
    *dial.0.lock().unwrap() = 0.6;
    healthy(&d, 3).await;
    assert_eq!(d.state("stock").unwrap(), State::Degraded, "predicted");
    let mut degraded = 0;
    for _ in 0..200 {
        healthy(&d, 1).await;
        if d.state("stock").unwrap() == State::Closed {
            break;
        }
        degraded += 1;
    }
    assert_eq!(
        d.state("stock").unwrap(),
        State::Closed,
        "a false alarm ends"
    );
    assert!(
        (tower_degrade::breaker::FALSE_ALARM_TICKS as usize..200).contains(&degraded),
        "{degraded} ticks degraded"
    );
    assert!(threshold(&d) > 0.63, "{}", threshold(&d));
    // The record's verdict waits for VERDICT (600 ticks at 500 ms): a breach then would
    // still confirm the warning.
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (0, 0, 0), "{r:?}");
    healthy(&d, 100).await;
    assert_eq!(
        d.state("stock").unwrap(),
        State::Closed,
        "the same scores trip no more"
    );
    // Its healthy scores, the false alarm's too, are learnt: past the hour the false alarm's
    // floor holds, the fitted tail is above them and the class stays closed (with them left
    // out, the fit stayed below 0.6 and the class tripped on them again once an hour).
    healthy(&d, 7_300).await;
    assert_eq!(d.state("stock").unwrap(), State::Closed, "learnt");
    assert!(threshold(&d) > 0.6, "{}", threshold(&d));
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (0, 1, 0), "{r:?}");

    // A prediction the class confirms (it starts failing) is not undone.
    let (d, dial) = calibrated_on_a_dial().await;
    *dial.0.lock().unwrap() = 0.99;
    healthy(&d, 3).await;
    assert_eq!(d.state("stock").unwrap(), State::Degraded);
    let mut svc = d.layer(d.class_id("stock").unwrap()).layer(slow_failing());
    for _ in 0..60 {
        for _ in 0..20 {
            let _ = svc.ready().await.unwrap().call((900, true)).await;
        }
        d.tick_now();
    }
    assert_ne!(
        d.state("stock").unwrap(),
        State::Closed,
        "confirmed: not closed"
    );
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (1, 0, 0), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_prediction_degrades_once_it_has_held_a_second_whatever_the_tick() {
    // The seed's fixed 0.87, predict_ticks not set: a second's ticks, 2 at the default
    // 500 ms tick, 1 at a tick of a second or more (a minute's window is not a tick's noise).
    for (tick, ticks) in [
        (Duration::from_millis(500), 2),
        (Duration::from_secs(1), 1),
        (Duration::from_secs(60), 1),
        (Duration::from_millis(250), 4),
    ] {
        let (d, dial) = on_a_dial(tick, BreakerConfig::default().predict_threshold(0.87));
        healthy(&d, 10).await;
        *dial.0.lock().unwrap() = 0.95;
        let mut held = 0;
        while d.state("stock").unwrap() == State::Closed && held < 10 {
            healthy(&d, 1).await;
            held += 1;
        }
        assert_eq!(held, ticks, "at a tick of {tick:?}");
    }
    // Set, it is a count of ticks at any tick.
    let (d, dial) = on_a_dial(
        Duration::from_secs(60),
        BreakerConfig::default()
            .predict_threshold(0.87)
            .predict_ticks(3),
    );
    healthy(&d, 10).await;
    *dial.0.lock().unwrap() = 0.95;
    healthy(&d, 2).await;
    assert_eq!(d.state("stock").unwrap(), State::Closed);
    healthy(&d, 1).await;
    assert_eq!(d.state("stock").unwrap(), State::Degraded);
}

#[tokio::test(start_paused = true)]
async fn a_warning_s_own_scores_are_learnt_so_the_same_level_does_not_trip_the_class_again() {
    // At a one-minute tick a prediction holds one tick, and a false alarm's floor an hour (60
    // ticks). 40 ticks at 0.6: the class is degraded at the first, and no breach follows, so
    // 40 ticks in the alarm is taken for a false one. Its ticks' scores, learnt 40 healthy
    // ticks after each (those of a degraded class too), lift the fitted tail above 0.6, so
    // once the floor's hour is over the same score does not degrade the class again (with a
    // warning's ticks left out, it did, once an hour).
    let (d, dial) = on_a_dial(
        Duration::from_secs(60),
        BreakerConfig::default().predict_calibrated(Calibration::default().warm_up_ticks(1)),
    );
    healthy(&d, 2_600).await;
    let set = |p: f32| *dial.0.lock().unwrap() = p;
    set(0.6);
    healthy(&d, 1).await;
    assert_eq!(d.state("stock").unwrap(), State::Degraded, "predicted");
    healthy(&d, 39).await;
    set(0.05);
    healthy(&d, 120).await;
    assert_eq!(d.state("stock").unwrap(), State::Closed);
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (0, 1, 0), "{r:?}");
    set(0.6);
    healthy(&d, 1).await;
    assert_eq!(d.state("stock").unwrap(), State::Closed, "learnt");
}

/// Healthy scores spread like a model's (logit-normal about 0.05), or the score the test
/// sets.
#[derive(Clone, Default)]
struct Spread(Arc<Mutex<Option<f32>>>, u64);

impl Predictor for Spread {
    fn predict(&mut self, _: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        let set = *self.0.lock().unwrap();
        for p in out.iter_mut() {
            let mut uniform = || {
                self.1 = self
                    .1
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((self.1 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            // Box-Muller: a standard normal.
            let z = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
            let logit = -3.0 + 0.4 * z;
            *p = set.unwrap_or((1.0 / (1.0 + (-logit).exp())) as f32);
        }
        Ok(())
    }
}

/// [`Spread`] under a version: its fingerprint.
struct Versioned(Spread, &'static str);

impl Predictor for Versioned {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        self.0.predict(input, out)
    }

    fn fingerprint(&self) -> Option<String> {
        Some(self.1.into())
    }
}

/// `stock` with [`Spread`] under `version`, the calibrated default (the shortest warm-up),
/// ticking every `tick`, restored from `saved` if given; filled.
fn spread(version: &'static str, tick: Duration, saved: Option<Calibrations>) -> Degrader {
    spread_in("shop", version, tick, saved)
}

/// [`spread`] in the degrader of `service`.
fn spread_in(
    service: &str,
    version: &'static str,
    tick: Duration,
    saved: Option<Calibrations>,
) -> Degrader {
    let mut b = Degrader::builder(service)
        .latency_clock(LatencyClock::Tokio)
        .tick(tick)
        .breaker(
            BreakerConfig::default().predict_calibrated(Calibration::default().warm_up_ticks(1)),
        )
        .class(ClassConfig::silver("stock"))
        .predictor(Versioned(Spread::default(), version), patient());
    if let Some(saved) = saved {
        b = b.restore_calibrations(saved);
    }
    filled(b.build_with_worker().unwrap().0)
}

/// `stock`'s calibrated threshold; `None` while it calibrates (as the status says).
fn stock_threshold(d: &Degrader) -> Option<f64> {
    let status = d.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    assert_eq!(stock.calibrating, stock.prediction_threshold.is_none());
    stock.prediction_threshold
}

#[tokio::test(start_paused = true)]
async fn a_saved_calibration_starts_the_next_process_calibrated() {
    let tick = Duration::from_millis(500);
    let d = spread("v1", tick, None);
    healthy(&d, 2_600).await;
    let learnt = stock_threshold(&d).expect("calibrated");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calibrations.bin");
    d.calibrations().save(&path).unwrap();
    d.shutdown();
    // A build without a predictor has learnt nothing, and leaves the file as it is.
    let none = filled(
        Degrader::builder("shop")
            .latency_clock(LatencyClock::Tokio)
            .tick(tick)
            .class(ClassConfig::silver("stock"))
            .build_with_worker()
            .unwrap()
            .0,
    );
    healthy(&none, 10).await;
    assert_eq!(none.calibrations().classes().count(), 0);
    let e = none.calibrations().save(&path).unwrap_err().to_string();
    assert!(e.contains("nothing to save"), "{e}");
    none.shutdown();

    // The next process, from the file: calibrating while the predictor's window fills and
    // the restored calibration settles, then calibrated, hundreds of ticks before a fresh
    // warm-up would be.
    let saved = Calibrations::load(&path).unwrap();
    assert_eq!(saved.tick(), tick);
    assert_eq!(saved.predictor(), Some("v1"));
    assert!(saved.classes().any(|c| c == ("stock", true)), "{saved:?}");
    let e = spread("v1", tick, Some(saved.clone()));
    let fresh = spread("v1", tick, None);
    assert_eq!(stock_threshold(&e), None, "settling");
    let left = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        stock.calibration_left
    };
    let restored_flag = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        stock.calibration_restored
    };
    assert!(restored_flag(&e) && !restored_flag(&fresh));
    // (The filling ticks carried no calls: nothing learnt yet.)
    assert_eq!(
        left(&e),
        Some(tower_degrade::breaker::RESTORED_SETTLE_TICKS)
    );
    assert_eq!(left(&fresh), Some(2_500), "the shortest warm-up");
    // (A restored calibration passes RESTORED_SETTLE_TICKS healthy scores, each
    // FALSE_ALARM_TICKS after its own; the filling ticks carried no calls.)
    healthy(&e, 600).await;
    healthy(&fresh, 600).await;
    let restored = stock_threshold(&e).expect("restored and settled");
    assert_eq!(left(&e), None);
    assert_eq!(stock_threshold(&fresh), None, "a fresh warm-up is not over");
    let logit = |p: f64| (p / (1.0 - p)).ln();
    assert!(
        (logit(restored) - logit(learnt)).abs() < 0.1,
        "{learnt} restored as {restored}"
    );

    // Learnt from another model, at another tick or by another service: calibrating
    // afresh, and said so.
    assert_eq!(saved.service(), "shop");
    let (logs, _guard) = logs::Logs::capture();
    let other_model = spread("v2", tick, Some(saved.clone()));
    let other_tick = spread("v1", Duration::from_secs(1), Some(saved.clone()));
    let other_service = spread_in("cart", "v1", tick, Some(saved));
    for other in [&other_model, &other_tick, &other_service] {
        healthy(other, 300).await;
        assert_eq!(stock_threshold(other), None);
        assert!(!restored_flag(other), "refused, so warming up afresh");
    }
    let text = logs.text();
    assert!(
        text.contains("calibrations saved by another service are not restored"),
        "{text}"
    );
    assert!(
        text.contains(
            "calibrations learnt from another predictor (or with none attached) are not restored"
        ),
        "{text}"
    );
    assert!(
        text.contains("calibrations saved at another tick are not restored"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_scores_before_a_breach_are_not_learnt_as_healthy() {
    // Scores that climb towards a breach while the class still serves (a slow leak) are its
    // precursors: learnt as healthy, they would lift the threshold ahead of themselves. A
    // healthy tick's score is learnt once FALSE_ALARM_TICKS more healthy ticks have passed
    // with no breach.
    let calibrated = || {
        let model = Spread::default();
        let d = filled(
            Degrader::builder("shop")
                .latency_clock(LatencyClock::Tokio)
                .breaker(
                    BreakerConfig::default()
                        .predict_calibrated(Calibration::default().warm_up_ticks(1)),
                )
                .class(ClassConfig::silver("stock"))
                .predictor(model.clone(), patient())
                .build_with_worker()
                .unwrap()
                .0,
        );
        (d, model)
    };
    let threshold = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        stock.prediction_threshold.unwrap()
    };
    // A climb over 30 ticks from the top of the healthy scores to just under the threshold.
    let logit = |p: f64| (p / (1.0 - p)).ln();
    let climb = |d: &Degrader, model: &Spread, t: f64| {
        let (d, model) = (d.clone(), model.clone());
        async move {
            for i in 0..30 {
                let x = logit(t) - 1.5 + 1.4 * f64::from(i) / 29.0;
                *model.0.lock().unwrap() = Some((1.0 / (1.0 + (-x).exp())) as f32);
                healthy(&d, 1).await;
            }
            *model.0.lock().unwrap() = None;
        }
    };
    let ahead = tower_degrade::breaker::FALSE_ALARM_TICKS as usize;

    // The climb, then a breach: none of its scores is learnt.
    let (d, model) = calibrated();
    healthy(&d, 2_600).await;
    let before = threshold(&d);
    climb(&d, &model, before).await;
    assert_eq!(
        d.state("stock").unwrap(),
        State::Closed,
        "under the threshold"
    );
    let mut svc = d.layer(d.class_id("stock").unwrap()).layer(slow_failing());
    for _ in 0..20 {
        let _ = svc.ready().await.unwrap().call((900, true)).await;
    }
    d.tick_now();
    assert_ne!(d.state("stock").unwrap(), State::Closed, "the breach");
    healthy(&d, 3 * ahead).await;
    let after = threshold(&d);
    eprintln!("with a breach: threshold {before} -> {after}");
    // (The healthy scores learnt since move it a little.)
    assert!(
        (logit(after) - logit(before)).abs() < 0.05,
        "the precursors were not learnt: {before} -> {after}"
    );

    // The same climb with no breach after it: healthy scores, learnt in time.
    let (d, model) = calibrated();
    healthy(&d, 2_600).await;
    let before = threshold(&d);
    climb(&d, &model, before).await;
    assert_eq!(
        d.state("stock").unwrap(),
        State::Closed,
        "under the threshold"
    );
    healthy(&d, ahead - 30).await;
    let unlearnt = threshold(&d);
    healthy(&d, 30).await;
    let after = threshold(&d);
    eprintln!("without: threshold {before} -> {unlearnt} -> {after}");
    assert!(
        (logit(unlearnt) - logit(before)).abs() < 0.05,
        "not learnt yet: {before} -> {unlearnt}"
    );
    assert!(
        (logit(after) - logit(before)).abs() > 0.1,
        "learnt: {before} -> {after}"
    );
}

/// A slow leak on `stock`: the [`Dial`] climbing from `from` to `to` over 250 healthy
/// ticks (125 s at 500 ms), then a breach (10 ticks of slow, failing calls), then the class
/// recovering over 800 healthy ticks at 0.05. Returns the leak's first tick the class was
/// degraded at (its warning).
async fn leak_then_breach(d: &Degrader, dial: &Dial, from: f64, to: f64) -> Option<u32> {
    let set = |p: f64| *dial.0.lock().unwrap() = p as f32;
    let mut first = None;
    for i in 0..250 {
        set(from + (to - from) * f64::from(i) / 249.0);
        healthy(d, 1).await;
        if first.is_none() && d.state("stock").unwrap() == State::Degraded {
            first = Some(i);
        }
    }
    set(to.max(0.95));
    let mut svc = d.layer(d.class_id("stock").unwrap()).layer(slow_failing());
    for _ in 0..10 {
        for _ in 0..20 {
            let _ = svc.ready().await.unwrap().call((900, true)).await;
        }
        d.tick_now();
    }
    assert_ne!(d.state("stock").unwrap(), State::Closed, "the breach");
    set(0.05);
    tokio::time::advance(Duration::from_secs(60)).await; // past the open breaker's wait
    healthy(d, 800).await;
    assert_eq!(d.state("stock").unwrap(), State::Closed, "recovered");
    first
}

#[tokio::test(start_paused = true)]
async fn a_slow_leak_warned_minutes_ahead_is_confirmed_by_its_breach_and_warned_of_again() {
    // A user's trial on a live service: a dependency slowing 2 ms a second, warned of 124 s
    // before the breach. Judged after FALSE_ALARM_TICKS healthy ticks alone, the warning was
    // a false alarm: its floor lifted the threshold above the leak's scores, which were then
    // learnt as healthy, the breach was counted as missed, and the next leak was not warned
    // of. Here the model's score climbs from 0.3 to 0.9 over 250 healthy ticks, then the
    // class fails; twice.
    let (d, dial) = calibrated_on_a_dial().await;
    let before = stock_threshold(&d).unwrap();
    assert!(before < 0.3, "{before}");
    for leak in 0..2 {
        let warned = leak_then_breach(&d, &dial, 0.3, 0.9).await;
        assert!(
            warned.is_some_and(|i| i < 10),
            "leak {leak} warned of at {warned:?}"
        );
        let r = record(&d);
        assert_eq!(
            (r.confirmed, r.false_alarms, r.missed),
            (leak + 1, 0, 0),
            "leak {leak}: confirmed, not a false alarm and a miss: {r:?}"
        );
        assert!(
            r.last_lead_ticks.is_some_and(|lead| lead > 200),
            "warned minutes ahead: {r:?}"
        );
        // The false-alarm exit's floor, lifted by the breach, and the leak's scores, not
        // learnt: the threshold is where the healthy scores put it.
        let after = stock_threshold(&d).unwrap();
        assert!(after < 0.3, "leak {leak}: threshold {before} -> {after}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_warning_late_in_an_earlier_ones_verdict_is_judged_from_itself() {
    // A warning no breach follows (0.6 for 45 ticks: the exit closes the class after 40 and
    // puts a floor above 0.6), then, 550 ticks after it, a slow leak above that floor that
    // breaches 250 ticks later. Judged from the first warning, the wait ended 50 ticks into
    // the leak: its scores were learnt, the floors its exits put stayed, and the same leak
    // after it was not warned of. Judged from its own warning, the breach confirms it.
    let (d, dial) = calibrated_on_a_dial().await;
    *dial.0.lock().unwrap() = 0.6;
    healthy(&d, 45).await;
    *dial.0.lock().unwrap() = 0.05;
    healthy(&d, 505).await;
    assert_eq!(d.state("stock").unwrap(), State::Closed);
    let floor = stock_threshold(&d).unwrap();
    assert!(floor > 0.6, "the false alarm's floor: {floor}");
    for leak in 0..2 {
        let warned = leak_then_breach(&d, &dial, 0.7, 0.95).await;
        assert!(
            warned.is_some_and(|i| i < 10),
            "leak {leak} warned of at {warned:?}"
        );
        let after = stock_threshold(&d).unwrap();
        assert!(after < 0.3, "leak {leak}: threshold {after}");
    }
    let r = record(&d);
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (2, 0, 0), "{r:?}");
}

/// A current-thread runtime on real time (the predictor's budget is real time), entered by
/// the test.
fn real_time_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Its first batch blocks until the test lets it go (far past any budget), then answers
/// `first` (`None`: fails); the others answer `then`.
struct Slow {
    gate: std::sync::mpsc::Receiver<()>,
    first: Option<f32>,
    then: f32,
    answered: bool,
}

impl Slow {
    fn new(gate: std::sync::mpsc::Receiver<()>, first: Option<f32>, then: f32) -> Self {
        Self {
            gate,
            first,
            then,
            answered: false,
        }
    }
}

impl Predictor for Slow {
    fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        if std::mem::replace(&mut self.answered, true) {
            out.fill(self.then);
            return Ok(());
        }
        let _ = self.gate.recv();
        let p = self.first.ok_or("model answered NaN, not a probability")?;
        out.fill(p);
        Ok(())
    }

    fn warm_up(&mut self, _classes: &[&str]) -> Result<(), BoxError> {
        Ok(())
    }
}

#[test]
fn an_overrun_keeps_the_last_prediction_and_is_counted() {
    let rt = real_time_runtime();
    let _g = rt.enter();
    let (release, gate) = std::sync::mpsc::channel();
    let d = with_predictor(Slow::new(gate, Some(0.99), 0.99));
    let ((), recorded) = metrics_during(|| {
        d.tick_now(); // waits 8 ms, then gives up on this batch
        d.tick_now(); // the worker is still busy: no new batch
    });
    let overruns = counter(&recorded, tower_degrade::metrics::PREDICTOR_OVERRUNS, &[]);
    assert_eq!(overruns, Some(2));
    assert!(
        d.status().classes.iter().all(|c| c.prediction.is_none()),
        "no answer yet: no prediction (not a made-up one)"
    );
    assert_eq!(d.state("pay").unwrap(), State::Closed);
    // Once the batch finishes, the next tick picks up its predictions.
    release.send(()).unwrap();
    drop(release);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.status().classes[0].prediction != Some(0.99f32 as f64) {
        assert!(
            std::time::Instant::now() < deadline,
            "the late batch never landed"
        );
        d.tick_now();
    }
}

/// Answers `quiet` at once until batch `from` (counting from 0); from it on, each batch waits
/// for a token from the test and answers `loud`. `started` counts the batches begun.
struct Gated {
    gate: std::sync::mpsc::Receiver<()>,
    from: usize,
    quiet: f32,
    loud: f32,
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Predictor for Gated {
    fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        let n = self
            .started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < self.from {
            out.fill(self.quiet);
            return Ok(());
        }
        self.gate.recv().map_err(|_| "the test ended")?;
        out.fill(self.loud);
        Ok(())
    }

    fn warm_up(&mut self, _classes: &[&str]) -> Result<(), BoxError> {
        Ok(())
    }
}

#[test]
fn a_batch_that_lands_ticks_after_its_input_was_taken_is_as_old_as_its_input() {
    // A model slower than a few ticks: its late batch counted as 1 tick old when it landed,
    // so a batch made from a zero-padded window (the class's first ticks) landed 20 ticks
    // later and degraded a healthy class; predictions are used while their input is at most
    // 4 ticks old.
    let rt = real_time_runtime();
    let _g = rt.enter();
    let (release, gate) = std::sync::mpsc::channel();
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let from = 2 * WINDOW;
    let d = filled(with_predictor(Gated {
        gate,
        from,
        quiet: 0.0,
        loud: 0.99,
        started: started.clone(),
    }));
    assert_eq!(d.status().classes[0].prediction, Some(0.0));
    d.tick_now(); // its batch waits past the budget
    for _ in 0..20 {
        d.tick_now();
    }
    release.send(()).unwrap();
    // The tick that takes the late batch sends the next one, which starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while started.load(std::sync::atomic::Ordering::SeqCst) < from + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the late batch never landed"
        );
        d.tick_now();
        std::thread::yield_now();
    }
    for _ in 0..3 {
        assert_eq!(
            d.status().classes[0].prediction,
            None,
            "21 ticks old: no prediction"
        );
        assert_eq!(d.state("pay").unwrap(), State::Closed);
        d.tick_now();
    }
    drop(release);
}

/// A predictor whose runs can be stopped: its warm-up (with `hang_warm_up`) and its first
/// batch wait until stopped, then fail; later batches answer 0.1. `returned` hears of each
/// run that ended stopped.
struct Stoppable {
    stop_rx: std::sync::mpsc::Receiver<()>,
    stop_tx: Option<std::sync::mpsc::Sender<()>>,
    returned: std::sync::mpsc::Sender<&'static str>,
    hang_warm_up: bool,
    batches: usize,
    /// Set by the stop handle itself, when the runner asks for the stop.
    asked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stoppable {
    fn new(hang_warm_up: bool) -> (Self, std::sync::mpsc::Receiver<&'static str>) {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let (returned, heard) = std::sync::mpsc::channel();
        let p = Self {
            stop_rx,
            stop_tx: Some(stop_tx),
            returned,
            hang_warm_up,
            batches: 0,
            asked: Default::default(),
        };
        (p, heard)
    }

    fn wait_for_stop(&self, what: &'static str) -> Result<(), BoxError> {
        self.stop_rx.recv().map_err(|_| "the runner is gone")?;
        let _ = self.returned.send(what);
        Err(format!("{what}: stopped").into())
    }
}

impl Predictor for Stoppable {
    fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        self.batches += 1;
        if self.batches == 1 {
            return self.wait_for_stop("batch");
        }
        out.fill(0.1);
        Ok(())
    }

    fn warm_up(&mut self, _classes: &[&str]) -> Result<(), BoxError> {
        if self.hang_warm_up {
            return self.wait_for_stop("warm-up");
        }
        Ok(())
    }

    fn stop_handle(&mut self) -> Option<tower_degrade::predict::StopHandle> {
        let tx = std::sync::Mutex::new(self.stop_tx.take()?);
        let asked = self.asked.clone();
        Some(Box::new(move || {
            asked.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = tx.lock().unwrap().send(());
        }))
    }
}

#[test]
fn a_warm_up_past_its_timeout_is_stopped_not_left_running() {
    // It was left running on its thread, burning a core, each retry of the build another.
    let rt = real_time_runtime();
    let _g = rt.enter();
    let (p, heard) = Stoppable::new(true);
    let mut config = PredictorConfig::default();
    config.warm_up_timeout = Duration::from_millis(50);
    let err = Degrader::builder("shop")
        .class(ClassConfig::gold("pay"))
        .predictor(p, config)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("warm-up did not finish"), "{err}");
    assert_eq!(
        heard.recv_timeout(Duration::from_secs(10)),
        Ok("warm-up"),
        "stopped, and its run returned"
    );
}

#[test]
fn a_batch_still_running_once_too_old_to_use_is_stopped_and_the_next_one_runs() {
    // A model that hangs on some input kept its thread: no batch ever ran again.
    let rt = real_time_runtime();
    let _g = rt.enter();
    let (p, heard) = Stoppable::new(false);
    let asked = p.asked.clone();
    let d = with_predictor(p);
    for _ in 0..=4 {
        d.tick_now(); // the batch runs past the budget; its input 4 ticks old at most
    }
    let asked_now = || asked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(!asked_now(), "not stopped while it may still be used");
    d.tick_now(); // 5 ticks old: stopped
    assert!(asked_now());
    assert_eq!(heard.recv_timeout(Duration::from_secs(10)), Ok("batch"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut failed = None;
    while d.status().classes[0].prediction != Some(0.1f32 as f64) {
        assert!(std::time::Instant::now() < deadline, "no batch ran again");
        d.tick_now();
        if let Some(e) = d.status().predictor.as_ref().and_then(|p| p.error.clone()) {
            failed = Some(e);
        }
    }
    let failed = failed.expect("the stopped batch counted as failed");
    assert!(failed.contains("was stopped"), "{failed}");
}

#[test]
fn a_degrader_dropped_with_a_batch_running_stops_it() {
    let rt = real_time_runtime();
    let _g = rt.enter();
    let (p, heard) = Stoppable::new(false);
    let asked = p.asked.clone();
    let d = with_predictor(p);
    d.tick_now(); // its batch runs past the budget
    drop(d);
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(heard.recv_timeout(Duration::from_secs(10)), Ok("batch"));
}

#[test]
fn a_batch_that_fails_after_overrunning_is_counted_as_failed() {
    // Its error was dropped when it landed late: no failure counted or logged.
    let rt = real_time_runtime();
    let _g = rt.enter();
    let (release, gate) = std::sync::mpsc::channel();
    let d = with_predictor(Slow::new(gate, None, 0.5));
    let ((), recorded) = metrics_during(|| {
        d.tick_now(); // gives up on the batch after its budget
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while d.status().classes[0].prediction != Some(0.5) {
            assert!(
                std::time::Instant::now() < deadline,
                "no batch after the failed one"
            );
            d.tick_now();
        }
    });
    assert_eq!(
        counter(&recorded, tower_degrade::metrics::PREDICTOR_FAILURES, &[]),
        Some(1)
    );
}

/// Answers each batch with what `script` says for the call number (from 0); warm-up passes.
struct Scripted<F>(F, usize);

impl<F: FnMut(usize) -> Result<Vec<f32>, BoxError> + Send + 'static> Predictor for Scripted<F> {
    fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        let answer = (self.0)(self.1)?;
        self.1 += 1;
        for (o, a) in out.iter_mut().zip(answer) {
            *o = a;
        }
        Ok(())
    }

    fn warm_up(&mut self, _classes: &[&str]) -> Result<(), BoxError> {
        Ok(())
    }
}

/// What `f` returns, and every metric it recorded.
fn metrics_during<T>(
    f: impl FnOnce() -> T,
) -> (T, Vec<(metrics::Key, metrics_util::debugging::DebugValue)>) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let out = metrics::with_local_recorder(&recorder, f);
    let recorded = snapshotter.snapshot().into_vec();
    (
        out,
        recorded
            .into_iter()
            .map(|(k, _, _, v)| (k.key().clone(), v))
            .collect(),
    )
}

/// The count of the counter `name` whose labels include `labels`, if it was registered.
fn counter(
    recorded: &[(metrics::Key, metrics_util::debugging::DebugValue)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<u64> {
    recorded.iter().find_map(|(k, v)| match v {
        metrics_util::debugging::DebugValue::Counter(n)
            if k.name() == name
                && labels.iter().all(|(key, value)| {
                    k.labels().any(|l| l.key() == *key && l.value() == *value)
                }) =>
        {
            Some(*n)
        }
        _ => None,
    })
}

/// The tick count of `degrade_predictor_failures_total` while `f` runs.
fn failures_during(f: impl FnOnce()) -> Option<u64> {
    counter(
        &metrics_during(f).1,
        tower_degrade::metrics::PREDICTOR_FAILURES,
        &[],
    )
}

fn predictions(d: &Degrader) -> Vec<Option<f64>> {
    d.status().classes.iter().map(|c| c.prediction).collect()
}

#[test]
fn a_failing_or_stopped_predictor_leaves_no_prediction_and_is_counted() {
    let rt = real_time_runtime();
    let _g = rt.enter();
    // Answers 0.95 twice, then fails: the fixed threshold (0.87, 2 ticks) would degrade on
    // stale predictions.
    let d = with_predictor(Scripted(
        |n| match n {
            0 | 1 => Ok(vec![0.3; 3]),
            _ => Err("inference failed: model answered NaN".into()),
        },
        0,
    ));
    use tower_degrade::degrader::{PredictorBatch, PredictorStatus};
    assert_eq!(d.status().predictor, Some(PredictorStatus::default()));
    d.tick_now();
    assert_eq!(predictions(&d), [Some(0.3f32 as f64); 3]);
    let status = d.status().predictor.clone().unwrap();
    assert_eq!(
        (status.last_batch, status.error),
        (Some(PredictorBatch::Fresh), None)
    );
    d.tick_now();
    let failed = failures_during(|| {
        for _ in 0..3 {
            d.tick_now();
        }
    });
    assert_eq!(failed, Some(3));
    assert_eq!(predictions(&d), [None; 3], "not the last ones");
    // The status says why there is none (it read as "no answer yet").
    let status = d.status().predictor.clone().unwrap();
    assert_eq!(status.last_batch, Some(PredictorBatch::Failed));
    assert!(
        status.error.as_deref().unwrap().contains("answered NaN"),
        "{status:?}"
    );
    assert_eq!(d.state("pay").unwrap(), State::Closed);
    // The threshold it would act on, as the metrics report it: still there, not calibrating.
    for c in d.status().classes.iter() {
        assert_eq!(c.prediction_threshold, Some(0.87), "{}", c.name);
        assert!(!c.calibrating, "{}", c.name);
    }

    // A predictor that panics stops its thread: the same, not an overrun.
    let d = with_predictor(Scripted(
        |n| {
            assert!(n < 1, "the model crashed");
            Ok(vec![0.2; 3])
        },
        0,
    ));
    d.tick_now();
    assert_eq!(predictions(&d), [Some(0.2f32 as f64); 3]);
    // The dying thread may outlast a few ticks' budget (overruns: the last predictions stand
    // for up to 4 ticks, then none); once it is gone, the tick sees it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while failures_during(|| d.tick_now()).is_none() {
        assert!(std::time::Instant::now() < deadline, "never seen as failed");
    }
    assert_eq!(predictions(&d), [None; 3]);
    assert_eq!(
        failures_during(|| d.tick_now()),
        Some(1),
        "and every tick after"
    );
    assert_eq!(predictions(&d), [None; 3]);
}

#[test]
fn a_model_that_fails_at_every_other_tick_is_logged_once_and_shows_in_the_status() {
    let rt = real_time_runtime();
    let _g = rt.enter();
    let (logs, _guard) = logs::Logs::capture();
    /// Fails every other batch it is given.
    struct Flaky(usize);
    impl Predictor for Flaky {
        fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
            self.0 += 1;
            if self.0.is_multiple_of(2) {
                return Err("inference failed on even batches".into());
            }
            out.fill(0.3);
            Ok(())
        }
    }
    let d = with_predictor(Flaky(0));
    // The warm-up's dummy batch is the first; the ticks' are batches 2 to 21: ten failures,
    // the last an answer.
    for _ in 0..20 {
        d.tick_now();
    }
    // The last tick went well: the counts and the last error still say what happened.
    let status = d.status().predictor.clone().unwrap();
    assert_eq!(status.error, None);
    assert_eq!(status.overrun_batches, 0);
    assert_eq!(status.failed_batches, 10, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("on even batches"),
        "{status:?}"
    );
    // Said when it started and when it ended, not at each of its ten starts.
    let text = logs.text();
    assert_eq!(text.matches("predictor failed").count(), 1, "{text}");
    assert_eq!(
        text.matches("the predictor answers again").count(),
        1,
        "{text}"
    );
}

#[test]
fn a_value_that_is_not_a_probability_is_no_prediction_and_trips_nothing() {
    let rt = real_time_runtime();
    let _g = rt.enter();
    // NaN, garbage above 1, and 1 plus a rounding error; from the sixth tick, probabilities.
    let d = with_predictor(Scripted(
        |n| {
            Ok(if n < 5 {
                vec![f32::NAN, 5.0, 1.000_000_1]
            } else {
                vec![0.1, 0.2, 0.3]
            })
        },
        0,
    ));
    let ((), recorded) = metrics_during(|| {
        for _ in 0..5 {
            d.tick_now();
        }
    });
    // Classes in registration order: default, pay, stock.
    assert_eq!(predictions(&d), [None, None, Some(1.0)]);
    assert_eq!(
        d.state("pay").unwrap(),
        State::Closed,
        "5.0 is not a certain failure"
    );
    // In a trial the status said nothing of why two classes had no prediction, and the log
    // named only the first.
    let predictor = || d.status().predictor.clone().unwrap();
    assert_eq!(
        predictor().not_probabilities,
        [Arc::from("default"), Arc::from("pay")]
    );
    let invalid = tower_degrade::metrics::PREDICTOR_INVALID;
    assert_eq!(counter(&recorded, invalid, &[("class", "pay")]), Some(5));
    // Created at 0 with the class's handles: a first invalid answer is an increase.
    assert_eq!(counter(&recorded, invalid, &[("class", "stock")]), Some(0));
    d.tick_now();
    assert_eq!(
        predictions(&d),
        [
            Some(0.1f32 as f64),
            Some(0.2f32 as f64),
            Some(0.3f32 as f64)
        ]
    );
    assert!(predictor().not_probabilities.is_empty());
}

/// A model that reads zero padding as an outage, as most do: 0.99 while a class's oldest tick
/// is padding (every feature 0), 0.1 once it has a whole window.
struct ReadsPadding;

impl Predictor for ReadsPadding {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        for (class, p) in out.iter_mut().enumerate() {
            let oldest = &input[class * WINDOW * N_FEATURES..][..N_FEATURES];
            *p = if oldest.iter().all(|v| *v == 0.0) {
                0.99
            } else {
                0.1
            };
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_short_history_s_padding_neither_degrades_a_class_nor_is_learnt_as_healthy() {
    // Such a model degraded every class, gold included, for the first 64 ticks after each
    // start at the fixed threshold; with the calibrated default, the padded ticks' 0.99 were
    // learnt as healthy scores and the threshold went beyond every probability.
    let d = Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .breaker(BreakerConfig::default().predict_threshold(0.87))
        .class(ClassConfig::silver("stock"))
        .predictor(ReadsPadding, patient())
        .build_with_worker()
        .unwrap()
        .0;
    for tick in 0..WINDOW + 5 {
        healthy(&d, 1).await;
        assert_eq!(d.state("stock").unwrap(), State::Closed, "tick {tick}");
    }
    assert_eq!(record(&d).false_alarms, 0);

    let d = Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .breaker(
            BreakerConfig::default().predict_calibrated(Calibration::default().warm_up_ticks(1)),
        )
        .class(ClassConfig::silver("stock"))
        .predictor(ReadsPadding, patient())
        .build_with_worker()
        .unwrap()
        .0;
    healthy(&d, 2_600 + WINDOW).await;
    let status = d.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    assert!(!stock.calibrating);
    let threshold = stock.prediction_threshold.unwrap();
    assert!(threshold < 0.5, "learnt the padding: {threshold}");
}

/// Answers `p` for every class, always; warms up in `warm_up` of real time.
struct Constant(f32, Duration);

impl Predictor for Constant {
    fn predict(&mut self, _: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        out.fill(self.0);
        Ok(())
    }

    fn warm_up(&mut self, _classes: &[&str]) -> Result<(), BoxError> {
        std::thread::sleep(self.1);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_model_saturated_at_one_on_healthy_ticks_does_not_beat_its_calibrated_threshold() {
    // 1.0 in f32 (a retrained model whose sigmoid saturates, or 0.99999999 rounded) on every
    // healthy tick: the threshold is fitted beyond it, and the class is never degraded for it,
    // and the log says (once) that the model cannot warn of this class.
    let (logs, _guard) = logs::Logs::capture();
    let d = filled(
        Degrader::builder("shop")
            .latency_clock(LatencyClock::Tokio)
            .class(ClassConfig::silver("stock"))
            .predictor(Constant(1.0, Duration::ZERO), patient())
            .breaker(
                BreakerConfig::default()
                    .predict_calibrated(Calibration::default().warm_up_ticks(1)),
            )
            .build_with_worker()
            .unwrap()
            .0,
    );
    healthy(&d, 2_600).await;
    let status = d.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    assert!(
        !stock.calibrating && stock.prediction == Some(1.0),
        "{stock:?}"
    );
    assert_eq!(
        stock.state,
        State::Closed,
        "threshold {:?}",
        stock.prediction_threshold
    );
    healthy(&d, 100).await;
    let text = logs.text();
    assert_eq!(
        text.matches("threshold is beyond every probability the model can answer")
            .count(),
        1,
        "{text}"
    );
    assert!(text.contains("class=stock"), "{text}");
}

#[test]
fn a_warm_up_that_does_not_finish_in_time_is_a_build_error_not_a_hang() {
    let mut config = PredictorConfig::default();
    config.warm_up_timeout = Duration::from_millis(50);
    let Err(err) = Degrader::builder("shop")
        .predictor(Constant(0.1, Duration::from_secs(2)), config)
        .build_with_worker()
    else {
        panic!("built with a predictor that never warmed up");
    };
    assert!(err.to_string().contains("warm_up_timeout"), "{err}");
}

struct Broken;

impl Predictor for Broken {
    fn predict(&mut self, _: &[f32], _: &mut [f32]) -> Result<(), BoxError> {
        Err("model file not found: models/p.onnx".into())
    }
}

#[test]
fn a_failing_warm_up_is_a_build_error() {
    let Err(err) = Degrader::builder("shop")
        .predictor(Broken, PredictorConfig::default())
        .build_with_worker()
    else {
        panic!("built with a broken predictor");
    };
    assert_eq!(
        err.to_string(),
        "invalid `predictor`: warm-up failed: model file not found: models/p.onnx"
    );
}

/// Keeps the tick it is told, and refuses one of a second.
struct Ticked(Arc<Mutex<Option<Duration>>>);

impl Predictor for Ticked {
    fn predict(&mut self, _: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        out.fill(0.0);
        Ok(())
    }

    fn tick_interval(&mut self, tick: Duration) -> Result<(), BoxError> {
        *self.0.lock().unwrap() = Some(tick);
        if tick == Duration::from_secs(1) {
            return Err("made for another tick".into());
        }
        Ok(())
    }
}

#[test]
fn a_predictor_is_told_the_degraders_tick_before_its_warm_up_and_may_refuse_it() {
    let told = Arc::default();
    let (_d, _worker) = Degrader::builder("shop")
        .tick(Duration::from_millis(250))
        .predictor(Ticked(Arc::clone(&told)), PredictorConfig::default())
        .build_with_worker()
        .unwrap();
    assert_eq!(*told.lock().unwrap(), Some(Duration::from_millis(250)));
    let Err(err) = Degrader::builder("shop")
        .tick(Duration::from_secs(1))
        .predictor(Ticked(Arc::default()), PredictorConfig::default())
        .build_with_worker()
    else {
        panic!("built with a predictor that refused the tick");
    };
    assert_eq!(
        err.to_string(),
        "invalid `predictor`: warm-up failed: made for another tick"
    );
}

#[cfg(feature = "rhai")]
#[tokio::test(start_paused = true)]
async fn policies_see_the_prediction() {
    let rec = Recorder::default();
    *rec.answer.lock().unwrap() = vec![0.0, 0.0, 0.6];
    let d = filled(with_predictor(rec));
    let src = r#"
        fn policy() { #{ governs: ["stock"] } }
        fn on_tick(ctx) { if ctx.has_prediction && ctx.prediction > 0.5 { shed() } }
    "#;
    d.load_policy_sources([("early", src)]).unwrap();
    d.tick_now();
    let svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(tower::service_fn(|()| async { Ok::<_, BoxError>(()) }));
    assert!(
        svc.oneshot(()).await.is_err(),
        "shed at p = 0.6, below the breaker's 0.87"
    );
    assert_eq!(d.state("stock").unwrap(), State::Closed);
}

#[tokio::test]
async fn a_budget_not_shorter_than_the_tick_is_warned_of_at_build() {
    let build = |budget_ms: u64| {
        let (logs, guard) = logs::Logs::capture();
        let mut config = PredictorConfig::default();
        config.budget = Duration::from_millis(budget_ms);
        let d = Degrader::builder("shop")
            .class(ClassConfig::silver("stock"))
            .predictor(Trend, config)
            .build()
            .unwrap();
        drop((d, guard));
        logs.text()
    };
    // The line's first use registers it, which other tests' builds race for: once first.
    build(500);
    let text = build(500);
    assert!(
        text.contains("budget is not shorter than the tick"),
        "{text}"
    );
    let text = build(8);
    assert!(!text.contains("budget is not shorter"), "{text}");
}

/// Answers 0.99 for a class while any window of its input had three times its rate's baseline
/// or more (a burst), 0.01 otherwise.
struct Burst;

impl Predictor for Burst {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        for (class, p) in out.iter_mut().enumerate() {
            let rows = &input[class * WINDOW * N_FEATURES..(class + 1) * WINDOW * N_FEATURES];
            let burst = rows.chunks(N_FEATURES).any(|row| row[0] >= 3.0);
            *p = if burst { 0.99 } else { 0.01 };
        }
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_window_read_late_is_not_predicted_from_until_it_has_left_the_input() {
    // In a user's trial the machine stalled for 2.5 s: the tick after it read windows of 3 s
    // as one, at five times their rate and with the stall's latencies, and every class warned
    // at once, the one the fault did not touch too (its threshold then learnt the stall's
    // score as healthy and stayed far up for hours).
    let tick = Duration::from_millis(500);
    let d = Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .breaker(BreakerConfig::default().predict_threshold(0.87))
        .class(ClassConfig::silver("stock"))
        .predictor(Burst, patient())
        .build()
        .unwrap();
    let mut svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(failing_after(0));
    let mut calls = async |n: usize| {
        for _ in 0..n {
            let _ = svc.ready().await.unwrap().call(false).await;
        }
    };
    let stock = |d: &Degrader| {
        let status = d.status();
        let c = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        (c.state, c.prediction)
    };
    // Calls between the ticks, 10 a tick, until the input is whole.
    tokio::time::sleep(tick / 2).await;
    for _ in 0..2 * WINDOW {
        calls(10).await;
        tokio::time::sleep(tick).await;
    }
    assert_eq!(stock(&d), (State::Closed, Some(0.01f32 as f64)));
    let late = |d: &Degrader| {
        let p = d.status().predictor.clone().unwrap();
        (p.late_ticks, p.unused_ticks_left)
    };
    assert_eq!(late(&d), (0, 0));
    // A stall of 3 s: the next tick comes late, its window 60 calls; then back between ticks
    // (the late one restarted the tick's timer).
    calls(60).await;
    tokio::time::advance(Duration::from_secs(3)).await;
    tokio::time::sleep(tick / 2).await;
    assert_eq!(late(&d), (1, 68), "that tick's and the 67 after it");
    let mut warned = 0;
    for _ in 0..WINDOW {
        calls(10).await;
        tokio::time::sleep(tick).await;
        let (state, p) = stock(&d);
        warned += usize::from(p == Some(0.99f32 as f64));
        assert_eq!(state, State::Closed, "predicted from a window read late");
    }
    assert_eq!(late(&d), (1, 68 - WINDOW as u32));
    assert!(warned >= WINDOW - 4, "the model read the burst: {warned}");
    // Once it has left the input, a burst on time is predicted from.
    for _ in 0..8 {
        calls(10).await;
        tokio::time::sleep(tick).await;
    }
    assert_eq!(stock(&d), (State::Closed, Some(0.01f32 as f64)));
    assert_eq!(late(&d), (1, 0));
    for _ in 0..3 {
        calls(60).await;
        tokio::time::sleep(tick).await;
    }
    assert_eq!(stock(&d).0, State::Degraded);
}
