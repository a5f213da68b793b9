"""Fixed statistics of the long baseline scored as detectors, under evaluate.py's rules: which
kind of deviation ranks each dataset's incidents (`docs/predictor-lodo.md`, *What training
adds*). Nothing here is trained, so every dataset is held out.

    python screen.py --data PUBLIC_TRACES_DIR [--seed 7]

Each statistic is computed per tick from the class's long baseline (baseline.py) on the log1p
scale, each channel's distance from the baseline's median in units of a spread, oriented so
that higher is worse (success enters as a failure), the largest over the channels:

- `spike`: the last tick's two-sided distance (what `za`'s anchor read);
- `scan`: the bundled model's anchor (model.ZSNet.prior, without its padding rule, which the
  steps scored leave moot), the mean over the last 1, 3 and 8 ticks times sqrt(k);
- `held`: the least of the last 3 ticks' oriented distances (a deviation that holds);
- `... tail`: the spread taken from the bad tail, (q99 - q50) / 2.33, instead of the IQR;
- `... larger spread`: the larger of the two spreads, per channel and tick;
- `... SLO channels`: only the channels an SLO is written on (success, errors, timeouts, p99),
  as the calibrated threshold rule reads p99 and failures;
- `max(a, c held)`: the larger of two, c weighing the held deviation;
- `median of 3`: the middle of the last 3 ticks' oriented distances;
- `... window baseline`: distances from the window's own start instead of the long baseline
  (model.window_z, the branch `zs`'s head read: the upper median of the 48 ticks that open
  the 64-tick window ending at the tick, in units of their MAD as a standard deviation, plus
  5 % of their standard deviation and 1e-3), and `max(scan, window scan)`, a change from either;
- `held, own baseline`: the held level (the best of the last 3 ticks, per channel) against a
  baseline kept of that level itself;
- `scan, seasonal baseline`: the scan of distances from the same time of day on the last 7
  days (the steps within 2 of it, their median and spread as the long baseline's; the long
  baseline's distance where fewer than 10 such steps were seen, so the simulator's one-hour
  traces and Nezha's day-long series read as the anchor), and the smaller of the two scans
  (a deviation from both the recent level and the usual level at that hour);
- `... against its own history`: the statistic itself read against the class's own history of
  it, (s - median) / (q99 - median) of its values on the last HISTORY healthy ticks before
  this one, refreshed every REFRESH ticks as the long baseline is (0 until 64 such ticks);
  `max(...)` of two such is a mixture whose parts each trip about as often on every series.

Each statistic is scored from a series' 68th step (`calibrate.as_used`), as the breaker uses a model and
evaluate.Model scores one (until 4 December, from the first: the trips of a series' padded start
were counted). For each, at most 1 false trip a day, headline horizon, k = 1: early recall and false trips a
day on the test part with the threshold chosen on validation, then early recall with the
threshold chosen on the test part itself (evaluate.ranking_check_rows' oracle, the same for
all). The classical baselines are scored beside them.
"""
from __future__ import annotations

import argparse

import numpy as np

import baseline
import datasets
import evaluate
import simulate
from calibrate import as_used
from features import FEATURES, N_FEATURES, SUCCESS, WINDOW
from traces import headline_horizon

SIGN = np.ones(N_FEATURES)
SIGN[SUCCESS] = -1.0  # success: lower is worse
# The ticks that open the window a window z-score is read against (model.REF; model.py needs torch).
model_REF = 48
SLO = [FEATURES.index(c) for c in ("success_rate", "error_rate", "timeout_rate", "p99_over_sla")]


def _z(X: np.ndarray, spread: str = "iqr") -> np.ndarray:
    """[T, 8] distances from the long baseline's median, log1p scale, oriented."""
    xl = np.log1p(np.clip(X.astype(np.float64), 0, None))
    q = np.log1p(np.clip(baseline.series(X).astype(np.float64), 0, None))  # [T, 5, 8]
    iqr = (q[:, 3] - q[:, 1]) / 1.349 + 0.05 * (q[:, 4] - q[:, 0]) + 1e-3  # model.baseline_spread
    tail = np.where(SIGN > 0, q[:, 4] - q[:, 2], q[:, 2] - q[:, 0]) / 2.33 + 1e-3  # the bad tail's reach
    scale = {"iqr": iqr, "tail": tail, "larger": np.maximum(iqr, tail)}[spread]
    return (xl - q[:, 2]) / scale * SIGN


