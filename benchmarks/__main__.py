"""``python -m benchmarks [SUITE ...] [--device cpu|cuda] [--quick] [--threads N]``: speed benchmarks.

Runs the named suites (default: every one present), prints each suite's tables, writes
``benchmarks/results/<suite>-<device type>.json`` (``<suite>-quick-<device type>.json`` with
``--quick``, so a quick look never overwrites the committed results), and ends with every ratio
against its target. A suite is a module ``benchmarks/<name>.py`` with
``run(device, *, quick=False) -> list[dict]``; one that is not there is skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from typing import List, Optional

import torch

from ._harness import device_name, load_average, write_results

#: every suite, in the order they run: ours (medians, sampler, Fig. 2), then BGmD and optimizers
SUITES = ("medians", "stable", "alpha_stable_experiment", "bgmd", "optim", "floor")


def _summary(results) -> None:
    lines = []
    for suite, rows in results:
        for r in rows:
            if "ratio" not in r or "target" not in r:
                continue
            what = ", ".join(f"{k}={r[k]}" for k in ("case", "config", "n", "d", "scenario", "alpha", "dtype")
                             if k in r)
            sign = ">=" if r.get("better", "higher") == "higher" else "<="
            lines.append(f"  {'ok  ' if r.get('met') else 'MISS'} {suite}: {what}: "
                         f"{r['ratio']:.3g} (target {sign} {r['target']:g})")
    if lines:
        print("\nEvery ratio against its target:")
        print("\n".join(lines))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"suites to run (default: all of {', '.join(SUITES)})")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repetitions (a smoke test, not numbers to quote)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, all cores)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    print(f"device: {device_name(device)}; torch {torch.__version__}; load average "
          f"{load_average()}")
    results = []
    for name in args.suites or SUITES:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"\n[{name}] benchmarks/{name}.py is not here: skipped")
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        rows = module.run(device, quick=args.quick)
        path = write_results(name + ("-quick" if args.quick else ""), rows, device)
        print(f"[{name}] {len(rows)} rows in {time.perf_counter() - start:.0f} s -> {path}")
        results.append((name, rows))
    _summary(results)
    print(f"\nload average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
