//! The long baseline a model may take as a second input.
//!
//! A window holds [`WINDOW`] ticks: a model that takes each feature's baseline from them
//! compares a class with its last half minute, not with what the service usually looks like,
//! and misses a slow leak that began before the window. So
//! [`OnnxPredictor`](crate::OnnxPredictor) keeps, per class, a [`Baseline`]: each feature's
//! quantiles ([`QUANTILES`]) over the class's last [`HISTORY`] healthy ticks (those the seed
//! rule does not flag: success rate at least 92 %, or p99 within the SLA), recomputed every
//! [`REFRESH`] ticks (every tick for the first [`REFRESH`]; classes at staggered ticks, see
//! [`Baseline::with_phase`]) from the ticks seen so far, the current one included; zeros until
//! a healthy tick has been seen. Quantile `q` of `n` values
//! is the sorted values' element `floor(q (n - 1))`: an order statistic, so a model may take the
//! quantiles of any monotone transform of a feature (its `log1p`, say) as the transform of
//! these.
//!
//! A model declares that it takes it with a second input, `baseline [batch, 5, 8]` float32
//! (the quantiles in [`QUANTILES`]' order, then the features in
//! [`FEATURES`](tower_degrade::predict::FEATURES)' order), and the metadata entry
//! [`BASELINE_KEY`] = [`BASELINE_VALUE`]. `training/baseline.py` is this module ported line for
//! line; the training pipeline and the evaluation harness feed models with it, and a test checks
//! the two agree.
//!
//! It runs on the predictor's thread, once per tick: per class, every 64 ticks, five selections
//! over at most 4,096 values per feature, and 128 KiB of history.

use tower_degrade::predict::{N_FEATURES, WINDOW};

/// The quantiles of each feature the baseline holds, in input order.
pub const QUANTILES: [f64; N_QUANTILES] = [0.01, 0.25, 0.5, 0.75, 0.99];
/// Rows of the `baseline` input: one per quantile.
pub const N_QUANTILES: usize = 5;
/// Healthy ticks the baseline is taken over (the newest).
pub const HISTORY: usize = 4_096;
/// Ticks between two recomputations of the quantiles (after the first [`REFRESH`] ticks).
pub const REFRESH: u64 = 64;
/// The second input's name, when a model has one.
pub const BASELINE_INPUT: &str = "baseline";
/// The ONNX metadata key under which a model with a second input declares the baseline it was
/// trained on; its value must be [`BASELINE_VALUE`].
pub const BASELINE_KEY: &str = "tower_degrade.baseline";
/// What [`BASELINE_KEY`] must say: this module's rule.
pub const BASELINE_VALUE: &str =
    "quantiles=0.01,0.25,0.5,0.75,0.99;history=4096;refresh=64;healthy=seed_rule";

/// The features the seed rule reads, by their place in
/// [`FEATURES`](tower_degrade::predict::FEATURES).
const SUCCESS: usize = 1;
const P99: usize = 5;

/// Whether a tick's features count towards the baseline: not flagged by the seed rule (success
/// rate below 92 % and p99 over the SLA).
pub fn healthy(row: &[f32; N_FEATURES]) -> bool {
    !(row[SUCCESS] < 0.92 && row[P99] > 1.0)
}

/// One class's long baseline.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    /// The newest healthy ticks, at most [`HISTORY`]; once full, `next` is the oldest.
    rows: Vec<[f32; N_FEATURES]>,
    next: usize,
    ticks: u64,
    /// Offsets this class's refreshes, so that classes do not all refresh on the same tick.
    phase: u64,
    quantiles: [[f32; N_FEATURES]; N_QUANTILES],
    column: Vec<f32>,
}

impl Baseline {
    /// An empty baseline: zeros until a healthy tick is observed.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty baseline that refreshes at its ticks `t` where `(t + phase) % REFRESH == 0`
    /// (after the first [`REFRESH`]), rather than at multiples of [`REFRESH`]:
    /// [`OnnxPredictor`](crate::OnnxPredictor) gives batch row `i` the phase `i`, so that 100
    /// classes refresh two or so a tick rather than all on one.
    pub fn with_phase(phase: u64) -> Self {
        Self {
            phase: phase % REFRESH,
            ..Self::default()
        }
    }