def window_z(X: np.ndarray) -> np.ndarray:
    """[T, 8] distances from the start of the window ending at each tick (model.window_z's,
    REF of WINDOW ticks), log1p scale, oriented; 0 until a window is whole."""
    from numpy.lib.stride_tricks import sliding_window_view
    xl = np.log1p(np.clip(X.astype(np.float64), 0, None))
    out = np.zeros_like(xl)
    if len(xl) < WINDOW:
        return out
    ref = sliding_window_view(xl, model_REF, axis=0)[:len(xl) - WINDOW + 1]  # tick t's: xl[t-63:t-15]
    def upper_median(a):  # model._middle's: the (REF // 2 + 1)-th smallest
        return np.partition(a, model_REF // 2, axis=-1)[..., model_REF // 2]
    med = upper_median(ref)
    scale = upper_median(np.abs(ref - med[..., None])) * 1.4826 + 0.05 * ref.std(axis=-1, ddof=1) + 1e-3
    out[WINDOW - 1:] = (xl[WINDOW - 1:] - med) / scale * SIGN
    return out


def _last(z: np.ndarray, j: int) -> np.ndarray:
    """z shifted j ticks later (the first j ticks repeat the first)."""
    return np.vstack([np.repeat(z[:1], j, axis=0), z[:-j]]) if j else z


def held(z):
    return np.minimum(np.minimum(z, _last(z, 1)), _last(z, 2)).max(axis=1)


def median3(z):
    a, b, c = z, _last(z, 1), _last(z, 2)
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c)).max(axis=1)


def spike(z):
    return np.abs(z).max(axis=1)


def scan(z):
    c = np.cumsum(np.vstack([np.zeros((1, z.shape[1])), z]), axis=0)
    best = np.abs(z).max(axis=1)
    for k in (3, 8):
        s = np.empty_like(z)
        s[k - 1:] = (c[k:] - c[:-k]) / np.sqrt(k)
        s[:k - 1] = (c[1:k] - c[0]) / np.sqrt(np.arange(1, k))[:, None]
        best = np.maximum(best, np.abs(s).max(axis=1))
    return best


def seasonal_z(X: np.ndarray, step_seconds: float, days: int = 7, near: int = 2,
               least: int = 10) -> np.ndarray:
    """[T, 8] oriented distances from the same time of day on the last `days` days: the log1p
    values of the steps within `near` of t - k day (k = 1..days), their median and spread as
    the long baseline's (model.baseline_spread); `_z`'s distance from the long baseline where
    fewer than `least` such steps came before t."""
    period = int(round(86400 / step_seconds))
    out = _z(X)
    T = len(X)
    if period <= near or period >= T:
        return out
    xl = np.log1p(np.clip(X.astype(np.float64), 0, None))
    offsets = np.array([k * period - j for k in range(1, days + 1) for j in range(-near, near + 1)])
    for t in range(period - near, T):
        idx = t - offsets
        idx = idx[(idx >= 0) & (idx < t)]
        if len(idx) < least:
            continue
        # The long baseline's order statistics (baseline.quantiles), of these steps alone.
        q = np.log1p(np.clip(baseline.quantiles(X[idx]).astype(np.float64), 0, None))
        spread = (q[3] - q[1]) / 1.349 + 0.05 * (q[4] - q[0]) + 1e-3
        out[t] = (xl[t] - q[2]) / spread * SIGN
    return out


def seasonal_statistics() -> dict:
    """Name -> function of a trace (the seasonal baseline needs its step)."""
    def season(tr):
        return scan(seasonal_z(tr.X, tr.step_seconds))
    return {"scan, seasonal baseline": season,
            "the smaller of the scan and the seasonal scan": lambda tr: np.minimum(scan(_z(tr.X)), season(tr))}


def held_own_baseline(X):
    """The best of the last 3 ticks per channel (the held level), against a baseline of it."""
    a, b, c = X, _last(X, 1), _last(X, 2)
    lo, hi = np.minimum(np.minimum(a, b), c), np.maximum(np.maximum(a, b), c)
    level = np.where(SIGN > 0, lo, hi).astype(np.float32)
    return _z(level).max(axis=1)


