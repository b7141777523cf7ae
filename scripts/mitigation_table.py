#!/usr/bin/env python3
"""Gain and forgetting per method at one epoch, from a report directory written by `emt report`.

Usage: python3 scripts/mitigation_table.py REPORT_DIR [--epoch N]

Prints one Markdown table per fine-tuning dataset (the one in docs/mitigation.md). Every figure is in points:
- gain: accuracy on the fine-tuned dataset minus the base's, pooled over seeds, with the report's 95% interval
  (learning_vs_forgetting.csv), then the per-seed values;
- change: the mean change on the other datasets, pooled, with its interval, then the per-seed values;
- drift: the share of the other datasets' answers that name a class of the fine-tuned dataset (answer_drift.csv),
  pooled over the other datasets and the seeds.
Reads only the report's own files; standard library only.
"""
import argparse
import csv
import json
import os
import sys


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pts(x):
    return f"{100 * x:+.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir")
    ap.add_argument("--epoch", type=int, default=None, help="epoch to tabulate (default: the last)")
    a = ap.parse_args()
    try:
        lvf = read_csv(os.path.join(a.report_dir, "learning_vs_forgetting.csv"))
        with open(os.path.join(a.report_dir, "report.json")) as f:
            rep = json.load(f)
    except OSError as e:
        sys.exit(f"mitigation_table: {e} (expected a directory written by `emt report`)")
    drift_path = os.path.join(a.report_dir, "answer_drift.csv")
    drift = read_csv(drift_path) if os.path.exists(drift_path) else []
    epoch = a.epoch if a.epoch is not None else max(int(r["epoch"]) for r in lvf)

    acc = {}  # (method, ft, epoch, eval) -> accuracy row
    for r in rep["accuracy"]:
        acc[(r["method"], r["finetune_dataset"], r["epoch"], r["eval_dataset"])] = r
    evals = rep["eval_datasets"]
    seeds = [str(s) for s in rep["seeds"]]

    def per_seed(method, ft):
        gains, changes = [], []
        for s in seeds:
            def at(e, d):
                row = acc.get((method, ft, e, d))
                if row is None or row.get("accuracy") is None:
                    return None
                if e == 0:
                    return row["accuracy"]  # the base: one model for every seed
                return (row.get("per_seed") or {}).get(s)
            g0, g = at(0, ft), at(epoch, ft)
            others = [(at(0, d), at(epoch, d)) for d in evals if d != ft]
            if g0 is None or g is None or any(b is None or x is None for b, x in others):
                continue
            gains.append(g - g0)
            changes.append(sum(x - b for b, x in others) / len(others))
        return gains, changes

    for ft in rep["finetune_datasets"]:
        rows = [r for r in lvf if r["finetune_dataset"] == ft and int(r["epoch"]) == epoch]
        if not rows:
            continue
        print(f"\nfine-tuned on {ft}, epoch {epoch} (points; 95% intervals pooled over {len(seeds)} seed(s))\n")
        print("| method | gain on " + ft + " | per seed | mean change on the others | per seed | drift (%) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            m = r["method"]
            gains, changes = per_seed(m, ft)
            d = [x for x in drift if x["method"] == m and x["finetune_dataset"] == ft and int(x["epoch"]) == epoch]
            n = sum(int(x["n"]) for x in d)
            k = sum(int(x["naming_finetuned"]) for x in d)
            drift_txt = f"{100 * k / n:.1f}" if n else "-"
            print(f"| `{m}` | {pts(float(r['gain']))} [{pts(float(r['gain_low']))}, {pts(float(r['gain_high']))}] | "
                  + " / ".join(pts(g) for g in gains) + " | "
                  + f"{pts(float(r['change']))} [{pts(float(r['change_low']))}, {pts(float(r['change_high']))}] | "
                  + " / ".join(pts(c) for c in changes) + f" | {drift_txt} |")


if __name__ == "__main__":
    main()
