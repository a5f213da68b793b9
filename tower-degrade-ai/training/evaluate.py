"""Evaluation harness: any ONNX model with the predictor contract against the baselines, under
the early-warning protocol (protocol.py; docs/predictor.md explains how to read it).

    python evaluate.py --model ../models/p_anomaly.onnx [--data PUBLIC_TRACES_DIR]
                       [--traces DIR ...] [--out report.md] [--json report.json]

Datasets: the simulator's held-out test traces (always), the public traces under --data
(NAB service-like files, Nezha, the SMD subset), and any directory of trace CSVs (traces.py
documents the format; `tower_degrade_ai::Recorder` writes it). A directory without a `split`
column is test data only; its thresholds come from the simulator's validation traces, which
share a recorder's 500 ms tick (one of other steps, more than 2x off it, is refused:
`unsplit_refusal`).

For every detector, the threshold is chosen on validation only: the lowest one whose false
trips per day of validation data stay within the budget. The test part is then scored once.
The model is also scored as the breaker uses it by default, its threshold calibrated per
series from the series' own healthy steps (no labels, none chosen by hand), and so is every
classical detector with a threshold to tune, beside it (`calibrated_name`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np

import baseline
import calibrate
import datasets
import features
import simulate
from features import N_FEATURES, P99, SUCCESS, WINDOW
from protocol import Result, alarms, auprc, bootstrap_ci, early_targets, evaluate, held, normal_steps
from traces import (MINUTE_SCALE, NOTES, Trace, grace, headline_horizon, horizons, missing_out_dir, note,
                    notes_section, read_datasets, tick_scale, windows)

BUDGETS = (1.0, 0.1)  # false trips per day of data time
MAX_ALARMED = 0.01


# ------------------------------------------------------------------ detectors (causal scores)
class NotAProbability(ValueError):
    """A model answered something OnnxPredictor would refuse."""


# ONNX Runtime's element types as ort names them (Rust's `TensorElementType`).
RUST_TYPES = {"double": "f64", "float16": "f16", "bfloat16": "bf16", "int8": "i8", "int16": "i16",
              "int32": "i32", "int64": "i64", "uint8": "u8", "uint16": "u16", "uint32": "u32",
              "uint64": "u64", "bool": "bool", "string": "String"}


def check_contract(session, path: str) -> None:
    """The checks `OnnxPredictor` makes of a model's inputs and output when it loads it (Rust's
    `check_contract`), in its words: the window [batch, 64, 8] f32, an optional second
    input, the long baseline [batch, 5, 8] f32, and one output [batch, 1] f32, the batch
    dynamic. A ValueError naming the file and what does not fit; the harness would otherwise
    score a model the runtime refuses (an output [batch, 2] read by its first column, P(normal)
    for a classifier whose probabilities were not sliced, an inverted detector)."""
    def fail(reason):
        return ValueError(f"model {path} does not fit the predictor contract (window [batch, "
                          f"{WINDOW}, {N_FEATURES}] f32 -> p_anomaly [batch, 1]): {reason}")

    def shown(dims):
        return "[" + ", ".join(str(d) if isinstance(d, int) else "dynamic" for d in dims) + "]"

    def fits(dims, want):
        # a dynamic dimension is a name or None; the batch must be one
        return len(dims) == len(want) and all(
            not isinstance(g, int) if w is None else (not isinstance(g, int) or g == w)
            for g, w in zip(dims, want))

    def hint(dims):
        return (" (the batch dimension must be dynamic: each class is a row)"
                if dims and isinstance(dims[0], int) else "")

    def check(arg, want, what, expected):
        if not arg.type.startswith("tensor("):
            raise fail(f"{what} `{arg.name}` has shape none (not a tensor), expected {expected}")
        dims = list(arg.shape or [])
        if not fits(dims, want):
            raise fail(f"{what} `{arg.name}` has shape {shown(dims)}, expected {expected}{hint(dims)}")
        if arg.type != "tensor(float)":
            held = arg.type[len("tensor("):-1]
            raise fail(f"{what} `{arg.name}` holds {RUST_TYPES.get(held, held)}, expected f32")

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) not in (1, 2):
        raise fail(f"{len(inputs)} inputs, expected one (window) or two (window, baseline)")
    if len(outputs) != 1:
        raise fail(f"{len(outputs)} outputs, expected one")
    check(inputs[0], [None, WINDOW, N_FEATURES], "input", f"[batch, {WINDOW}, {N_FEATURES}]")
    check(outputs[0], [None, 1], "output", "[batch, 1]")
    if len(inputs) == 2:
        check(inputs[1], [None, baseline.N_QUANTILES, N_FEATURES], "second input",
              f"the long baseline [batch, {baseline.N_QUANTILES}, {N_FEATURES}]")


class Model:
    def __init__(self, path: str, threads: int = 0):
        """`threads`: ONNX Runtime's intra-op threads (0: its default, every core)."""
        import onnxruntime as ort
        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime's own words: a status code and a protobuf error
            hint = " (train.py's .pt beside it holds PyTorch weights: give the .onnx)" if path.endswith(".pt") else ""
            raise ValueError(f"{path}: not an ONNX model ONNX Runtime can load{hint}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        # the same checks as OnnxPredictor's: the inputs' and output's shapes and types, the
        # features the model names, and a second input is the long baseline
        check_contract(self.session, path)
        meta = self.session.get_modelmeta().custom_metadata_map
        features.check(meta, path)
        inputs = [i.name for i in self.session.get_inputs()]
        self.input = inputs[0]
        self.baseline = inputs[1] if len(inputs) > 1 else None
        if self.baseline is not None:
            baseline.check(meta, path)

    def __call__(self, tr: Trace) -> np.ndarray:
        out = np.empty(tr.T, dtype=np.float32)
        B = None if self.baseline is None else baseline.of(tr.X)
        for lo in range(0, tr.T, 8192):
            idx = np.arange(lo, min(tr.T, lo + 8192))
            feed = {self.input: windows(tr.X, idx)}
            if B is not None:
                feed[self.baseline] = B[idx]
            out[idx] = self.session.run(None, feed)[0][:, 0]
        # OnnxPredictor refuses an answer that is not a probability (a model that ends in a
        # logit): scoring it here would report a model the runtime cannot run.
        bad = np.flatnonzero(~((out >= 0) & (out <= 1)))
        if len(bad):
            raise NotAProbability(f"{self.path}: answered {out[bad[0]]:g} on step {int(bad[0])} of "
                             f"{tr.name}, not a probability in 0..1 (OnnxPredictor refuses it: "
                             "end the model with a sigmoid)")
        # The breaker uses no prediction until a class's window is whole and a batch that
        # overran can no longer stand for one made before (`FeatureHistory::is_full`), with a
        # fixed threshold as with the calibrated one: a series' first steps are scored as it
        # scores them, not at all. Their input is zero-padded and their long baseline holds a
        # handful of ticks, and a model scored on them can trip at a series' start (on Nezha's
        # test days, a third of the held-out model's false trips, and all its ranking budget).
        return calibrate.as_used(out)


def _reference(tr: Trace) -> slice:
    """Steps a baseline may calibrate on: the train part, else the first 10 % (no labels)."""
    return slice(0, tr.val_from) if tr.val_from > 0 else slice(0, max(64, tr.T // 10))


def seed_rule(tr: Trace) -> np.ndarray:
    """The seed's reactive rule: success < 92 % and p99 over the SLA, 3 windows running."""
    bad = (~baseline.healthy(tr.X)).astype(float)
    return alarms(bad, 0.5, 3).astype(float)


def calibrated_rule(tr: Trace) -> np.ndarray:
    """The seed's rule with per-series thresholds from the reference part (p99 and failure
    rate at their 99.5th percentile); either channel over for 3 steps. Score: how far over."""
    ref = tr.X[_reference(tr)]
    fail = 1 - tr.X[:, SUCCESS]
    b_p99 = max(np.percentile(ref[:, P99], 99.5), 1e-3)
    b_fail = max(np.percentile(1 - ref[:, SUCCESS], 99.5), 0.01)
    s = np.maximum(tr.X[:, P99] / b_p99, fail / b_fail)
    # the least of the last 3 steps: over the threshold means over for 3 steps
    T = len(s)
    m = np.minimum(s, np.minimum(np.concatenate([[0], s[:-1]])[:T], np.concatenate([[0, 0], s[:-2]])[:T]))
    return m


# Channels where "higher is worse"; success enters as a failure rate.
def _risk(X: np.ndarray) -> np.ndarray:
    Y = X.astype(float).copy()
    Y[:, SUCCESS] = 1 - Y[:, SUCCESS]
    return Y


def static_z(tr: Trace) -> np.ndarray:
    """Robust z-score against the reference part's median and MAD, max over channels."""
    Y = _risk(tr.X)
    ref = Y[_reference(tr)]
    med = np.median(ref, axis=0)
    mad = np.median(np.abs(ref - med), axis=0) * 1.4826
    scale = np.maximum(mad, np.std(ref, axis=0) * 0.05 + 1e-6)
    return np.max(np.abs(Y - med) / scale, axis=1)


def rolling_z(tr: Trace, W: int = 64) -> np.ndarray:
    """Robust z-score against the previous 64 steps' median and MAD, max over channels."""
    from numpy.lib.stride_tricks import sliding_window_view
    Y = _risk(tr.X)
    Z = np.full(tr.T, np.nan)
    if tr.T <= W:
        return Z
    win = sliding_window_view(Y, W, axis=0)[:-1]  # windows ending at t-1
    floor = np.std(Y, axis=0) * 0.05 + 1e-6
    # In chunks: all of a long trace's windows at once took 13 kB a step (25 GB for 2 million).
    for lo in range(0, len(win), CHUNK):
        w = win[lo:lo + CHUNK]
        med = np.median(w, axis=-1)
        mad = np.median(np.abs(w - med[..., None]), axis=-1) * 1.4826
        scale = np.maximum(mad, floor)
        Z[W + lo:W + lo + len(w)] = np.max(np.abs(Y[W + lo:W + lo + len(w)] - med) / scale, axis=1)
    return Z


# Steps of windows `rolling_z` holds at once: each step's 64 x 8 window is copied three times
# over (the median's partition, the deviations, their median), 12 kB a step, so 65,536 of
# them were 0.8 GB above the rest of a run (half its peak on 1.8 million rows), and no faster.
CHUNK = 8192


BASELINES = {
    "seed rule": seed_rule,
    "calibrated rule": calibrated_rule,
    "static robust z": static_z,
    "rolling robust z": rolling_z,
}
FIXED = {"seed rule": 0.5}  # a rule with no threshold to tune
# How far a directory's step may be from the simulator's tick (either way) for the simulator's
# validation traces to set its thresholds when it has no validation part: a 1 s tick's budget
# a step is twice the 500 ms tick's, a 10 s one's twenty times.
SIM_STEP_SLACK = 2.0
BREAKER = (0.87, 2)  # the seed's operating point: predict_threshold(0.87).predict_ticks(2)
AS_DEPLOYED = "model, as the breaker uses it (p ≥ 0.87 for 2 steps)"
AS_DEFAULT = "model, as the breaker uses it by default (threshold calibrated per series, 1/day, held 1 s)"
WARM_UP = 3600  # Calibration::default().warm_up_ticks


def calibrated_alarms(tr: Trace, sc: np.ndarray, armed: list | None = None) -> np.ndarray:
    """The breaker's default use of the model on one series: the threshold calibrated online
    from the series' own healthy steps (those the seed rule does not flag), warmed up on its
    reference part (at most 3,600 steps), held for a second (calibrate.predict_ticks: 2 steps
    at 500 ms, 1 of a second or more). `armed`: calibrate.alarms's."""
    healthy = baseline.healthy(tr.X)
    ref = _reference(tr)
    warm_up = min(WARM_UP, ref.stop - ref.start)
    return calibrate.alarms(sc, healthy, tr.step_seconds, warm_up, armed=armed).astype(float)


def never_armed(traces, armed: list) -> tuple:
    """(the series with test data, those of them the calibrated threshold never held on before
    they ended: too few healthy steps for its first fit), by name; `armed`: calibrate.alarms's
    for each of `traces`."""
    tested = [(tr.name, a) for tr, a in zip(traces, armed) if tr.test_from < tr.T]
    return [n for n, _ in tested], [n for n, a in tested if a is None]


def armed_on_none(r: dict) -> bool:
    """A default row (AS_DEFAULT) whose threshold held on none of its series with test data:
    nothing it counts means anything (rows made before that count existed say nothing)."""
    return r.get("series", 0) > 0 and r.get("unarmed") == r["series"]


# The fewest healthy steps the calibrated threshold's first fit takes (calibrate.MIN_PEAKS
# excesses over the 98th percentile).
FIRST_FIT = math.ceil(calibrate.MIN_PEAKS / (1 - calibrate.TAIL_QUANTILE))


def _some(items: list) -> str:
    """The first three of `items`, and "..." where there are more."""
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def unarmed_note(name: str, traces, armed: list) -> str | None:
    """What a dataset's default row does not say: on how many series the calibrated threshold
    never held (never_armed), where that row counts no alarm at all."""
    tested, never = never_armed(traces, armed)
    if not never:
        return None
    return (f"evaluate.py: {name}: the breaker's default never armed on {len(never)} of "
            f"{len(tested)} series with test data ({_some(never)}): "
            f"its first fit needs at least {FIRST_FIT:,} healthy steps after a series' first {calibrate.UNUSED_STEPS}, "
            f"each learnt {calibrate.FALSE_ALARM_TICKS} steps later, and its row counts no alarm, "
            "warned or false, on those series")


def late_armed_note(name: str, traces, armed: list) -> str | None:
    """What a dataset's default row does not say either: on how many series the calibrated
    threshold first held after the test part began, and how many test incidents came before
    it did (the row counts no warning of those, however the model scored them)."""
    late = [(tr, a) for tr, a in zip(traces, armed)
            if tr.test_from < tr.T and a is not None and a > tr.test_from]
    if not late:
        return None
    tested = never_armed(traces, armed)[0]
    # The test incidents the protocol counts (from a horizon into the part), and of those the
    # ones no alarm before their start could warn of (alarms start where it held).
    before = sum(sum(1 for s, _ in tr.events
                     if tr.test_from + headline_horizon(tr.step_seconds) <= s <= a)
                 for tr, a in late)
    shown = _some([f"{tr.name}: from step {a:,}, its test part from {tr.test_from:,}" for tr, a in late])
    return (f"evaluate.py: {name}: the breaker's default first held after the test part began on "
            f"{len(late)} of {len(tested)} series with test data ({shown}): "
            f"{before} test incident(s) came before it held, which its row counts as not warned of; "
            f"its first fit needs at least {FIRST_FIT:,} healthy steps: give the series a longer part "
            "before the test part")


# ------------------------------------------------------------------ protocol over parts
def _part(tr: Trace, part: str):
    """(end, eval_from) of the validation or test part."""
    if part == "val":
        return tr.test_from, tr.val_from
    return tr.T, tr.test_from


def _part_events(tr: Trace, end: int):
    """(events, pre_ignore) as a part ending at `end` sees them: those that start before it,
    cut at it."""
    ev = [(s, min(e, end - 1)) for s, e in tr.events if s < end]
    pre = None if tr.pre_ignore is None else [p for (s, _), p in zip(tr.events, tr.pre_ignore) if s < end]
    return ev, pre


def run_part(traces, scores, part, thr, H, k=1) -> Result:
    total = Result()
    for tr, sc in zip(traces, scores):
        end, start = _part(tr, part)
        if end - start <= 0:
            continue
        a = alarms(sc[:end], thr, k)
        ev, pre = _part_events(tr, end)
        total.add(evaluate(a, ev, H, tr.step_seconds, eval_from=start,
                           grace=grace(tr), merge=H, pre_ignore=pre, ignore=tr.ignore))
    return total


def false_trips_at(traces, scores, part, thresholds, H, k=1):
    """(false trips per day, share of normal time alarmed) of `run_part` at each of many
    thresholds, as two arrays: what `choose_threshold` tries every candidate for. Neither
    depends on the incidents' hits, only on which normal steps alarm, so every series' normal
    steps are gathered once (with the level each has held for k steps) and each threshold is
    one comparison over them, where run_part re-ran the protocol per series and threshold
    (thousands of small files made that the harness's slowest part). Series are laid end to
    end with more than H steps between them, so no episode spans two."""
    pos, level, seconds, n = [], [], 0.0, 0
    offset = 0
    for tr, sc in zip(traces, scores):
        end, start = _part(tr, part)
        if end - start <= 0:
            continue
        ev, pre = _part_events(tr, end)
        idx = np.flatnonzero(normal_steps(end, ev, H, start, grace(tr), pre, tr.ignore))
        pos.append(idx + offset)
        level.append(held(sc[:end], k)[idx])
        offset += end + H + 2
        n += len(idx)
        seconds += len(idx) * tr.step_seconds  # summed as Result.add sums it
    pos = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)
    level = np.concatenate(level) if level else np.zeros(0)
    days = max(1e-9, seconds / 86400)
    per_day, alarmed = [], []
    for thr in thresholds:
        on = pos[level >= thr]
        trips = int(on.size > 0) + int(np.count_nonzero(np.diff(on) > H + 1))
        per_day.append(trips / days)
        alarmed.append(on.size / max(1, n))
    return np.asarray(per_day), np.asarray(alarmed)


def choose_threshold(traces, scores, H, budget, k=1, part="val") -> float:
    """The lowest threshold whose validation false trips per day stay within the budget, with
    at most 1 % of normal time alarmed (so a detector cannot buy recall with an alarm that
    never ends, which the protocol counts as a single false trip). part="test": chosen on the
    test part itself instead (`ranking_check_rows`), which is not a deployable threshold.

    Candidates are the upper quantiles of the scores on normal validation steps and an even
    grid; every candidate is tried (false trips do not always fall as the threshold rises: a
    higher one can split an episode in two)."""
    normal, every = [], []
    for tr, sc in zip(traces, scores):
        end, start = _part(tr, part)
        if end <= start:
            continue
        y = early_targets(tr.T, tr.events, H, grace(tr), tr.pre_ignore, tr.ignore)[start:end]
        v = sc[start:end]
        ok = np.isfinite(v)
        normal.append(v[ok & (y == 0)])
        every.append(v[ok])
    if not every or not sum(len(v) for v in every):
        name = "validation" if part == "val" else "test"
        steps = sum(max(_part(tr, part)[0] - _part(tr, part)[1], 0) for tr in traces)
        raise ValueError(f"no {name} step with a score to choose a threshold on (the {name} part "
                         f"holds {steps} step(s), and a step is scored once there are enough before "
                         "it): record longer traces, hours of them")
    n = np.concatenate(normal)
    v = np.concatenate(every)
    if not len(n):
        raise ValueError(f"no normal step in the {'validation' if part == 'val' else 'test'} part "
                         "(every one is in an incident, its grace, before one or ignored): no "
                         "false-trip rate to choose a threshold by")
    cands = np.concatenate([
        np.quantile(n, 1 - np.logspace(-1, -6, 100)),
        np.linspace(v.min(), v.max(), 50),
        [v.max() + 1e-6],
    ])
    cands = np.unique(cands)
    per_day, alarmed = false_trips_at(traces, scores, part, cands, H, k)
    ok = (per_day <= budget) & (alarmed <= MAX_ALARMED)
    return float(cands[ok].min()) if ok.any() else float(v.max() + 1e-6)


RANKING_CHECK = "test"  # a row's "threshold_from" when its threshold was chosen on the test part


def check_scorable(traces, ranking_check=False) -> None:
    """Raise the ValueError `choose_threshold` would raise on `traces` at any horizon (no
    validation step with a model's score, or none in normal time; with `ranking_check`, the
    same of the test part), before a model is trained or run on them: scores of 0 where a
    model has one (calibrate.as_used) stand in for a detector's."""
    stand_in = [calibrate.as_used(np.zeros(t.T)) for t in traces]
    for H in horizons(traces[0].step_seconds):
        for part in ("val", "test") if ranking_check else ("val",):
            choose_threshold(traces, stand_in, H, BUDGETS[0], part=part)


def ranking_check_rows(name, traces, scores, budgets=BUDGETS) -> list:
    """Each detector with its threshold chosen on the test part itself, for at most `budget`
    false trips per day there (headline horizon, k = 1): not a deployable threshold (it reads
    the test labels), the same oracle for every detector. A threshold chosen on validation can
    trip far more often on the test part than its budget (a baseline's series drifting between
    the two); this says which detector ranks the test incidents best at the false-trip rate
    actually reached. The rows carry threshold_from = RANKING_CHECK."""
    H = headline_horizon(traces[0].step_seconds)
    out = []
    for d, sc in scores.items():
        if d in FIXED:
            continue
        for budget in budgets:
            thr = choose_threshold(traces, sc, H, budget, 1, part="test")
            r = run_part(traces, sc, "test", thr, H, 1)
            lo, hi = bootstrap_ci(r.hits)
            out.append(dict(dataset=name, detector=d, H=H, k=1, budget_per_day=budget, threshold=thr,
                            threshold_from=RANKING_CHECK, recall_early_ci=[lo, hi], test_days=r.days,
                            step_seconds=traces[0].step_seconds, **r.summary()))
    return out


def evaluate_dataset(name, traces, detectors, val_traces=None, val_scores=None, budgets=BUDGETS,
                     ks=(1, 3), ranking_check=False, per_file=None):
    """All detectors on one dataset. val_traces / val_scores: where thresholds come from when the
    dataset has no validation part of its own. ranking_check: also `ranking_check_rows`.
    per_file: a list to append each file's own result to, at the headline (`per_file_rows`)."""
    scores = {d: [f(tr) for tr in traces] for d, f in detectors.items()}
    out = []
    for d in detectors:
        vt, vs = (traces, scores[d]) if val_traces is None else (val_traces, val_scores[d])
        for H in horizons(traces[0].step_seconds):
            ys, ss = [], []
            for tr, sc in zip(traces, scores[d]):
                end, start = _part(tr, "test")
                y = early_targets(tr.T, tr.events, H, grace(tr), tr.pre_ignore, tr.ignore)
                ys.append(y[start:end])
                ss.append(np.nan_to_num(sc[start:end], nan=-1e9))
            ap, base = auprc(ss, ys)
            for k in ks:
                for budget in budgets:
                    thr = FIXED.get(d) if d in FIXED else choose_threshold(vt, vs, H, budget, k)
                    r = run_part(traces, scores[d], "test", thr, H, k)
                    s = r.summary()
                    lo, hi = bootstrap_ci(r.hits)
                    out.append(dict(dataset=name, detector=d, H=H, k=k, budget_per_day=budget,
                                    threshold=thr, auprc=ap, base_rate=base,
                                    recall_early_ci=[lo, hi], test_days=r.days,
                                    step_seconds=traces[0].step_seconds, **s))
        if d == "model":
            # As deployed: the breaker degrades at p >= 0.87 for 2 consecutive ticks.
            for H in horizons(traces[0].step_seconds):
                r = run_part(traces, scores[d], "test", BREAKER[0], H, BREAKER[1])
                lo, hi = bootstrap_ci(r.hits)
                ref = next(x for x in out if x["detector"] == "model" and x["H"] == H)
                out.append(dict(dataset=name, detector=AS_DEPLOYED, H=H, k=BREAKER[1],
                                budget_per_day=None, threshold=BREAKER[0], auprc=ref["auprc"],
                                base_rate=ref["base_rate"], recall_early_ci=[lo, hi],
                                test_days=r.days, step_seconds=traces[0].step_seconds, **r.summary()))
            # The default: a threshold each series calibrates from its own healthy steps.
            armed = []
            cal = [calibrated_alarms(tr, sc, armed) for tr, sc in zip(traces, scores[d])]
            for said in (unarmed_note(name, traces, armed), late_armed_note(name, traces, armed)):
                if said:
                    note(said)
            never = never_armed(traces, armed)[1]  # for the per-file rows
            out += default_rows(name, traces, cal, AS_DEFAULT, armed, out, "model")
    # Every classical detector with a threshold to tune, under the default's rule: its own
    # threshold calibrated per series the same way, so the default is compared with what the
    # same self-calibration makes of them.
    for d in detectors:
        if d == "model" or d in FIXED or isinstance(detectors[d], Model):
            continue
        armed = []
        alarms_ = [calibrated_alarms(tr, as_probability(sc), armed) for tr, sc in zip(traces, scores[d])]
        out += default_rows(name, traces, alarms_, calibrated_name(d), armed, out, d, calibrated_of=d)
    if ranking_check:
        out += ranking_check_rows(name, traces, scores, budgets)
    if per_file is not None:
        if "model" in scores:
            scores[AS_DEFAULT] = cal
        rows = per_file_rows(out, traces, scores)
        if "model" in scores:
            for r in rows:
                if r["detector"] == AS_DEFAULT:
                    r["armed"] = r["file"] not in never
        per_file += rows
    return out


def default_rows(name, traces, alarms_, detector, armed, rows, scored, **extra) -> list:
    """The rows of one detector used as the breaker's default is (`alarms_`: each series'
    calibrated alarms, 0 or 1; `armed`: calibrate.alarms's), at every horizon, k the
    breaker's (calibrate.predict_ticks); `rows`: those already made, where the AUPRC of the
    scores `scored` is."""
    tested, never = never_armed(traces, armed)
    out = []
    for H in horizons(traces[0].step_seconds):
        r = run_part(traces, alarms_, "test", 0.5, H, 1)
        lo, hi = bootstrap_ci(r.hits)
        ref = next(x for x in rows if x["detector"] == scored and x["H"] == H)
        out.append(dict(dataset=name, detector=detector, H=H,
                        k=calibrate.predict_ticks(traces[0].step_seconds), budget_per_day=None,
                        threshold=None, auprc=ref["auprc"], base_rate=ref["base_rate"],
                        recall_early_ci=[lo, hi], test_days=r.days,
                        step_seconds=traces[0].step_seconds, series=len(tested),
                        unarmed=len(never), **extra, **r.summary()))
    return out


def as_probability(scores) -> np.ndarray:
    """A classical detector's scores (at least 0, larger is worse) as the probabilities the
    calibration reads: s / (1 + s), whose logit, what the calibration fits its tail on, is
    ln s. Increasing, so the calibrated threshold is a threshold on s itself."""
    s = np.maximum(np.asarray(scores, dtype=float), 0.0)  # NaN (no score yet) stays NaN
    return s / (1.0 + s)


def calibrated_name(detector: str) -> str:
    """The row of a classical detector used as the breaker's default uses the model."""
    return f"{detector}, calibrated per series as the default"


def per_file_rows(rows, traces, scores) -> list:
    """Each file's early warnings and false trips, at the headline (H, k = 1, budget 1 false
    trip a day) with the thresholds chosen for its whole directory (`rows`), per detector:
    dicts of file, detector, events, early, false_trips, days."""
    H = headline_horizon(traces[0].step_seconds)
    out = []
    for r in rows:
        headline = r["H"] == H and (r["detector"] == AS_DEFAULT
                                    or (r["k"] == 1 and r["budget_per_day"] == 1.0))
        if not headline or r["detector"] not in scores or r.get("threshold_from") == RANKING_CHECK:
            continue
        thr = 0.5 if r["detector"] == AS_DEFAULT else r["threshold"]  # calibrated alarms are 0 or 1
        for tr, sc in zip(traces, scores[r["detector"]]):
            f = run_part([tr], [sc], "test", thr, H, 1)
            out.append(dict(file=tr.name, detector=r["detector"], events=f.n_events, early=f.early,
                            false_trips=f.fp_episodes, days=f.days))
    return out


def file_table(rows, files) -> str:
    """Per file of one directory (`files`: per_file_rows), the model, its default use and the
    classical baseline with the highest early recall over the directory (`rows`: its headline
    rows, k = 1 and budget 1)."""
    names = list(dict.fromkeys(f["file"] for f in files))
    if len(names) < 2:
        return ""
    present = {f["detector"] for f in files}
    classical = [r for r in rows if r["detector"] in present and r["detector"] != "model"]
    best = max(classical, key=lambda r: (r["recall_early"], -r["false_trips_per_day"]))["detector"] \
        if classical else None
    shown = [d for d in ("model", AS_DEFAULT, best) if d in present]
    cell = {(f["file"], f["detector"]): f for f in files}
    lines = ["Per file, with the directory's thresholds (early warnings of the file's test incidents; "
             "false trips; \"not armed\": the default's threshold never held on that file):", "", "| file | test incidents | days of normal test data | "
             + " | ".join("model, default" if d == AS_DEFAULT else d for d in shown) + " |",
             "|---|---:|---:|" + "---|" * len(shown)]
    def result(c):
        if not c.get("armed", True):
            return "not armed"
        return f"{c['early']} of {c['events']}; {c['false_trips']}"
    for n in names:
        first = cell[(n, shown[0])]
        lines.append(f"| {md_cell(n)} | {first['events']} | {first['days']:.2f} | "
                     + " | ".join(result(cell[(n, d)]) for d in shown) + " |")
    return "\n".join(lines) + "\n"


def md_cell(text: str) -> str:
    """`text` as one cell of a Markdown table: a `|` in it (a file's name) escaped."""
    return text.replace("|", "\\|")


def fmt(v, p=2):
    return "–" if v is None else f"{v:.{p}f}"


# Fewer test incidents than this: an early recall's bootstrap interval cannot show how unsure it is.
FEW_EVENTS = 10


def cautions(events: int, days: float) -> list:
    """What too few test incidents (`events`) or too little normal test time (`days`) make of
    a table's numbers, one sentence each (none where there are enough of both)."""
    warn = []
    if events == 0:
        warn.append("no test incident: no early recall to measure, only false trips")
    elif events < FEW_EVENTS:
        warn.append(f"{events} test incident(s): an early recall over so few moves in steps of "
                    f"{1 / max(events, 1):.2f}, and its bootstrap interval cannot show how unsure it is "
                    "(over incidents all missed or all warned of, it is [0, 0] or [1, 1])")
    if days == 0:
        warn.append("no normal test data (every test step is in an incident, its grace, before one "
                    "or ignored): no false-trip rate to measure")
    elif days < 1:
        warn.append(f"{days:.2f} days of normal test data: one false trip there reads as "
                    f"{1 / days:.3g} a day; record days, not hours, before reading these rates")
    return warn


def table(rows, dataset, H, k, budget, caution=False) -> str:
    """The rows of `dataset` at horizon H, k and budget as a Markdown table; `caution`: after
    its heading, what too few incidents or too little normal time make of its numbers."""
    sel = [r for r in rows if r["dataset"] == dataset and r["H"] == H
           and r.get("threshold_from") != RANKING_CHECK
           and ((r["k"] == k and r["budget_per_day"] == budget)
                or r["detector"] in (AS_DEPLOYED, AS_DEFAULT) or r.get("calibrated_of"))]
    if not sel:
        return ""
    per_hour = tick_scale(sel[0]["step_seconds"])
    head = ("| detector | early recall [95 % CI] | any recall | precision | false trips/day | normal time alarmed"
            + (" | /hour" if per_hour else "") + " | median lead (steps) | AUPRC (base) |")
    lines = [f"**{dataset}**: H = {H} steps, k = {k}, budget {budget:g} false trip/day "
             f"({sel[0]['events']} test events, {sel[0]['test_days']:.2f} days of normal test data)", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    events, days = sel[0]["events"], sel[0]["test_days"]
    warn = cautions(events, days) if caution else []
    if warn:
        lines[1:1] = ["", *(f"*Caution: {w}.*" for w in warn)]
    for r in sel:
        lo, hi = r["recall_early_ci"]
        # Nothing to measure is a dash, not a 0: no incident to warn of, no normal day to trip on.
        # A default that armed on no series has nothing to show either.
        idle = armed_on_none(r)
        recall = ("never armed | –" if idle else
                  f"{r['recall_early']:.2f} [{lo:.2f}, {hi:.2f}] | {r['recall_any']:.2f}"
                  if events else "– | –")
        trips = days > 0 and not idle
        # precision is of alarms: with none raised there is none to measure
        alarmed = r.get("early", 0) + r.get("late", 0) + r.get("false_trips", 0) > 0
        lines.append(
            f"| {r['detector']} | {recall} | "
            f"{fmt(r['precision'] if alarmed and not idle else None)} | {fmt(r['false_trips_per_day'] if trips else None)}"
            + (" | –" if idle else f" | {100 * r['normal_time_alarmed']:.2f} %")
            + (f" | {fmt(r['false_trips_per_hour'] if trips else None, 3)}" if per_hour else "")
            + f" | {fmt(r['median_lead_steps'], 1)} | {fmt(r['auprc'])} ({fmt(r['base_rate'], 3)}) |")
    return "\n".join(lines) + "\n"


def unsplit_refusal(path: str, trs) -> str | None:
    """Why a directory without a validation part cannot be scored (None if it can): its
    thresholds would come from the simulator's validation traces, and a threshold those keep at
    one false trip a day is one in 172,800 of their 500 ms steps; on 5-minute steps it would be
    600 times stricter a step, and every detector would read as warning of nothing."""
    if any(t.val_from < t.test_from for t in trs):
        return None
    off = [t for t in trs if not 1 / SIM_STEP_SLACK <= t.step_seconds / simulate.DT <= SIM_STEP_SLACK]
    if not off:
        return None
    whose = f"{off[0].name}'s steps ({off[0].step_seconds:g} s)" if len(trs) > 1 else \
        f"its steps ({off[0].step_seconds:g} s)"
    return (f"{path}: no validation part (no `val` rows), and {whose} are not the "
            f"simulator's {simulate.DT:g} s tick, whose validation traces would set its "
            f"thresholds: python traces.py split {path} writes a time-ordered split")


def input_notes(path: str, trs: list, own_val: bool) -> None:
    """What the report says of a --traces directory before its rows (`note`): incidents the
    protocol does not count, no test incident, too little normal validation time to keep a
    threshold at 1 false trip a day on (`own_val`: thresholds from its own validation part)."""
    # As the protocol counts them: an incident that starts within H steps of the test
    # part's start leaves no room for an early warning and is not counted.
    H = headline_horizon(trs[0].step_seconds)
    events = sum(1 for t in trs for s, _ in t.events if s >= t.test_from + H)
    early = sum(1 for t in trs for s, _ in t.events if t.test_from <= s < t.test_from + H)
    if early:
        note(f"evaluate.py: --traces {path}: {early} incident(s) start within {H} steps of "
             "their test part's start: no room for an early warning, not counted")
    # Nor is one that began before the test part and runs into it.
    across = sum(1 for t in trs for s, e in t.events if s < t.test_from <= e)
    if across:
        note(f"evaluate.py: --traces {path}: {across} incident(s) begin before their test part "
             "and run into it: not test incidents, not counted")
    if not events:
        note(f"evaluate.py: --traces {path}: no incident in its test data, so no early recall "
             "to measure (its rows count false trips only)")
    # Thresholds chosen on less than a day of normal validation time: a false trip there
    # reads as more than one a day, so a threshold kept at 1 a day is one with none.
    if own_val:
        def normal_seconds(t):
            events, pre = _part_events(t, t.test_from)
            return np.count_nonzero(normal_steps(t.test_from, events, H, t.val_from, grace(t), pre,
                                                 t.ignore)) * t.step_seconds

        val_days = sum(normal_seconds(t) for t in trs) / 86400
        if val_days < 1:
            s = val_days * 86400
            took = f"{s / 3600:.3g} hours" if s >= 3600 else f"{s / 60:.3g} minutes" if s >= 60 else f"{s:.3g} s"
            note(f"evaluate.py: --traces {path}: thresholds are chosen on {took} of normal validation "
                 f"data: one false trip there reads as {1 / max(val_days, 1e-9):.3g} a day, so a "
                 "threshold kept at 1 a day is one with no false trip there; record days, and give "
                 "the validation part a day of them")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="ONNX model: window [batch,64,8] -> p_anomaly [batch,1]")
    ap.add_argument("--data", help="directory holding nab/, nezha/ and smd_subset/")
    ap.add_argument("--traces", nargs="+", action="extend", default=[], metavar="DIR",
                    help="directories of trace CSVs (--traces A B, or --traces A --traces B)")
    ap.add_argument("--seed", type=int, default=7, help="the simulator's seed")
    ap.add_argument("--traces-only", action="store_true",
                    help="score only the --traces directories (the simulator sets the thresholds of "
                         "those without a split column)")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--json", help="write every row here")
    a = ap.parse_args()
    NOTES.clear()
    if a.traces_only and not a.traces:
        sys.exit("evaluate.py: --traces-only needs --traces DIR (the directories to score)")
    if a.data and not a.traces_only:
        datasets.require(a.data, "evaluate.py")
    # Fail now, not after the scoring: the directories the reports go to.
    missing = missing_out_dir(out=a.out, json=a.json)
    if missing:
        sys.exit(f"evaluate.py: {missing}")

    # The traces first: a file that cannot be read fails now, not after the simulator's run.
    try:
        own = read_datasets(a.traces, need=("test",))
    except ValueError as e:
        sys.exit(f"evaluate.py: --traces {e}")
    traced = []
    for path, (name, trs) in zip(a.traces, own.items()):
        own_val = any(t.val_from < t.test_from for t in trs)
        refused = unsplit_refusal(path, trs)
        if refused:
            sys.exit(f"evaluate.py: --traces {refused}")
        if not own_val:
            note(f"evaluate.py: --traces {path}: no validation part (no `val` rows): thresholds "
                 "come from the simulator's 500 ms validation traces (python traces.py split DIR "
                 "writes one)")
        traced.append((path, name, trs, own_val))
    try:
        model = Model(a.model)
        # The file scored, for the report: hashed now, not after a long run it could change in.
        digest = hashlib.sha256()
        with open(a.model, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest = digest.hexdigest()[:12]
    except ValueError as e:  # each names the file
        sys.exit(f"evaluate.py: --model {e}")
    except Exception as e:  # onnxruntime's own errors do not name the file
        sys.exit(f"evaluate.py: --model {a.model}: {e}")
    det = {"model": model, **BASELINES}
    rows, sim_val, sim_val_scores, files = [], None, None, {}
    if not a.traces_only or not all(own_val for *_, own_val in traced):
        sim = simulate.dataset(a.seed)
        sim_val = [t for t in sim if t.val_from < t.test_from]
        sim_test = [t for t in sim if t.test_from == 0]
        # Scored once: the simulator's validation traces also set the thresholds of recorded
        # traces that have no validation part of their own.
        sim_val_scores = {d: [f(t) for t in sim_val] for d, f in det.items()}
        if not a.traces_only:
            rows = evaluate_dataset("simulated", sim_test, det, sim_val, sim_val_scores)
    if a.data and not a.traces_only:
        pub = datasets.load_or_exit(a.data, "evaluate.py")
        for name in ("nab", "nezha", "smd"):
            d = dict(det)
            if name == "nab":
                for nd in datasets.NAB_DETECTORS:
                    d[f"NAB {nd}"] = (lambda nd: lambda tr: _nab(a.data, tr, nd))(nd)
            rows += evaluate_dataset(name, pub[name], d)
    for path, name, trs, own_val in traced:
        input_notes(path, trs, own_val)
        try:
            rows += evaluate_dataset(name, trs, det, None if own_val else sim_val,
                                     None if own_val else sim_val_scores, per_file=files.setdefault(name, []))
        except ValueError as e:
            sys.exit(f"evaluate.py: --traces {path}: {e}")

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    head = {n: headline_horizon(next(r["step_seconds"] for r in rows if r["dataset"] == n)) for n in names}
    md = [f"# Early-warning evaluation\n\nModel: `{a.model}` (sha256 {digest}…). Headline: H = 20 steps "
          f"on traces whose steps are under {MINUTE_SCALE:g} s (10 s at the 500 ms tick), H = 6 steps on longer "
          "ones (the public data's minutes); k = 1; thresholds chosen on validation for at most 1 "
          "false trip per day.\n"]
    if NOTES:
        md.append(notes_section(NOTES))
    for n in names:
        md.append(table(rows, n, head[n], 1, 1.0, caution=True))
        if files.get(n):
            md.append(file_table([r for r in rows if r["dataset"] == n and r["H"] == head[n] and r["k"] == 1
                                  and r["budget_per_day"] == 1.0 and r.get("threshold_from") != RANKING_CHECK],
                                 files[n]))
    md.append("## Every horizon, k = 1 and 3, budgets 1 and 0.1 false trip per day\n")
    for n in names:
        for H in sorted({r["H"] for r in rows if r["dataset"] == n}):
            for k in (1, 3):
                for b in BUDGETS:
                    if (H, k, b) != (head[n], 1, 1.0):
                        md.append(table(rows, n, H, k, b))
    text = "\n".join(md)
    if a.out:
        open(a.out, "w").write(text)
        print(f"evaluate.py: wrote {a.out}", file=sys.stderr)
    else:
        print(text)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1, default=float)


def _nab(root, tr, detector):
    s = datasets.nab_detector_scores(root, tr, detector)
    return np.full(tr.T, np.nan) if s is None else s


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NotAProbability as e:
        sys.exit(f"evaluate.py: --model {e}")
