"""The long baseline a model may take as a second input, ported line for line from the Rust
runtime (`tower_degrade_ai::baseline`), so training and the harness see what the breaker feeds.

A window holds 64 ticks: a model that takes each channel's baseline from them compares a
series with its last half minute, not with what the service usually looks like. A class's
long baseline is per feature the quantiles QUANTILES of its last HISTORY healthy ticks (those
the seed rule does not flag: success >= 92 % or p99 within the SLA), recomputed every REFRESH
ticks (every tick for the first REFRESH; see `series` for the phase) from the ticks seen so far, the current one included;
zeros until a healthy tick has been seen. Quantile q of n values is the sorted values' element
floor(q (n - 1)): an order statistic, so the quantiles of any monotone transform of a feature
(log1p, say) are the transform of these.

A model that takes it declares it: a second input `baseline [batch, 5, 8]` (the quantiles in
QUANTILES' order, then the features in FEATURES' order), and the metadata entry
METADATA_KEY = METADATA_VALUE.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from features import N_FEATURES, P99, SUCCESS
from traces import windows

QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
N_QUANTILES = len(QUANTILES)
HISTORY = 4096
REFRESH = 64
# The seed rule: a tick is unhealthy when its success rate is below this and its p99 over the
# SLA above that (float32 comparisons, as in Rust).
UNHEALTHY_SUCCESS = np.float32(0.92)
UNHEALTHY_P99 = np.float32(1.0)

METADATA_KEY = "tower_degrade.baseline"
METADATA_VALUE = (f"quantiles={','.join(f'{q:g}' for q in QUANTILES)};history={HISTORY};"
                  f"refresh={REFRESH};healthy=seed_rule")
INPUT_NAME = "baseline"


def check(metadata: dict, model: str = "model") -> None:
    """Raise ValueError unless `metadata` (an ONNX model's custom metadata map) declares this
    baseline (what `OnnxPredictor` checks of a model with a second input)."""
    found = metadata.get(METADATA_KEY)
    if found != METADATA_VALUE:
        raise ValueError(f"{model}: takes a second input, so its `{METADATA_KEY}` metadata must be "
                         f"`{METADATA_VALUE}` (the baseline the runtime feeds); found {found!r}. "
                         f"If it was trained on `baseline.of`'s rows, stamp it with "
                         f"`python features.py {model}`")


def healthy(X: np.ndarray) -> np.ndarray:
    """[T] bool: the ticks the seed rule does not flag (what a baseline learns from, and what
    the harness's seed rule and calibrated threshold count as healthy)."""
    X = X.astype(np.float32, copy=False)
    return ~((X[:, SUCCESS] < UNHEALTHY_SUCCESS) & (X[:, P99] > UNHEALTHY_P99))


def quantiles(rows: np.ndarray) -> np.ndarray:
    """[5, 8]: each column's order statistics at QUANTILES (rows: [n, 8], n >= 1)."""
    s = np.sort(rows.astype(np.float32, copy=False), axis=0)
    n = len(s)
    return s[[int(q * (n - 1)) for q in QUANTILES]]


def series(X: np.ndarray, phase: int = 0) -> np.ndarray:
    """[T, 5, 8] float32: the baseline a class with features X [T, 8] is fed at each tick.
    After the first REFRESH ticks it refreshes where (t + phase) % REFRESH == 0: the runtime
    gives batch row i the phase i, so that classes do not all refresh on the same tick; a
    series scored alone is row 0."""
    return Rows(X, phase)[:]


class Rows:
    """`series(X, phase)` held as what it is, one [5, 8] block per refresh (a tick's row is
    its last refresh's): 1/64 of the [T, 5, 8] array, which at 160 bytes a tick was most of
    what the harness held of a long trace. rows[idx] gives series' rows at the ticks idx."""

    def __init__(self, X: np.ndarray, phase: int = 0):
        X = X.astype(np.float32, copy=False)
        T = len(X)
        h = healthy(X)
        pos = np.flatnonzero(h)  # healthy ticks, in order
        count = np.cumsum(h)  # healthy ticks up to and including t
        refreshes = [t for t in range(T) if t < REFRESH or (t + phase) % REFRESH == 0]
        self.values = np.zeros((len(refreshes), N_QUANTILES, N_FEATURES), dtype=np.float32)
        last = np.zeros((N_QUANTILES, N_FEATURES), dtype=np.float32)  # until a healthy tick
        for i, t in enumerate(refreshes):
            n = int(count[t])
            if n:
                last = quantiles(X[pos[max(0, n - HISTORY):n]])
            self.values[i] = last
        # each tick's refresh: the last one at or before it
        self.which = (np.searchsorted(np.asarray(refreshes, dtype=np.int64), np.arange(T), side="right")
                      - 1).astype(np.int32)

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, idx) -> np.ndarray:
        return self.values[self.which[idx]]


_cache: dict = {}


def of(X: np.ndarray) -> Rows:
    """Rows(X), computed once per array (the traces' arrays are not changed once made)."""
    key = id(X)
    hit = _cache.get(key)
    if hit is None or hit[0] is not X:
        hit = _cache[key] = (X, Rows(X))
    return hit[1]


def inputs(X: np.ndarray, idx: np.ndarray, with_baseline: bool) -> np.ndarray:
    """What a network is trained on at the ticks idx: the windows [n, 64, 8], and with
    with_baseline the baseline's rows after each window, [n, 64 + 5, 8]."""
    w = windows(X, idx)
    return np.concatenate([w, of(X)[idx]], axis=1) if with_baseline else w


# ------------------------------------------------------------------ the Rust test's reference
REFERENCE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                          "fixtures", "baseline.reference.txt"))
REFERENCE_TICKS = (0, 1, 2, 63, 64, 65, 127, 128, 1000, 4095, 4096, 4159, 4160, 4800, 6000)


def reference_series(T: int) -> np.ndarray:
    """[T, 8] float32: the series the reference is computed over (as `reference_row` in Rust:
    integers over powers of two, the success rate over 128; some ticks unhealthy)."""
    t = np.arange(T, dtype=np.int64)[:, None]
    f = np.arange(N_FEATURES, dtype=np.int64)[None, :]
    X = (((t * 7919 + f * 104729) % 1000).astype(np.float32) / np.float32(256)).astype(np.float32)
    X[:, SUCCESS] = (128 - (t[:, 0] * 13) % 20).astype(np.float32) / np.float32(128)
    X[:, P99] = ((t[:, 0] * 31 + 7) % 512).astype(np.float32) / np.float32(256)
    return X


def reference_text() -> str:
    B = series(reference_series(max(REFERENCE_TICKS) + 1))
    lines = ["# training/baseline.py --reference: a tick, then the baseline fed at it "
             "(5 quantiles x 8 features, row-major)"]
    for t in REFERENCE_TICKS:
        lines.append(" ".join([str(t)] + [repr(float(v)) for v in B[t].ravel()]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--reference"]:
        sys.exit("usage: python baseline.py --reference   # rewrites " + REFERENCE)
    with open(REFERENCE, "w") as out:
        out.write(reference_text())
    print(REFERENCE)
