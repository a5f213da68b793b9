"""Scenario simulator: 500 ms traces of the eight features for one class of a service.

A fluid queue model: arrivals r(t) (diurnal, bursty), a service of capacity mu(t) requests per
second and base service time s(t), a backlog that grows when r > mu, latency from the service
time plus queueing, timeouts past 3x the SLA, load shedding past a 5 s backlog, and errors.
Failure modes change r, mu, s or the error rate, most with a precursor ramp:

  slow_db        service time ramps up x3..x10 over 20-180 s
  error_burst    errors creep up over 10-60 s, then burst to 20-60 % (a third abrupt)
  saturation     traffic ramps to 1.2-2x capacity over 30-300 s
  dep_outage     a dependency slows (in-flight and queueing grow), then calls time out
  retry_storm    a small error rate makes clients retry, the retries saturate the service
  slow_leak      capacity leaks away over 2-10 min

Normal traffic has its own noise: diurnal swings, bursts of x1.5-2.5 for 5-60 s, isolated
latency spikes (GC pauses) that last one or two ticks, and 0-3 changes that are not faults
(`benign`; about one in five still breaches, over 200 traces without bursts or faults):

  deploy          a rolling restart over 20-120 s (in 3 of 10, one instance of 6-12 out at a
                  time; the others start a new one first), cold caches slowing the calls,
                  half of them with a few connection resets; the new version then has
                  0.85-1.25x the old service time, for good
  noisy_neighbour CPU steal for 30-600 s: service time up 5-35 %, changing every 5-20 s

Both are sized to the room the service's p99 has below its SLA (each slowdown at most 80 % of
it). Incidents are the SLO breaches of `traces.breach_events`, found in the simulated
features, not the injected fault windows.

    python simulate.py --out DIR [--seed 7]   # writes the train/val/test traces as CSV
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from features import N_FEATURES
from traces import Trace, breach_events, clip, rate_ratio, write_csv

DT = 0.5
MODES = ["slow_db", "error_burst", "saturation", "dep_outage", "retry_storm", "slow_leak"]
BENIGN = ["deploy", "noisy_neighbour"]


def _ramp(t, t0, d, shape):
    """0 before t0, 1 after t0 + d, shaped in between."""
    x = np.clip((t - t0) / max(d, 1e-9), 0, 1)
    return x ** shape


def benign(rng: np.random.Generator, t: np.ndarray, mode: str, room: float, cap: np.ndarray,
           err: np.ndarray) -> np.ndarray:
    """A change that is not a fault, at a random time: the factor it multiplies the service
    time by; a deploy also takes capacity (`cap`) and may add errors (`err`), in place. `room`:
    how much slower the service can get before its p99 reaches the SLA; each slowdown takes at
    most 80 % of it (a burst of traffic on top can still breach)."""
    t0 = rng.uniform(0, t[-1])
    room = max(room, 0.05)
    if mode == "deploy":
        d = rng.uniform(20, 120)
        rolling = (t >= t0) & (t < t0 + d)
        if rng.random() < 0.3:  # no surge instance: one of 6-12 is out at a time
            cap *= np.where(rolling, 1 - 1 / rng.integers(6, 13), 1.0)
        if rng.random() < 0.5:
            err += rolling * rng.uniform(0.002, 0.01)
        since = np.clip(t - t0, 0, None)
        cold = min(rng.uniform(0.1, 0.5), 0.8 * room) * (t >= t0) * np.exp(-since / rng.uniform(10, 60)) * (since < d + 120)
        return (1 + cold) * np.where(t >= t0 + d, rng.uniform(0.85, 1 + min(0.25, 0.5 * room)), 1.0)
    if mode == "noisy_neighbour":
        d = rng.uniform(30, 600)
        steal = np.zeros_like(t)
        a = t0
        while a < t0 + d:  # the steal changes every 5-20 s
            b = min(a + rng.uniform(5, 20), t0 + d)
            steal[(t >= a) & (t < b)] = min(rng.uniform(0.05, 0.35), rng.uniform(0.2, 0.8) * room)
            a = b
        return 1 + steal
    raise ValueError(f"unknown change {mode!r}")


def simulate(rng: np.random.Generator, T: int, n_incidents: int, bursty: bool) -> tuple[np.ndarray, list]:
    t = np.arange(T) * DT
    r0 = rng.uniform(50, 2000)
    s0 = rng.uniform(0.01, 0.08)
    sla = s0 * rng.uniform(5, 9)
    timeout = 3 * sla
    tail = rng.uniform(2.5, 4.0)
    mu0 = r0 * rng.uniform(1.8, 3.0)
    e0 = rng.uniform(0.0005, 0.008)

    period = rng.uniform(1200, 3600)
    rate = r0 * (1 + rng.uniform(0.15, 0.4) * np.sin(2 * np.pi * t / period + rng.uniform(0, 6.3)))
    if bursty:
        for _ in range(rng.poisson(T * DT / 300)):
            b0, bd = rng.uniform(0, T * DT), rng.uniform(5, 60)
            rate *= 1 + (rng.uniform(0.5, 1.5)) * ((t >= b0) & (t < b0 + bd))
    slow = np.ones(T)
    cap = np.ones(T)
    err = np.full(T, e0)
    tmo = np.zeros(T)
    extra_q = np.zeros(T)
    retry_p = np.zeros(T)

    # incidents: onset of the fault, a precursor ramp, a hold, a recovery
    starts = []
    gap = T * DT / (n_incidents + 1)
    for i in range(n_incidents):
        starts.append(gap * (i + 1) + rng.uniform(-0.3, 0.3) * gap)
    for f0 in starts:
        mode = MODES[rng.integers(len(MODES))]
        hold = rng.uniform(30, 180)
        rec = rng.uniform(5, 30)
        if mode == "slow_db":
            d = rng.uniform(20, 180)
            k = rng.uniform(3, 10)
            up = _ramp(t, f0, d, rng.uniform(1, 3))
            down = _ramp(t, f0 + d + hold, rec, 1)
            slow *= 1 + (k - 1) * up * (1 - down)
        elif mode == "error_burst":
            d = 0.5 if rng.random() < 1 / 3 else rng.uniform(10, 60)
            creep = _ramp(t, f0, d, rng.uniform(1, 2)) * rng.uniform(0.01, 0.035)
            burst = ((t >= f0 + d) & (t < f0 + d + hold)) * rng.uniform(0.2, 0.6)
            end = t < f0 + d + hold
            err += np.where(end, np.maximum(creep, burst), 0)
        elif mode == "saturation":
            d = rng.uniform(30, 300)
            k = rng.uniform(1.2, 2.0) * mu0 / r0
            up = _ramp(t, f0, d, rng.uniform(1, 2))
            down = _ramp(t, f0 + d + hold, rec, 1)
            rate *= 1 + (k - 1) * up * (1 - down)
        elif mode == "dep_outage":
            d = rng.uniform(10, 90)
            up = _ramp(t, f0, d, rng.uniform(1, 2))
            down = _ramp(t, f0 + d + hold, rec, 1)
            slow *= 1 + rng.uniform(0.5, 1.5) * up * (1 - down)
            extra_q += rng.uniform(0.3, 1.0) * sla * up * (1 - down)
            dead = (t >= f0 + d) & (t < f0 + d + hold)
            tmo += dead * rng.uniform(0.3, 1.0)
        elif mode == "retry_storm":
            d = rng.uniform(20, 120)
            e1 = rng.uniform(0.015, 0.04)
            up = _ramp(t, f0, d, 1)
            down = _ramp(t, f0 + d + hold, rec, 1)
            err += e1 * (t >= f0) * (1 - down)
            retry_p += rng.uniform(1.0, 3.0) * up * (1 - down)
        elif mode == "slow_leak":
            d = rng.uniform(120, 600)
            k = rng.uniform(0.3, 0.6)  # capacity left at the breach
            up = _ramp(t, f0, d, 1)
            down = _ramp(t, f0 + d + hold, rec, 1)
            cap *= 1 - (1 - k * r0 / mu0 * rng.uniform(0.7, 0.9)) * up * (1 - down)

    for _ in range(int(rng.integers(0, 4))):
        slow *= benign(rng, t, BENIGN[rng.integers(len(BENIGN))], sla / (s0 * tail) - 1, cap, err)

    rate = rate * (1 + retry_p) * np.exp(rng.normal(0, 0.03, T))
    X = np.zeros((T, N_FEATURES))  # columns in features.FEATURES order
    backlog = 0.0
    for i in range(T):
        s = s0 * slow[i]
        mu = mu0 * cap[i] / slow[i]
        r = rate[i]
        backlog = max(0.0, backlog + (r - mu) * DT)
        shed = 0.0
        if backlog > mu * 5:  # shed past a 5 s backlog
            shed = (backlog - mu * 5) / max(r * DT, 1)
            backlog = mu * 5
        u = min(r / mu, 0.97)
        qd = backlog / mu + s * u * u / (1 - u) * 0.5 + extra_q[i]
        noise = np.exp(rng.normal(0, 0.06))
        p50 = (s + 0.6 * qd) * noise
        p99 = (s * tail + 1.4 * qd) * noise * np.exp(rng.normal(0, 0.05))
        if rng.random() < 0.004:  # a GC pause
            p99 *= rng.uniform(1.5, 4)
        n = max(int(r * DT), 1)
        to = min(0.95, tmo[i] + max(0.0, (p99 - timeout) / (2 * timeout)))
        e = min(1.0, err[i] + min(shed, 1.0))
        fails = rng.binomial(n, min(1.0, e + to)) / n
        timeouts = fails * (to / max(e + to, 1e-9))
        errors = fails - timeouts
        inflight = r * (s + qd) + backlog
        X[i] = [r, 1 - fails, errors, timeouts, p50 / sla, p99 / sla,
                inflight / (r * sla + 1), qd / sla]
    X[:, 0] = rate_ratio(X[:, 0])
    X = clip(X)
    return X, breach_events(X)


def generate(seed: int, n: int, T: int, split: str) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        X, events = simulate(rng, T, int(rng.integers(0, 4)), bursty=rng.random() < 0.5)
        tr = Trace(f"sim-{split}-{i:03d}", "simulated", X, events, DT)
        tr.val_from = 0 if split != "train" else T
        tr.test_from = T if split != "test" else 0
        out.append(tr)
    return out


SPLITS = {"train": (300, 1), "val": (50, 2), "test": (80, 3)}
TICKS = 7200  # one hour per trace


def dataset(seed: int = 7) -> list:
    """Train, validation and held-out test traces, each from its own random stream."""
    out = []
    for split, (n, k) in SPLITS.items():
        out += generate(seed * 1000 + k, n, TICKS, split)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for tr in dataset(a.seed):
        write_csv(tr, os.path.join(a.out, tr.name + ".csv"))


if __name__ == "__main__":
    main()
