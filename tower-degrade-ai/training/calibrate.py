"""The breaker's calibrated prediction threshold (`tower_degrade::breaker::Calibration`), ported
line for line so the harness scores the model as the breaker uses it by default (checked step
for step: `port_fixture.py` writes what `alarms` makes of a series, and the breaker's tests
replay it): SPOT over the
logits of a class's healthy scores (a generalized Pareto fit of the excesses over their 98th
percentile, or lower where scores repeat so that 50 lie above it, down to the 80th; by the
method of moments), kept at a false-trip budget per day, the per-step risk divided by the
extremal index (runs of healthy steps over the tail's start per step over it, at least 1/32):
a trip starts with a run of steps over the threshold and lasts while the scores stay above the
class's usual ones (the fitted 98th percentile, at least the tail's start, and over a false
alarm's scores while its floor holds), until a breach or the false-alarm exit. A healthy step's score is learnt once
FALSE_ALARM_TICKS more healthy steps have passed, and no warning waits for its verdict (`alarms`).
"""
from __future__ import annotations

import bisect
import math
from collections import deque

import numpy as np

from features import WINDOW

TAIL_QUANTILE = 0.98
MAX_PEAKS = 2048
# The fewest excesses a first fit takes: fewer give a tail that trips far over budget.
MIN_PEAKS = 50
# The lowest quantile the tail may start at when scores repeat.
LOWEST_START = 0.8
EPS = 1e-6
# How far above a false alarm's highest score (logit) the threshold is put.
FALSE_ALARM_MARGIN = 0.25
# Healthy ticks after which an alarm is taken for a false one (tower_degrade::breaker::FALSE_ALARM_TICKS).
FALSE_ALARM_TICKS = 40
# How long a breach still confirms a warning (tower_degrade::breaker::VERDICT): a false alarm's
# floor is lifted by one, and a warning's scores are not learnt before.
VERDICT_SECONDS = 300.0
# The most steps a verdict spans (tower_degrade::breaker::MAX_VERDICT_TICKS).
MAX_VERDICT_TICKS = 7200
# The least extremal index the risk is divided by.
MIN_THETA = 1.0 / 32.0
# Seconds of healthy steps a false alarm's floor holds (an hour: 7,200 ticks at 500 ms, 60
# minute steps).
FALSE_ALARM_HOLD_SECONDS = 3600.0
# Ticks a prediction that overran its budget may still be used (tower_degrade's STALE_TICKS).
STALE_TICKS = 4
# A series' first steps whose scores the breaker does not use: until its window is whole, and
# a batch that overran no longer stands for one made before (`FeatureHistory::is_full`).
UNUSED_STEPS = WINDOW - 1 + STALE_TICKS


def as_used(scores) -> np.ndarray:
    """A series' scores as the breaker uses them: a copy (floating, of the scores' own precision
    where they have one) with none on its first UNUSED_STEPS steps, where the breaker takes no
    prediction (a fixed threshold as the calibrated one)."""
    s = np.asarray(scores)
    out = s.astype(s.dtype if np.issubdtype(s.dtype, np.floating) else float, copy=True)
    out[:UNUSED_STEPS] = np.nan
    return out


