"""``median_sgd.sample_stable`` against ``scipy.stats.levy_stable.rvs``: 10**6 symmetric
alpha-stable samples. Target: >= 10x.

Both draw by the Chambers-Mallows-Stuck method (scipy in numpy, single-threaded; ours in torch,
in float64 on the CPU and rounded to the requested dtype). scipy runs on the CPU on every device;
ours on the device, with its own seeded generator. Each row also times the two uniform draws
per sample that ``sample_stable`` makes with that generator (the same stream it must keep): no
evaluation of the formula can be faster than them.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

import median_sgd as ms

from ._harness import measure_interleaved, print_table

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
            work = torch.float32 if device.type == "mps" else torch.float64
            t_scipy, t_ours, t_rng = measure_interleaved([
                lambda: scipy.stats.levy_stable.rvs(alpha, 0.0, size=N, random_state=rng),
                lambda: ms.sample_stable(alpha, N, generator=gen, device=device, dtype=dtype),
                # the uniforms sample_stable draws (two per sample): its floor with this generator
                lambda: (torch.rand(N, generator=gen, device=device, dtype=work),
                         torch.rand(N, generator=gen, device=device, dtype=work)),
            ], device, warmup=1, repeat=repeat)
            ratio = t_scipy["median_s"] / t_ours["median_s"]
            rows.append({
                "case": "sample_stable vs scipy", "alpha": alpha, "samples": N,
                "dtype": str(dtype).replace("torch.", ""), "scipy_s": t_scipy["median_s"],
                "ours_s": t_ours["median_s"], "uniforms_s": t_rng["median_s"],
                "uniforms_fraction": t_rng["median_s"] / t_ours["median_s"],
                "ratio_if_only_uniforms": t_scipy["median_s"] / t_rng["median_s"],
                "ratio": ratio, "target": TARGET, "better": "higher", "met": bool(ratio >= TARGET),
            })
    print_table(f"sample_stable vs scipy.stats.levy_stable.rvs, {N:.0e} samples ({device.type})", rows,
                ["alpha", "dtype", "scipy_s", "ours_s", "uniforms_s", "uniforms_fraction",
                 "ratio_if_only_uniforms", "ratio", "met"])
    return rows


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main

    main([SUITE])
