//! A log-linear latency histogram with bounded relative error.
//!
//! Values are microseconds. Each power of two is split into [`SUB_BUCKETS`] linear sub-buckets, so
//! a value is reported as the midpoint of a bucket whose width is at most `1 / SUB_BUCKETS` of its
//! lower bound: the relative error of any reported percentile is at most `1 / (2 * SUB_BUCKETS)`
//! (3.125 %). Values below `SUB_BUCKETS` µs are exact. This is the HdrHistogram layout with one
//! significant binary digit fewer; it is written here rather than taken from the `hdrhistogram`
//! crate because recording must be a single relaxed `fetch_add` on shared memory, which that
//! crate's (`&mut self`) recorder does not offer.

/// log2 of the number of linear sub-buckets per power of two.
pub(crate) const SUB_BITS: u32 = 4;
/// Linear sub-buckets per power of two.
pub(crate) const SUB_BUCKETS: usize = 1 << SUB_BITS;
/// Largest recordable value (larger values are clamped): 2^32 µs, about 71 minutes.
pub(crate) const MAX_MICROS: u64 = (1 << 32) - 1;
/// Number of buckets needed to cover `0..=MAX_MICROS`.
pub(crate) const BUCKETS: usize = (32 - SUB_BITS as usize + 1) * SUB_BUCKETS;

/// The bucket index of `micros`.
#[inline]
pub(crate) fn bucket_of(micros: u64) -> usize {
    let v = micros.min(MAX_MICROS);
    if v < SUB_BUCKETS as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) as usize & (SUB_BUCKETS - 1);
    ((shift as usize + 1) << SUB_BITS) + sub
}

/// The inclusive range of values `[low, high]` that land in `bucket`.
pub(crate) fn bucket_range(bucket: usize) -> (u64, u64) {
    if bucket < SUB_BUCKETS {
        return (bucket as u64, bucket as u64);
    }
    let shift = (bucket >> SUB_BITS) as u32 - 1;
    let sub = (bucket & (SUB_BUCKETS - 1)) as u64;
    let low = (SUB_BUCKETS as u64 + sub) << shift;
    let high = low + (1u64 << shift) - 1;
    (low, high)
}

/// The value reported for `bucket`: its midpoint.
pub(crate) fn bucket_value(bucket: usize) -> u64 {
    let (low, high) = bucket_range(bucket);
    low + (high - low) / 2
}

/// Value at quantile `q` (0.0..=1.0) of a bucket count array, by nearest rank; 0 when empty.
pub(crate) fn quantile(counts: &[u32; BUCKETS], total: u64, q: f64) -> u64 {
    if total == 0 {
        return 0;
    }
    // Nearest-rank: the smallest value such that at least q * total samples are <= it.
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0u64;
    for (bucket, &c) in counts.iter().enumerate() {
        seen += u64::from(c);
        if seen >= rank {
            return bucket_value(bucket);
        }
    }
    bucket_value(BUCKETS - 1)
}

/// Number of samples strictly above `micros` (by bucket: buckets whose low bound exceeds it).
pub(crate) fn count_above(counts: &[u32; BUCKETS], micros: u64) -> u64 {
    let first = bucket_of(micros) + 1;
    counts[first.min(BUCKETS)..]
        .iter()
        .map(|&c| u64::from(c))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_the_range() {
        let mut next = 0u64;
        for b in 0..BUCKETS {
            let (low, high) = bucket_range(b);
            assert_eq!(low, next, "bucket {b} starts where the previous ended");
            assert!(high >= low);
            assert_eq!(bucket_of(low), b);
            assert_eq!(bucket_of(high), b);
            next = high + 1;
        }
        assert_eq!(next - 1, MAX_MICROS);
    }

    #[test]
    fn relative_error_is_bounded() {
        for v in (1..5_000_000u64)
            .step_by(997)
            .chain([1 << 20, (1 << 31) + 12345])
        {
            let reported = bucket_value(bucket_of(v)) as f64;
            let err = (reported - v as f64).abs() / v as f64;
            assert!(err <= 1.0 / (2.0 * SUB_BUCKETS as f64), "v={v} err={err}");
        }
    }

    #[test]
    fn huge_values_clamp() {
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }
}