def verdict_ticks(step_seconds: float) -> int:
    """The steps VERDICT_SECONDS spans, at least FALSE_ALARM_TICKS and at most
    MAX_VERDICT_TICKS (`breaker::verdict_ticks`): 600 at 500 ms, 40 at a minute."""
    ns = max(int(round(step_seconds * 1e9)), 1)
    return min(max(FALSE_ALARM_TICKS, -(-int(VERDICT_SECONDS * 1e9) // ns)), MAX_VERDICT_TICKS)


# Steps after a warning ends within which the next one is the same alarm (the breaker's
# MERGE_GAP); a warning back later is an alarm of its own.
MERGE_GAP = FALSE_ALARM_TICKS // 4


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
        self.hold = max(1, math.floor(FALSE_ALARM_HOLD_SECONDS / max(step_seconds, 1e-3) + 0.5))
        self.init: list[float] | None = []
        self.start = self.thr = self.fit = self.usual = 0.0
        self.peaks: deque[float] = deque()
        self.sum = self.sum_sq = 0.0
        self.seen = self.exceeded = 0
        self.over = self.runs = 0  # healthy steps over the tail's start, and their runs
        self.was_over = False
        self.floor: tuple[float, int] | None = None

    def threshold(self):
        return None if self.init is not None else sigmoid(self.thr)

    def false_alarm(self, highest: float):
        """An alarm the class did not confirm: the threshold above its scores for the next
        hour of healthy steps (FALSE_ALARM_HOLD_SECONDS)."""
        if self.init is None and math.isfinite(highest):
            self.floor = (logit(highest) + FALSE_ALARM_MARGIN, self.seen + self.hold)
            self._hold_floor()

    def lift_floor(self, before):
        """A breach confirmed the alarm the floor was put above: the floor it replaced
        (`before`) again, if its time is not over, or the fitted threshold."""
        if self.init is None:
            self.floor = before
            self._hold_floor()

    def _hold_floor(self):
        if self.floor is not None and self.seen >= self.floor[1]:
            self.floor = None
        self.thr = self.fit if self.floor is None else max(self.fit, self.floor[0])

    def exceeds(self, p: float) -> bool:
        """p at or above the threshold, compared on the clamped logit as it was fitted."""
        return self.init is None and math.isfinite(p) and logit(p) >= self.thr

    def above_usual(self, p: float) -> bool:
        """p above the class's usual scores (Rust's `above_usual`): over the score the fitted
        tail puts 2 % of healthy steps above (at least the start), and while a false alarm's
        floor holds, over that alarm's highest score; compared as `exceeds` compares. A
        warning holds while its scores stay there."""
        if self.init is not None or not math.isfinite(p):
            return False
        x = logit(p)
        # over the floor's alarm (the floor is its highest score's logit plus the margin)
        return x > self.usual and (self.floor is None or x + FALSE_ALARM_MARGIN > self.floor[0])

    def observe(self, p: float, echo: bool = False):
        """Learn a healthy step's score; an `echo` (ECHO_TICKS: its window still holds a
        breach) no higher than the tail's start, once there is one (Rust's `observe_echo`)."""
        if not math.isfinite(p):
            return
        x = logit(p)
        if echo and self.init is None:
            x = min(x, self.start)
        if self.init is not None:
            self.init.append(x)
            if len(self.init) >= max(self.warm_up, math.ceil(MIN_PEAKS / (1 - TAIL_QUANTILE))):
                self._fit()
        else:
            self.seen += 1
            self._count_run(x)
            # every healthy score over the start, those past the threshold too (Rust's
            # `Tail::observe`: left out, the tail learnt is cut at the threshold)
            if self.start < x:
                self._push(x - self.start)
                self._refit()
            else:
                self._hold_floor()

    def _count_run(self, x: float):
        over = x > self.start
        if over:
            self.over += 1
            self.runs += not self.was_over
        self.was_over = over

    def _theta(self) -> float:
        """The extremal index: runs of steps over the tail's start per step over it."""
        return 1.0 if self.over == 0 else min(max(self.runs / self.over, MIN_THETA), 1.0)

    def _fit(self):
        ordered = self.init
        init = sorted(ordered)
        self.init = None
        n = len(init)
        at = min(int(n * TAIL_QUANTILE), n - 1)
        # at least MIN_PEAKS scores strictly above the start (scores that repeat), not below
        # LOWEST_START
        lowest = int(n * LOWEST_START)
        while n - bisect.bisect_right(init, init[at]) < MIN_PEAKS:
            first = bisect.bisect_left(init, init[at])
            if first <= lowest:
                break
            at = first - 1
        self.start = self.usual = init[at]
        self.seen = len(init)
        for x in ordered:  # the runs, and the excesses, in the warm-up's order
            self._count_run(x)
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
            self.fit = self.start + 2.0 * max(highest, 1.0)
            self.usual = self.start
            self._hold_floor()
            return
        mean = self.sum / n
        var = max(self.sum_sq / n - mean * mean, 1e-12)
        gamma = min(max(0.5 * (1.0 - mean * mean / var), -0.5), 0.45)
        sigma = max(mean * (1.0 - gamma), 1e-9)  # the mean is sigma / (1 - gamma)
        risk = min(self.risk / self._theta(), 0.5)

        def excess(risk):  # the excess a share `risk` of the healthy steps exceeds
            ratio = min(risk * self.seen / max(self.exceeded, 1), 1.0)
            return -sigma * math.log(ratio) if abs(gamma) < 1e-6 else sigma / gamma * (ratio ** -gamma - 1.0)

        over = excess(risk)
        self.usual = self.start + max(excess(1.0 - TAIL_QUANTILE), 0.0)
        # never the start itself: where healthy scores repeat, it is the class's usual score,
        # and a threshold there (compared with >=) trips on it
        self.fit = max(self.start + max(over, 0.0), math.nextafter(self.start, math.inf))
        self._hold_floor()


# How long a prediction must hold before it degrades a class (tower_degrade's PREDICT_HOLD).
PREDICT_HOLD_SECONDS = 1.0


def predict_ticks(step_seconds: float) -> int:
    """The breaker's default consecutive predicting ticks at a tick of `step_seconds`
    (`BreakerConfig::predict_ticks_at`): those that make up PREDICT_HOLD_SECONDS, rounded up,
    at least 1; 2 at 500 ms, 1 at a second or more."""
    ns = max(int(round(step_seconds * 1e9)), 1)
    return max(1, -(-int(PREDICT_HOLD_SECONDS * 1e9) // ns))


# Healthy steps in a row that close a degraded class, the score no longer predicting
# (`BreakerConfig::degraded_recovery_ticks`' default).
DEGRADED_RECOVERY_TICKS = 3
# Breaching steps in a row that degrade a closed class by the degrade rule (`DegradeRule`'s
# `windows`): it then neither warns nor holds a warning until it closes again.
RULE_WINDOWS = 3
# Steps after a breach whose scores may still read it (the breaker's ECHO_TICKS: the model's
# window after it, and a batch that overran used up to STALE_TICKS later): they do not
# predict, are learnt no higher than the tail's start (`Calibrator.observe`), and a breach
# among them is no incident the tally counts as missed.
ECHO_TICKS = WINDOW - 1 + STALE_TICKS


def alarms(scores: np.ndarray, healthy: np.ndarray, step_seconds: float, warm_up: int,
           false_trips_per_day: float = 1.0, k: int | None = None, armed: list | None = None,
           trace: list | None = None) -> np.ndarray:
    """The breaker's predicted trips over one series, online, step for step as
    `Breaker::step_predicted` takes them: a step alarms when the score is at or above the
    class's threshold for k steps running; the class is then degraded for the prediction
    (`degraded`) until DEGRADED_RECOVERY_TICKS healthy steps in a row no longer predict, and
    warns again only once closed. A warning no breach has confirmed yet (the breaker's
    `alarm`) holds while the score stays above the class's usual ones
    (`Calibrator.above_usual`). Healthy steps, those of a warning too, teach the threshold once
    FALSE_ALARM_TICKS more healthy steps have passed with no unhealthy one (those before an
    unhealthy step are its precursors, as in the breaker), and no warning waits for its
    verdict (verdict_ticks healthy steps from its last warning); those whose window still holds
    an unhealthy step (ECHO_TICKS) do not predict and are learnt no higher than the tail's
    start. An alarm that stays healthy
    for FALSE_ALARM_TICKS steps after its warning is a false one: the threshold goes above its
    scores and the class closes; an unhealthy step confirms it, and one within the verdict
    lifts the floor its false alarm put (a slow leak warned of minutes ahead). A warning back
    within MERGE_GAP steps of the class closing again (a score flapping about the threshold) is
    the same alarm, counted on across the steps between them; one back later is an alarm of
    its own, and the ended one is judged apart, FALSE_ALARM_TICKS healthy steps after its
    first warning. `armed`: a list to append the first step the threshold held at (its
    warm-up over) to, or None if it never did. `k`: predict_ticks(step_seconds) unless given.
    `trace`: a list to append each step's (warned: the class degraded for the prediction,
    closed: a false alarm closed the class, threshold or None, degraded: for a prediction or by
    the rule) to (`port_fixture.py`)."""
    if k is None:
        k = predict_ticks(step_seconds)
    cal = Calibrator(false_trips_per_day, step_seconds, warm_up)
    armed_at = None
    out = np.zeros(len(scores), dtype=bool)
    # A series' first steps are zero-padded in the model's input: the breaker neither acts on
    # nor learns their scores (no prediction, as in Rust).
    scores = as_used(scores)
    predicted = 0  # predicting steps in a row (the breaker's `predicted`)
    degraded = None  # healthy steps in a row while degraded; None: closed
    for_prediction = False  # degraded for a prediction, not by the degrade rule
    rule = 0  # breaching steps in a row while closed (the breaker's `breached`)
    alarm = None  # a warning not confirmed: [healthy steps since, highest score, quiet steps]
    ended = None  # an alarm whose warnings ended MERGE_GAP steps ago: [healthy steps, highest]
    unlearnt: deque = deque()  # healthy scores not learnt yet (the breaker's `unlearnt`)
    verdict = verdict_ticks(step_seconds)
    # A warning waiting for its verdict (the breaker's tally watching it, and its `floored`):
    # [healthy steps since the last warning, whether the exit put a floor meanwhile, the floor
    # it replaced]; its scores are held back from the calibration where the verdict is longer
    # than the exit. `covered`: steps left in which an unhealthy step is the incident counted
    # last, and a warning not watched (the tally's `covered`).
    pending = None
    covered = 0

    def put_floor(highest):
        before = cal.floor
        cal.false_alarm(highest)
        if pending is not None and not pending[1]:
            pending[1], pending[2] = True, before

    echo = 0  # steps to come whose window still holds the last breach (the breaker's `echo`)
    relapse = False
    for t, p in enumerate(scores):
        p = float(p)
        warned = False
        covered = max(covered - 1, 0)
        is_echo = echo > 0 and healthy[t]
        # A run of breaches that began in an earlier breach's echo: a relapse (the breaker's
        # `relapse`), which nothing could warn of.
        if not healthy[t] and echo != ECHO_TICKS:
            relapse = echo > 0
        echo = ECHO_TICKS if not healthy[t] else max(echo - 1, 0)
        watching = pending is not None
        if pending is not None:
            if not healthy[t]:
                if pending[1]:
                    cal.lift_floor(pending[2])  # a breach confirms the warning its floor came from
                pending = None
                covered = FALSE_ALARM_TICKS  # the incident counted
            else:
                pending[0] += 1
                if pending[0] >= verdict:
                    pending = None
        # A warning not confirmed yet holds while the score stays above the usual ones.
        holding = predicted >= k and alarm is not None and degraded is not None and for_prediction
        # An echo does not predict: its warning would be taken for a false alarm, its floor
        # over the echo's scores.
        predicting = not is_echo and (cal.exceeds(p) or (holding and cal.above_usual(p)))
        predicted = predicted + 1 if predicting else 0
        out[t] = predicted >= k
        # Learnt before the alarm is judged, as the breaker learns it.
        if not healthy[t]:
            unlearnt.clear()
        elif math.isfinite(p):  # no prediction: nothing to learn (Rust: None)
            unlearnt.append((p, is_echo))
            # Held while a warning waits for its verdict: its scores, and those before it,
            # are the precursors of a breach that may still come.
            while len(unlearnt) > FALSE_ALARM_TICKS and (pending is None or verdict <= FALSE_ALARM_TICKS):
                cal.observe(*unlearnt.popleft())
        if ended is not None:  # its verdict, apart (the breaker's `judge_ended`)
            if not healthy[t]:
                ended = None
            else:
                ended[0] += 1
                if ended[0] >= FALSE_ALARM_TICKS:
                    put_floor(ended[1])
                    ended = None
        exit_now = False
        if alarm is not None:  # the breaker's `false_alarm`
            if not healthy[t]:
                alarm = None  # a breach confirms it
            else:
                quiet = 0 if degraded is not None else alarm[2] + 1
                if quiet >= MERGE_GAP:
                    # It ended and did not come back: judged apart; a later warning is an
                    # alarm of its own.
                    ended = ([max(ended[0], alarm[0]), max(ended[1], alarm[1])]
                             if ended is not None else [alarm[0], alarm[1]])
                    alarm = None
                else:
                    alarm = [alarm[0] + 1, max(alarm[1], p if math.isfinite(p) else 0.0), quiet]
                    if alarm[0] >= FALSE_ALARM_TICKS:
                        # A false alarm: its floor, and the class closes (if it has not).
                        put_floor(alarm[1])
                        exit_now = degraded is not None
                        alarm, predicted, degraded = None, 0, None
                        out[t] = False
        if exit_now:
            pass  # the breaker returns the exit's transition
        elif degraded is None:
            rule = rule + 1 if not healthy[t] else 0
            if rule >= RULE_WINDOWS:
                rule, degraded, for_prediction = 0, 0, False
                # An incident no warning led, counted where there is a prediction and a
                # threshold, and not a relapse in an echo, where nothing could warn (the
                # tally's `breached`).
                if (math.isfinite(p) and cal.init is None and not watching and covered == 0
                        and not relapse):
                    covered = FALSE_ALARM_TICKS
            elif predicted >= k:
                warned = True
                # A warning in a breaching step came with the breach: no alarm to judge.
                if healthy[t]:
                    alarm = [alarm[0], max(alarm[1], p), 0] if alarm is not None else [0, p, 0]
                rule, degraded, for_prediction = 0, 0, True
        else:
            degraded = 0 if not healthy[t] or predicted > 0 else degraded + 1
            if degraded >= DEGRADED_RECOVERY_TICKS:
                degraded = None
        if warned and covered == 0:
            if not healthy[t]:
                covered = FALSE_ALARM_TICKS  # a warning with its breach: late, the incident counted
            else:
                # Judged from this warning, a floor put since the first kept (after the step's
                # learning, as the breaker starts it).
                pending = [0, False, None] if pending is None else [0, pending[1], pending[2]]
        if armed_at is None and cal.init is None:
            armed_at = t + 1  # fitted on this step's learning: it holds from the next
        if trace is not None:
            trace.append((warned, exit_now, cal.threshold(), degraded is not None))
    if armed is not None:
        armed.append(armed_at if armed_at is not None and armed_at < len(scores) else None)
    return out


if __name__ == "__main__":
    import sys
    sys.exit(__doc__)  # a library: train.py and evaluate.py use it
