"""Train the predictor and export it to ONNX.

    python train.py --out MODEL.onnx [--data PUBLIC_TRACES_DIR] [--traces DIR]...
                    [--seed 7] [--epochs 8] [--hard-negatives 20000] [--arch zsl]
                    [--balance | --no-balance]

The defaults are the bundled model's recipe: the anchored scan read off the long baseline
alone (model.ZSLNet, `zsl`), every dataset weighted equally.

Training data: the simulator's train traces, plus the train part of each public dataset
(time-ordered: NAB's first 48 % per file, Nezha's first day, SMD's train file, each without
its last 20 %, which is validation). Target: an SLO breach / labelled incident starts within
the next H steps (protocol.early_targets; H = 20 ticks on 500 ms traces, 6 steps on the public
data, see traces.headline_horizon), ignored inside incidents and their grace.
Validation picks the epoch; the test parts are never read here. `--traces DIR` (repeatable)
adds a directory of your own trace CSVs (`Recorder`'s), each file with a time-ordered `split`
column (`python traces.py split DIR` adds one); they are a dataset of their own, weighted like
the others.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import os
import time

import numpy as np
import torch
from torch import nn

import baseline
import datasets
import reference
import simulate
from model import ARCHS, build, export
from traces import HARNESS_DATASETS, headline_horizon, missing_out_dir, read_datasets, targets

NEG_PER_POS = 40



def sample(traces, part: str, rng, neg_per_pos=NEG_PER_POS, with_baseline=False):
    """Windows (with the long baseline's rows, with_baseline), targets and each window's dataset
    from the train or validation part of each trace."""
    xs, ys, ds = [], [], []
    for tr in traces:
        lo, hi = (0, tr.val_from) if part == "train" else (tr.val_from, tr.test_from)
        if hi <= lo:
            continue
        y = targets(tr)
        idx = np.arange(lo, hi)
        pos = idx[y[lo:hi] == 1]
        neg = idx[y[lo:hi] == 0]
        n_neg = max(len(pos) * neg_per_pos, 200)
        if len(neg) > n_neg:
            neg = rng.choice(neg, n_neg, replace=False)
        sel = np.sort(np.concatenate([pos, neg]))
        xs.append(baseline.inputs(tr.X, sel, with_baseline))
        ys.append((y[sel] == 1).astype(np.float32))
        ds += [tr.dataset] * len(sel)
    return np.concatenate(xs), np.concatenate(ys), np.array(ds)


def dataset_weights(ds: np.ndarray) -> np.ndarray:
    """A weight per window that gives each dataset the same total weight, so the largest (the
    simulator's) does not decide alone what the network learns."""
    names, inverse, counts = np.unique(ds, return_inverse=True, return_counts=True)
    return (len(ds) / (len(names) * counts))[inverse].astype(np.float32)


# With --balance, a dataset of fewer training windows than this is said to rest its equal share
# of the loss on too few (the public data's smallest, SMD's, has 1,600; a 70-row file, 42).
FEW_WINDOWS = 1000


def dataset_shares(ds: np.ndarray, y: np.ndarray, balance: bool, given=()) -> list:
    """The training log's lines on each dataset's windows: how many, how many positive, and
    with `balance` (dataset_weights) what each weighs; then a warning for a dataset whose
    equal share rests on fewer than FEW_WINDOWS windows (a directory of a short recording
    gets as much of the loss as the simulator's million), and a note for one with no positive
    window. A dataset of `given` (those trained on) with no window at all is warned of first:
    it is not trained on."""
    names, counts = np.unique(ds, return_counts=True)
    w = dataset_weights(ds) if balance else np.ones(len(ds), dtype=np.float32)
    out = [f"warning: {name}: no training window (no train part in its files, or each step of "
           "their train parts in an incident or ignored: the windows are the steps before an "
           "incident and healthy steps): it is not trained on"
           for name in sorted(set(given) - set(names))]
    for name, n in zip(names, counts):
        at = ds == name
        out.append(f"  {name}: {n} windows ({int(y[at].sum())} positive), each weighing "
                   f"{float(w[at][0]):.3g}, {100 * float(w[at].sum()) / float(w.sum()):.1f} % of the loss")
    largest = names[int(np.argmax(counts))]
    for name, n in zip(names, counts):
        if balance and n < FEW_WINDOWS and n < counts.max():
            out.append(f"warning: {name}: {n} windows weigh as much together as {largest}'s "
                       f"{counts.max()}, each {counts.max() / n:.0f} times one of those: so few are "
                       "learnt by heart. A file gives its windows before an incident and "
                       f"{NEG_PER_POS} healthy windows for each of those or 200, whichever is more, "
                       "however long it is (200 where its train part has no incident): record "
                       "incidents (faults injected throughout a recording, so that its train part "
                       "has them; or more recordings), or train with --no-balance")
        if not y[ds == name].any():
            # The public data's own train parts are as published (SMD's has no labelled
            # incident): what to record is advice for a directory of the user's.
            out.append(f"note: {name}: no positive window (no incident in its train part): it "
                       "teaches only what is normal" if name in HARNESS_DATASETS else
                       f"note: {name}: no positive window (no incident in its train part, by "
                       "default the first 60 % of each file after `traces.py split`): it teaches "
                       "only what is normal; inject faults throughout a recording, not only at "
                       "its end")
    return out


def train_epoch(net, opt, Xt, yt, pos_weight, wt=None) -> float:
    net.train()
    perm = torch.randperm(len(yt))
    total = 0.0
    for i in range(0, len(perm), 512):
        b = perm[i:i + 512]
        p = net(Xt[b]).squeeze(1).clamp(1e-6, 1 - 1e-6)
        w = torch.where(yt[b] > 0, pos_weight, torch.tensor(1.0))
        if wt is not None:
            w = w * wt[b]
        loss = nn.functional.binary_cross_entropy(p, yt[b], weight=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(b)
    return total / len(yt)


def predict(net, X: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(X[i:i + 8192])).squeeze(1).numpy()
                               for i in range(0, len(X), 8192)])


def validate(net, Xv, yva) -> float:
    from sklearn.metrics import average_precision_score
    return float(average_precision_score(yva, predict(net, Xv.numpy())))


def calibrate(net, traces) -> dict:
    """Platt scaling on every validation step that has a target (no subsampling: the natural
    base rate), so p_anomaly is a calibrated probability."""
    from sklearn.linear_model import LogisticRegression
    logits, ys = [], []
    net.eval()
    for tr in traces:
        lo, hi = tr.val_from, tr.test_from
        if hi <= lo:
            continue
        y = targets(tr)
        idx = lo + np.flatnonzero(y[lo:hi] >= 0)
        with torch.no_grad():
            for i in range(0, len(idx), 8192):
                x = torch.from_numpy(baseline.inputs(tr.X, idx[i:i + 8192], net.takes_baseline))
                logits.append(net.logit(x).squeeze(1).numpy())
        ys.append(y[idx])
    z = np.concatenate(logits)[:, None]
    y = np.concatenate(ys)
    lr = LogisticRegression(C=1e4).fit(z, y)
    scale, shift = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if scale <= 0:
        # The logit ranks validation steps the wrong way round (a model that learned nothing
        # that holds on this data): a negative scale would turn its ranking upside down.
        # Keep the model's order and fit the offset alone.
        scale, shift = 1.0, fit_shift(z[:, 0], y)
    net.scale.fill_(scale)
    net.shift.fill_(shift)
    return dict(scale=round(scale, 4), shift=round(shift, 4), steps=int(len(y)), base_rate=round(float(y.mean()), 5))


def fit_shift(z: np.ndarray, y: np.ndarray) -> float:
    """The b for which sigmoid(z + b) has the mean of y (Newton's method on the log-loss)."""
    b = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(z + b)))
        grad, hess = float((p - y).sum()), float((p * (1 - p)).sum()) + 1e-9
        b -= grad / hess
        if abs(grad) < 1e-6 * len(y):
            break
    return b


