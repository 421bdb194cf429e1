"""BGmD's aggregation (k = 0.1 d) against the full geometric median of the same (n, d) matrix.

The paper's point (Acharya et al. 2022, Proposition 1, Lemma 2): the geometric median costs
``O(d / eps^2)`` per aggregation, BGmD ``O(k / eps^2 + n d)``, so with ``k = 0.1 d`` it should be
several times faster when the Weiszfeld iterations dominate. Issue 15's target: BGmD (k = d/10)
converged at least 1.5x faster than our converged full geometric median, in both selection
modes (``norm`` and ``topk``), at n = 32, d = 1,000,000 (32 x 10^6 entries), clean and under bit
flips; the other sizes are reported for context (chapter "Block geometric median descent",
"When does BGmD pay?").

Matrices look like a step of corrupted distributed training: a common gradient ``g`` with
log-normal coordinate scales (so a few columns carry most of the mass), per-row noise of the same
scales, and in the ``bit_flip`` scenario 20% of the rows replaced by ``-100 g_i`` (Section 7.2).
Rows per size and scenario:

* ``converged norm`` and ``converged topk``: both call the library's default solver to its
  default tolerance. For few rows (``n <= 64``) ``geometric_median`` iterates on the ``n x n``
  Gram matrix, so a full geometric median costs one ``O(n^2 d)`` product and a few passes: BGmD
  saves only what its own pass over the columns (norms) and its gather do not spend again;
* ``fixed 20`` and ``fixed 100`` (norm sampling): both run exactly that many plain Weiszfeld
  iterations (``fixed_iter=True``, no host synchronisation; 100 is the authors' ``max_iter``),
  the cost model of the paper's Proposition 1, where the speedup tends to ``d / k`` once the
  iterations dominate BGmD's ``O(n d)`` selection. Context, no target.

``copies`` is BGmD's time in copies of ``G`` (``copy_`` into a preallocated matrix). ``ratio`` is
the ratio of the medians (over ``repeat`` interleaved rounds; three times as many at the target
size); ``pair_ratio_q1``, ``pair_ratio_median`` and ``pair_ratio_q3`` are the quartiles of the
ratios within each round, which show how far one run's ratio can be trusted.

``map`` rows (the chapter "How fast is a median?", "When does BGmD pay?"): converged BGmD (norm
sampling; ``map topk``: the authors' top-k, at k = d/10 only) against the converged full
geometric median over ``n`` in {8, 32, 128}, ``d`` in {10^4, 10^5, 10^6} and ``k/d`` in
{0.01, 0.1, 0.3}, clean and under bit flips; the full median and every block size of one matrix
are timed interleaved. Each row also carries the parts of the cost model
(:func:`cost_model`), each timed on its own at that size (in the same interleaved series), and
the ratio it predicts
(``predicted_ratio``) from the measured iteration counts. The map's times are the *minimum* over
the repetitions (the other rows: the median), and on the CPU they are the process's CPU time
(``time.process_time``, one thread), not wall-clock time: on a shared machine with more jobs
than cores a wall clock also counts the time the others hold the core, which the minimum of a
few repetitions does not remove.

Both sides run with value checks off (``median_sgd.value_checks(False)``): the finiteness check
of the full matrix would otherwise add the same O(n d) pass to both. BGmD runs with the paper's
mean memory, which is warm (non-zero) after the warm-up calls. The full geometric median and
BGmD are timed interleaved (``measure_pair``), so load drifts hit both.
"""

from __future__ import annotations

import time
from typing import List

import torch

import median_sgd as ms

from median_sgd.bgmd import column_stats, select_from_squares, take_columns

from ._harness import measure, measure_interleaved, measure_pair, pair_ratios, print_table

SUITE = "bgmd"
TARGET = 1.5  # converged BGmD at least 1.5x faster than the converged full geometric median ...
TARGET_SIZE = (32, 1_000_000)  # ... at n = 32, d = 1e6 (issue 15), in both selection modes


