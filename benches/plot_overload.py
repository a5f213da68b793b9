"""Plot the overload benchmark's per-100 ms bins (the CSVs `--bin overload` writes).

    python3 benches/plot_overload.py target/overload docs/overload.png

Needs matplotlib (`pip install matplotlib`). One row of panels per scenario (steady, step,
ramp): gold success per bin, gold p99 per bin, total goodput per bin; one line per
configuration.
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "unprotected": "(a) unprotected",
    "tower": "(b) tower load_shed + concurrency_limit(16)",
    "admission": "(c) tower-degrade admission",
}
SCENARIOS = ["steady", "step", "ramp"]


def load(path):
    bins = defaultdict(dict)  # (config, class) -> t -> (sent, ok, p99)
    with open(path) as f:
        for row in csv.DictReader(f):
            t = float(row["t"])
            bins[(row["config"], row["class"])][t] = (
                int(row["sent"]),
                int(row["ok"]),
                float(row["p99_ms"]),
            )
    return bins


def main(src, out):
    src = Path(src)
    scenarios = [s for s in SCENARIOS if (src / f"{s}.csv").exists()]
    fig, axes = plt.subplots(len(scenarios), 3, figsize=(15, 3.6 * len(scenarios)), squeeze=False)
    for row, scenario in enumerate(scenarios):
        bins = load(src / f"{scenario}.csv")
        for config, label in LABELS.items():
            gold = bins.get((config, "gold"), {})
            if not gold:
                continue
            ts = sorted(gold)
            axes[row][0].plot(ts, [100.0 * gold[t][1] / max(gold[t][0], 1) for t in ts], label=label)
            axes[row][1].plot(ts, [gold[t][2] for t in ts], label=label)
            total = defaultdict(int)
            for cls in ("gold", "silver", "bronze"):
                for t, (_, ok, _) in bins.get((config, cls), {}).items():
                    total[t] += ok
            tt = sorted(total)
            axes[row][2].plot(tt, [total[t] * 10 for t in tt], label=label)
        axes[row][0].set_title(f"{scenario}: gold success per 100 ms (%)")
        axes[row][1].set_title(f"{scenario}: gold p99 from intended send (ms)")
        axes[row][1].axhline(50, color="grey", linestyle="--", linewidth=0.8)
        axes[row][1].set_yscale("log")
        axes[row][2].set_title(f"{scenario}: goodput (served/s)")
        for ax in axes[row]:
            ax.set_xlabel("s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
