//! [`ScanPredictor`]: the bundled model's anchor computed in Rust, with no ONNX Runtime.

use tower_degrade::BoxError;
use tower_degrade::predict::{N_FEATURES, Predictor, WINDOW};

use crate::baseline::{Baseline, N_QUANTILES, check_finite, learn_batch};

/// The ticks the scan sums over: each channel's last 1, 3 and 8 ticks (`model.ZSNet.SCALES`).
const SCALES: [usize; 3] = [1, 3, 8];
/// The newest ticks the scan reads.
const LAST: usize = 8;
/// The spread's floor on the `log1p` scale, so that a flat baseline does not divide by 0.
const FLOOR: f32 = 1e-3;
/// The bundled model's mapping of its anchor to a probability, read off `p_anomaly.onnx`
/// (`net.log_a`, `net.b`, `net.scale`, `net.shift`): `p = sigmoid((exp(LOG_A) * anchor + B) *
/// SCALE + SHIFT)`, the bundled model with its learnt head's correction at 0. A test runs this
/// predictor beside that model with its head's weights set to 0 (`tests/fixtures/anchor.onnx`,
/// made from the bundled file by `training/make_fixtures.py`) and checks they agree.
const LOG_A: f32 = 0.828_575_6;
const B: f32 = -3.314_67;
const SCALE: f32 = 1.834_212_2;
const SHIFT: f32 = -0.581_353_96;

/// A failure predictor that needs no model file and no ONNX Runtime: the bundled model's
/// anchor, computed in Rust.
///
/// The bundled model ([`OnnxPredictor::bundled`](crate::OnnxPredictor::bundled)) scores a class
/// with a scan of robust z-scores against the class's long baseline ([`crate::baseline`]):
/// for each feature, on the `log1p` scale, the mean of its last 1, 3 and 8 ticks' distances
/// from the baseline's median in units of its spread, times the square root of the ticks
/// summed, the largest over the features and the three lengths. A learnt head then moves that
/// score within a bound. Trained without the dataset it was scored on (the leave-one-dataset-out
/// evaluation, `docs/predictor-lodo.md`, *What training adds*), the head added at most three
/// incidents per dataset with thresholds from validation, and with thresholds chosen for the
/// same false-trip budget on the test part six on Nezha (9 of 96 against 3) and none elsewhere:
/// on a service the model has not seen, the anchor is mostly what warns. This predictor is that anchor alone, mapped to a
/// probability with the bundled model's constants (its head's correction at 0). The
/// calibrated default threshold, which reads only the order of a class's scores, learns the
/// anchor's ranking; at the fixed 0.87 it tripped more often than the bundled model on the
/// 500 ms recordings the model was trained for (four false trips where the head made two,
/// `docs/predictor.md`, *Without ONNX Runtime*).
///
/// Each batch row keeps its class's long baseline, as the bundled model's does: rows are
/// classes, in the same order every call. A tick costs a few hundred floating-point operations
/// per class, and the baseline's upkeep (per class, every 64 ticks, five selections over at
/// most 4,096 values per feature); nothing is allocated once every class's history holds its
/// 4,096 healthy ticks. A window whose last 8 ticks hold a value that is not finite is an
/// error (the runtime's features never are), as a model's answer that is not a probability
/// is for [`OnnxPredictor`](crate::OnnxPredictor): no class then has a prediction that tick.
///
/// ```
/// use tower_degrade::{ClassConfig, Degrader, predict::PredictorConfig};
/// use tower_degrade_ai::ScanPredictor;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let degrader = Degrader::builder("shop")
///     .class(ClassConfig::gold("payment"))
///     .predictor(ScanPredictor::new(), PredictorConfig::default())
///     .build()?; // spawns the control loop: call it inside a tokio runtime
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct ScanPredictor {
    /// Per batch row, the class's long baseline.
    baselines: Vec<Baseline>,
}

impl std::fmt::Debug for ScanPredictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanPredictor")
            .field("classes", &self.baselines.len())
            .finish_non_exhaustive()
    }
}

impl ScanPredictor {
    /// A predictor with no class seen yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The long baseline of batch row `class`, once the row has been run.
    pub fn baseline(&self, class: usize) -> Option<&Baseline> {
        self.baselines.get(class)
    }

    /// One tick of every class: `input` is `[out.len(), 64, 8]` row-major, one class per batch
    /// row in the same order every call. Each row's newest tick is learnt into its baseline
    /// first, as the bundled model's are.
    pub fn run(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), crate::Error> {
        self.score(input, out, true)
    }

    fn score(&mut self, input: &[f32], out: &mut [f32], learn: bool) -> Result<(), crate::Error> {
        let batch = out.len();
        // Checked before any baseline learns, so that a refused batch changes nothing.
        check_finite(input, LAST)?;
        learn_batch(&mut self.baselines, input, batch, learn)?;
        let a = LOG_A.exp();
        for ((window, o), b) in input
            .chunks_exact(WINDOW * N_FEATURES)
            .zip(out.iter_mut())
            .zip(&self.baselines)
        {
            let logit = (a * anchor(window, b.quantiles()) + B) * SCALE + SHIFT;
            *o = 1.0 / (1.0 + (-logit).exp());
        }
        Ok(())
    }
}

