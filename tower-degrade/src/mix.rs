//! splitmix64, the one mixer the crate uses where it needs spread rather than cryptographic
//! strength: stable user buckets across processes, backoff jitter, and the chaos layer's
//! seeded draws. A leaf, naming no other part of the crate.
//!
//! Hand-written rather than `rand`'s: every use hashes a counter or a key (so one relaxed
//! atomic add gives a lock-free, reproducible stream shared by all threads), which an RNG
//! object behind `&mut self` does not offer.

/// The golden-ratio increment between splitmix64's states.
#[cfg_attr(not(any(feature = "chaos", feature = "fallback")), allow(dead_code))]
pub(crate) const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: a bijection on `u64` whose outputs look independent.
#[inline]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform draw in `[0, 1)` from 64 mixed bits.
#[inline]
#[cfg_attr(not(any(feature = "chaos", feature = "fallback")), allow(dead_code))]
pub(crate) fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixer_is_splitmix64() {
        // The first outputs of splitmix64 seeded with 0 (its reference implementation).
        assert_eq!(mix64(GAMMA), 0xE220_A839_7B1D_CDAF);
        assert_eq!(mix64(GAMMA.wrapping_mul(2)), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn draws_are_in_the_unit_interval_and_spread() {
        let draws: Vec<f64> = (1..=10_000u64)
            .map(|i| unit(mix64(i.wrapping_mul(GAMMA))))
            .collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let below_half = draws.iter().filter(|u| **u < 0.5).count();
        assert!((4_800..5_200).contains(&below_half), "{below_half}");
        assert_eq!(unit(u64::MAX), 1.0 - 1.0 / (1u64 << 53) as f64);
    }
}
