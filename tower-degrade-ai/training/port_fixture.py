"""The harness's port of the breaker (`calibrate.alarms`) beside the breaker itself: one class's
series of scores and breaches, and what the port makes of it step by step (the steps it warns
at, those a false alarm closes the class at, its threshold after each), written as a fixture
that `tower-degrade/tests/breaker/main.rs` (`the_python_port_takes_the_breakers_steps`)
replays through `Breaker::step_predicted` and checks step for step:

    python port_fixture.py [OUT]   # default ../../tower-degrade/tests/breaker/port.json

The series covers what the default's calibration does: the warm-up; warnings a breach
confirms (one held while the score hovers above the class's usual ones, a slow leak, one soon
after a breach with no warning, warnings that flap); a lasting shift of the healthy scores,
learnt, and a warning at the new level; a false alarm and its floor, a warning over that floor,
warnings that flap with no breach (one alarm) and one that comes back later (its own). The scores are multiples of 1/65536, exact in
both languages. `test_harness.py` checks the committed file against this script.
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
STEP_SECONDS = 0.5
WARM_UP = 3000
QUANTUM = 65536


def series() -> tuple[list, list]:
    """(the scores, as multiples of 1/QUANTUM, the first UNUSED_STEPS of them None; the steps
    that breach)."""
    rng = np.random.default_rng(12)
    steps: list = []
    breach: list = []

    def about(centre, n):
        steps.extend(1 / (1 + np.exp(-(centre + 0.3 * rng.standard_normal(n)))))

    def at(p, n=1):
        steps.extend([p] * n)

    def breaching(p, n):
        breach.extend(range(len(steps), len(steps) + n))
        at(p, n)

    usual = math.log(0.05 / 0.95)
    tail = 1 / (1 + math.exp(-(usual + 0.9)))  # 3 sd above the usual scores
    about(usual, calibrate.UNUSED_STEPS + WARM_UP + 100)
    # Warnings a breach confirms (their scores are not learnt): one held while the score
    # hovers above the usual ones; a slow leak; one soon after a breach with no warning;
    # warnings that flap (3 on, 4 off: one alarm).
    at(0.9, 2)
    at(tail, 12)
    breaching(0.95, 2)
    about(usual, 300)
    steps.extend(np.linspace(0.15, 0.9, 120))
    breaching(0.95, 8)
    about(usual, 900)
    breaching(0.05, 2)
    about(usual, 10)
    at(0.9, 3)
    about(usual, 5)
    breaching(0.95, 2)
    about(usual, 700)
    for _ in range(6):
        at(0.8, 3)
        about(usual, 4)
    breaching(0.95, 1)
    about(usual, 700)
    # A lasting shift of the healthy scores (its warnings false alarms), learnt; a warning at
    # the new level, not held at it.
    about(usual + 1.5, 3000)
    at(0.97, 2)
    about(usual + 1.5, 700)
    # A false alarm (40 healthy steps over the threshold): its floor; a warning over it, then
    # the benign level again, not held; warnings that flap with no breach (one alarm), and
    # one back later (its own).
    at(0.5, 45)
    about(usual + 1.5, 60)
    at(0.99, 2)
    at(0.5, 10)
    about(usual + 1.5, 100)
    for _ in range(8):
        at(0.995, 3)
        about(usual + 1.5, 4)
    about(usual + 1.5, 40)
    at(0.999, 3)
    about(usual + 1.5, 100)
    q = [round(float(p) * QUANTUM) for p in steps]
    for i in range(calibrate.UNUSED_STEPS):
        q[i] = None
    return q, breach


def fixture() -> dict:
    q, breach = series()
    scores = np.array([np.nan if x is None else x / QUANTUM for x in q])
    healthy = np.ones(len(q), bool)
    healthy[breach] = False
    trace: list = []
    calibrate.alarms(scores, healthy, STEP_SECONDS, WARM_UP, trace=trace)
    thresholds, last = [], None
    for t, (_, _, thr) in enumerate(trace):
        if thr != last:
            # 12 significant digits: the breaker's must agree to 1e-9
            thresholds.append([t, None if thr is None else float(f"{thr:.12g}")])
            last = thr
    return {
        "about": "port_fixture.py: calibrate.alarms on these steps; regenerate, do not edit",
        "step_ms": int(STEP_SECONDS * 1000),
        "warm_up": WARM_UP,
        "quantum": QUANTUM,
        "scores": q,
        "breach": breach,
        "warned": [t for t, (w, _, _) in enumerate(trace) if w],
        "false_alarm_closed": [t for t, (_, c, _) in enumerate(trace) if c],
        "thresholds": thresholds,
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