    /// Take in one tick's features (the newest row of the class's window).
    pub fn observe(&mut self, row: &[f32; N_FEATURES]) {
        if healthy(row) {
            if self.rows.len() < HISTORY {
                self.rows.push(*row);
            } else {
                self.rows[self.next] = *row;
                self.next = (self.next + 1) % HISTORY;
            }
        }
        let tick = self.ticks;
        self.ticks += 1;
        if (tick < REFRESH || (tick + self.phase).is_multiple_of(REFRESH)) && !self.rows.is_empty()
        {
            self.refresh();
        }
    }

    fn refresh(&mut self) {
        let n = self.rows.len();
        for f in 0..N_FEATURES {
            self.column.clear();
            self.column.extend(self.rows.iter().map(|r| r[f]));
            // Each order statistic by selection (linear), the next one searched for only to the
            // right of the last: the quantiles ascend.
            let mut from = 0;
            for (q, row) in QUANTILES.iter().zip(&mut self.quantiles) {
                let k = (q * (n - 1) as f64) as usize;
                let (_, v, _) =
                    self.column[from..].select_nth_unstable_by(k - from, f32::total_cmp);
                row[f] = *v;
                from = k;
            }
        }
    }

    /// The quantiles now: `[quantile][feature]`.
    pub fn quantiles(&self) -> &[[f32; N_FEATURES]; N_QUANTILES] {
        &self.quantiles
    }

    /// Healthy ticks held (at most [`HISTORY`]).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no healthy tick has been seen.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Write the quantiles into `out` (`[N_QUANTILES * N_FEATURES]`, row-major), as the model's
    /// `baseline` input takes them.
    pub(crate) fn write(&self, out: &mut [f32]) {
        for (chunk, row) in out.chunks_exact_mut(N_FEATURES).zip(&self.quantiles) {
            chunk.copy_from_slice(row);
        }
    }
}

/// That `input` is `[batch, 64, 8]`, as a predictor's tick passes it.
pub(crate) fn check_batch(input: &[f32], batch: usize) -> Result<(), crate::Error> {
    if input.len() != batch * WINDOW * N_FEATURES {
        return Err(crate::Error::Inference(format!(
            "input holds {} values, expected {batch} x {WINDOW} x {N_FEATURES}",
            input.len()
        )));
    }
    Ok(())
}

/// That every row's last `ticks` ticks hold finite values only (the runtime's features never
/// are otherwise): the first that does not is an error naming its row.
pub(crate) fn check_finite(input: &[f32], ticks: usize) -> Result<(), crate::Error> {
    let read = (WINDOW - ticks) * N_FEATURES;
    match input
        .chunks_exact(WINDOW * N_FEATURES)
        .enumerate()
        .find_map(|(i, w)| w[read..].iter().find(|v| !v.is_finite()).map(|&v| (i, v)))
    {
        Some((row, v)) => Err(crate::Error::Inference(format!(
            "batch row {row}: a feature of its last {ticks} tick(s) is {v}, not a finite number"
        ))),
        None => Ok(()),
    }
}

