#!/usr/bin/env python3
"""Print the latest criterion results (target/criterion) as a markdown table.

Usage: python3 benches/table.py [target-dir]
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target") / "criterion"
rows = []
for est in sorted(root.glob("*/*/new/estimates.json")):
    bench = json.loads((est.parent / "benchmark.json").read_text())
    e = json.loads(est.read_text())
    mean = e["mean"]
    rows.append((bench["group_id"], bench.get("function_id") or bench.get("value_str") or "",
                 mean["point_estimate"], mean["confidence_interval"]["lower_bound"],
                 mean["confidence_interval"]["upper_bound"]))

def fmt(ns):
    return f"{ns / 1000:.1f} µs" if ns >= 10_000 else f"{ns:.1f} ns"

print("| group | benchmark | mean | 95 % CI |")
print("|---|---|---:|---:|")
for group, name, mean, lo, hi in rows:
    print(f"| {group} | {name} | {fmt(mean)} | {fmt(lo)} – {fmt(hi)} |")