def gradient_matrix(n: int, d: int, *, flip: float, device, dtype=torch.float32, seed: int = 0):
    """``n`` noisy copies of a gradient with log-normal coordinate scales; a ``flip`` fraction
    of the rows scaled by -100 (the paper's scaled bit flip)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = torch.exp(1.5 * torch.randn(d, generator=g))
    grad = scale * torch.randn(d, generator=g)
    G = grad + scale * torch.randn(n, d, generator=g)
    bad = int(flip * n)
    G[:bad] *= -100.0
    return G.to(device=device, dtype=dtype)


MAP_NS = (8, 32, 128)
MAP_DIMS = (10**4, 10**5, 10**6)
MAP_FRACTIONS = (0.01, 0.1, 0.3)
TOPK_FRACTION = 0.1  # the "map topk" rows: the authors' selection at k = d/10 only
# geometric_median's rule for its Gram pre-iteration (median_sgd.weiszfeld.local_weiszfeld)
GRAM_MAX_N, GRAM_MIN_SIZE = 64, 1 << 16


def uses_gram(n: int, d: int) -> bool:
    """Whether the adaptive ``geometric_median`` of an ``(n, d)`` matrix iterates on its Gram matrix."""
    return n <= GRAM_MAX_N and n * d >= GRAM_MIN_SIZE


def gm_model(n: int, d: int, iters: int, *, read_s: float, pass_s: float, gemm_s: float,
             step_s: float, call_s: float) -> float:
    """Seconds of a converged ``geometric_median``: ``call + 2 read + (1 + I) pass`` (plain),
    ``call + 2 read + gemm + 2 pass + (I - 1) step`` (Gram).

    The two reads are the mean (the start) and ``max |G|`` (the scaling); a pass is one exact
    Weiszfeld iteration over ``G`` (the first gives the start's distances); on the Gram route the
    ``n x n`` product replaces all but one confirming exact iteration, and each of its ``I - 1``
    iterations costs a ``step``: the fixed cost of an iteration's small operations, whatever ``d``.
    """
    if uses_gram(n, d):
        return call_s + 2 * read_s + gemm_s + 2 * pass_s + max(iters - 1, 0) * step_s
    return call_s + 2 * read_s + (1 + iters) * pass_s


def cost_model(n: int, d: int, k: int, gm_iter: int, bgmd_iter: int, parts: dict) -> dict:
    """The times a converged full geometric median and a converged BGmD step should take, from
    the measured iteration counts and the parts measured on their own at that size.

    ``parts``: ``read_s`` (one read of ``G``: ``G.sum()``), ``pass_s`` (one exact Weiszfeld
    iteration over ``G``), ``gemm_s`` (``G @ G.T``), ``stats_s`` (BGmD's column statistics: two
    reads, ``max |G|`` and the sums and squares), ``select_s`` (the block's selection from the
    ``d`` squared norms: ``O(d)``, whatever ``n``), ``gather_s`` (the ``k`` columns), and the
    machine's fixed costs ``step_s`` (an iteration of a tiny problem), ``call_s`` (a call of
    ``geometric_median`` less its iterations) and ``bgmd_call_s`` (a BGmD step less its parts).
    BGmD's block median is :func:`gm_model` of the ``(n, k)`` block, its reads, passes and
    product ``k / d`` of the full matrix's (a pass no less than a ``step``). Returns
    ``{gm_model_s, bgmd_model_s, block_gm_model_s, predicted_ratio}``.
    """
    frac = k / d
    step = parts["step_s"]
    full = gm_model(n, d, gm_iter, read_s=parts["read_s"], pass_s=parts["pass_s"],
                    gemm_s=parts["gemm_s"], step_s=step, call_s=parts["call_s"])
    block = gm_model(n, k, bgmd_iter, read_s=frac * parts["read_s"],
                     pass_s=step + frac * max(parts["pass_s"] - step, 0.0),
                     gemm_s=frac * parts["gemm_s"], step_s=step, call_s=parts["call_s"])
    bgmd = parts["bgmd_call_s"] + parts["stats_s"] + parts["select_s"] + parts["gather_s"] + block
    return {"gm_model_s": full, "bgmd_model_s": bgmd, "block_gm_model_s": block,
            "predicted_ratio": full / bgmd}


def map_clock(device: torch.device):
    """The map's clock: the process's CPU time on the CPU, wall-clock time elsewhere."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


