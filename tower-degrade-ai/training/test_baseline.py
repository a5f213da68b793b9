"""The long baseline (baseline.py): its rule, and the reference the Rust test checks against."""
import unittest

import numpy as np

import baseline
from features import N_FEATURES, P99, SUCCESS


def brute_force(X: np.ndarray, t: int, phase: int = 0) -> np.ndarray:
    """The baseline fed at tick t, from the rule as the docstring states it."""
    refreshed = max(u for u in range(t + 1)
                    if u < baseline.REFRESH or (u + phase) % baseline.REFRESH == 0)
    seen = X[:refreshed + 1]
    rows = seen[baseline.healthy(seen)][-baseline.HISTORY:]
    if len(rows) == 0:
        return np.zeros((baseline.N_QUANTILES, N_FEATURES), dtype=np.float32)
    s = np.sort(rows, axis=0)
    return s[[int(q * (len(rows) - 1)) for q in baseline.QUANTILES]]


class Baseline(unittest.TestCase):
    def test_series_follows_the_rule(self):
        X = baseline.reference_series(4300)
        B = baseline.series(X)
        for t in (0, 1, 5, 63, 64, 65, 100, 128, 4095, 4096, 4097, 4160, 4299):
            np.testing.assert_array_equal(B[t], brute_force(X, t), err_msg=f"tick {t}")
        B = baseline.series(X, phase=10)
        for t in (63, 64, 117, 118, 119, 182, 4299):
            np.testing.assert_array_equal(B[t], brute_force(X, t, 10), err_msg=f"tick {t}")

    def test_the_harness_holds_a_block_per_refresh_not_per_tick(self):
        # What evaluate.Model and training read (`of`): the same rows as the rule's, at any
        # ticks, from one [5, 8] block per refresh.
        X = baseline.reference_series(4300)
        rows = baseline.of(X)
        self.assertEqual(len(rows), 4300)
        # every tick of the first REFRESH, then every REFRESH-th
        self.assertEqual(len(rows.values), baseline.REFRESH + (4300 - 1) // baseline.REFRESH)
        ticks = np.array([4299, 0, 64, 63, 4096, 127, 128])
        want = np.stack([brute_force(X, t) for t in ticks])
        np.testing.assert_array_equal(rows[ticks], want)
        self.assertIs(baseline.of(X), rows)  # computed once per array

    def test_unhealthy_ticks_are_left_out_and_zeros_come_first(self):
        X = np.full((3, N_FEATURES), 0.5, dtype=np.float32)
        X[:, SUCCESS], X[:, P99] = 0.5, 2.0  # the seed rule's breach
        X[2, SUCCESS] = 1.0
        B = baseline.series(X)
        self.assertFalse(B[:2].any())
        self.assertTrue((B[2][:, 0] == 0.5).all())

    def test_the_rust_reference_is_current(self):
        # src/baseline.rs reads this file; a change to the rule must rewrite it
        # (`python baseline.py --reference`).
        with open(baseline.REFERENCE) as f:
            self.assertEqual(f.read(), baseline.reference_text())

    def test_a_model_must_declare_the_baseline_it_takes(self):
        baseline.check({baseline.METADATA_KEY: baseline.METADATA_VALUE})
        with self.assertRaisesRegex(ValueError, "tower_degrade.baseline"):
            baseline.check({}, "m.onnx")
        with self.assertRaisesRegex(ValueError, "m.onnx"):
            baseline.check({baseline.METADATA_KEY: "quantiles=0.5"}, "m.onnx")

    def test_inputs_put_the_baseline_after_the_window(self):
        X = baseline.reference_series(200)
        x = baseline.inputs(X, np.array([150, 199]), True)
        self.assertEqual(x.shape, (2, 64 + baseline.N_QUANTILES, N_FEATURES))
        np.testing.assert_array_equal(x[1, -1 - baseline.N_QUANTILES], X[199])
        np.testing.assert_array_equal(x[1, 64:], baseline.series(X)[199])


if __name__ == "__main__":
    unittest.main()
