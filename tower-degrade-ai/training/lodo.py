"""Leave-one-dataset-out: how the model does on a kind of service it has never seen.

    python lodo.py --data PUBLIC_TRACES_DIR --out-dir DIR [--report lodo.md] [--json lodo.json]
                   [--traces DIR ...] [--folds simulated nab nezha smd ...] [--epochs 8] [--seed 7]
                   [--arch conv|robust|z|zb|zc|za|zs|zsl|zsw|zal|zam] [--balance | --no-balance] [--reuse]
                   [--seeds 7 8 9 ...] [--jobs N] [--threads N]
    python lodo.py --data PUBLIC_TRACES_DIR --out-dir DIR --from-json lodo.json [--report lodo.md]

For each dataset D (the simulator and every public dataset): a model is trained with the
bundled model's recipe (train.fit) on the train parts of every *other* dataset, so nothing of
D is seen in training, in the choice of epoch or in the probability calibration. It is then
scored on D's test part by evaluate.py's rules, beside the classical baselines computed in the
same run: thresholds chosen on D's validation part for at most 1 and 0.1 false trips per day
(and at most 1 % of normal time alarmed), early recall with bootstrap 95 % confidence
intervals over events, time alarmed, median lead; and the breaker's default use of the model
(a threshold each series calibrates from its own healthy steps, no labels), beside every
classical detector with a threshold to tune used the same way (evaluate.calibrated_name): the
default against what the same self-calibration makes of the classical detectors.

The baseline a fold is compared with is the one with the highest early recall on the test
part, chosen after the fact: the comparison favours the baselines. Beside each early recall,
its chance level (protocol.chance_early): what an alarm on for the same share of normal time,
tripping as often, would score placed at random, since the protocol counts an alarm still on
when an incident's horizon opens as a warning of it. A ranking check follows
(evaluate.ranking_check_rows): every detector's threshold chosen on the test part itself for at
most 1 false trip a day there, since a validation threshold can trip far over its budget on the
test part; it is not a deployable threshold, and the headline stays the protocol's.
Then which incidents each warns of (`overlap`): how many the model and the best baseline warn
of, both and each alone, and every classical detector of the run together, so a shortfall
says whether the model misses what the baselines see or the baselines, few and apart, each
see a few of their own.
For a recipe with an anchor (`za` and those built on it, the bundled `zsl` among them), each
fold's model is also scored with its learnt head silenced (make_fixtures.silence_head: the
anchor alone, as trained; not a baseline): what the head added in each fold.

`--traces DIR` (repeatable) adds a directory of your own trace CSVs (traces.py documents the
format; `tower_degrade_ai::Recorder` writes it) as one more dataset: held out in a fold of its
own, scored as the public ones are (thresholds from its validation part), and trained on in
every other fold. Each file needs a split column, and the directory train, val and test rows
(`python traces.py split DIR`). It is named after the directory (its path where that name is
taken), which is what `--folds` takes.

`--seeds 7 8 9` runs the whole evaluation once per seed (other initial weights and batches,
another simulator), each in DIR/seed-SEED/ with its own report, and reports the seeds side by
side: a fold's early warnings move between seeds (by one of NAB's 17 incidents, 0.06 of
early recall; by up to five of SMD's 122). `--jobs N` runs N folds (of any seed) at once, each in a process of its own
with the cores shared out (`--threads`, default cores / N), its output in a log beside its
model; on 16 cores, three seeds' twelve folds at once took 3.3 minutes. Mind the memory too:
NAB's fold held about 7.2 GiB at its peak (its training windows; measured), and Nezha's and
SMD's train on as many windows, so N such folds at once need about N times that.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import datasets
import evaluate
import make_fixtures
import simulate
from protocol import chance_early
from traces import HARNESS_DATASETS, NOTES, headline_horizon, missing_out_dir, notes_section, read_datasets

FOLDS = HARNESS_DATASETS
# The fold's model with its learnt head silenced (make_fixtures.silence_head): what training added.
ANCHOR = "anchor alone (no learnt head)"
MODEL_ROWS = ("model", evaluate.AS_DEFAULT, ANCHOR)
# What a --traces directory must hold (traces.read_dataset): a split in every file, train rows
# for the other folds to train on, val and test rows for its own fold.
LODO_NEEDS = ("split", "train", "val", "test")


def training_traces(held_out: str, sim, pub) -> list:
    traces = [] if held_out == "simulated" else list(sim)
    for name, trs in pub.items():
        if name != held_out:
            traces += trs
    return traces


def file_name(dataset: str) -> str:
    """A fold's files' name part: the dataset's name, a path's separators and odd characters
    made `_` (a --traces directory may be named by its path)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_.") or "traces"


