"""The public labelled traces mapped onto the eight features (docs/predictor.md has the table).

None of them samples at 500 ms: NAB steps are 5 min, Nezha and SMD 1 min; a step stands for a
tick. None measures all eight features: a channel a dataset lacks is held at the level a
healthy simulated class shows (`NEUTRAL`), so the model sees an ordinary value there rather
than an impossible zero. Scales are relative to each series' own training-part median, as the
Rust features are relative to each class's SLA.

    load(data_dir) -> {"nab": [...], "nezha": [...], "smd": [...]}   # lists of traces.Trace
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import sys
from contextlib import contextmanager
from datetime import datetime

import numpy as np

from features import (ERROR as E, INFLIGHT as INF, NEUTRAL, P50, P99, QUEUE as Q, RATE as R,
                      SUCCESS as S, TIMEOUT as TO)
from protocol import events_from_binary
from traces import Trace, clip, rate_ratio

# A series' training-part median maps to these levels (SLA = 2x the normal p99, etc.)
LEVEL = {"p50": 0.15, "p99": 0.5, "inflight": 0.2, "queue": 0.05, "error": 0.01, "timeout": 0.01}


def _rel(v: np.ndarray, train_end: int, level: float, floor: float = 1e-3) -> np.ndarray:
    med = np.nanmedian(v[:max(train_end, 1)])
    return v / max(abs(med), floor) * level


def _workload(v: np.ndarray, train_end: int) -> np.ndarray:
    return rate_ratio(v / max(np.nanmedian(v[:max(train_end, 1)]), 1e-9) * 100)


def _splits(T: int, train_frac: float) -> tuple[int, int]:
    """Time-ordered: train, its last 20 % validation, then test."""
    test_from = int(T * train_frac)
    return int(test_from * 0.8), test_from


# ---------------------------------------------------------------- NAB
NAB_FILES = [f"realAWSCloudwatch/{f}" for f in (
    "ec2_cpu_utilization_24ae8d", "ec2_cpu_utilization_53ea38", "ec2_cpu_utilization_5f5533",
    "ec2_cpu_utilization_77c1ca", "ec2_cpu_utilization_825cc2", "ec2_cpu_utilization_ac20cd",
    "ec2_cpu_utilization_c6585a", "ec2_cpu_utilization_fe7f93", "ec2_disk_write_bytes_1ef3de",
    "ec2_disk_write_bytes_c0d644", "ec2_network_in_257a54", "ec2_network_in_5abac7",
    "elb_request_count_8c0756", "grok_asg_anomaly", "iio_us-east-1_i-a2eb1cd9_NetworkIn",
    "rds_cpu_utilization_cc0c53", "rds_cpu_utilization_e47b3b")] + [
    "realKnownCause/cpu_utilization_asg_misconfiguration",
    "realKnownCause/ec2_request_latency_system_failure",
    "realKnownCause/rogue_agent_key_hold",
]
NAB_DETECTORS = ["numenta", "ARTime", "contextOSE", "randomCutForest", "windowedGaussian"]


def _nab_channel(name: str) -> str:
    if "latency" in name:
        return "latency"
    if "cpu" in name or "grok" in name:
        return "cpu"
    if "key_hold" in name:
        return "latency"  # key-hold durations
    return "workload"  # request counts, network and disk bytes


def _ts(s: str) -> datetime:
    return datetime.strptime(s[:19], "%Y-%m-%d %H:%M:%S")


@contextmanager
def _reading(path: str):
    """What goes wrong reading or mapping `path` (an empty or cut file, a missing column, a
    timestamp that does not parse) as a ValueError naming it: `load` tells which file."""
    try:
        yield
    except (ValueError, KeyError, IndexError, TypeError, EOFError, OSError, csv.Error) as e:
        # A KeyError is a column or a label file's entry that is not there.
        what = f"nothing under {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__
        raise ValueError(f"{path}: cannot be read as the shared traces' ({what})") from e


def _json(path: str):
    with _reading(path), open(path) as f:
        return json.load(f)


def load_nab(root: str) -> list:
    nab = os.path.join(root, "nab")
    windows = _json(os.path.join(nab, "labels", "combined_windows.json"))
    labels = _json(os.path.join(nab, "labels", "combined_labels.json"))
    out = []
    for f in NAB_FILES:
        with _reading(os.path.join(nab, "data", f + ".csv")):
            out.append(_nab_trace(nab, f, windows, labels))
    return out


def _nab_trace(nab: str, f: str, windows: dict, labels: dict) -> Trace:
    """One NAB file as a trace, its incidents from the labelled windows."""
    with open(os.path.join(nab, "data", f + ".csv")) as fh:
        rows = list(csv.DictReader(fh))
    ts = [_ts(r["timestamp"]) for r in rows]
    v = np.array([float(r["value"]) for r in rows])
    T = len(v)
    val_from, test_from = _splits(T, 0.6)
    X = np.tile(NEUTRAL, (T, 1))
    ch = _nab_channel(f)
    if ch == "latency":
        X[:, P99] = _rel(v, val_from, LEVEL["p99"])
        X[:, P50] = X[:, P99] * LEVEL["p50"] / LEVEL["p99"]
    elif ch == "cpu":
        X[:, INF] = _rel(v, val_from, LEVEL["inflight"])
        X[:, Q] = np.maximum(0, v / max(np.percentile(v[:val_from], 99), 1e-9) - 1) * 0.5 + NEUTRAL[Q]
    else:
        X[:, R] = _workload(v, val_from)
    index = {t: i for i, t in enumerate(ts)}
    events, pre = [], []
    marks = sorted(index[_ts(x)] for x in labels[f + ".csv"])
    for w0, w1 in windows[f + ".csv"]:
        a, b = index[_ts(w0)], index[_ts(w1)]
        # the onset is the labelled anomaly inside the window, else the window's middle
        s = next((m for m in marks if a <= m <= b), (a + b) // 2)
        events.append((s, b))
        pre.append(s - a)  # the window's early part is ambiguous
    tr = Trace(f.split("/")[1], "nab", clip(X), events, 300.0, pre, val_from, test_from)
    tr.meta["timestamps"] = [r["timestamp"] for r in rows]
    tr.meta["nab_file"] = f
    tr.meta["channel"] = ch
    return tr


def nab_detector_scores(root: str, tr: Trace, detector: str) -> np.ndarray | None:
    path = os.path.join(root, "nab", "detector_outputs", detector, tr.meta["nab_file"] + ".csv.gz")
    if not os.path.exists(path):
        return None
    rows = list(csv.DictReader(gzip.open(path, "rt")))
    by_ts = {r["timestamp"]: float(r["anomaly_score"]) for r in rows}
    return np.array([by_ts.get(t, np.nan) for t in tr.meta["timestamps"]])


# ---------------------------------------------------------------- Nezha
NEZHA_DAYS = {"onlineboutique": ("2022-08-22", "2022-08-23"), "trainticket": ("2023-01-29", "2023-01-30")}


def _gz_rows(path: str) -> list:
    with _reading(path), gzip.open(path, "rt") as f:
        return list(csv.DictReader(f))


def _fault_steps(ts: list, faults: list) -> list:
    """A fault lasts 3 min; its onset is the first step at or after the injection
    (the `inject_time` string: `inject_timestamp` is hours off for one day)."""
    out = []
    for fl in faults:
        t = _ts(fl["inject_time"])
        s = next((i for i, x in enumerate(ts) if x >= t), None)
        if s is not None:
            out.append((s, min(s + 2, len(ts) - 1)))
    return sorted(out)


def _nezha_pod(rows: list, train_end: int) -> np.ndarray:
    col = lambda c: np.array([float(r[c] or 0) for r in rows])
    T = len(rows)
    X = np.tile(NEUTRAL, (T, 1))
    X[:, R] = _workload(col("PodWorkload(Ops)"), train_end)
    sr = col("PodSuccessRate(%)")
    if sr.max() > 0:  # zero everywhere but OnlineBoutique's front end: no measurement
        X[:, S] = np.clip(sr / 100, 0, 1)
        X[:, E] = 1 - X[:, S]
    p99 = col("PodServerLatencyP99(s)")
    X[:, P99] = _rel(p99, train_end, LEVEL["p99"])
    X[:, P50] = _rel(col("PodServerLatencyP90(s)"), train_end, LEVEL["p50"])
    X[:, INF] = _rel(col("CpuUsageRate(%)"), train_end, LEVEL["inflight"])
    X[:, Q] = _rel(col("PodClientLatencyP90(s)"), train_end, LEVEL["queue"])
    return X


def _nezha_front(rows: list, train_end: int) -> np.ndarray:
    col = lambda c: np.array([float(r[c] or 0) for r in rows])
    T = len(rows)
    X = np.tile(NEUTRAL, (T, 1))
    sr = col("SuccessRate(%)")
    if sr.max() > 0:
        X[:, S] = np.clip(sr / 100, 0, 1)
        X[:, E] = 1 - X[:, S]
    X[:, P99] = _rel(col("LatencyP99(s)"), train_end, LEVEL["p99"])
    X[:, P50] = _rel(col("LatencyP50(s)"), train_end, LEVEL["p50"])
    return X


def load_nezha(root: str) -> list:
    """One series per pod that had a fault injected, plus the front end's SLO metrics; for
    each system the first day is train (its last 20 % validation), the second day test."""
    out = []
    for system, days in NEZHA_DAYS.items():
        for day_i, d in enumerate(days):
            metric = os.path.join(root, "nezha", d, "metric")
            faults_path = os.path.join(root, "nezha", d, f"{d}-fault_list.json")
            fault_list = _json(faults_path)
            with _reading(faults_path):
                faults = [x for v in fault_list.values() for x in v]
                pods = sorted({fl["inject_pod"] for fl in faults})
            is_test = day_i == 1
            front_path = os.path.join(metric, "front_service.csv.gz")
            front = _gz_rows(front_path)
            with _reading(front_path):
                ts = [_ts(r["Time"]) for r in front]
                T = len(front)
                val_from, test_from = (0, 0) if is_test else (int(T * 0.8), T)
                train_end = T if is_test else val_from
                # the test day's scales come from its own first 20 %, before any test step is used
                scale_end = int(T * 0.2) if is_test else train_end
                out.append(Trace(f"{system}-{d}-front", "nezha", clip(_nezha_front(front, scale_end)),
                                 _fault_steps(ts, faults), 60.0, None, val_from, test_from))
            for pod in pods:
                path = os.path.join(metric, f"{pod}_metric.csv.gz")
                if not os.path.exists(path):
                    continue
                rows = _gz_rows(path)
                with _reading(path):
                    pts = [_ts(r["Time"]) for r in rows]
                    Tp = len(rows)
                    vf, tf = (0, 0) if is_test else (int(Tp * 0.8), Tp)
                    se = int(Tp * 0.2) if is_test else vf
                    evs = _fault_steps(pts, [fl for fl in faults if fl["inject_pod"] == pod])
                    X = clip(_nezha_pod(rows, se))
                out.append(Trace(f"{system}-{d}-{pod}", "nezha", X, evs, 60.0, None, vf, tf))
    return out


# ---------------------------------------------------------------- SMD
SMD_MACHINES = ["1-6", "1-7", "2-1", "2-2", "2-7", "2-8", "3-3", "3-4"]


def _smd(rows: list, train_rows: list) -> np.ndarray:
    col = lambda rs, c: np.array([float(r[c]) for r in rs])
    T = len(rows)
    X = np.tile(NEUTRAL, (T, 1))
    n = len(train_rows)
    both = lambda c: np.concatenate([col(train_rows, c), col(rows, c)])
    X[:, R] = _workload(both("eth1_pi"), n)[n:]
    X[:, INF] = _rel(both("cpu_r"), n, LEVEL["inflight"], 0.01)[n:]
    X[:, Q] = _rel(both("load_1"), n, LEVEL["queue"], 0.01)[n:]
    X[:, TO] = _rel(both("tcp_timeouts"), n, LEVEL["timeout"], 0.01)[n:]
    X[:, E] = _rel(both("retransegs"), n, LEVEL["error"], 0.01)[n:]
    X[:, S] = 1 - np.clip(X[:, E] + X[:, TO], 0, 1)
    return X


def load_smd(root: str) -> list:
    """The published split: the train file (unlabelled, taken as normal; its last 20 %
    validation) and the labelled test file, as one series."""
    out = []
    for m in SMD_MACHINES:
        tr_path = os.path.join(root, "smd_subset", f"machine-{m}_train.csv.gz")
        te_path = os.path.join(root, "smd_subset", f"machine-{m}_test.csv.gz")
        tr_rows, te_rows = _gz_rows(tr_path), _gz_rows(te_path)
        with _reading(f"{tr_path} and {te_path}"):
            X = np.concatenate([_smd(tr_rows, tr_rows[:int(len(tr_rows) * 0.8)]), _smd(te_rows, tr_rows)])
            lab = np.concatenate([np.zeros(len(tr_rows)), [float(r["label"]) for r in te_rows]])
        n = len(tr_rows)
        out.append(Trace(f"machine-{m}", "smd", clip(X), events_from_binary(lab), 60.0, None, int(n * 0.8), n))
    return out


def missing(root: str) -> list:
    """The files `load` reads that are not under `root`: checked before anything else runs,
    so a mistyped or partial --data fails at once, naming what is missing."""
    need = [os.path.join("nab", "labels", f) for f in ("combined_windows.json", "combined_labels.json")]
    need += [os.path.join("nab", "data", f + ".csv") for f in NAB_FILES]
    for days in NEZHA_DAYS.values():
        for d in days:
            need += [os.path.join("nezha", d, f"{d}-fault_list.json"),
                     os.path.join("nezha", d, "metric", "front_service.csv.gz")]
    for m in SMD_MACHINES:
        need += [os.path.join("smd_subset", f"machine-{m}_{p}.csv.gz") for p in ("train", "test")]
    return [p for p in need if not os.path.isfile(os.path.join(root, p))]


def require(root: str, tool: str) -> None:
    """Exit with a message naming what `root` lacks, if anything (`missing`)."""
    gone = missing(root)
    if gone:
        shown = ", ".join(gone[:4]) + (f" and {len(gone) - 4} more" if len(gone) > 4 else "")
        sys.exit(f"{tool}: --data {root}: not the public traces' directory (it must hold nab/, "
                 f"nezha/ and smd_subset/ as shared): missing {shown}")


def load(root: str) -> dict:
    """The three public datasets under `root`; a file that cannot be read or mapped is a
    ValueError naming it."""
    return {"nab": load_nab(root), "nezha": load_nezha(root), "smd": load_smd(root)}


def load_or_exit(root: str, tool: str) -> dict:
    """`load`, or exit with `tool`'s message naming the file that could not be read."""
    try:
        return load(root)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        sys.exit(f"{tool}: --data {root}: {e}")
