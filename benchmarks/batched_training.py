"""The batched trainer (``bgmd_training.train_runs``) against run by run (``train``), R = 20.

Issue 16: R independent runs of one method (seeds x fractions x attacks) trained as one program
(stacked parameters, ``vmap`` over the runs, the aggregator over a leading run dimension) instead
of one after the other. Both sides train the same runs at Table 2's ci scale (the digits, the
tiny CNN, 10 clients x 16) for the ci scale's 15 epochs (``EPOCHS``); the timings include everything each side does
(model construction, sampling, attacks, aggregation, evaluation). Batched and run by run
alternate (B, L, B, L, ...) in one process, so load drift hits both. Each row also records the
largest relative gap between the two sides' train losses (the equality the tests assert).

``python -m benchmarks.batched_training [--quick]`` writes
``benchmarks/results/batched-training-<device type>.json``; it is not in the default suite list
(minutes on a CPU).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import List

import torch

from ._harness import RESULTS, load_average, print_table, write_results

SUITE = "batched-training"
#: the R = 20 runs: five seeds x (clean, bit flip 20%, impulse 20%, backdoor 40%)
RUNS = tuple((attack, psi, seed) for seed in range(5)
             for attack, psi in (("none", 0.0), ("bit_flip", 0.2), ("impulse", 0.2), ("backdoor", 0.4)))
#: the ci scale's whole run (Table 2's ci config): what chapter 12 trains
EPOCHS = 15.0


def _largest_gap(batched: List[dict], looped: List[dict]) -> float:
    gaps = [abs(a["train_loss"] - b["train_loss"]) / max(abs(b["train_loss"]), 1e-12)
            for a, b in zip(batched, looped)
            if math.isfinite(b["train_loss"]) and b["train_loss"] < 1e3]
    return max(gaps, default=0.0)


def run(device, *, quick: bool = False) -> List[dict]:
    from median_sgd.experiments import bgmd_experiments as be
    from median_sgd.experiments import bgmd_training as bt

    device = torch.device(device)
    cfg = dataclasses.replace(be.CONFIGS["ci"].table2, epochs=0.25 if quick else EPOCHS)
    runs = RUNS[:4] if quick else RUNS
    data = bt.load_images(cfg.dataset, seed=cfg.data_seed)
    repeat = 1 if quick else 2
    rows = []
    for m in cfg.methods:
        bt.train_runs(cfg, m, runs[:2], data=data, device=device)  # warm-up (vmap, allocator)
        batched_s, looped_s = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            batched = bt.train_runs(cfg, m, runs, data=data, device=device)
            batched_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            looped = [r for a, p, s in runs for r in bt.train(cfg, m, a, p, s, data=data, device=device)]
            looped_s.append(time.perf_counter() - start)
        b, l_ = min(batched_s), min(looped_s)
        rows.append({"case": m.label, "R": len(runs), "seeds": sorted({s for _, _, s in runs}),
                     "runs": [list(r) for r in runs], "epochs": cfg.epochs,
                     "iterations": looped[len(looped) // len(runs) - 1]["iteration"],
                     "batched_s": b, "run_by_run_s": l_, "batched_all_s": batched_s,
                     "run_by_run_all_s": looped_s, "ratio": l_ / b,
                     "max_rel_gap_train_loss": _largest_gap(batched, looped),
                     "load_average": load_average()})
        print(f"{m.label}: batched {b:.2f} s, run by run {l_:.2f} s, x{l_ / b:.2f}", flush=True)
    print_table(f"batched vs run by run, R = {len(runs)}, ci scale, {cfg.epochs:g} epochs", rows,
                ["case", "R", "iterations", "batched_s", "run_by_run_s", "ratio",
                 "max_rel_gap_train_loss"])
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    dev = torch.device("cpu")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result_rows = run(dev, quick=quick)
    for row in result_rows:
        row["started_utc"] = started
    name = f"{SUITE}-quick-{dev.type}.json" if quick else f"{SUITE}-{dev.type}.json"
    print(write_results(SUITE, result_rows, dev, path=RESULTS / name))