def _fixed_costs(device, repeat: int) -> dict:
    """``step_s``, ``call_s`` and ``bgmd_call_s`` on a tiny ``(8, 64)`` matrix, where every
    operation costs its fixed (dispatch) cost rather than memory traffic."""
    G = gradient_matrix(8, 64, flip=0.0, device=device)

    def gm(m):
        return lambda: ms.geometric_median(G, max_iter=m, fixed_iter=True)

    one, many = measure_interleaved([gm(1), gm(21)], device, warmup=3, repeat=repeat,
                                    clock=map_clock(device))
    step = max((many["min_s"] - one["min_s"]) / 20, 0.0)
    call = max(one["min_s"] - 2 * step, 0.0)  # mean, max |G|, the first pass and one step
    gen = torch.Generator(device=device).manual_seed(0)
    agg = ms.BGmD(8, memory="mean", generator=gen, fixed_iter=True, max_iter=1)
    agg(G)
    idx = agg.last_block
    sq = column_stats(G, agg.memory)[2]
    block = take_columns(G, idx)
    t = measure_interleaved([lambda: agg(G), lambda: column_stats(G, agg.memory),
                             lambda: select_from_squares(sq, 8, "norm", gen, 2.0),
                             lambda: take_columns(G, idx),
                             lambda: ms.geometric_median(block, max_iter=1, fixed_iter=True)],
                            device, warmup=3, repeat=repeat, clock=map_clock(device))
    bgmd_call = max(t[0]["min_s"] - sum(x["min_s"] for x in t[1:]), 0.0)
    return {"step_s": step, "call_s": call, "bgmd_call_s": bgmd_call}


def _size_parts(G, device) -> tuple:
    """The timed functions of ``read_s``, ``pass_s`` and ``gemm_s`` of one matrix (see
    :func:`cost_model`) and how to turn their times into those parts."""
    n, d = G.shape
    passes = 5  # pass_s = (T(1 + passes) - T(1)) / passes: a difference of two longer solves

    def gm(m):
        return lambda: ms.geometric_median(G, max_iter=m, fixed_iter=True)

    fns = [lambda: G.sum(), gm(1), gm(1 + passes)]
    if uses_gram(n, d):
        fns.append(lambda: torch.matmul(G, G.mT))

    def parts(t):
        return {"read_s": t[0], "pass_s": max((t[2] - t[1]) / passes, 0.0),
                "gemm_s": t[3] if len(t) > 3 else 0.0}

    return fns, parts


def _block_parts(G, agg, k: int, mode: str, device) -> tuple:
    """The timed functions of ``select_s`` and ``gather_s`` of BGmD's step on ``G`` with block
    size ``k`` (the column statistics cost the same for every block: timed once)."""
    gen = torch.Generator(device=device).manual_seed(1)
    sq = column_stats(G, agg.memory)[2]
    idx = select_from_squares(sq, k, mode, gen, 2.0)
    return [lambda: select_from_squares(sq, k, mode, gen, 2.0), lambda: take_columns(G, idx)]