def hard_negatives(net, traces, n: int) -> np.ndarray:
    """The n normal train windows scored highest."""
    cand_x, cand_s = [], []
    for tr in traces:
        if tr.val_from <= 0:
            continue
        y = targets(tr)
        idx = np.flatnonzero(y[:tr.val_from] == 0)
        if len(idx) == 0:
            continue
        X = baseline.inputs(tr.X, idx, net.takes_baseline)
        sc = predict(net, X)
        keep = np.argsort(sc)[-max(1, n // 50):]
        cand_x.append(X[keep])
        cand_s.append(sc[keep])
    s = np.concatenate(cand_s)
    top = np.argsort(s)[-n:]
    return np.concatenate(cand_x)[top]


def fit(traces, out: str, seed: int = 7, epochs: int = 8, n_hard: int = 20000,
        public_data: bool = True, arch: str = "zsl", balance: bool = True, log=print,
        own_traces: tuple = (), threads: int = 0) -> dict:
    """Train on the train parts of `traces` (validation parts pick the epoch and calibrate),
    export the model to `out` with its reference answers, and write `<out>.train.json`.
    `threads`: torch's threads (0: every core; several trainings at once take fewer each)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    t0 = time.time()
    net = build(arch)
    Xtr, ytr, dtr = sample(traces, "train", rng, with_baseline=net.takes_baseline)
    Xva, yva, _ = sample(traces, "val", rng, with_baseline=net.takes_baseline)
    log(f"train windows {len(ytr)} ({int(ytr.sum())} positive), val {len(yva)} ({int(yva.sum())})"
        f" in {time.time() - t0:.0f} s")
    for line in dataset_shares(dtr, ytr, balance, {tr.dataset for tr in traces}):
        log(line)

    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    pos_weight = torch.tensor(float((1 - ytr).sum() / max(ytr.sum(), 1)) ** 0.5)
    Xt, yt = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    wt = torch.from_numpy(dataset_weights(dtr)) if balance else None
    Xv = torch.from_numpy(Xva)
    best = (-1.0, None, -1)
    for epoch in range(epochs):
        total = train_epoch(net, opt, Xt, yt, pos_weight, wt)
        ap_val = validate(net, Xv, yva)
        log(f"epoch {epoch}: loss {total:.4f}  val AUPRC {ap_val:.3f}  ({time.time() - t0:.0f} s)")
        if ap_val > best[0]:
            best = (ap_val, {k: v.clone() for k, v in net.state_dict().items()}, epoch)
    net.load_state_dict(best[1])
    if n_hard:
        # Within 0.02 of the first round's best, not of the last epoch kept: measured from
        # the last one kept, the bar went down with each epoch accepted.
        bar = best[0] - 0.02
        # Second round: the normal windows the first model likes most. A breaker may trip at
        # most about once a day, so the rare normal window that looks like a precursor (a
        # burst, a GC pause) matters more than the many that do not.
        Xh = hard_negatives(net, traces, n_hard)
        Xt = torch.cat([Xt, torch.from_numpy(Xh)])
        yt = torch.cat([yt, torch.zeros(len(Xh))])
        if wt is not None:
            wt = torch.cat([wt, torch.ones(len(Xh))])
        log(f"added {len(Xh)} hard negatives ({time.time() - t0:.0f} s)")
        for g in opt.param_groups:
            g["lr"] = 1e-3
        for epoch in range(epochs, epochs + epochs // 2):
            total = train_epoch(net, opt, Xt, yt, pos_weight, wt)
            ap_val = validate(net, Xv, yva)
            log(f"epoch {epoch}: loss {total:.4f}  val AUPRC {ap_val:.3f}  ({time.time() - t0:.0f} s)")
            if ap_val > bar:
                best = (ap_val, {k: v.clone() for k, v in net.state_dict().items()}, epoch)
        net.load_state_dict(best[1])
    calibration = calibrate(net, traces)
    log(f"calibrated: {calibration} ({time.time() - t0:.0f} s)")
    torch.save(net.state_dict(), os.path.splitext(out)[0] + ".pt")
    export(net, out)
    reference.write(out)
    info = dict(seed=seed, epochs=epochs, best_epoch=best[2], val_auprc=round(best[0], 4),
                train_windows=int(len(ytr)), train_positive=int(ytr.sum()), horizon={"500 ms ticks": headline_horizon(0.5), "minute steps": headline_horizon(60)},
                parameters=sum(p.numel() for p in net.parameters()),
                public_data=public_data, arch=arch, balance=balance, calibration=calibration, seconds=round(time.time() - t0))
    if own_traces:
        info["traces"] = list(own_traces)
    with open(os.path.splitext(out)[0] + ".train.json", "w") as f:
        json.dump(info, f, indent=1)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="directory holding nab/, nezha/ and smd_subset/ (optional)")
    # No default: one at the bundled model's path replaced the shipped model whenever a user
    # forgot the flag. (The bundled model is rebuilt with --out ../models/p_anomaly.onnx.)
    ap.add_argument("--out", required=True, metavar="MODEL.onnx",
                    help="where the model goes (its .train.json, .reference.json and .pt, the "
                         "PyTorch weights, beside it); "
                         "../models/p_anomaly.onnx rebuilds the bundled model")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--hard-negatives", type=int, default=20000,
                    help="normal windows the first model scores highest, added for a second round")
    ap.add_argument("--arch", default="zsl", choices=ARCHS,
                    help="the network (model.build): conv (the bundled model's until 1 December 2026), "
                         "robust, z, zb (z with the long baseline as a second input), zc (zb's inputs "
                         "squashed rather than clipped, and the classical detectors' scores), za (a robust "
                         "z-score against the long baseline, which zc's head may correct within a bound; "
                         "bundled until 2 December), zs (za whose z-score is a scan over the last 1, 3 "
                         "and 8 ticks; bundled on 2 December), zsl (zs whose head reads the long baseline "
                         "only: about half its inference cost; the bundled model's), zsw (zsl "
                         "whose scan weighs each channel by a learnt factor), zal (za "
                         "whose head reads the long baseline only: about 40 %% of its inference "
                         "cost), zam (za whose window branch takes one partial selection per "
                         "channel, not two)")
    ap.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                    help="give each dataset the same weight in training (dataset_weights; the default)")
    ap.add_argument("--traces", nargs="+", action="extend", default=[], metavar="DIR",
                    help="directories of your own trace CSVs to train on too (--traces A B, or "
                         "--traces A --traces B); each file needs a split column: python "
                         "traces.py split DIR")
    a = ap.parse_args()
    if a.epochs < 1:
        ap.error(f"--epochs {a.epochs}: at least 1 (the model is the best epoch's)")
    if a.data:
        datasets.require(a.data, "train.py")
    # Fail now, not after the training: the directory the model goes to.
    missing = missing_out_dir(out=a.out)
    if missing:
        ap.error(missing)

    # Your own traces first: a file that cannot be read fails now, not after the simulator's run.
    # Each directory is a dataset of its own (its weight in training, with --balance).
    try:
        own_traces = [t for trs in read_datasets(a.traces, need=("split", "train")).values() for t in trs]
    except ValueError as e:
        ap.error(f"--traces {e}")
    traces = simulate.dataset(a.seed)
    if a.data:
        for v in datasets.load_or_exit(a.data, "train.py").values():
            traces += v
    traces += own_traces
    info = fit(traces, a.out, a.seed, a.epochs, a.hard_negatives, public_data=bool(a.data),
               arch=a.arch, balance=a.balance, own_traces=tuple(a.traces))
    print(json.dumps(info))
    # The validation AUPRC above is pooled over every dataset trained on: it says little of a
    # service of yours. What does is the early-warning report.
    out = shlex.quote(a.out)
    traced = "".join(f" --traces {shlex.quote(d)}" for d in a.traces)
    data = f" --data {shlex.quote(a.data)}" if a.data else ""
    print(f"train.py: wrote {a.out}; next, score it on your traces beside the classical detectors "
          f"(and the shipped model, scored the same way): python evaluate.py --model {out}{traced} "
          "--traces-only --out report.md" if a.traces else
          f"train.py: wrote {a.out}; next, score it: python evaluate.py --model {out}{data} "
          "--out report.md", file=sys.stderr)


if __name__ == "__main__":
    main()
