"""screen.py's reading of a statistic against its own history."""
import unittest

import numpy as np

import baseline
import screen


def brute_force(s: np.ndarray, healthy: np.ndarray, t: int, least: int = 64) -> float:
    """against_history at tick t, from the rule as its docstring states it."""
    u = max(u for u in range(t + 1) if u < baseline.REFRESH or u % baseline.REFRESH == 0)
    history = s[:u][healthy[:u]]  # the healthy ticks before the last refresh
    if len(history) < least:
        return 0.0
    v = np.sort(history[-baseline.HISTORY:])
    mid, hi = v[(len(v) - 1) // 2], v[int(0.99 * (len(v) - 1))]
    return (s[t] - mid) / max(hi - mid, 1e-3)


class AgainstHistory(unittest.TestCase):
    def test_follows_the_rule(self):
        rng = np.random.default_rng(3)
        T = 4400
        s = rng.gamma(2.0, 1.0, T)
        healthy = rng.random(T) > 0.1
        out = screen.against_history(s, healthy)
        for t in (0, 63, 64, 70, 71, 72, 127, 128, 129, 4160, 4223, 4224, 4399):
            self.assertAlmostEqual(out[t], brute_force(s, healthy, t), places=12, msg=f"tick {t}")

    def test_nothing_before_enough_healthy_history_and_unhealthy_ticks_are_not_learnt(self):
        s = np.ones(200)
        s[100:] = 5.0  # an incident: its ticks are unhealthy, so the history stays at 1
        healthy = np.ones(200, bool)
        healthy[100:] = False
        out = screen.against_history(s, healthy)
        self.assertTrue((out[:64] == 0).all())
        # a flat history: spread at its floor, so a rise of 4 reads as 4,000
        self.assertAlmostEqual(out[150], 4.0 / 1e-3)


class Spreads(unittest.TestCase):
    def test_the_larger_spread_gives_the_shorter_of_the_two_distances(self):
        rng = np.random.default_rng(5)
        X = rng.gamma(2.0, 0.2, (300, 8)).astype(np.float32)
        X[:, screen.SUCCESS] = 1 - rng.random(300) * 0.05
        iqr, tail, larger = (screen._z(X, sp) for sp in ("iqr", "tail", "larger"))
        np.testing.assert_allclose(np.abs(larger), np.minimum(np.abs(iqr), np.abs(tail)), rtol=1e-12)
        self.assertTrue((np.abs(iqr) != np.abs(tail)).any())


class Seasonal(unittest.TestCase):
    def test_a_daily_cycle_is_usual_at_its_hour(self):
        # 5-minute steps, a rate eight times as high from noon to 3 pm: against the long
        # baseline each afternoon is far out; against the same time on the days before, usual.
        step, per_day, days = 300.0, 288, 10
        t = np.arange(per_day * days)
        X = np.full((len(t), 8), 0.5, np.float32)
        X[:, screen.SUCCESS] = 1.0
        afternoon = (t % per_day >= 144) & (t % per_day < 180)
        X[:, 0] = np.where(afternoon, 400.0, 50.0) + (t % 5)
        z_long, z_season = screen._z(X), screen.seasonal_z(X, step)
        late = (t >= per_day * 3) & (t % per_day >= 150) & (t % per_day < 174)
        self.assertTrue((np.abs(z_season[late, 0]) < 1.5).all())
        self.assertTrue((z_long[late, 0] > 10).all())
        # Before 10 steps at that time of day were seen: the long baseline's distance.
        np.testing.assert_array_equal(z_season[:per_day], z_long[:per_day])
        # A trace shorter than a day: the long baseline's.
        np.testing.assert_array_equal(screen.seasonal_z(X[:200], step), z_long[:200])


if __name__ == "__main__":
    unittest.main()


class WindowZ(unittest.TestCase):
    def test_a_tick_is_read_against_the_start_of_its_own_window(self):
        X = np.full((100, 8), 0.5, np.float32)
        X[90:, 0] = 1.5  # a step up in channel 0 at tick 90
        X[90:, screen.SUCCESS] = 0.0  # and the success rate falls: worse, so positive too
        z = screen.window_z(X)
        self.assertTrue((z[:63] == 0).all())  # no whole window yet
        self.assertEqual(float(np.abs(z[63:90]).max()), 0.0)  # flat: nothing moved
        # the window ending at 99 opens at 36: its first 48 ticks are all before the step
        scale = 1e-3  # a flat start: MAD and standard deviation 0
        self.assertAlmostEqual(z[99, 0], (np.log1p(1.5) - np.log1p(0.5)) / scale, places=6)
        self.assertAlmostEqual(z[99, screen.SUCCESS], np.log1p(0.5) / scale, places=6)

    @unittest.skipUnless(__import__("importlib").util.find_spec("torch"), "needs torch (model.py)")
    def test_it_is_model_window_z_at_the_window_s_last_tick(self):
        import torch

        import model
        self.assertEqual(screen.model_REF, model.REF)
        rng = np.random.default_rng(4)
        X = rng.lognormal(-1.0, 1.0, size=(200, 8)).astype(np.float32)
        z = screen.window_z(X)
        xl = torch.from_numpy(np.log1p(X.astype(np.float64)))
        for t in (63, 64, 120, 199):
            want = model.window_z(xl[t - 63:t + 1].T[None])[0, :, -1].numpy() * screen.SIGN
            np.testing.assert_allclose(z[t], want, rtol=1e-9, atol=1e-9)