def against_history(s: np.ndarray, healthy: np.ndarray, least: int = 64) -> np.ndarray:
    """[T]: each tick's s in units of its own history's upper spread, (s - q50) / (q99 - q50)
    over the last HISTORY healthy ticks before it, recomputed every tick for the first REFRESH
    and then every REFRESH ticks (as baseline.series); 0 until `least` healthy ticks."""
    T = len(s)
    out = np.zeros(T)
    pos = np.flatnonzero(healthy)
    before = np.concatenate([[0], np.cumsum(healthy)[:-1]])  # healthy ticks before t
    mid = hi = None
    for t in range(T):
        if t < baseline.REFRESH or t % baseline.REFRESH == 0:
            n = int(before[t])
            if n >= least:
                v = np.sort(s[pos[max(0, n - baseline.HISTORY):n]])
                mid, hi = v[(len(v) - 1) // 2], v[int(0.99 * (len(v) - 1))]
        if mid is not None:
            out[t] = (s[t] - mid) / max(hi - mid, 1e-3)
    return out


def own_history(*parts):
    """max over (statistic, spread) parts, each against its own history (against_history)."""
    def f(X):
        h = baseline.healthy(X)
        z = {sp: _z(X, sp) for sp in {sp for _, sp in parts}}
        return np.max([against_history(g(z[sp]), h) for g, sp in parts], axis=0)
    return f


def statistics() -> dict:
    """Name -> function of a trace's features [T, 8]."""
    def of(f, spread="iqr"):
        return lambda X: f(_z(X, spread))
    out = {"spike": of(spike), "scan (the bundled anchor)": of(scan), "held": of(held),
           "held, tail": of(held, "tail"), "spike, tail": of(spike, "tail"),
           "median of 3": of(median3), "held, own baseline": held_own_baseline,
           "scan, larger spread": of(scan, "larger"), "held, larger spread": of(held, "larger"),
           "held, tail, SLO channels": lambda X: held(_z(X, "tail")[:, SLO])}
    for c in (1.5, 2.0, 3.0):
        out[f"max(spike, {c:g} held)"] = lambda X, c=c: (lambda z: np.maximum(spike(z), c * held(z)))(_z(X))
        out[f"max(scan, {c:g} held)"] = lambda X, c=c: (lambda z: np.maximum(scan(z), c * held(z)))(_z(X))
    out["scan, window baseline"] = lambda X: scan(window_z(X))
    out["max(scan, window scan)"] = lambda X: np.maximum(scan(_z(X)), scan(window_z(X)))
    out["scan, against its own history"] = own_history((scan, "iqr"))
    out["held, tail, against its own history"] = own_history((held, "tail"))
    out["max(scan, held tail), each against its own history"] = own_history((scan, "iqr"), (held, "tail"))
    return out


def score(traces, val, f) -> tuple:
    """(early recall, false trips/day) with the validation threshold, and the ranking check's
    early recall; at most 1 false trip a day, headline horizon, k = 1."""
    H = headline_horizon(traces[0].step_seconds)
    sc = [f(t) for t in traces]
    vt, vs = (traces, sc) if val is None else (val, [f(t) for t in val])
    r = evaluate.run_part(traces, sc, "test", evaluate.choose_threshold(vt, vs, H, 1.0), H).summary()
    rc = evaluate.run_part(traces, sc, "test",
                           evaluate.choose_threshold(traces, sc, H, 1.0, part="test"), H).summary()
    return r["recall_early"], r["false_trips_per_day"], rc["recall_early"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="directory holding nab/, nezha/ and smd_subset/")
    ap.add_argument("--seed", type=int, default=7, help="the simulator's seed")
    a = ap.parse_args()
    datasets.require(a.data, "screen.py")
    sim = simulate.dataset(a.seed)
    pub = datasets.load_or_exit(a.data, "screen.py")
    sets = {"simulated": ([t for t in sim if t.test_from == 0], [t for t in sim if t.val_from < t.test_from]),
            **{n: (pub[n], None) for n in ("nab", "nezha", "smd")}}
    stats = {k: (lambda f: lambda tr: f(tr.X))(f) for k, f in statistics().items()}
    stats.update(seasonal_statistics())
    dets = {k: (lambda f: lambda tr: as_used(f(tr)))(f) for k, f in stats.items()}
    dets.update({k: f for k, f in evaluate.BASELINES.items() if k not in evaluate.FIXED})
    print("| statistic | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, f in dets.items():
        cells = [score(trs, val, f) for trs, val in sets.values()]
        print(f"| {name} | " + " | ".join(f"{e:.3f} at {d:.2f}/day, ranking check {c:.3f}"
                                         for e, d, c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
