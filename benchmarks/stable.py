"""``median_sgd.sample_stable`` against ``scipy.stats.levy_stable.rvs``: 10**6 symmetric
alpha-stable samples. Target: >= 10x.

Both draw by the Chambers-Mallows-Stuck method (scipy in numpy, single-threaded; ours in torch,
in float64 on the CPU and rounded to the requested dtype). scipy runs on the CPU on every device;
ours on the device, with its own seeded generator.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

import median_sgd as ms

from ._harness import measure_pair, print_table

SUITE = "stable"
N = 10**6
ALPHAS = (0.5, 1.0, 1.5, 1.9, 2.0)
TARGET = 10.0


def run(device, *, quick: bool = False) -> List[dict]:
    """One row per (alpha, dtype): seconds of each and ``ratio`` = scipy / ours."""
    import scipy.stats

    device = torch.device(device)
    alphas = (0.5, 1.5) if quick else ALPHAS
    repeat = 3 if quick else 7
    rows = []
    for alpha in alphas:
        rng = np.random.RandomState(0)
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator(device=device).manual_seed(0)
            t_scipy, t_ours = measure_pair(
                lambda: scipy.stats.levy_stable.rvs(alpha, 0.0, size=N, random_state=rng),
                lambda: ms.sample_stable(alpha, N, generator=gen, device=device, dtype=dtype),
                device, warmup=1, repeat=repeat)
            ratio = t_scipy["median_s"] / t_ours["median_s"]
            rows.append({
                "case": "sample_stable vs scipy", "alpha": alpha, "samples": N,
                "dtype": str(dtype).replace("torch.", ""), "scipy_s": t_scipy["median_s"],
                "ours_s": t_ours["median_s"], "ratio": ratio, "target": TARGET, "better": "higher",
                "met": bool(ratio >= TARGET),
            })
    print_table(f"sample_stable vs scipy.stats.levy_stable.rvs, {N:.0e} samples ({device.type})", rows,
                ["alpha", "dtype", "scipy_s", "ours_s", "ratio", "met"])
    return rows


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main

    main([SUITE])
