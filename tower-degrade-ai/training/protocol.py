"""The early-warning evaluation protocol (docs/predictor.md, "Reading the evaluation").

Everything is in steps. Events are inclusive (s, e) step ranges; s is the onset.

  target      y_t = 1 if some event has s - H <= t < s; -1 (ignored) inside an event, in its
              recovery grace and in an ambiguous zone before it; 0 elsewhere.
  alarm       score >= threshold for k consecutive steps.
  episode     a run of alarms; runs closer than `merge` steps are one episode.
  early hit   first alarm in [s - H, s): lead = s - first alarm.
  late hit    first alarm in [s, e].
  false trip  an alarm episode on normal steps (outside every [s - H - pre_ignore, e + grace]).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def events_from_binary(lab) -> list[tuple[int, int]]:
    lab = np.asarray(lab).astype(bool)
    if not lab.any():
        return []
    d = np.diff(np.concatenate([[0], lab.astype(np.int8), [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return list(zip(starts.tolist(), ends.tolist()))


def early_targets(T: int, events, H: int, grace: int = 0, pre_ignore=None, ignore=None) -> np.ndarray:
    """y in {1, 0, -1}. Precedence: inside event/grace (-1) > pre-onset (1) > ambiguous (-1) > 0.
    `ignore` ([T] bool, optional): more ambiguous steps, wherever they are."""
    y = np.zeros(T, dtype=np.int8)
    for i, (s, e) in enumerate(events):
        pi = 0 if pre_ignore is None else int(pre_ignore[i])
        y[max(0, s - H - pi):max(0, s - H)] = -1
    for s, e in events:
        y[max(0, s - H):s] = 1
    for s, e in events:
        y[s:min(T, e + grace + 1)] = -1
    if ignore is not None:
        y[np.asarray(ignore[:T], dtype=bool) & (y == 0)] = -1
    return y


def held(score, k: int = 1) -> np.ndarray:
    """The level a score has held for the last k steps (the lowest of them): an alarm at
    threshold thr for k consecutive steps is held(score, k) >= thr. -inf at a missing (NaN)
    score and in the first k - 1 steps."""
    s = np.nan_to_num(np.asarray(score, dtype=float), nan=-np.inf)
    if k <= 1 or not len(s):
        return s
    out = np.full(len(s), -np.inf)
    if len(s) >= k:
        out[k - 1:] = np.lib.stride_tricks.sliding_window_view(s, k).min(axis=1)
    return out


def alarms(score, thr: float, k: int = 1) -> np.ndarray:
    return held(score, k) >= thr


def episodes(a, merge: int = 0) -> list[tuple[int, int]]:
    ev = events_from_binary(a)
    if merge <= 0 or not ev:
        return ev
    out = [list(ev[0])]
    for s, e in ev[1:]:
        if s - out[-1][1] - 1 <= merge:
            out[-1][1] = e
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


@dataclass
class Result:
    n_events: int = 0
    early: int = 0
    late: int = 0
    missed: int = 0
    leads: list = field(default_factory=list)
    hits: list = field(default_factory=list)  # per event: 2 early, 1 late, 0 missed
    fp_episodes: int = 0
    normal_steps: int = 0
    normal_alarm_steps: int = 0
    normal_seconds: float = 0.0

    def add(self, o: "Result") -> "Result":
        for k in ("n_events", "early", "late", "missed", "fp_episodes", "normal_steps",
                  "normal_alarm_steps", "normal_seconds"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.leads += o.leads
        self.hits += o.hits
        return self

    @property
    def days(self) -> float:
        return self.normal_seconds / 86400

    def false_trips_per_day(self) -> float:
        return self.fp_episodes / max(1e-9, self.days)

    def summary(self) -> dict:
        detected = self.early + self.late
        p = detected / max(1, detected + self.fp_episodes)
        re = self.early / max(1, self.n_events)
        ra = detected / max(1, self.n_events)
        return dict(
            events=self.n_events, early=self.early, late=self.late, missed=self.missed,
            precision=p, recall_early=re, recall_any=ra,
            f1_early=2 * p * re / max(1e-12, p + re),
            median_lead_steps=float(np.median(self.leads)) if self.leads else None,
            false_trips=self.fp_episodes,
            false_trips_per_day=self.false_trips_per_day(),
            false_trips_per_hour=self.fp_episodes / max(1e-9, self.normal_seconds / 3600),
            normal_time_alarmed=self.normal_alarm_steps / max(1, self.normal_steps),
            # which incidents, by their place in the run's order (the same for every detector
            # scored on the same series and horizon), so that two detectors' warnings can be
            # compared incident by incident
            early_events=[i for i, h in enumerate(self.hits) if h == 2],
        )


def evaluate(a, events, H: int, step_seconds: float, eval_from: int = 0, grace: int = 0,
             merge: int | None = None, pre_ignore=None, ignore=None) -> Result:
    """Event-level early-warning evaluation of one boolean alarm series. Steps before
    `eval_from` do not count; events with onset < eval_from + H are dropped (no room for an
    early warning in the part). Steps `ignore` marks ([T] bool) are not normal time."""
    merge = H if merge is None else merge
    T = len(a)
    a = np.asarray(a, dtype=bool).copy()
    a[:eval_from] = False
    keep = [i for i, (s, _) in enumerate(events) if s >= eval_from + H]
    r = Result(n_events=len(keep))
    for i in keep:
        s, e = events[i]
        lo = max(0, s - H)
        idx = np.flatnonzero(a[lo:e + 1])
        if idx.size == 0:
            r.missed += 1
            r.hits.append(0)
            continue
        first = lo + int(idx[0])
        # Stricter than the reference: an alarm raised during an earlier incident or its grace
        # and still on (densely injected traces) is no early warning of this one.
        carried = False
        if first == lo and lo > 0 and a[lo - 1]:
            rs = lo - 1
            while rs > 0 and a[rs - 1]:
                rs -= 1
            carried = any(ps <= rs <= pe + grace for ps, pe in events if pe < s)
        if first < s and not carried:
            r.early += 1
            r.leads.append(s - first)
            r.hits.append(2)
        else:
            r.late += 1
            r.hits.append(1)
    normal = normal_steps(T, events, H, eval_from, grace, pre_ignore, ignore)
    r.fp_episodes = len(episodes(a & normal, merge))
    r.normal_steps = int(normal.sum())
    r.normal_alarm_steps = int((a & normal).sum())
    r.normal_seconds = r.normal_steps * step_seconds
    return r


def normal_steps(T: int, events, H: int, eval_from: int = 0, grace: int = 0, pre_ignore=None,
                 ignore=None) -> np.ndarray:
    """[T] bool: the steps where an alarm is a false trip (`evaluate`): from eval_from on,
    outside every [s - H - pre_ignore, e + grace] and every step `ignore` marks."""
    normal = np.ones(T, dtype=bool)
    normal[:eval_from] = False
    for i, (s, e) in enumerate(events):
        pi = 0 if pre_ignore is None else int(pre_ignore[i])
        normal[max(0, s - H - pi):min(T, e + grace + 1)] = False
    if ignore is not None:
        normal &= ~np.asarray(ignore[:T], dtype=bool)
    return normal


def chance_early(summary: dict, H: int, step_seconds: float) -> float:
    """The early recall an alarm that knows nothing of the incidents would score: one that is
    on for the same share of normal time and starts its false trips at the same rate as the
    detector did (`Result.summary`), placed independently of the onsets. An onset is then
    warned early when the alarm is on at s - H (the protocol counts a trip still on as a
    warning) or starts in the H - 1 steps after: f + (1 - f) (1 - exp(-lambda (H - 1))), with
    lambda the trips per step not alarmed. A detector alarmed for 15 % of normal time warns
    early of about 15 % of incidents by chance alone."""
    f = min(max(float(summary["normal_time_alarmed"]), 0.0), 1.0)
    if f >= 1.0:
        return 1.0
    per_step = float(summary["false_trips_per_day"]) * step_seconds / 86400.0 / (1.0 - f)
    return f + (1.0 - f) * (1.0 - float(np.exp(-per_step * max(H - 1, 0))))


def auprc(scores, ys) -> tuple[float | None, float | None]:
    """Step-level average precision over non-ignored steps, with its base rate."""
    from sklearn.metrics import average_precision_score
    s = np.concatenate(scores)
    y = np.concatenate(ys)
    m = (y >= 0) & np.isfinite(s)
    if not m.any() or y[m].sum() == 0 or y[m].sum() == m.sum():
        return None, (float(y[m].mean()) if m.any() else None)
    return float(average_precision_score(y[m], s[m])), float(y[m].mean())


def bootstrap_ci(hits: list, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of early recall, resampling events."""
    if not hits:
        return (0.0, 0.0)
    h = np.asarray(hits) == 2
    rng = np.random.default_rng(seed)
    samples = h[rng.integers(0, len(h), size=(n, len(h)))].mean(axis=1)
    return float(np.quantile(samples, 0.025)), float(np.quantile(samples, 0.975))