def score_fold(held_out: str, model_path: str, data: str, sim, pub, anchor_path=None,
               threads: int = 0) -> list:
    """evaluate.py's rows for the held-out dataset, scored with the fold's model, and with
    anchor_path, with the recipe's anchor alone (ANCHOR; not a baseline). `threads`: ONNX
    Runtime's (0: every core)."""
    det = {"model": evaluate.Model(model_path, threads), **evaluate.BASELINES}
    if anchor_path is not None:
        det[ANCHOR] = evaluate.Model(anchor_path, threads)
    if held_out == "simulated":
        sim_val = [t for t in sim if t.val_from < t.test_from]
        sim_test = [t for t in sim if t.test_from == 0]
        val_scores = {d: [f(t) for t in sim_val] for d, f in det.items()}
        return evaluate.evaluate_dataset("simulated", sim_test, det, sim_val, val_scores,
                                         ranking_check=True)
    if held_out == "nab":
        for nd in datasets.NAB_DETECTORS:
            det[f"NAB {nd}"] = (lambda nd: lambda tr: evaluate._nab(data, tr, nd))(nd)
    return evaluate.evaluate_dataset(held_out, pub[held_out], det, ranking_check=True)


def headline(rows: list, dataset: str, budget: float, ranking_check: bool = False) -> dict:
    """The model, its default use and the best baseline at the headline horizon, k = 1, with
    thresholds from validation (the protocol), or with ranking_check, from the test part
    (evaluate.ranking_check_rows; the default has no such row: it is None); and the classical
    detector that warns early of the most under the default's rule (`calibrated`: its own
    threshold calibrated per series, evaluate.calibrated_name; None in the ranking check)."""
    H = headline_horizon(next(r["step_seconds"] for r in rows if r["dataset"] == dataset))
    source = evaluate.RANKING_CHECK if ranking_check else None
    at = [r for r in rows if r["dataset"] == dataset and r["H"] == H
          and r.get("threshold_from") == source]
    model = next(r for r in at if r["detector"] == "model" and r["k"] == 1
                 and r["budget_per_day"] == budget)
    default = next((r for r in at if r["detector"] == evaluate.AS_DEFAULT), None)
    anchor = next((r for r in at if r["detector"] == ANCHOR and r["k"] == 1
                   and r["budget_per_day"] == budget), None)
    best = max(classical(at, budget), key=lambda r: (r["recall_early"], -r["false_trips_per_day"]))
    # The classical detectors used as the default uses the model (rows of runs before 5
    # December have none: None)
    same_rule = [r for r in at if r.get("calibrated_of")]
    calibrated = max(same_rule, key=lambda r: (r["recall_early"], -r["false_trips_per_day"]),
                     default=None)
    return dict(H=H, model=model, default=default, best=best, anchor=anchor, calibrated=calibrated)


def classical(rows: list, budget: float) -> list:
    """The classical detectors' rows among `rows` (one dataset, horizon and threshold source)
    at k = 1 and `budget` false trips a day: every detector but the model's rows and the seed's
    operating point."""
    return [r for r in rows if r["detector"] not in MODEL_ROWS + (evaluate.AS_DEPLOYED,)
            and r["k"] == 1 and r["budget_per_day"] == budget]


def _recall(r) -> str:
    """Early recall and its interval; "–" with no test incident, as evaluate.py's report says
    it (0.00 [0.00, 0.00] read as a measured zero)."""
    if not r.get("events", 1):
        return "–"
    lo, hi = r["recall_early_ci"]
    return f"{r['recall_early']:.2f} [{lo:.2f}, {hi:.2f}]"


def _default_row(d: str, r: dict) -> str:
    """The default's row of fold `d`: "never armed" where it armed on no series with test data
    (evaluate.never_armed; rows of runs before 4 December do not say, and read as the zeros
    they counted); dashes where the run has no default row (None: rows scored without the
    model's default, or under its name before 5 December)."""
    if r is None:
        return f"| {d} | – | – | – | – | – |"
    if evaluate.armed_on_none(r):
        return f"| {d} | never armed on its {r['series']} series | – | – | – | – |"
    return (f"| {d} | {_recall(r)} | {r['recall_any']:.2f} | {r['false_trips_per_day']:.2f} | "
            f"{100 * r['normal_time_alarmed']:.2f} % | {_chance(r)} |")


def _verdict(m, b) -> str:
    """The model's early recall over the baseline's, and whether their intervals are apart:
    not said over fewer than evaluate.FEW_EVENTS incidents, whose intervals cannot show how
    unsure they are (all missed or all warned of: [0, 0] or [1, 1])."""
    if not m.get("events", 1):
        return "no test incident"
    if b["recall_early"] == 0:
        return "both 0" if m["recall_early"] == 0 else "ahead"
    ratio = m["recall_early"] / b["recall_early"]
    if m["events"] < evaluate.FEW_EVENTS:
        return f"{ratio:.2f}x (over {m['events']} incidents)"
    apart = m["recall_early_ci"][0] > b["recall_early_ci"][1]
    below = m["recall_early_ci"][1] < b["recall_early_ci"][0]
    return f"{ratio:.2f}x" + (" (CIs apart)" if apart else " (CIs apart, below)" if below else "")


