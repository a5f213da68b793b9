//! The eight features of a window, and each class's feature history.

use std::time::Duration;

use super::{N_FEATURES, WINDOW};
use crate::window::{Ring, WindowSnapshot};

/// The 8 features of one window.
pub fn features(w: &WindowSnapshot, sla: Duration, mean_rps: f64) -> [f32; N_FEATURES] {
    let sla_s = sla.as_secs_f64().max(1e-6);
    let over_sla = |d: Duration| (d.as_secs_f64() / sla_s).clamp(0.0, 20.0);
    let rps = w.rps();
    let little = rps * sla_s + 1.0;
    [
        (rps / mean_rps.max(1.0)).clamp(0.0, 10.0),
        w.success_rate(),
        w.error_rate(),
        w.timeout_rate(),
        over_sla(w.p50),
        over_sla(w.p99),
        (w.inflight.max(0) as f64 / little).clamp(0.0, 20.0),
        over_sla(w.queue_delay),
    ]
    .map(|v| v as f32)
}

/// Per class, the features of the last [`WINDOW`] ticks, each with its window's rate (for the
/// rate baseline).
#[derive(Debug, Clone, Default)]
pub(crate) struct FeatureHistory {
    ring: Ring<([f32; N_FEATURES], f64), WINDOW>,
    rps_sum: f64,
    /// Ticks pushed since the first, or since the last window [read late](Self::read_late)
    /// (saturating): the ticks of the input that can be used.
    pushed: u32,
}

impl FeatureHistory {
    pub(crate) fn push(&mut self, w: &WindowSnapshot, sla: Duration) {
        // The rate's baseline is the mean of the held windows before this one.
        let len = self.ring.len();
        let mean = if len == 0 {
            w.rps()
        } else {
            self.rps_sum / len as f64
        };
        if let Some((_, evicted)) = self.ring.push((features(w, sla, mean), w.rps())) {
            self.rps_sum -= evicted;
        }
        self.rps_sum += w.rps();
        self.pushed = self.pushed.saturating_add(1);
    }

    /// The window just pushed was read late: it spans two ticks or more (a tick ran long, or
    /// the process or its runtime stalled), so its rate is overstated and its latencies are
    /// the stall's, not what the model reads at a tick. Its predictions are unused until it
    /// has left the input ([`is_full`](Self::is_full) again `WINDOW` ticks and a stale
    /// batch's ticks later).
    pub(crate) fn read_late(&mut self) {
        self.pushed = 0;
    }

    /// Whether every prediction the class may be given now was made from a whole window of
    /// ticks read on time (no zero padding in its input, no window [read late](Self::read_late)):
    /// a batch that overran is used for up to [`STALE_TICKS`](super::runner::STALE_TICKS) more
    /// ticks, so its input is that much older.
    pub(crate) fn is_full(&self) -> bool {
        self.unused_ticks_left() == 0
    }

    /// Ticks until [`is_full`](Self::is_full), from this one (0 once it is).
    pub(crate) fn unused_ticks_left(&self) -> u32 {
        (WINDOW as u32 + super::runner::STALE_TICKS).saturating_sub(self.pushed)
    }

    /// Write the `[WINDOW, N_FEATURES]` block, oldest first, zero-padded at the start.
    pub(crate) fn write(&self, out: &mut [f32]) {
        out.fill(0.0);
        let len = self.ring.len();
        let pad = WINDOW - len;
        for (i, ago) in (0..len).rev().enumerate() {
            let (features, _) = self.ring.get(ago).expect("ago < len");
            out[(pad + i) * N_FEATURES..(pad + i + 1) * N_FEATURES].copy_from_slice(features);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_oldest_first_and_zero_padded() {
        let mut h = FeatureHistory::default();
        for s in [10u64, 20, 30] {
            let w = WindowSnapshot {
                successes: s,
                period: Duration::from_millis(500),
                ..Default::default()
            };
            h.push(&w, Duration::from_millis(100));
        }
        let mut out = vec![1.0; WINDOW * N_FEATURES];
        h.write(&mut out);
        assert!(out[..(WINDOW - 3) * N_FEATURES].iter().all(|v| *v == 0.0));
        // rate ratios: 20 rps over itself, 40 over 20, 60 over 30.
        let rate = |i: usize| out[(WINDOW - 3 + i) * N_FEATURES];
        assert_eq!((rate(0), rate(1), rate(2)), (1.0, 2.0, 2.0));
        assert_eq!(out[(WINDOW - 1) * N_FEATURES + 1], 1.0, "success rate");
    }

    #[test]
    fn a_window_read_late_leaves_the_predictions_unused_for_that_tick_and_67_more() {
        let w = WindowSnapshot {
            successes: 10,
            period: Duration::from_millis(500),
            ..Default::default()
        };
        let mut h = FeatureHistory::default();
        let sla = Duration::from_millis(100);
        for left in (1..=68).rev() {
            assert_eq!((h.is_full(), h.unused_ticks_left()), (false, left));
            h.push(&w, sla);
        }
        assert_eq!((h.is_full(), h.unused_ticks_left()), (true, 0));
        h.push(&w, sla);
        h.read_late();
        for left in (1..=68).rev() {
            assert_eq!((h.is_full(), h.unused_ticks_left()), (false, left));
            h.push(&w, sla);
        }
        assert!(h.is_full());
    }

    #[test]
    fn features_are_normalised_by_the_sla() {
        let w = WindowSnapshot {
            successes: 8,
            errors: 1,
            timeouts: 1,
            p50: Duration::from_millis(50),
            p99: Duration::from_secs(10),
            period: Duration::from_millis(500),
            inflight: 5,
            ..Default::default()
        };
        let f = features(&w, Duration::from_millis(100), 20.0);
        assert_eq!(f[0], 1.0);
        assert!(
            (f[1] - 0.8).abs() < 1e-6 && (f[2] - 0.1).abs() < 1e-6 && (f[3] - 0.1).abs() < 1e-6
        );
        assert_eq!((f[4], f[5]), (0.5, 20.0), "p99 clipped at 20x the SLA");
        assert!(
            (f[6] - 5.0 / 3.0).abs() < 1e-6,
            "5 in flight over 20 rps x 0.1 s + 1"
        );
    }
}
