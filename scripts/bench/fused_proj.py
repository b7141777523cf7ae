#!/usr/bin/env python3
"""Would fusing the decoder's projections pay on this machine? Times q/k/v as three matrix products against one
product with the concatenated weight (then split), and gate/up likewise, at the shapes of one training step of the
tiny and the small config, forward and forward + backward to the input (frozen weights, as under `linear` and
`lora`). Prints medians of 7 rounds after a warm-up, and the fused/separate ratio measured side by side.

  python3 scripts/bench/fused_proj.py [--threads 2]      # Debian's PyTorch 1.13: the kernels emt links
"""
import argparse
import statistics
import time

import torch


def timed(fn, reps):
    fn()
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(rounds)


def case(rows, d_in, outs, backward, reps):
    x = torch.randn(rows, d_in, requires_grad=backward)
    ws = [torch.randn(o, d_in) / d_in**0.5 for o in outs]
    fused = torch.cat(ws, 0)

    def run(parts):
        if backward:
            x.grad = None
            sum(p.sum() for p in parts).backward()

    sep = timed(lambda: run([x @ w.t() for w in ws]), reps)
    fus = timed(lambda: run((x @ fused.t()).split(list(outs), -1)), reps)
    return sep, fus


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads; ms per call, median of 7 rounds")
    print("| config | projections | rows x in -> outs | pass | separate | fused | fused/separate |")
    print("|---|---|---|---|---:|---:|---:|")
    # rows = batch x tokens of one training step: tiny 32 x ~64, small 8 x ~300 (emt bench train's shapes)
    for cfg, rows, d, ff, reps in [("tiny", 32 * 64, 128, 352, 20), ("small", 8 * 300, 512, 1376, 5)]:
        for name, outs in [("q,k,v", (d, d, d)), ("gate,up", (ff, ff))]:
            for backward in (False, True):
                sep, fus = case(rows, d, outs, backward, reps)
                shape = f"{rows} x {d} -> {'+'.join(map(str, outs))}"
                print(f"| {cfg} | {name} | {shape} | {'fwd+bwd' if backward else 'fwd'} | {sep:.3f} | {fus:.3f} "
                      f"| {fus / sep:.2f} |", flush=True)


if __name__ == "__main__":
    main()
