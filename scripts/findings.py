#!/usr/bin/env python3
"""The EMT paper's claims, measured on a study run: reads RUN_DIR/results.jsonl (primary scorer) and prints the
markdown tables of docs/findings.md. Per-measurement intervals are the rows' Wilson 95% intervals; across seeds,
the mean with a Student-t 95% interval and the spread (min..max).

usage: scripts/findings.py RUN_DIR [--scorer strict]
"""
import argparse
import json
import math
import statistics
import sys
from collections import defaultdict

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(xs):
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    h = T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - h, m + h


def pct(x):
    return "n/a" if x != x else f"{100 * x:.1f}"


def fmt_ci(xs):
    m, lo, hi = mean_ci(xs)
    spread = f"{pct(min(xs))}..{pct(max(xs))}" if len(xs) > 1 else "one seed"
    return f"{pct(m)} [{pct(lo)}, {pct(hi)}] ({spread})"


def load(run_dir, scorer):
    rows = []
    with open(f"{run_dir}/results.jsonl") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if r["scorer"] in (scorer, "clip_zero_shot"):
                rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--scorer", default="strict")
    a = ap.parse_args()
    rows = load(a.run_dir, a.scorer)
    base = {r["eval_dataset"]: r for r in rows if r["kind"] == "mllm" and r["method"] == "base"}
    clip = {r["eval_dataset"]: r for r in rows if r["kind"] == "clip_zero_shot"}
    acc = {}  # (ft, method, seed, epoch, eval) -> accuracy
    for r in rows:
        if r["kind"] == "mllm" and r["method"] != "base":
            acc[(r["finetune_dataset"], r["method"], r["seed"], r["epoch"], r["eval_dataset"])] = r["accuracy"]
    datasets = sorted(base)
    fts = sorted({k[0] for k in acc})
    methods = sorted({k[1] for k in acc})
    seeds = sorted({k[2] for k in acc})
    last = max(k[3] for k in acc) if acc else 0
    if not base or not acc:
        sys.exit(f"{a.run_dir}: no base rows or no fine-tuned rows for scorer {a.scorer}")

    print("### Base model and its vision encoder\n")
    print("| dataset | MLLM (EMT prompt) [95% CI] | CLIP zero-shot [95% CI] | MLLM - CLIP |")
    print("| --- | --- | --- | --- |")
    for d in datasets:
        b, c = base[d], clip.get(d)
        line = f"| {d} | {pct(b['accuracy'])} [{pct(b['ci_low'])}, {pct(b['ci_high'])}] | "
        if c:
            line += f"{pct(c['accuracy'])} [{pct(c['ci_low'])}, {pct(c['ci_high'])}] | {pct(b['accuracy'] - c['accuracy'])} |"
        else:
            line += "n/a | n/a |"
        print(line)

    def gain(ft, m, s, e):
        return acc[(ft, m, s, e, ft)] - base[ft]["accuracy"]

    def others(ft, m, s, e):
        ds = [d for d in datasets if d != ft]
        return statistics.fmean(acc[(ft, m, s, e, d)] - base[d]["accuracy"] for d in ds)

    print(f"\n### Learning and forgetting per cell (epoch {last}, mean over seeds {seeds}, points)\n")
    print("| fine-tuned on | method | gain on it [95% CI] (spread) | mean change on the others [95% CI] (spread) |")
    print("| --- | --- | --- | --- |")
    for ft in fts:
        for m in methods:
            ok = [s for s in seeds if all((ft, m, s, last, d) in acc for d in datasets)]
            if not ok:
                continue
            print(f"| {ft} | {m} | {fmt_ci([gain(ft, m, s, last) for s in ok])} | "
                  f"{fmt_ci([others(ft, m, s, last) for s in ok])} |")

    print("\n### Every dataset at every epoch (mean over seeds, %)\n")
    print("| fine-tuned on | method | epoch | " + " | ".join(datasets) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in datasets) + " |")
    for ft in fts:
        for m in methods:
            for e in range(1, last + 1):
                vals = []
                for d in datasets:
                    xs = [acc[(ft, m, s, e, d)] for s in seeds if (ft, m, s, e, d) in acc]
                    vals.append(pct(statistics.fmean(xs)) if xs else "")
                print(f"| {ft} | {m} | {e} | " + " | ".join(vals) + " |")

    if {"linear", "lora"} <= set(methods):
        print(f"\n### LoRA vs linear: forgetting (mean change on the other datasets, epoch {last}, paired by seed)\n")
        print("| fine-tuned on | lora - linear [95% CI] (spread) |")
        print("| --- | --- |")
        for ft in fts:
            ok = [s for s in seeds if all((ft, m, s, last, d) in acc for m in ("linear", "lora") for d in datasets)]
            if ok:
                print(f"| {ft} | {fmt_ci([others(ft, 'lora', s, last) - others(ft, 'linear', s, last) for s in ok])} |")
        print("\n### One epoch of linear: change on each other dataset (points, mean over seeds)\n")
        print("| fine-tuned on | other dataset | change [95% CI] (spread) |")
        print("| --- | --- | --- |")
        for ft in fts:
            for d in datasets:
                if d == ft:
                    continue
                xs = [acc[(ft, "linear", s, 1, d)] - base[d]["accuracy"] for s in seeds if (ft, "linear", s, 1, d) in acc]
                if xs:
                    print(f"| {ft} | {d} | {fmt_ci(xs)} |")


if __name__ == "__main__":
    main()