def map_rows(device: torch.device, *, quick: bool = False, ns=None, dims=None) -> List[dict]:
    """The ``"map"`` and ``"map topk"`` rows: ``{case, n, d, k, k_frac, scenario, gm_s, bgmd_s,
    ratio, gm_iter, bgmd_iter, gram, read_s, pass_s, gemm_s, stats_s, select_s, gather_s, step_s,
    call_s, bgmd_call_s, gm_model_s, bgmd_model_s, block_gm_model_s, predicted_ratio}``.

    Per matrix, the full geometric median, BGmD at every block size (norm sampling; top-k at
    k = d/10) and each part of :func:`cost_model` (each on its own) are timed in one interleaved
    series; the fixed costs once, on a tiny matrix."""
    ns = ns or ((8, 32) if quick else MAP_NS)
    dims = dims or ((10**4,) if quick else MAP_DIMS)
    fractions = (0.01, 0.1) if quick else MAP_FRACTIONS
    fixed = _fixed_costs(device, repeat=5 if quick else 15)
    rows = []
    for d in dims:
        repeat = 3 if quick else (25 if d <= 10**4 else 13 if d <= 10**5 else 5)
        for n in ns:
            for scenario, flip in (("clean", 0.0), ("bit_flip", 0.2)):
                G = gradient_matrix(n, d, flip=flip, device=device)
                blocks = [("map", "norm", f) for f in fractions]
                if TOPK_FRACTION in fractions:
                    blocks.append(("map topk", "topk", TOPK_FRACTION))
                aggs = []
                for _, mode, frac in blocks:
                    gen = torch.Generator(device=device).manual_seed(0)
                    agg = ms.BGmD(int(frac * d), mode=mode, memory="mean", generator=gen)
                    agg(G)  # the memory is warm from now on
                    aggs.append(agg)
                # One interleaved series for everything timed on this matrix: the two sides at
                # every block size and every part of the cost model see the same load.
                size_fns, size_parts = _size_parts(G, device)
                part_fns = [f for (_, mode, frac), agg in zip(blocks, aggs)
                            for f in _block_parts(G, agg, int(frac * d), mode, device)]
                stats_fn = [lambda: column_stats(G, aggs[0].memory)]
                fns = ([lambda: ms.geometric_median(G)] + [(lambda a=a: a(G)) for a in aggs]
                       + size_fns + stats_fn + part_fns)
                times = [t["min_s"] for t in measure_interleaved(fns, device, warmup=1, repeat=repeat,
                                                                 clock=map_clock(device))]
                gm_s, bgmd_times = times[0], times[1:1 + len(aggs)]
                rest = times[1 + len(aggs):]
                size = size_parts(rest[:len(size_fns)])
                stats_s = rest[len(size_fns)]
                part_times = rest[len(size_fns) + 1:]
                gm_iter = int(ms.geometric_median(G).n_iter)
                for b, ((case, _, frac), agg, bgmd_s) in enumerate(zip(blocks, aggs, bgmd_times)):
                    k = int(frac * d)
                    parts = {**fixed, **size, "stats_s": stats_s, "select_s": part_times[2 * b],
                             "gather_s": part_times[2 * b + 1]}
                    bgmd_iter = int(agg.last_gm.n_iter)
                    row = {"case": case, "n": n, "d": d, "k": k, "k_frac": frac,
                           "scenario": scenario, "gm_s": gm_s, "bgmd_s": bgmd_s,
                           "ratio": gm_s / bgmd_s, "gm_iter": gm_iter, "bgmd_iter": bgmd_iter,
                           "gram": uses_gram(n, d), "block_gram": uses_gram(n, k),
                           "clock": map_clock(device).__name__, **parts}
                    row.update(cost_model(n, d, k, gm_iter, bgmd_iter, parts))
                    rows.append(row)
                G = aggs = None  # free the matrix before the next size
    print_table(f"When does BGmD pay? converged BGmD vs converged full geometric median on "
                f"{device.type}", rows,
                ["case", "n", "d", "k", "scenario", "gram", "gm_iter", "bgmd_iter", "gm_s", "bgmd_s",
                 "ratio", "predicted_ratio", "select_s", "block_gm_model_s"])
    return rows