/// What both predictors do first on a tick: check that `input` is `[batch, 64, 8]` and that
/// every row's newest tick is finite (a NaN learnt would stay in the baseline's quantiles for
/// its 4,096 healthy ticks; the runtime's features never are), give each new batch row a
/// baseline (row `i` the phase `i`), and with `learn`, learn each row's newest tick into its
/// row's baseline (not on a warm-up's dummy batch). A refused batch changes nothing.
pub(crate) fn learn_batch(
    baselines: &mut Vec<Baseline>,
    input: &[f32],
    batch: usize,
    learn: bool,
) -> Result<(), crate::Error> {
    check_batch(input, batch)?;
    check_finite(input, 1)?;
    while baselines.len() < batch {
        baselines.push(Baseline::with_phase(baselines.len() as u64));
    }
    if learn {
        for (window, b) in input.chunks_exact(WINDOW * N_FEATURES).zip(baselines) {
            let newest = window[(WINDOW - 1) * N_FEATURES..]
                .try_into()
                .expect("N_FEATURES values");
            b.observe(newest);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: f32) -> [f32; N_FEATURES] {
        let mut r = [v; N_FEATURES];
        r[SUCCESS] = 1.0;
        r[P99] = v.min(1.0);
        r
    }

    #[test]
    fn zeros_until_a_healthy_tick() {
        let mut b = Baseline::new();
        let mut sick = row(0.5);
        sick[SUCCESS] = 0.5;
        sick[P99] = 3.0;
        b.observe(&sick);
        assert!(b.is_empty());
        assert_eq!(b.quantiles(), &[[0.0; N_FEATURES]; N_QUANTILES]);
        b.observe(&row(0.25));
        assert_eq!(b.len(), 1);
        assert!(b.quantiles().iter().all(|q| q[0] == 0.25));
    }

    #[test]
    fn quantiles_are_order_statistics_of_the_healthy_ticks() {
        let mut b = Baseline::new();
        // 0..=100 shuffled, over the first 64 ticks' per-tick refresh and past it.
        for i in 0..=100u32 {
            b.observe(&row(((i * 37) % 101) as f32));
        }
        // The last refresh was at tick 64: ticks 0..=64 held then.
        let held: Vec<f32> = {
            let mut v: Vec<f32> = (0..=64u32).map(|i| ((i * 37) % 101) as f32).collect();
            v.sort_by(f32::total_cmp);
            v
        };
        let q = b.quantiles();
        for (qi, want) in QUANTILES
            .iter()
            .map(|q| held[(q * 64.0) as usize])
            .enumerate()
        {
            assert_eq!(q[qi][0], want, "quantile {}", QUANTILES[qi]);
        }
        assert_eq!(b.len(), 101);
    }

    #[test]
    fn a_phase_moves_the_refreshes_after_the_first_ticks() {
        let mut plain = Baseline::new();
        let mut shifted = Baseline::with_phase(10);
        let q = |b: &Baseline| b.quantiles()[2][0];
        let (mut plain_changed, mut shifted_changed) = (vec![], vec![]);
        for t in 0..200u64 {
            let before = (q(&plain), q(&shifted));
            plain.observe(&row(t as f32));
            shifted.observe(&row(t as f32));
            if t >= 64 && q(&plain) != before.0 {
                plain_changed.push(t);
            }
            if t >= 64 && q(&shifted) != before.1 {
                shifted_changed.push(t);
            }
            if t < 64 {
                assert_eq!(q(&plain), q(&shifted), "both refresh every tick at first");
            }
        }
        assert_eq!(plain_changed, [64, 128, 192]);
        assert_eq!(shifted_changed, [118, 182], "t + 10 a multiple of 64");
    }

    #[test]
    fn holds_the_newest_history_ticks() {
        let mut b = Baseline::new();
        // 1,024 ticks at 100, then 4,097 at 1: the last refresh, at tick 5,120, holds ticks
        // 1,025..=5,120.
        for i in 0..(HISTORY as u64 + 1_025) {
            b.observe(&row(if i < 1_024 { 100.0 } else { 1.0 }));
        }
        assert_eq!(b.len(), HISTORY);
        // The 100s were pushed out.
        assert!(
            b.quantiles().iter().all(|q| q[0] == 1.0),
            "{:?}",
            b.quantiles()
        );
    }

    /// The series `training/baseline.py` writes its reference from (integers over powers of
    /// two, and the success rate over 128: the same float32 in both languages).
    pub(crate) fn reference_row(t: u64) -> [f32; N_FEATURES] {
        let mut r = [0.0; N_FEATURES];
        for (f, v) in r.iter_mut().enumerate() {
            *v = ((t * 7_919 + f as u64 * 104_729) % 1_000) as f32 / 256.0;
        }
        r[SUCCESS] = (128 - (t * 13) % 20) as f32 / 128.0;
        r[P99] = ((t * 31 + 7) % 512) as f32 / 256.0;
        r
    }

    #[test]
    fn the_python_port_agrees() {
        // tests/fixtures/baseline.reference.txt: `python training/baseline.py --reference`;
        // per line, a tick and the quantiles Python fed a model at it.
        let text = include_str!("../tests/fixtures/baseline.reference.txt");
        let mut want = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut v = line.split_whitespace();
            let tick: u64 = v.next().unwrap().parse().unwrap();
            let q: Vec<f32> = v.map(|x| x.parse().unwrap()).collect();
            assert_eq!(q.len(), N_QUANTILES * N_FEATURES);
            want.insert(tick, q);
        }
        assert!(want.len() >= 10);
        let mut b = Baseline::new();
        let mut out = [0.0; N_QUANTILES * N_FEATURES];
        let last = *want.keys().last().unwrap();
        for t in 0..=last {
            b.observe(&reference_row(t));
            if let Some(q) = want.get(&t) {
                b.write(&mut out);
                assert_eq!(&out[..], &q[..], "tick {t}");
            }
        }
    }
}