/// The anchor of one class (`model.ZSNet.prior`): `window` is `[64, 8]`, `q` the baseline's
/// quantiles. Ticks the runtime zero-padded the window with (every feature 0) are no evidence:
/// each mean is over the real ticks among its last k.
fn anchor(window: &[f32], q: &[[f32; N_FEATURES]; N_QUANTILES]) -> f32 {
    let lp = |v: f32| v.max(0.0).ln_1p();
    let ticks = &window[(WINDOW - LAST) * N_FEATURES..];
    let real: [bool; LAST] = std::array::from_fn(|t| {
        ticks[t * N_FEATURES..][..N_FEATURES]
            .iter()
            .any(|&v| v != 0.0)
    });
    let mut largest = 0.0f32;
    for f in 0..N_FEATURES {
        let (q01, q25, q50, q75, q99) = (
            lp(q[0][f]),
            lp(q[1][f]),
            lp(q[2][f]),
            lp(q[3][f]),
            lp(q[4][f]),
        );
        let scale = (q75 - q25) / 1.349 + 0.05 * (q99 - q01) + FLOOR;
        for &k in &SCALES {
            let (mut sum, mut n) = (0.0f32, 0.0f32);
            for t in LAST - k..LAST {
                if real[t] {
                    sum += (lp(ticks[t * N_FEATURES + f]) - q50) / scale;
                    n += 1.0;
                }
            }
            largest = largest.max(sum.abs() / n.max(1.0).sqrt());
        }
    }
    // `model.squash`: logarithmic beyond about 3, never clipped.
    largest.ln_1p() / 3.0
}

impl Predictor for ScanPredictor {
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        Ok(self.run(input, out)?)
    }

    /// A dummy batch, which the classes' long baselines do not learn from.
    fn warm_up(&mut self, classes: &[&str]) -> Result<(), BoxError> {
        let input = vec![0.0; classes.len() * WINDOW * N_FEATURES];
        let mut out = vec![0.0; classes.len()];
        Ok(self.score(&input, &mut out, false)?)
    }

    /// The crate's version: calibrations learnt from another version's scan are not
    /// restored.
    fn fingerprint(&self) -> Option<String> {
        Some(concat!("tower-degrade-ai ScanPredictor ", env!("CARGO_PKG_VERSION")).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window slid one tick on, `row` its newest.
    fn push(window: &mut [f32], row: [f32; N_FEATURES]) {
        window.copy_within(N_FEATURES.., 0);
        window[(WINDOW - 1) * N_FEATURES..].copy_from_slice(&row);
    }

    fn healthy() -> [f32; N_FEATURES] {
        [1.0, 1.0, 0.0, 0.0, 0.2, 0.5, 0.3, 0.05]
    }

    #[test]
    fn a_class_at_its_usual_level_scores_low_and_a_held_shift_more_the_longer_it_holds() {
        let mut p = ScanPredictor::new();
        let (mut window, mut out) = (vec![0.0; WINDOW * N_FEATURES], [0.0]);
        // A class that wavers a little about its level, for 500 ticks.
        for t in 0..500 {
            let mut row = healthy();
            row[5] *= 1.0 + ((t * 7) % 11) as f32 / 100.0;
            push(&mut window, row);
            p.run(&window, &mut out).unwrap();
        }
        let calm = out[0];
        assert!(calm < 0.01, "{calm}");
        // Its p99 doubles and holds: no tick scores lower than the last, and the eighth
        // higher than the first (the scan's means over 3 and 8 ticks fill up).
        let mut slow = healthy();
        slow[5] = 1.0;
        let mut scores = vec![];
        for _ in 0..8 {
            push(&mut window, slow);
            p.run(&window, &mut out).unwrap();
            scores.push(out[0]);
        }
        assert!(scores.is_sorted(), "{scores:?}");
        assert!(
            scores[7] > scores[0] && scores[0] > 10.0 * calm,
            "{calm} {scores:?}"
        );
    }

    #[test]
    fn padding_is_no_evidence() {
        // A class's first tick: 63 zero ticks, then one at its level. Read as ticks, the zeros
        // would stand far below the baseline.
        let mut window = vec![0.0; WINDOW * N_FEATURES];
        window[(WINDOW - 1) * N_FEATURES..].copy_from_slice(&healthy());
        let mut p = ScanPredictor::new();
        let mut out = [0.0];
        p.run(&window, &mut out).unwrap();
        let at_zero = 1.0 / (1.0 + (-((B) * SCALE + SHIFT)).exp());
        assert!((out[0] - at_zero).abs() < 1e-6, "{} {at_zero}", out[0]);
    }

    #[test]
    fn a_wrong_input_length_is_an_error() {
        let mut p = ScanPredictor::new();
        let err = p.run(&[0.0; 10], &mut [0.0; 2]).unwrap_err();
        assert!(err.to_string().contains("expected 2 x 64 x 8"), "{err}");
    }

    #[test]
    fn a_value_that_is_not_finite_is_an_error_and_nothing_is_learnt() {
        let mut p = ScanPredictor::new();
        let mut window = healthy().repeat(WINDOW);
        window[WINDOW * N_FEATURES - 3] = f32::NAN;
        let err = p.run(&window, &mut [0.0]).unwrap_err();
        assert!(err.to_string().contains("batch row 0"), "{err}");
        assert!(p.baseline(0).is_none_or(Baseline::is_empty));
        window[WINDOW * N_FEATURES - 3] = f32::INFINITY;
        assert!(p.run(&window, &mut [0.0]).is_err());
    }

    #[test]
    fn warm_up_learns_nothing() {
        let mut p = ScanPredictor::new();
        p.warm_up(&["a", "b"]).unwrap();
        assert!(p.baseline(1).unwrap().is_empty());
    }
}
