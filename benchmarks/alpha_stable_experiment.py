"""The workshop paper's alpha-stable experiment (its Fig. 2) at full size, as one vectorised run.

d = 10, tau = 0.01, 1000 iterations, 50 seeds, every noise level and every estimator
(``median_sgd.experiments.stable_noise.simulate``: the paper's three SPP estimators and their
three SGD versions, all (alpha, seed) pairs advanced by the same tensor operations). The ``ci``
config has the 11 noise levels 1/alpha = 0.5, 0.6, ..., 1.5 of Fig. 2, the ``paper`` config
samples the same range twice as finely (21). Target: under 10 s on the CPU.
"""

from __future__ import annotations

from typing import List

import torch

from ._harness import measure, print_table

SUITE = "alpha_stable_experiment"
TARGET_S = 10.0


def run(device, *, quick: bool = False) -> List[dict]:
    """One row per config: seconds of one ``simulate`` call (``ratio`` = seconds)."""
    try:
        from median_sgd.experiments import stable_noise
    except ImportError:
        print("\n[alpha_stable_experiment] median_sgd.experiments.stable_noise is missing: skipped")
        return []
    device = torch.device(device)
    rows = []
    for name in ("ci",) if quick else ("ci", "paper"):
        cfg = stable_noise.CONFIGS[name]
        t = measure(lambda: stable_noise.simulate(cfg, device=device), device, warmup=1,
                    repeat=1 if quick else 3)
        rows.append({
            "case": "alpha-stable experiment", "config": name, "alphas": len(cfg.inv_alphas),
            "estimators": len(cfg.estimators), "seeds": cfg.seeds, "steps": cfg.steps, "d": cfg.dim,
            "dtype": "float64", "seconds": t["median_s"], "min_s": t["min_s"], "max_s": t["max_s"],
            "ratio": t["median_s"], "target": TARGET_S, "better": "lower",
            "met": bool(t["median_s"] < TARGET_S),
        })
    print_table(f"Fig. 2 (alpha-stable noise) at full size, one batched run ({device.type})", rows,
                ["config", "alphas", "estimators", "seeds", "steps", "d", "seconds", "min_s", "max_s",
                 "met"])
    return rows


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main

    main([SUITE])
