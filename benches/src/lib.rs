//! Criterion benchmarks for tower-degrade live in `benches/`; the bench binaries live in
//! `src/bin/`. This library holds what the binaries share.

/// The `q` quantile (0-1) of `sorted` microsecond samples, in milliseconds (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}