def _cautions(rows: list, folds) -> list:
    """Per fold with too few test incidents or too little normal test time
    (evaluate.cautions), a line saying so; none where every fold has enough."""
    out = []
    for d in folds:
        m = headline(rows, d, 1.0)["model"]
        out += [f"*Caution: {d}: {w}.*" for w in evaluate.cautions(m["events"], m["test_days"])]
    return out + [""] if out else []


def _comparison(rows: list, folds, budget: float, ranking_check: bool = False) -> list:
    """The model beside the best baseline in each fold (`headline`), as table lines."""
    out = ["| held out | model: early recall [95 % CI] | false trips/day | time alarmed | "
           "chance | median lead | best baseline | its early recall | its false trips/day | "
           "its time alarmed | its chance | model / baseline |",
           "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for d in folds:
        h = headline(rows, d, budget, ranking_check)
        m, b = h["model"], h["best"]
        out.append(
            f"| {d} (H = {h['H']}) | {_recall(m)} | {m['false_trips_per_day']:.2f} | "
            f"{100 * m['normal_time_alarmed']:.2f} % | {_chance(m)} | "
            f"{evaluate.fmt(m['median_lead_steps'], 1)} | {b['detector']} | {_recall(b)} | "
            f"{b['false_trips_per_day']:.2f} | {100 * b['normal_time_alarmed']:.2f} % | {_chance(b)} | "
            f"{_verdict(m, b)} |")
    return out + [""]


def _anchor(rows: list, folds) -> list:
    """Per fold: the model and its anchor alone (ANCHOR), from validation and in the ranking
    check, as table lines."""
    out = ["| held out | model: early recall [95 % CI] | false trips/day | anchor alone | "
           "false trips/day | model, ranking check | anchor alone, ranking check |",
           "|---|---|---:|---|---:|---|---|"]
    for d in folds:
        h, rc = headline(rows, d, 1.0), headline(rows, d, 1.0, ranking_check=True)
        m, a = h["model"], h["anchor"]
        out.append(f"| {d} (H = {h['H']}) | {_recall(m)} | {m['false_trips_per_day']:.2f} | "
                   f"{_recall(a)} | {a['false_trips_per_day']:.2f} | {_recall(rc['model'])} | "
                   f"{_recall(rc['anchor'])} |")
    return out + [""]


def _same_rule(rows: list, folds) -> list:
    """Per fold: the breaker's default use of the model beside the classical detector best
    under the same rule (`headline`'s `calibrated`), as table lines."""
    out = ["| held out | default: early recall [95 % CI] | false trips/day | best classical detector, "
           "calibrated the same way | its early recall | its false trips/day | default / it |",
           "|---|---|---:|---|---|---:|---|"]

    def cells(r):
        if r is None:
            return "– | –"
        if evaluate.armed_on_none(r):
            return "never armed | –"
        return f"{_recall(r)} | {r['false_trips_per_day']:.2f}"

    for d in folds:
        h = headline(rows, d, 1.0)
        m, b = h["default"], h["calibrated"]
        ratio = ("–" if m is None or evaluate.armed_on_none(m) or evaluate.armed_on_none(b)
                 else _verdict(m, b))
        out.append(f"| {d} (H = {h['H']}) | {cells(m)} | {b['calibrated_of']} | {cells(b)} | {ratio} |")
    return out + [""]


def _chance(r) -> str:
    """The early recall the row's alarm would score placed at random (protocol.chance_early)."""
    return f"{chance_early(r, r['H'], r['step_seconds']):.2f}"


def beyond_chance(r) -> float:
    """Early recall beyond chance, as Cohen's kappa corrects agreement: (R - C) / (1 - C), with C
    the row's chance level. 0 for an alarm that warns no more often than its alarm rate alone
    would; 1 for one that warns early of every incident."""
    c = chance_early(r, r["H"], r["step_seconds"])
    if c >= 1.0:
        return 0.0
    v = (r["recall_early"] - c) / (1.0 - c)
    return 0.0 if abs(v) < 0.005 else v  # no "-0.00" in the tables


def _beyond_chance(rows: list, folds, budget: float = 1.0) -> list:
    """Per fold: the model and every baseline's early recall beyond chance (`beyond_chance`),
    thresholds from validation as in the headline; the baseline best by this measure."""
    out = ["| held out | model: early recall | its chance | beyond chance | best baseline by the protocol: "
           "beyond chance | best baseline beyond chance | its early recall | its chance | beyond chance |",
           "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for d in folds:
        h = headline(rows, d, budget)
        m, b = h["model"], h["best"]
        base = classical([r for r in rows if r["dataset"] == d and r["H"] == h["H"]
                          and r.get("threshold_from") is None], budget)
        top = max(base, key=beyond_chance)
        out.append(
            f"| {d} (H = {h['H']}) | {m['recall_early']:.2f} | {_chance(m)} | {beyond_chance(m):.2f} | "
            f"{b['detector']}: {beyond_chance(b):.2f} | {top['detector']} | {top['recall_early']:.2f} | "
            f"{_chance(top)} | {beyond_chance(top):.2f} |")
    return out + [""]


def overlap(rows: list, d: str, budget: float = 1.0) -> dict | None:
    """Which of fold `d`'s test incidents the model and the classical detectors warn of early
    (headline horizon, k = 1, thresholds from validation; rows' `early_events`): counts of the
    model's, the best baseline's (`headline`), both, each alone, every classical detector's
    together, and any detector's, the model's included. None for rows of runs from before
    5 December 2026, which do not say."""
    h = headline(rows, d, budget)
    at = [r for r in rows if r["dataset"] == d and r["H"] == h["H"] and r.get("threshold_from") is None]
    base = classical(at, budget)
    if any("early_events" not in r for r in base + [h["model"]]):
        return None
    m, b = set(h["model"]["early_events"]), set(h["best"]["early_events"])
    every = set().union(*(r["early_events"] for r in base))
    return dict(H=h["H"], events=h["model"]["events"], best=h["best"]["detector"], detectors=len(base),
                model=len(m), baseline=len(b), both=len(m & b), model_alone=len(m - b),
                baseline_alone=len(b - m), classical=len(every), any=len(every | m))


def _overlap(rows: list, folds) -> list:
    """Per fold, `overlap` as table lines."""
    out = ["| held out | test incidents | model | best baseline | its | both | the model's alone | "
           "the baseline's alone | every classical detector together | any detector, the model too |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for d in folds:
        o = overlap(rows, d)
        out.append(f"| {d} (H = {o['H']}) | {o['events']} | {o['model']} | {o['best']} | {o['baseline']} | "
                   f"{o['both']} | {o['model_alone']} | {o['baseline_alone']} | "
                   f"{o['classical']} ({o['detectors']} detectors) | {o['any']} |")
    return out + [""]


def report(rows: list, folds, infos: dict, notes: list = ()) -> str:
    """The Markdown report of `rows`; `notes`: what reading the --traces directories noted
    (traces.NOTES), a section of its own after the introduction."""
    out = ["# Leave-one-dataset-out evaluation\n",
           "Each row: a model trained without the dataset named, scored on that dataset's test "
           "part (`training/lodo.py`). Headline horizon (H = 20 ticks on the simulator's 500 ms "
           "traces, 6 steps on the public data), k = 1, thresholds chosen on the held-out "
           "dataset's validation part. The best baseline is the one with the highest early "
           "recall on the test part, chosen after the fact.\n"]
    if notes:
        out.append(notes_section(list(notes)))
    out += _cautions(rows, folds)
    for budget in evaluate.BUDGETS:
        out.append(f"## At most {budget:g} false trip per day\n")
        out += _comparison(rows, folds, budget)
    if all(overlap(rows, d) is not None for d in folds):
        out.append("## Which incidents they warn of\n")
        out.append("The early warnings at most 1 false trip a day (thresholds from validation, the "
                   "headline horizon) incident by incident: how many the model and the best "
                   "baseline warn of, how many both do and each alone, and how many every "
                   "classical detector of the run warns of together. Where two detectors warn of "
                   "few incidents and hardly the same ones, the best baseline, chosen after the "
                   "fact among several, is the luckiest of them as much as the best.\n")
        out += _overlap(rows, folds)
    out.append("## Beyond chance\n")
    out.append("The protocol counts an alarm still on when an incident's horizon opens as an early "
               "warning of it, so a detector alarmed for much of the time warns early of a share "
               "of incidents by its alarm rate alone. Early recall beyond chance, (R - C) / (1 - C) "
               "with C the chance level above (as Cohen's kappa corrects agreement), at most 1 false "
               "trip a day, thresholds from validation, every baseline scored so:\n")
    out += _beyond_chance(rows, folds)
    if any(r.get("threshold_from") == evaluate.RANKING_CHECK for r in rows):
        out.append("## Ranking check: thresholds chosen on the test part itself\n")
        out.append("A threshold chosen on validation can trip far more often than its budget on "
                   "the test part (compare each row's false trips/day above with its budget): a "
                   "detector whose validation threshold overshoots buys early recall with false "
                   "trips. Here every detector's threshold is chosen on the test part for at most "
                   "1 false trip per day *there* (the same oracle for all, not a deployable "
                   "threshold): which detector ranks the held-out incidents best at the false-trip "
                   "rate actually reached.\n")
        out += _comparison(rows, folds, 1.0, ranking_check=True)
    if all(headline(rows, d, 1.0)["anchor"] is not None for d in folds):
        out.append("## What training adds: the model beside its anchor alone\n")
        out.append("Each fold's model with its learnt head silenced (`make_fixtures.silence_head`: "
                   "the score a fixed increasing function of the anchor), scored in the same run "
                   "under the same rules, at most 1 false trip per day: thresholds from "
                   "validation, then from the test part itself (the ranking check). Where the "
                   "two are level, what ranks the held-out incidents is the anchor, not what "
                   "the head learnt from the other datasets.\n")
        out += _anchor(rows, folds)
    out.append("## The breaker's default use of the model (threshold calibrated per series, no "
               "labels)\n")
    out.append("| held out | early recall [95 % CI] | any recall | false trips/day | time alarmed | chance |")
    out.append("|---|---|---:|---:|---:|---:|")
    for d in folds:
        out.append(_default_row(d, headline(rows, d, 1.0)["default"]))
    if all(headline(rows, d, 1.0)["calibrated"] is not None for d in folds):
        out.append("\n## The default beside the classical detectors under the same rule\n")
        out.append("Each classical detector with a threshold to tune used as the breaker's default uses "
                   "the model: its own threshold calibrated per series from that series' healthy "
                   "steps, at 1 false trip a day, held 1 s (its score s read as the probability "
                   "s / (1 + s)), in the same run; no labels and no threshold chosen by hand on either "
                   "side. The detector shown warns early of the most incidents, chosen after the "
                   "fact.\n")
        out += _same_rule(rows, folds)
    out.append("\n## The folds' models\n")
    out.append("| held out | trained on (windows, positive) | validation AUPRC | seconds |")
    out.append("|---|---|---:|---:|")
    for d in folds:
        i = infos[d]
        out.append(f"| {d} | {i['train_windows']} ({i['train_positive']}) | {i['val_auprc']:.3f} | "
                   f"{i['seconds']} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ several seeds, several runs at once
def seed_dir(out_dir: str, seed: int) -> str:
    """Where one seed's models, logs and report go with --seeds."""
    return os.path.join(out_dir, f"seed-{seed}")


def child_argv(a, seed: int, fold: str, threads: int, out: str) -> list:
    """The command line that runs one fold of one seed as a process of its own (--jobs): the
    same recipe and data, `threads` for torch and ONNX Runtime, its rows in `out`."""
    argv = [sys.executable, os.path.abspath(__file__), "--data", a.data, "--out-dir", out,
            "--folds", fold, "--seed", str(seed), "--epochs", str(a.epochs),
            "--hard-negatives", str(a.hard_negatives), "--arch", a.arch,
            "--balance" if a.balance else "--no-balance", "--threads", str(threads),
            "--json", os.path.join(out, f"fold-{file_name(fold)}.json")]
    for t in a.traces:
        argv += ["--traces", t]
    return argv + (["--reuse"] if a.reuse else [])


def run_all(jobs: list, at_once: int, threads: int, log=print) -> list:
    """Run `jobs`, (argv, log file) pairs, `at_once` at a time, each one's output into its log
    file; the ones that failed, as (log file, exit status)."""
    # numpy's own thread pools (BLAS, OpenMP) held to the same share of the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}

    def one(job):
        argv, path = job
        t0 = time.time()
        with open(path, "w") as f:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        log(f"   {path}: {'done' if rc == 0 else f'failed (exit status {rc})'} "
            f"({time.time() - t0:.0f} s)", flush=True)
        return path, rc

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return [(p, rc) for p, rc in pool.map(one, jobs) if rc != 0]


def _notes(runs) -> list:
    """Every run's notes, each once, in order."""
    return list(dict.fromkeys(n for run in runs for n in run.get("notes", [])))


def merge(paths: list) -> dict:
    """One seed's folds, each run in a process of its own, as one run's --json: the rows in
    fold order, every fold's model, each note once."""
    rows, models, runs = [], {}, []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
        rows += runs[-1]["rows"]
        models.update(runs[-1]["models"])
    return dict(rows=rows, models=models, notes=_notes(runs))


def _per_seed(values) -> str:
    return ", ".join(str(v) for v in values)


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def seeds_table(runs: dict, folds) -> list:
    """Per fold, each seed's run side by side (`runs`: {seed: rows}): early warnings in
    incidents at the headline horizon, k = 1, at most 1 false trip a day, thresholds from
    validation, then from the test part (the ranking check), and the breaker's default; how
    many seeds reach the best baseline of their own run. Table lines."""
    out = ["| held out | test incidents | model, per seed | its false trips/day (median) | "
           "best baseline | its early warnings, per seed | seeds at least the baseline | "
           "model / baseline (pooled) | ranking check: model, per seed | ranking check: best "
           "baseline, per seed | default, per seed | its false trips/day (median) |",
           "|---|---:|---|---:|---|---|---:|---:|---|---|---|---:|"]
    for d in folds:
        hs = [headline(rows, d, 1.0) for rows in runs.values()]
        # a run scored without the ranking check (or without the default) shows "–" for it
        rcs = [headline(rows, d, 1.0, ranking_check=True) if _checked(rows, d) else None
               for rows in runs.values()]
        names = list(dict.fromkeys(h["best"]["detector"] for h in hs))
        at_least = sum(h["model"]["early"] >= h["best"]["early"] for h in hs)
        # Pooled over the seeds (the median of each seed's ratio read 1.57x for 3 and 2 early
        # warnings against 1 and 15): ahead where the baselines warned of none and it did.
        ours, theirs = (sum(h[k]["early"] for h in hs) for k in ("model", "best"))
        ratio = ("–" if ours == theirs == 0 else "ahead" if theirs == 0
                 else f"{ours / theirs:.2f}x")
        defaults = [h["default"] for h in hs]
        trips = [r["false_trips_per_day"] for r in defaults if r is not None]
        out.append(
            f"| {d} (H = {hs[0]['H']}) | {_span([h['model']['events'] for h in hs])} | "
            f"{_per_seed(h['model']['early'] for h in hs)} | "
            f"{statistics.median(h['model']['false_trips_per_day'] for h in hs):.2f} | "
            f"{' / '.join(names)} | {_per_seed(h['best']['early'] for h in hs)} | "
            f"{at_least} of {len(hs)} | {ratio} | {_per_seed(_early(r, 'model') for r in rcs)} | "
            f"{_per_seed(_early(r, 'best') for r in rcs)} | {_per_seed(_early(r) for r in defaults)} | "
            f"{f'{statistics.median(trips):.2f}' if trips else '–'} |")
    return out + [""]


def seeds_overlap(runs: dict, folds) -> list:
    """Per fold, each seed's `overlap` side by side, as table lines; none where a run does not
    say which incidents each detector warned of."""
    if not all(overlap(rows, d) is not None for rows in runs.values() for d in folds):
        return []
    out = ["| held out | model, per seed | best baseline, per seed | both, per seed | every "
           "classical detector together, per seed | any detector, the model too, per seed |",
           "|---|---|---|---|---|---|"]
    for d in folds:
        os_ = [overlap(rows, d) for rows in runs.values()]
        out.append(f"| {d} (H = {os_[0]['H']}) | " + " | ".join(
            _per_seed(o[k] for o in os_) for k in ("model", "baseline", "both", "classical", "any")) + " |")
    return out + [""]


def _checked(rows: list, dataset: str) -> bool:
    """Whether `rows` hold the ranking check's rows for `dataset`."""
    return any(r["dataset"] == dataset and r.get("threshold_from") == evaluate.RANKING_CHECK for r in rows)


def _early(row, which: str | None = None):
    """A row's early warnings (or its headline's `which` row's), "–" where there is none."""
    if row is not None and which is not None:
        row = row[which]
    return "–" if row is None else row["early"]


def pooled(runs: dict, folds, which: str) -> tuple:
    """Early warnings and incidents summed over every fold and seed, for the headline's
    `which` ("model", "best", "default", "calibrated")."""
    hs = [headline(rows, d, 1.0) for rows in runs.values() for d in folds]
    hs = [h[which] for h in hs if h[which] is not None]
    return sum(h["early"] for h in hs), sum(h["events"] for h in hs)


def seeds_report(runs: dict, folds, out_dir: str | None = None, notes: list = ()) -> str:
    """The report of one recipe run with several seeds (`runs`: {seed: rows}); `notes`: what
    reading the --traces directories noted, as in `report`."""
    seeds = list(runs)
    out = ["# Leave-one-dataset-out evaluation, several seeds\n",
           f"The same recipe trained and scored with each of the seeds {_per_seed(seeds)} "
           "(`training/lodo.py --seeds`): each seed draws other initial weights and batches, and "
           "another simulator, so the simulator fold's test traces change with it; the public "
           "datasets' do not. Per fold and seed, early warnings (incidents warned of in the "
           "horizon before their onset) at the headline horizon, k = 1, at most 1 false trip a "
           "day: thresholds chosen on the held-out validation part (the protocol), then on the "
           "test part itself (the ranking check), and the breaker's default use of the model "
           "(no threshold chosen). The best baseline is each run's own, chosen after the fact.\n"]
    if notes:
        out.append(notes_section(list(notes)))
    out += seeds_table(runs, folds)
    for which, what in (("model", "the model, thresholds from validation"),
                        ("best", "the best baseline of each fold and run"),
                        ("default", "the breaker's default use of the model"),
                        ("calibrated", "the classical detector of each fold and run that warns of "
                                       "the most under the default's rule")):
        early, events = pooled(runs, folds, which)
        if events:
            out.append(f"- Pooled over the folds and seeds, {what}: {early} early warnings of "
                       f"{events} incidents ({100 * early / events:.1f} %).")
    both = seeds_overlap(runs, folds)
    if both:
        os_ = [overlap(rows, d) for rows in runs.values() for d in folds]
        out.append("\nWhich incidents they warn of (at most 1 false trip a day, thresholds from "
                   "validation), per seed: the model's, the best baseline's, those both warn of, "
                   "those every classical detector of the run warns of together, and those any "
                   "detector does (each seed's report has the section):\n")
        out += both
        out.append(f"- Pooled, the model warns early of {sum(o['model_alone'] for o in os_)} "
                   f"incidents the best baseline of its run does not, and the best baseline of "
                   f"{sum(o['baseline_alone'] for o in os_)} the model does not; both of "
                   f"{sum(o['both'] for o in os_)}.")
    if out_dir is not None:
        out.append(f"\nEach seed's whole report: `{seed_dir(out_dir, seeds[0])}/lodo.md` and the "
                   "others beside it.")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="directory holding nab/, nezha/ and smd_subset/")
    ap.add_argument("--out-dir", required=True, help="where the folds' models go")
    ap.add_argument("--traces", nargs="+", action="extend", default=[], metavar="DIR",
                    help="a directory of your own trace CSVs, a dataset of its own: held out in its "
                         "own fold, trained on in the others (--traces A B, or --traces A --traces B)")
    ap.add_argument("--folds", nargs="*", metavar="DATASET",
                    help="the datasets held out, each in its fold (default: every one: "
                         f"{', '.join(FOLDS)} and the --traces directories' names)")
    seed = ap.add_mutually_exclusive_group()
    # no default here: argparse takes a value equal to the default for no value, so --seed 7
    # --seeds 8 would pass (the default, 7, is set after parsing)
    seed.add_argument("--seed", type=int, help="the seed (default 7)")
    seed.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                      help="run the whole evaluation once per seed, each in DIR/seed-SEED/ with "
                           "its own report, and report the seeds side by side")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run this many folds (of any seed) at once, each in a process of its "
                         "own with its share of the cores (default 1: one after another)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch's and ONNX Runtime's threads in this process (default 0: every "
                         "core; with --jobs, each fold's share)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--hard-negatives", type=int, default=20000)
    ap.add_argument("--arch", default="zsl", help="train.py's --arch (the bundled model's: zsl)")
    ap.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                    help="train.py's --balance (the default, as for the bundled model)")
    ap.add_argument("--reuse", action="store_true",
                    help="score a fold's model already in --out-dir (with its .train.json) "
                         "instead of training it again")
    ap.add_argument("--report", help="write the markdown report here")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--from-json", metavar="FILE",
                    help="write the report from the rows and models of an earlier run's --json, "
                         "without training or scoring")
    a = ap.parse_args()
    if a.seed is None:
        a.seed = 7
    if a.epochs < 1:
        ap.error(f"--epochs {a.epochs}: at least 1 (each fold's model is its best epoch's)")
    if a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: at least 1")
    if a.threads < 0:
        ap.error(f"--threads {a.threads}: 0 (every core) or more")
    if a.seeds and len(set(a.seeds)) < len(a.seeds):
        ap.error(f"--seeds {_per_seed(a.seeds)}: a seed given twice")
    # Fail now, not after the folds' training: the directories the reports go to (a report
    # inside --out-dir is where it belongs: that directory is made once nothing is refused).
    def unless_inside(path):
        inside = path is not None and not os.path.isdir(path) and \
            os.path.dirname(os.path.abspath(path)) == os.path.abspath(a.out_dir)
        return None if inside else path

    missing = missing_out_dir(report=unless_inside(a.report), json=unless_inside(a.json))
    if missing:
        ap.error(missing)
    datasets.require(a.data, "lodo.py")
    if a.from_json:
        if not os.path.isfile(a.from_json):
            ap.error(f"--from-json {a.from_json}: no such file" if not os.path.exists(a.from_json)
                     else f"--from-json {a.from_json}: not a file")
        saved = json.load(open(a.from_json))
        if "seeds" in saved:  # a --seeds run's
            runs = {int(s): run for s, run in saved["seeds"].items()}
            models = next(iter(runs.values()))["models"]
            # the folds every seed has
            folds = [d for d in (a.folds or models) if all(d in run["models"] for run in runs.values())]
            text = seeds_report({s: run["rows"] for s, run in runs.items()}, folds, saved.get("out_dir"),
                                _notes(runs.values()))
        else:
            folds = [d for d in (a.folds or saved["models"]) if d in saved["models"]]
            text = report(saved["rows"], folds, saved["models"], saved.get("notes", []))
        print(text)
        if a.report:
            os.makedirs(a.out_dir, exist_ok=True)  # where a report inside it goes
            open(a.report, "w").write(text)
        return

    import model  # torch: only to train, not to read the report's rules
    import train
    if a.arch not in train.ARCHS:
        ap.error(f"--arch {a.arch}: expected one of {', '.join(train.ARCHS)}")

    # Your own traces first: a file that cannot be read fails now, not after a fold's training.
    try:
        own = read_datasets(a.traces, LODO_NEEDS)
    except ValueError as e:
        ap.error(f"--traces {e}")
    known = list(FOLDS) + list(own)
    unknown = [d for d in a.folds or () if d not in known]
    if unknown:
        ap.error(f"--folds {' '.join(unknown)}: expected some of {', '.join(known)}")
    folds = a.folds or known
    names = [file_name(d) for d in folds]
    clash = [d for d, n in zip(folds, names) if names.count(n) > 1]
    if clash:
        ap.error(f"--traces: {', '.join(clash)}: their folds' files would have one name, "
                 f"{file_name(clash[0])}; rename a directory")
    # A held-out directory whose validation or test part cannot be scored (no normal step in
    # it, or none a model scores) fails now, not after its fold's training.
    for (d, trs), path in zip(own.items(), a.traces):
        if d in folds:
            try:
                evaluate.check_scorable(trs, ranking_check=True)
            except ValueError as e:
                ap.error(f"--traces {path}: {e}")
    os.makedirs(a.out_dir, exist_ok=True)
    if a.seeds or a.jobs > 1:
        return several(a, folds)
    # A recipe with an anchor is also scored by its anchor alone (make_fixtures.silence_head).
    anchored = isinstance(model.build(a.arch), model.ZANet)
    sim = simulate.dataset(a.seed)
    pub = {**datasets.load_or_exit(a.data, "lodo.py"), **own}
    rows, infos = [], {}
    for d in folds:
        t0 = time.time()
        path = os.path.join(a.out_dir, f"lodo-{file_name(d)}.onnx")
        done = os.path.splitext(path)[0] + ".train.json"
        # The --traces datasets this fold trains on (in its .train.json, to be checked by --reuse).
        theirs = [n for n in own if n != d]
        if a.reuse and os.path.exists(path) and os.path.exists(done):
            print(f"== fold {d}: the model in {path}", flush=True)
            infos[d] = json.load(open(done))
            # A model trained otherwise would be reported under this run's recipe.
            made = (infos[d].get("arch", "conv"), infos[d].get("balance", False))
            if made != (a.arch, a.balance):
                ap.error(f"--reuse: {done} was trained with --arch {made[0]}"
                         f"{' --balance' if made[1] else ''}, not --arch {a.arch}"
                         f"{' --balance' if a.balance else ''}")
            if infos[d].get("seed", a.seed) != a.seed:
                ap.error(f"--reuse: {done} was trained with --seed {infos[d]['seed']}, not {a.seed} "
                         "(the seed also draws the simulator's traces)")
            if infos[d].get("traces", []) != theirs:
                ap.error(f"--reuse: {done} was trained on the --traces datasets "
                         f"[{', '.join(infos[d].get('traces', []))}], this fold's are [{', '.join(theirs)}]")
        else:
            print(f"== fold {d}: training without it", flush=True)
            infos[d] = train.fit(training_traces(d, sim, pub), path, a.seed, a.epochs, a.hard_negatives,
                                 arch=a.arch, balance=a.balance,
                                 log=lambda m: print("   ", m, flush=True), own_traces=tuple(theirs),
                                 threads=a.threads)
        anchor = None
        if anchored:
            import onnx
            anchor = os.path.splitext(path)[0] + ".anchor.onnx"
            onnx.save(make_fixtures.silence_head(path), anchor)
        rows += score_fold(d, path, a.data, sim, pub, anchor, a.threads)
        h = headline(rows, d, 1.0)
        print(f"   {d}: model {_recall(h['model'])}, best baseline {h['best']['detector']} "
              f"{_recall(h['best'])} ({time.time() - t0:.0f} s)", flush=True)
    text = report(rows, folds, infos, NOTES)
    print(text)
    if a.report:
        open(a.report, "w").write(text)
    if a.json:
        json.dump(dict(rows=rows, models=infos, notes=NOTES), open(a.json, "w"), indent=1, default=float)


