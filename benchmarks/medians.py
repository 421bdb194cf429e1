"""How fast is ``median_sgd.geometric_median``? Three comparisons, each a ratio measured in one run.

1. **Against the ``geom-median`` package** (Pillutla et al.'s reference implementation of
   Weiszfeld, GPL: installed in the benchmark environment only, never vendored) on the same
   float32 matrices, (n, d) in {(16, 1e6), (64, 65536), (512, 1024)}, clean and with 25%
   outliers, *at the same achieved objective*: geom-median runs with its defaults, its objective
   ``sum_i ||z - G_i||`` is evaluated in float64, and ours runs with the loosest ``tol`` of a
   ladder whose objective is no larger (up to a relative 1e-12: both then sit at float32's floor,
   where rounding the median moves the objective at second order). Both objectives, the
   iteration counts and the tolerance are recorded. Target: >= 2x on the CPU.
2. **The hardware floor.** An iteration must read the (n, d) matrix; ours reads it twice
   (distances, then the weighted sum). One iteration of the exact loop (``fixed_iter=True``, the
   difference of 22 and 2 iterations over 20) against a copy of the matrix (``clone``) and one
   read of it (``sum``), in the same run; where the 20 iterations cost less than the timings'
   spread, only that bound is recorded (``iteration_bound="at most"``). Target: an iteration
   costs at most 2.5 copies. The whole
   adaptive solve is reported in copies too (with few samples it iterates on the Gram matrix and
   touches the matrix only a few times).
3. **Many problems at once**: 256 independent (16, 64) problems (a quarter of the rows of each
   shifted away) in one batched call against a Python loop over them. Target: >= 20x.

On a GPU the same tables, plus bfloat16 inputs next to float32 for 2 and 3. Every timing is the
median of several repetitions after warm-up, with ``torch.cuda.synchronize()`` on a GPU
(``_harness.measure``).
"""

from __future__ import annotations

from typing import List

import torch

import median_sgd as ms

from ._harness import measure, measure_pair, print_table

SUITE = "medians"

SIZES = [(16, 1_000_000), (64, 65_536), (512, 1_024)]
QUICK_SIZES = [(16, 100_000), (64, 8_192), (512, 256)]
#: candidate tolerances for ours, loosest first: the first that matches geom-median's objective
TOLS = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
#: "the same objective": ours <= theirs * (1 + SLACK), in float64 (a float32 median is
#: optimal to ~1e-14 relative at best: rounding it moves the objective at second order)
SLACK = 1e-12
OUTLIER_SHIFT = 10.0

TARGET_VS_GEOM_MEDIAN = 2.0
TARGET_COPIES_PER_ITERATION = 2.5
TARGET_BATCHED = 20.0


