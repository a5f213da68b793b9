"""The breaker's calibrated prediction threshold (`tower_degrade::breaker::Calibration`), ported
line for line so the harness scores the model as the breaker uses it by default: SPOT over the
logits of a class's healthy scores (a generalized Pareto fit of the excesses over their 98th
percentile, by the method of moments), kept at a false-trip budget per day.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

TAIL_QUANTILE = 0.98
MAX_PEAKS = 2048
# The fewest excesses a first fit takes: fewer give a tail that trips far over budget.
MIN_PEAKS = 50
EPS = 1e-6


def logit(p: float) -> float:
    p = min(max(p, EPS), 1.0 - EPS)
    return math.log(p / (1.0 - p))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class Calibrator:
    def __init__(self, false_trips_per_day: float, step_seconds: float, warm_up: int):
        ticks_per_day = 86400.0 / max(step_seconds, 1e-3)
        self.risk = min(max(false_trips_per_day / ticks_per_day, 1e-12), 0.5)
        self.warm_up = max(1, warm_up)
        self.init: list[float] | None = []
        self.start = self.thr = 0.0
        self.peaks: deque[float] = deque()
        self.sum = self.sum_sq = 0.0
        self.seen = self.exceeded = 0

    def threshold(self):
        return None if self.init is not None else sigmoid(self.thr)

    def exceeds(self, p: float) -> bool:
        """p at or above the threshold, compared on the clamped logit as it was fitted."""
        return self.init is None and math.isfinite(p) and logit(p) >= self.thr

    def observe(self, p: float):
        if not math.isfinite(p):
            return
        x = logit(p)
        if self.init is not None:
            self.init.append(x)
            if len(self.init) >= max(self.warm_up, math.ceil(MIN_PEAKS / (1 - TAIL_QUANTILE))):
                self._fit()
        else:
            self.seen += 1
            if self.start < x < self.thr:
                self._push(x - self.start)
                self._refit()

    def _fit(self):
        init = sorted(self.init)
        self.init = None
        at = min(int(len(init) * TAIL_QUANTILE), len(init) - 1)
        self.start = init[at]
        self.seen = len(init)
        for x in init[at:]:
            if x > self.start:
                self._push(x - self.start)
        self._refit()

    def _push(self, e: float):
        self.peaks.append(e)
        self.sum += e
        self.sum_sq += e * e
        self.exceeded += 1
        if len(self.peaks) > MAX_PEAKS:
            old = self.peaks.popleft()
            self.sum -= old
            self.sum_sq -= old * old

    def _refit(self):
        n = len(self.peaks)
        if n < 2:
            highest = max(self.peaks, default=0.0)
            self.thr = self.start + 2.0 * max(highest, 1.0)
            return
        mean = self.sum / n
        var = max(self.sum_sq / n - mean * mean, 1e-12)
        gamma = min(max(0.5 * (1.0 - mean * mean / var), -0.5), 0.45)
        sigma = max(0.5 * mean * (mean * mean / var + 1.0), 1e-9)
        ratio = min(self.risk * self.seen / max(self.exceeded, 1), 1.0)
        over = -sigma * math.log(ratio) if abs(gamma) < 1e-6 else sigma / gamma * (ratio ** -gamma - 1.0)
        self.thr = self.start + max(over, 0.0)


def alarms(scores: np.ndarray, healthy: np.ndarray, step_seconds: float, warm_up: int,
           false_trips_per_day: float = 1.0, k: int = 2) -> np.ndarray:
    """The breaker's predicted trips over one series, online: a step alarms when the score is
    at or above the class's threshold for k steps running; healthy steps below it (and every
    step while warming up) teach the threshold."""
    cal = Calibrator(false_trips_per_day, step_seconds, warm_up)
    out = np.zeros(len(scores), dtype=bool)
    run = 0
    for t, p in enumerate(scores):
        over = cal.exceeds(float(p))
        run = run + 1 if over else 0
        out[t] = run >= k
        if healthy[t] and not out[t]:
            cal.observe(float(p))
    return out