def several(a, folds) -> int:
    """--seeds or --jobs: every fold of every seed in a process of its own, up to `a.jobs` at a
    time, then each seed's report (and with --seeds, the seeds side by side)."""
    seeds = a.seeds or [a.seed]
    outs = {s: seed_dir(a.out_dir, s) if a.seeds else a.out_dir for s in seeds}
    at_once = min(a.jobs, len(seeds) * len(folds))
    threads = a.threads or max(1, (os.cpu_count() or 1) // at_once)
    jobs = []
    for s, out in outs.items():
        os.makedirs(out, exist_ok=True)
        jobs += [(child_argv(a, s, d, threads, out), os.path.join(out, f"fold-{file_name(d)}.log"))
                 for d in folds]
    print(f"== {len(jobs)} runs (seeds {_per_seed(seeds)}; folds {', '.join(folds)}), "
          f"{at_once} at a time, {threads} thread{'s' if threads > 1 else ''} each", flush=True)
    failed = run_all(jobs, at_once, threads)
    if failed:
        for path, rc in failed:
            print(f"lodo.py: a fold failed (exit status {rc}); its output is in {path}", file=sys.stderr)
        return 1
    runs = {}
    for s, out in outs.items():
        runs[s] = merge([os.path.join(out, f"fold-{file_name(d)}.json") for d in folds])
        text = report(runs[s]["rows"], folds, runs[s]["models"], runs[s]["notes"])
        if a.seeds:
            with open(os.path.join(out, "lodo.json"), "w") as f:
                json.dump(runs[s], f, indent=1, default=float)
            with open(os.path.join(out, "lodo.md"), "w") as f:
                f.write(text)
    if a.seeds:
        text = seeds_report({s: run["rows"] for s, run in runs.items()}, folds, a.out_dir,
                            _notes(runs.values()))
    print(text)
    if a.report:
        with open(a.report, "w") as f:
            f.write(text)
    if a.json:
        saved = (dict(seeds={str(s): run for s, run in runs.items()}, out_dir=a.out_dir) if a.seeds
                 else runs[seeds[0]])
        with open(a.json, "w") as f:
            json.dump(saved, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