def sample_matrix(n: int, d: int, outliers: bool, *, device, dtype=torch.float32, seed: int = 0):
    """``n`` standard normal rows in ``R^d``; with ``outliers`` the first quarter of the rows is
    shifted by ``OUTLIER_SHIFT`` in every coordinate (about 7 clean spreads away)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g)
    if outliers:
        G[: n // 4] += OUTLIER_SHIFT
    return G.to(device=device, dtype=dtype)


def objective(G: torch.Tensor, z: torch.Tensor) -> float:
    """``sum_i ||z - G_i||`` in float64 (one number)."""
    return float(ms.geometric_median_objective(G.double(), z.double()))


def vs_geom_median(device: torch.device, sizes, repeat: int) -> List[dict]:
    try:
        from geom_median.torch import compute_geometric_median
    except ImportError:
        print("\n[medians] geom-median is not installed (pip install -c ci/constraints.txt "
              "'geom-median>=0.1'): skipping the comparison with it")
        return []
    rows = []
    for n, d in sizes:
        for scenario in ("clean", "outliers"):
            G = sample_matrix(n, d, scenario == "outliers", device=device)
            G_theirs, their_device = G, device
            try:
                # weights on G's device (its default weights live on the CPU)
                ref = compute_geometric_median(G, torch.ones(n, device=device))
            except (TypeError, RuntimeError) as err:  # e.g. numpy on CUDA tensors
                print(f"[medians] geom-median fails on {device.type} ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:80]}); it runs on the CPU")
                G_theirs, their_device = G.cpu(), torch.device("cpu")
                ref = compute_geometric_median(G_theirs, torch.ones(n))
            ones = torch.ones(n, device=their_device)

            def theirs():
                return compute_geometric_median(G_theirs, ones)

            f_ref = objective(G_theirs, ref.median)
            for tol in TOLS:
                res = ms.geometric_median(G, tol=tol)
                f_ours = objective(G, res.median)
                if f_ours <= f_ref * (1 + SLACK):
                    break
            t_theirs, t_ours = measure_pair(theirs, lambda: ms.geometric_median(G, tol=tol), device,
                                            warmup=1, repeat=repeat)
            speedup = t_theirs["median_s"] / t_ours["median_s"]
            rows.append({
                "case": "vs geom-median", "n": n, "d": d, "scenario": scenario, "dtype": "float32",
                "geom_median_device": their_device.type,
                "geom_median_s": t_theirs["median_s"], "ours_s": t_ours["median_s"],
                "geom_median_iter": len(ref.logs) - 1, "ours_iter": int(res.n_iter), "ours_tol": tol,
                "geom_median_objective": f_ref, "ours_objective": f_ours,
                "objective_rel_diff": (f_ours - f_ref) / f_ref,
                "same_objective": f_ours <= f_ref * (1 + SLACK),
                "ratio": speedup, "target": TARGET_VS_GEOM_MEDIAN, "better": "higher",
                "met": bool(speedup >= TARGET_VS_GEOM_MEDIAN and f_ours <= f_ref * (1 + SLACK)),
            })
            G = G_theirs = ref = res = None  # free memory before the next size
    return rows


def hardware_floor(device: torch.device, sizes, dtypes, repeat: int) -> List[dict]:
    rows = []
    k1, k2 = 2, 22
    for dtype in dtypes:
        for n, d in sizes:
            G = sample_matrix(n, d, True, device=device, dtype=dtype)
            nbytes = G.numel() * G.element_size()
            with ms.value_checks(False):
                t_copy = measure(lambda: G.clone(), device, repeat=repeat, min_time=0.02)
                # a copy into memory already in use: no fresh pages from the OS (which a clone of
                # tens of MB pays on the CPU), the floor suite's unit
                out = torch.empty_like(G)
                t_copy_into = measure(lambda: out.copy_(G), device, repeat=repeat, min_time=0.02)
                out = None
                t_read = measure(lambda: G.sum(), device, repeat=repeat, min_time=0.02)
                t1 = measure(lambda: ms.geometric_median(G, fixed_iter=True, max_iter=k1, tol=0.0),
                             device, repeat=repeat, min_time=0.02)
                t2 = measure(lambda: ms.geometric_median(G, fixed_iter=True, max_iter=k2, tol=0.0),
                             device, repeat=repeat, min_time=0.02)
            t_solve = measure(lambda: ms.geometric_median(G), device, repeat=repeat, min_time=0.02)
            n_solve = int(ms.geometric_median(G).n_iter)
            # 20 more iterations may cost less than the timings' own spread (the Gram route
            # makes an iteration n-dimensional work): then only an upper bound is measured, the
            # spread over 20 iterations, never the difference of two noisy medians
            spread = max(t["max_s"] - t["min_s"] for t in (t1, t2))
            extra = t2["median_s"] - t1["median_s"]
            resolved = extra > spread
            t_iter = (extra if resolved else spread) / (k2 - k1)
            copies = t_iter / t_copy["median_s"]
            rows.append({
                "case": "hardware floor", "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
                "bytes": nbytes, "copy_s": t_copy["median_s"], "copy_into_s": t_copy_into["median_s"],
                "read_s": t_read["median_s"],
                "iteration_s": t_iter, "iteration_bound": "measured" if resolved else "at most",
                "solve_s": t_solve["median_s"], "solve_iter": n_solve,
                "copy_GBps": 2 * nbytes / t_copy["median_s"] / 1e9,  # a copy reads and writes
                "read_GBps": nbytes / t_read["median_s"] / 1e9,
                "iteration_GBps": nbytes / t_iter / 1e9,  # counting the one read it cannot avoid
                "floor_fraction": t_read["median_s"] / t_iter,  # 1 = an iteration costs one read
                "solve_copies": t_solve["median_s"] / t_copy["median_s"],
                "ratio": copies, "target": TARGET_COPIES_PER_ITERATION, "better": "lower",
                "met": bool(copies <= TARGET_COPIES_PER_ITERATION),
            })
            G = None  # free memory before the next size
    return rows


def batched(device: torch.device, dtypes, repeat: int, problems: int = 256, n: int = 16,
            d: int = 64) -> List[dict]:
    rows = []
    for dtype in dtypes:
        g = torch.Generator().manual_seed(1)
        G = torch.randn(problems, n, d, generator=g)
        G[:, : n // 4] += OUTLIER_SHIFT / 2
        G = G.to(device=device, dtype=dtype)
        t_loop, t_batch = measure_pair(lambda: [ms.geometric_median(x) for x in G],
                                       lambda: ms.geometric_median(G), device, warmup=1, repeat=repeat)
        together = ms.geometric_median(G)
        alone = torch.stack([ms.geometric_median(x).median for x in G])
        ratio = t_loop["median_s"] / t_batch["median_s"]
        rows.append({
            "case": "batched", "problems": problems, "n": n, "d": d,
            "dtype": str(dtype).replace("torch.", ""),
            "batched_s": t_batch["median_s"], "loop_s": t_loop["median_s"],
            "max_iter_used": int(together.n_iter.max()),
            "max_abs_diff": float((together.median.float() - alone.float()).abs().max()),
            "ratio": ratio, "target": TARGET_BATCHED, "better": "higher",
            "met": bool(ratio >= TARGET_BATCHED),
        })
    return rows


def run(device, *, quick: bool = False) -> List[dict]:
    """Rows of the three comparisons; each has ``ratio``, ``target``, ``better`` and ``met``."""
    device = torch.device(device)
    sizes = QUICK_SIZES if quick else SIZES
    repeat = 3 if quick else 7
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = vs_geom_median(device, sizes, repeat)
    if rows:
        print_table(f"geometric_median vs geom-median at the same objective ({device.type})", rows,
                    ["n", "d", "scenario", "geom_median_iter", "ours_iter", "ours_tol",
                     "objective_rel_diff", "geom_median_s", "ours_s", "ratio", "met"])
    floor = hardware_floor(device, sizes, dtypes, repeat)
    print_table(f"one Weiszfeld iteration against a copy of the matrix ({device.type})", floor,
                ["n", "d", "dtype", "copy_s", "read_s", "iteration_s", "iteration_bound", "copy_GBps",
                 "iteration_GBps",
                 "floor_fraction", "solve_iter", "solve_copies", "ratio", "met"])
    many = batched(device, dtypes, repeat)
    print_table(f"256 problems of (16, 64): one batched call vs a Python loop ({device.type})", many,
                ["problems", "n", "d", "dtype", "max_iter_used", "batched_s", "loop_s", "max_abs_diff",
                 "ratio", "met"])
    return rows + floor + many


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main

    main([SUITE])
