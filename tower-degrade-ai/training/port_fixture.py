"""The harness's port of the breaker (`calibrate.alarms`) beside the breaker itself: series of
one class's scores and breaches, and what the port makes of each step by step (the steps it
warns at, those a false alarm closes the class at, the steps the class is degraded, its
threshold after each), written as a fixture that `tower-degrade/tests/breaker/main.rs`
(`the_python_port_takes_the_breakers_steps`) replays through `Breaker::step_predicted` and
checks step for step:

    python port_fixture.py [OUT]   # default ../../tower-degrade/tests/breaker/port.json

Two series. At the 500 ms tick: the warm-up; warnings a breach confirms (one held while the
score hovers above the class's usual ones, a slow leak, one past the echo of a breach with no
warning after high scores in that echo, warnings that flap); a false alarm and its floor, a
warning over that floor and the benign level again for longer than the exit; warnings that
flap with no breach (one alarm) and one that comes back later (its own); a lasting shift of
the healthy scores, learnt, and a warning at the new level; an incident the degrade rule
takes (breaches in a row while closed) with high scores in its echo. At minute steps (a
verdict no longer than the exit, one step held): warnings close together, a false alarm's
exit, then a breach within the first warning's verdict; two warnings with the class closed a
few steps between them; high scores in the echo of an incident the degrade rule took, and
warnings past it. The scores are multiples of 1/65536, exact in both languages.
`test_harness.py` checks the committed file against this script. Not modelled by the port:
a class opened by failures (its rows breach without tripping), ticks with no call served.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

import calibrate

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "tower-degrade", "tests", "breaker", "port.json"))
WARM_UP = 3000
QUANTUM = 65536
USUAL = math.log(0.05 / 0.95)


class _Series:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.steps: list = []
        self.breach: list = []

    def about(self, centre, n):
        self.steps.extend(1 / (1 + np.exp(-(centre + 0.3 * self.rng.standard_normal(n)))))

    def at(self, p, n=1):
        self.steps.extend([p] * n)

    def breaching(self, p, n):
        self.breach.extend(range(len(self.steps), len(self.steps) + n))
        self.at(p, n)


def short_ticks() -> _Series:
    s = _Series(12)
    tail = 1 / (1 + math.exp(-(USUAL + 0.9)))  # 3 sd above the usual scores
    s.about(USUAL, calibrate.UNUSED_STEPS + WARM_UP + 100)
    # Warnings a breach confirms (their scores are not learnt).
    s.at(0.9, 2)
    s.at(tail, 12)
    s.breaching(0.95, 2)
    s.about(USUAL, 300)
    s.steps.extend(np.linspace(0.15, 0.9, 120))
    s.breaching(0.95, 8)
    s.about(USUAL, 900)
    s.breaching(0.05, 2)
    s.about(USUAL, 10)
    s.at(0.9, 3)  # in the breach's echo: no warning
    s.about(USUAL, calibrate.ECHO_TICKS)
    s.at(0.9, 3)
    s.about(USUAL, 5)
    s.breaching(0.95, 2)
    s.about(USUAL, 700)
    for _ in range(6):
        s.at(0.8, 3)
        s.about(USUAL, 4)
    s.breaching(0.95, 1)
    s.about(USUAL, 700)
    # A false alarm (40 healthy steps over the threshold): its floor; a warning over it, then
    # the benign level for longer than the exit, not held at it; warnings that flap with no
    # breach (one alarm), and one back later (its own).
    s.at(0.5, 45)
    s.about(USUAL, 60)
    s.at(0.99, 2)
    s.at(0.5, 45)
    s.about(USUAL, 100)
    for _ in range(8):
        s.at(0.995, 3)
        s.about(USUAL, 4)
    s.about(USUAL, 40)
    s.at(0.999, 3)
    s.about(USUAL, 100)
    # A lasting shift of the healthy scores, learnt; a warning at the new level.
    s.about(USUAL + 1.5, 3000)
    s.at(0.99995, 2)
    s.about(USUAL + 1.5, 60)
    # An incident the degrade rule takes (breaches in a row while closed), its scores high
    # after it: no warning, no hold; learnt as healthy once it has closed.
    s.breaching(0.05, 5)
    s.at(0.9, 45)
    s.about(USUAL + 1.5, 100)
    return s


def minute_steps() -> _Series:
    s = _Series(13)
    s.about(USUAL, calibrate.UNUSED_STEPS + WARM_UP + 100)
    # Two warnings 6 steps apart, the exit 40 after the first, a breach within its verdict.
    s.at(0.9, 2)
    s.about(USUAL, 4)
    s.at(0.9, 1)
    s.about(USUAL, 39)
    s.breaching(0.95, 2)
    s.about(USUAL, 100)
    s.at(0.9, 1)
    s.about(USUAL, 60)
    # Two warnings with the class closed for 7 steps between them, the second higher: one
    # alarm (within 10), its floor above the second from the first's exit.
    s.at(0.95, 1)
    s.about(USUAL, 10)
    s.at(0.99, 1)
    s.about(USUAL, 100)
    # An incident the degrade rule takes, then high scores in its echo (no warning), and past
    # it two warnings and a breach after the first one's exit, beyond its verdict (the exit's
    # length at a minute): the breach lifts no floor.
    s.breaching(0.05, 3)
    s.about(USUAL, 4)
    s.at(0.9, 1)
    s.about(USUAL, 5)
    s.at(0.9, 1)
    s.about(USUAL, calibrate.ECHO_TICKS)
    s.at(0.9, 1)
    s.about(USUAL, 5)
    s.at(0.9, 1)
    s.about(USUAL, 38)
    s.breaching(0.95, 1)
    s.about(USUAL, 100)
    return s


def _spans(flags) -> list:
    """[start, end) of each run of True."""
    out, start = [], None
    for t, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = t
        elif not f and start is not None:
            out.append([start, t])
            start = None
    return out


def run(series: _Series, step_seconds: float) -> dict:
    q = [round(float(p) * QUANTUM) for p in series.steps]
    for i in range(calibrate.UNUSED_STEPS):
        q[i] = None
    scores = np.array([np.nan if x is None else x / QUANTUM for x in q])
    healthy = np.ones(len(q), bool)
    healthy[series.breach] = False
    trace: list = []
    calibrate.alarms(scores, healthy, step_seconds, WARM_UP, trace=trace)
    thresholds, last = [], None
    for t, (_, _, thr, _) in enumerate(trace):
        if thr != last:
            # 12 significant digits: the breaker's must agree to 1e-9
            thresholds.append([t, None if thr is None else float(f"{thr:.12g}")])
            last = thr
    return {
        "step_ms": int(step_seconds * 1000),
        "warm_up": WARM_UP,
        "quantum": QUANTUM,
        "scores": q,
        "breach": series.breach,
        "warned": [t for t, x in enumerate(trace) if x[0]],
        "false_alarm_closed": [t for t, x in enumerate(trace) if x[1]],
        "degraded": _spans(x[3] for x in trace),
        "thresholds": thresholds,
    }


def fixture() -> dict:
    return {
        "about": "port_fixture.py: calibrate.alarms on these steps; regenerate, do not edit",
        "series": [run(short_ticks(), 0.5), run(minute_steps(), 60.0)],
    }


def text() -> str:
    return json.dumps(fixture(), separators=(",", ":")) + "\n"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else OUT
    with open(out, "w") as f:
        f.write(text())
    print(out)


if __name__ == "__main__":
    main()