#: (label, mode, options) of the rows per size: the converged ones carry the target
CASES = (("converged norm", "norm", {}), ("converged topk", "topk", {}),
         ("fixed 20", "norm", {"fixed_iter": True, "max_iter": 20}),
         ("fixed 100", "norm", {"fixed_iter": True, "max_iter": 100}))


def size_rows(device: torch.device, n: int, d: int, repeat: int, cases=CASES) -> List[dict]:
    """The rows of one size (k = d/10), clean and with 20% bit flips: BGmD against the full
    geometric median (interleaved), and BGmD's time in copies of ``G``."""
    k = d // 10
    rows = []
    with ms.value_checks(False):
        for scenario, flip in (("clean", 0.0), ("bit_flip", 0.2)):
            G = gradient_matrix(n, d, flip=flip, device=device)
            out = torch.empty_like(G)
            copy = measure(lambda: out.copy_(G), device, warmup=1, repeat=repeat)["median_s"]
            out = None
            for label, mode, opts in cases:
                gen = torch.Generator(device=device).manual_seed(0)
                agg = ms.BGmD(k, mode=mode, memory="mean", generator=gen, **opts)
                agg(G)  # the memory is warm from now on
                full, block = measure_pair(lambda: ms.geometric_median(G, **opts), lambda: agg(G),
                                           device, warmup=1, repeat=repeat)
                spread = pair_ratios(full, block)
                fixed = opts.get("fixed_iter", False)
                gm_iter = opts["max_iter"] if fixed else int(ms.geometric_median(G).n_iter)
                bgmd_iter = opts["max_iter"] if fixed else int(agg.last_gm.n_iter)
                ratio = full["median_s"] / block["median_s"]
                row = {
                    "case": label, "n": n, "d": d, "k": k, "scenario": scenario,
                    "gm_s": full["median_s"], "bgmd_s": block["median_s"], "ratio": ratio,
                    "copy_s": copy, "copies": block["median_s"] / copy, "gm_iter": gm_iter,
                    "bgmd_iter": bgmd_iter, "repeat": repeat, **spread,
                }
                if (n, d) == TARGET_SIZE and not fixed:
                    row.update(target=TARGET, better="higher", met=bool(ratio >= TARGET))
                rows.append(row)
            G = None  # free the matrix before the next one
    return rows


def run(device: torch.device, *, quick: bool = False) -> List[dict]:
    """Rows ``{case, n, d, k, scenario, gm_s, bgmd_s, ratio, copies, gm_iter, bgmd_iter}`` (ratio:
    ``gm_s / bgmd_s``; the converged rows at the target size also carry ``target``, ``better``,
    ``met``) (``*_iter``: Weiszfeld iterations run; the converged ones' counts to the default
    tolerance)."""
    device = torch.device(device)
    sizes = [(32, 100_000)] if quick else [(32, 1_000_000), (32, 100_000), (8, 1_000_000)]
    if device.type == "cuda" and not quick:
        sizes.append((32, 10_000_000))
    repeat = 3 if quick else 7
    # the target size three times as often: its ratios are the target's, and on a shared machine
    # one run's medians of 7 fell on either side of it (1.44 and 1.67 for norm sampling under bit
    # flips, two quiet runs on the same tree, 2026-12-07)
    rows = [row for n, d in sizes
            for row in size_rows(device, n, d, 3 * repeat if (n, d) == TARGET_SIZE else repeat)]
    with ms.value_checks(False):
        map_ = map_rows(device, quick=quick)
    print_table(f"BGmD (k = d/10, mean memory) vs full geometric median on {device.type}", rows,
                ["case", "n", "d", "k", "scenario", "gm_iter", "bgmd_iter", "gm_s", "bgmd_s",
                 "ratio", "copies", "met"])
    return rows + map_


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main

    main([SUITE])
