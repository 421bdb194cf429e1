"""median_sgd.distributed: robust DDP communication hooks.

* One process: the hook's aggregation code, run on simulated ranks (``RobustHook.simulate``),
  against the library's estimators of the same rows (coordinate_median, trimmed_mean,
  geometric_median, BGmD), which test_medians.py and test_bgmd.py check against scipy and
  brute force.
* Several processes (gloo, world size 4, one rank Byzantine, its loss multiplied by -100, and one
  rank whose gradients are NaN at every step): real collectives give the simulated result on
  every rank, and DDP training with the mean hook diverges while every robust hook converges,
  dropping the NaN rank's contribution to every bucket. One spawn for the whole module
  (starting the processes is the slow part), with a timeout so that a hang fails instead of
  blocking. Ranks that register different hooks get an error on every rank, not a hang.
* NCCL: the same on GPUs (marked ``cuda``; needs 4 GPUs, skipped otherwise).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import median_sgd as ms
from median_sgd.distributed import RULES, RobustHook, robust_hook
from median_sgd.experiments import scaling_out

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def rows(world=5, n=41, seed=0, dtype=torch.float64, device="cpu", byzantine=(0,)):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(world, n, generator=gen, dtype=torch.float64)
    for r in byzantine:
        G[r] *= -100.0
    return G.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Simulated ranks: the hook's code against the library


@pytest.mark.parametrize("world", [1, 2, 4, 5, 8])
def test_simulated_rules_equal_the_library(world, device, dtype):
    G = rows(world, n=53, dtype=dtype, device=device)
    expected = {
        "mean": G.mean(0),
        "coordinate_median": ms.coordinate_median(G),
        "trimmed_mean": ms.trimmed_mean(G, 0.25),
        "gm": ms.geometric_median(G, max_iter=8, fixed_iter=True).median,
    }
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for rule, ref in expected.items():
        out = robust_hook(rule, **({"init": "mean"} if rule == "gm" else {})).simulate(G)
        assert out.shape == G.shape and out.dtype == dtype and out.device == G.device
        assert torch.equal(out, out[:1].expand_as(out)), f"{rule}: ranks differ"
        torch.testing.assert_close(out[0], ref, rtol=tol, atol=tol * float(G.abs().max()))


@pytest.mark.parametrize("max_iter,fixed_iter,tol", [(1, True, 1e-6), (3, True, 1e-6),
                                                     (50, False, 1e-10), (50, True, 1e-10)])
def test_simulated_gm_follows_weiszfeld_iteration_by_iteration(max_iter, fixed_iter, tol):
    G = rows(6, n=30, seed=3)
    G[2] = G[3]  # coincident points: the smoothing floor matters
    hook = robust_hook("gm", max_iter=max_iter, fixed_iter=fixed_iter, tol=tol, init="mean")
    ref = ms.geometric_median(G, max_iter=max_iter, fixed_iter=fixed_iter, tol=tol)
    torch.testing.assert_close(hook.simulate(G)[0], ref.median, rtol=1e-12, atol=1e-12)


def test_gm_hook_from_the_median_is_robust_to_a_minority_of_far_ranks():
    G = rows(7, n=20, byzantine=())
    honest = ms.geometric_median(G[3:], tol=1e-12, max_iter=1000).median
    G[:3] = 1e8  # three of seven ranks send garbage
    converged = ms.geometric_median(G, tol=1e-12, max_iter=10_000).median
    spread = float(torch.linalg.vector_norm(G[3:] - honest, dim=1).max())
    assert torch.linalg.vector_norm(converged - honest) < 2 * spread  # breakdown point 1/2
    out = robust_hook("gm").simulate(G)[0]  # 8 rounds from the coordinate-wise median
    assert torch.linalg.vector_norm(out - converged) < 1e-2 * spread
    # from the mean, 8 rounds leave a trace of the attack that shrinks only geometrically
    from_mean = robust_hook("gm", init="mean").simulate(G)[0]
    assert torch.linalg.vector_norm(from_mean - converged) > 1e3 * spread
    assert torch.linalg.vector_norm(robust_hook("mean").simulate(G)[0] - honest) > 1e7


@pytest.mark.parametrize("memory", ["median", "mean", None])
@pytest.mark.parametrize("mode,k", [("topk", 0.2), ("topk", 7), ("norm", 0.3)])
def test_simulated_bgmd_equals_the_library_bgmd(memory, mode, k):
    gen = torch.Generator().manual_seed(5)
    hook = robust_hook("bgmd", k=k, mode=mode, memory=memory, seed=11, init="mean")
    agg = ms.BGmD(k, mode=mode, memory=memory, max_iter=8, fixed_iter=True,
                  generator=torch.Generator().manual_seed(11))
    for _ in range(4):
        G = torch.randn(5, 40, generator=gen, dtype=torch.float64)
        G[0] *= -100.0
        out = hook.simulate(G, key="bucket")
        assert torch.equal(out, out[:1].expand_as(out))
        torch.testing.assert_close(out[0], agg(G), rtol=1e-12, atol=1e-10)
        if memory is None:
            assert "bucket" not in hook.memory
        else:
            torch.testing.assert_close(hook.memory["bucket"], agg.memory, rtol=1e-12, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Hostile ranks: a non-finite bucket is dropped by every rule; huge values do not overflow


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["row", "coordinates"])
def test_a_non_finite_rank_is_dropped_by_every_rule(value, where):
    """The issue's example: ``G[0] = nan; robust_hook("gm").simulate(G)`` was all NaN."""
    G = rows(6, n=8, seed=4, byzantine=())
    G[3] *= -100.0  # a finite Byzantine rank stays in
    bad = G.clone()
    if where == "row":
        bad[0] = value
    else:
        bad[0, [1, 5]] = value
    for rule, options in [("mean", {}), ("coordinate_median", {}), ("trimmed_mean", {}),
                          ("gm", {}), ("gm", {"init": "mean"}), ("bgmd", {"k": 0.5}),
                          ("bgmd", {"k": 0.5, "memory": "mean", "mode": "norm"})]:
        hook = robust_hook(rule, **options)
        out = hook.simulate(bad)
        assert torch.isfinite(out).all(), (rule, options)
        assert torch.equal(out, out[:1].expand_as(out))
        assert hook.stats["dropped"] == 1
        # exactly what the other five ranks would agree on without it (the trimmed mean still
        # trims floor(0.25 * 6) = 1 value at each end of the five)
        ref = robust_hook(rule, **options).simulate(G[1:])[0]
        torch.testing.assert_close(out[0], ref, rtol=1e-12, atol=1e-12)


def test_the_issue_example_and_every_rank_dropped():
    G = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    G[0] = float("nan")
    for rule in RULES:
        assert torch.isfinite(robust_hook(rule).simulate(G)).all(), rule
    G[:] = float("nan")
    for rule in RULES:  # nothing to aggregate: no step
        hook = robust_hook(rule)
        assert torch.equal(hook.simulate(G), torch.zeros_like(G)), rule
        assert hook.stats["dropped"] == 6


@pytest.mark.parametrize("memory", ["mean", "median"])
def test_bgmd_round_with_every_rank_dropped_keeps_the_memory(memory):
    """No finite rank: no step, and the memory stays, so later rounds are those without it."""
    gen = torch.Generator().manual_seed(10)
    G1, G3 = torch.randn(2, 5, 40, generator=gen, dtype=torch.float64)
    hook, without = (robust_hook("bgmd", k=0.2, memory=memory) for _ in range(2))
    hook.simulate(G1, key="b"), without.simulate(G1, key="b")
    before = hook.memory["b"].clone()
    out = hook.simulate(torch.full_like(G1, float("nan")), key="b")
    assert torch.equal(out, torch.zeros_like(G1)) and torch.equal(hook.memory["b"], before)
    assert bool((before != 0).any()) and hook.stats["dropped"] == 5
    torch.testing.assert_close(hook.simulate(G3, key="b"), without.simulate(G3, key="b"), rtol=0, atol=0)
    torch.testing.assert_close(hook.memory["b"], without.memory["b"], rtol=0, atol=0)


@pytest.mark.parametrize("memory", ["mean", "median"])
def test_bgmd_memory_is_not_poisoned_by_a_nan_round(memory):
    """With memory="mean" a NaN rank used to leave the memory NaN in every later clean round."""
    gen = torch.Generator().manual_seed(8)
    hook = robust_hook("bgmd", k=0.2, memory=memory, init="mean")
    agg = ms.BGmD(0.2, mode="topk", memory=memory, max_iter=8, fixed_iter=True)
    for step in range(4):
        G = torch.randn(5, 40, generator=gen, dtype=torch.float64)
        G[0] *= -100.0
        finite = G
        if step == 1:
            G = G.clone()
            G[2, ::3] = float("nan")
            finite = G[[0, 1, 3, 4]]
        out = hook.simulate(G, key="bucket")
        torch.testing.assert_close(out[0], agg(finite), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(hook.memory["bucket"], agg.memory, rtol=1e-12, atol=1e-10)
    assert hook.stats["dropped"] == 1


@pytest.mark.parametrize("init", ["median", "mean"])
@pytest.mark.parametrize("huge,d", [(1e20, 4), (3e38, 4), (5e17, 100_000)])
def test_a_huge_finite_rank_does_not_overflow_the_geometric_median(init, huge, d):
    """float32: ||z|| and the distances overflowed, the smoothing floor became inf, all NaN."""
    G = rows(6, n=d, seed=2, dtype=torch.float32, byzantine=())
    honest = G[1:].double()
    centre = ms.geometric_median(honest, tol=1e-12, max_iter=10_000).median
    spread = float(torch.linalg.vector_norm(honest - centre, dim=1).max())
    G[0] = huge
    for rule in ("gm", "bgmd"):
        out = robust_hook(rule, init=init, **({"k": 1.0} if rule == "bgmd" else {})).simulate(G)
        assert torch.isfinite(out).all(), (rule, init)
        if init == "median":  # the fixed rounds are robust from the coordinate-wise median
            assert float(torch.linalg.vector_norm(out[0].double() - centre)) < 2 * spread


def test_hook_sums_do_not_overflow():
    """float32 values near the largest float: the mean and the trimmed mean divide first."""
    big = torch.finfo(torch.float32).max * 0.75  # the sum of two overflows
    G = torch.full((4, 5), big)
    G[0] = -big
    for rule, expected in [("mean", big / 2), ("trimmed_mean", big), ("coordinate_median", big)]:
        out = robust_hook(rule).simulate(G)[0].double()
        torch.testing.assert_close(out, torch.full((5,), expected, dtype=torch.float64),
                                   rtol=1e-6, atol=0)


def test_gm_hook_is_translation_equivariant_in_float32():
    """Gradients that share a large component (issue 12 item 6): around 1e4 with a spread of 1e-3,
    float32's rounding floor ~ eps ||z|| swamped the distances and the hook returned about the
    mean; iterating around the centre reaches the optimum up to float32's rounding of it."""
    gen = torch.Generator().manual_seed(0)
    W, n, shift = 16, 4096, 1e4
    G0 = 1e-3 * torch.randn(W, n, generator=gen, dtype=torch.float64)
    G0[: W // 4] += 5e-3
    opt = ms.geometric_median(G0, tol=1e-13, max_iter=100_000).median

    def excess(z):  # relative excess of the objective sum_r ||g_r - z|| over the optimum
        f = lambda u: float(torch.linalg.vector_norm(G0 - u, dim=1).sum())
        return f(z) / f(opt) - 1

    rounded = excess((opt + shift).float().double() - shift)  # the best float32 can hold
    mean = excess(G0.mean(0))
    for init in ("median", "mean"):
        out = robust_hook("gm", init=init).simulate((G0 + shift).float())[0].double() - shift
        assert excess(out) < 2 * rounded < 0.5 * mean, init


def test_bgmd_memory_is_per_bucket_and_reset_on_a_new_shape():
    hook = robust_hook("bgmd", k=0.5)
    hook.simulate(rows(4, n=10), key="a")
    hook.simulate(rows(4, n=6), key="b")
    assert hook.memory["a"].shape == (10,) and hook.memory["b"].shape == (6,)
    fresh = robust_hook("bgmd", k=0.5)
    G = rows(4, n=8, seed=9)
    torch.testing.assert_close(hook.simulate(G, key="a"), fresh.simulate(G, key="a"))
    hook.reset()
    assert hook.memory == {}
    # DDP's buckets are keyed by their parameters: a rebuilt bucket replaces the old ones
    hook.simulate(rows(4, n=10), key=(1, 2))
    hook.simulate(rows(4, n=10), key=(3,))
    hook.simulate(rows(4, n=10), key=(2, 3))
    assert set(hook.memory) == {(2, 3)}


def test_half_precision_buckets_are_aggregated_in_float32():
    G = rows(5, n=64, dtype=torch.float16, byzantine=())
    for rule in RULES:
        out = robust_hook(rule).simulate(G)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = ms.geometric_median(G.float(), max_iter=8, fixed_iter=True).median
    out = robust_hook("gm", init="mean").simulate(G)[0].float()
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_inputs_are_not_modified():
    G = rows(4, n=12)
    before = G.clone()
    for rule in RULES:
        robust_hook(rule).simulate(G)
    assert torch.equal(G, before)


def test_communication_counts():
    W, n = 4, 100
    G = rows(W, n=n)
    per_allreduce = 2 * (W - 1) / W * n
    counts = {}
    for rule in RULES:
        hook = robust_hook(rule)
        hook.simulate(G)
        counts[rule] = hook.stats
        assert hook.stats["buckets"] == 1 and hook.stats["dropped"] == 0
    # the mean: one all-reduce, with the count of finite ranks appended
    assert counts["mean"] == {"buckets": 1, "collectives": 1, "dropped": 0,
                              "elements_sent": 2 * (W - 1) / W * (n + 1)}
    # sharded medians: one all-to-all (each chunk with the sender's flag) and one all-gather, as
    # many elements as one all-reduce plus the W - 1 flags
    assert counts["coordinate_median"]["collectives"] == 2
    assert counts["coordinate_median"]["elements_sent"] == pytest.approx(per_allreduce + W - 1)
    # geometric median: the coordinate-wise median, then max_iter rounds of (gather W numbers,
    # all-reduce)
    assert counts["gm"]["collectives"] == 2 + 2 * 8
    assert counts["gm"]["elements_sent"] == pytest.approx(9 * per_allreduce + 9 * (W - 1))
    hook = robust_hook("gm")
    hook.simulate(G)
    hook.reset_stats()
    assert hook.stats == {"buckets": 0, "collectives": 0, "elements_sent": 0.0, "dropped": 0}


def test_sync_free_on_meta_tensors():
    """No rule reads a value on the host in its default settings (meta tensors have none)."""
    G = torch.empty(4, 30, device="meta")
    for rule in ("mean", "coordinate_median", "trimmed_mean", "gm"):
        robust_hook(rule).simulate(G)
    with pytest.raises(RuntimeError):
        robust_hook("gm", fixed_iter=False).simulate(G)


@pytest.mark.parametrize(
    "rule,options,error",
    [
        ("median", {}, ValueError),
        ("gm", {"trim": 0.1}, TypeError),
        ("trimmed_mean", {"trim": 0.5}, ValueError),
        ("gm", {"max_iter": 0}, ValueError),
        ("gm", {"eps": 0.0}, ValueError),
        ("gm", {"fixed_iter": 1}, TypeError),
        ("bgmd", {"k": 0}, ValueError),
        ("bgmd", {"k": 1.5}, ValueError),
        ("bgmd", {"mode": "random"}, ValueError),
        ("bgmd", {"memory": "gm"}, ValueError),
        ("bgmd", {"seed": 1.0}, TypeError),
    ],
)
def test_bad_options(rule, options, error):
    with pytest.raises(error):
        robust_hook(rule, **options)


def test_bad_inputs():
    hook = robust_hook("gm")
    with pytest.raises(ValueError):
        hook.simulate(torch.zeros(4))
    with pytest.raises(TypeError):
        hook.simulate(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError):
        hook(object(), None)


def test_ddp_accepts_the_hook_signature():
    """DDP inspects the hook: parameters named (state, bucket), a __name__."""
    import inspect

    hook = robust_hook("gm")
    assert list(inspect.signature(hook).parameters) == ["state", "bucket"]
    assert hook.__name__ == "robust_hook_gm" and isinstance(hook, RobustHook)


# ---------------------------------------------------------------------------------------------
# Several processes on this machine: gloo, world size 4, one Byzantine rank


TRAIN_CONFIG = dataclasses.replace(
    scaling_out.CONFIGS["ci"],
    steps=12,
    eval_every=4,
    runs=(
        ("mean", "mean", (), True),
        ("coordinate median", "coordinate_median", (), True),
        ("trimmed mean", "trimmed_mean", (("trim", 0.25),), True),
        ("geometric median", "gm", (("max_iter", 4),), True),
        ("BGmD", "bgmd", (("k", 0.1), ("max_iter", 4)), True),
    ),
    check_size=300,
    timeout_s=300.0,
)


@pytest.fixture(scope="module")
def gloo_records():
    return scaling_out.run(TRAIN_CONFIG)


def test_real_collectives_equal_the_simulation_on_every_rank(gloo_records):
    checks = {r["rule"]: r for r in gloo_records["checks"]}
    assert set(checks) == set(RULES)
    for rule, rec in checks.items():
        assert rec["ranks_identical"], rule
        assert rec["finite"], rule
        assert rec["max_diff_simulated"] < 1e-12, rule
        assert rec["max_diff_library"] < 1e-10, rule
        # one matrix of the three has the NaN rank: its row is dropped once, on every rank
        assert rec["dropped"] == len(TRAIN_CONFIG.nan_ranks), rule


def test_mean_hook_diverges_robust_hooks_converge(gloo_records):
    curves = gloo_records["curves"]
    start = {r["run"]: r["test_loss"] for r in curves if r["step"] == 0}
    for rec in gloo_records["runs"]:
        assert rec["ranks_identical"], rec["run"]  # every rank holds the same model
        initial = start[rec["run"]]
        if rec["rule"] == "mean":
            assert rec["final_loss"] > 10 * initial
        else:
            assert rec["final_loss"] < 0.95 * initial, rec["run"]
            assert rec["final_accuracy"] > 0.5, rec["run"]


def test_training_runs_used_several_buckets(gloo_records):
    for rec in gloo_records["runs"]:
        assert rec["buckets"] >= 2


def test_the_nan_rank_is_dropped_from_every_bucket(gloo_records):
    assert TRAIN_CONFIG.nan_ranks and all(rec["attacked"] for rec in gloo_records["runs"])
    for rec in gloo_records["runs"]:
        # per step: every bucket drops the NaN rank's contribution, and nothing else
        assert rec["dropped"] == rec["buckets"] * len(TRAIN_CONFIG.nan_ranks), rec["run"]


SMALL = dataclasses.replace(TRAIN_CONFIG, world_size=2, steps=2, check_size=10)


def test_worker_failure_is_reported_not_hung():
    bad = dataclasses.replace(SMALL, runs=(("bad", "mean", (("trim", 0.1),), True),))
    with pytest.raises(RuntimeError, match="worker process failed"):
        scaling_out.run(bad)


def test_bad_rank_lists_are_rejected_before_starting():
    with pytest.raises(ValueError, match="both Byzantine and a NaN rank"):
        scaling_out.run(dataclasses.replace(SMALL, nan_ranks=(0,)))
    with pytest.raises(ValueError, match="must be ranks"):
        scaling_out.run(dataclasses.replace(SMALL, nan_ranks=(2,)))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda"),
                                    torch.device("cuda", 1)])
def test_any_cuda_device_puts_rank_r_on_gpu_r(device):
    # the decision only (no GPU needed): "cuda:0" was once compared as a string with "cuda"
    # and silently ran every rank on the CPU
    for rank in range(4):
        assert scaling_out.rank_device(device, rank) == torch.device("cuda", rank)


def test_cpu_devices_and_bad_devices():
    for device in ["cpu", "cpu:0", torch.device("cpu")]:
        assert scaling_out.rank_device(device, 2) == torch.device("cpu")
    with pytest.raises(ValueError, match="CPU or CUDA"):
        scaling_out.rank_device("meta", 0)
    with pytest.raises(ValueError, match="nccl backend needs a CUDA device"):
        scaling_out.run(dataclasses.replace(SMALL, backend="nccl"), device="cpu")
    with pytest.raises(ValueError, match="CPU or CUDA"):
        scaling_out.run(SMALL, device="meta")


def test_a_hang_times_out_and_the_workers_are_stopped():
    with pytest.raises(TimeoutError, match="did not finish"):
        scaling_out.run(dataclasses.replace(SMALL, timeout_s=0.5))


# ---------------------------------------------------------------------------------------------
# Ranks that register different hooks: an error on every rank, not a hang until the timeout

MISMATCH_WORKER = r"""
import datetime, sys
import torch
import torch.distributed as dist
from median_sgd.distributed import robust_hook

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
torch.manual_seed(0)
cases = [  # (rank 0's hook, rank 1's hook, each rank's tensor length)
    (("gm", {}), ("coordinate_median", {}), (10, 10)),
    (("gm", {"max_iter": 4}), ("gm", {}), (10, 10)),
    (("trimmed_mean", {"trim": 0.1}), ("trimmed_mean", {"trim": 0.2}), (10, 10)),
    (("mean", {}), ("mean", {}), (10, 12)),
    (("gm", {"max_iter": 8}), ("gm", {}), (10, 10)),  # the same effective options: no error
]
for i, case in enumerate(cases):
    rule, options = case[rank]
    try:
        robust_hook(rule, **options).aggregate(torch.full((case[2][rank],), float(rank)))
        print(f"case {i}: ok", flush=True)
    except RuntimeError as err:
        print(f"case {i}: error: {err}", flush=True)
# through DDP, as registered in a training script
model = torch.nn.Linear(3, 2)
ddp = torch.nn.parallel.DistributedDataParallel(model)
ddp.register_comm_hook(None, robust_hook(["gm", "bgmd"][rank]))
try:
    ddp(torch.randn(4, 3)).sum().backward()
    print("ddp: ok", flush=True)
except RuntimeError as err:
    print(f"ddp: error: {err}", flush=True)
dist.destroy_process_group()
"""


def test_ranks_with_different_hooks_raise_on_every_rank(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", MISMATCH_WORKER, str(rank),
                               str(tmp_path / "store")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, out in enumerate(outs):
        lines = {line.split(":")[0]: line for line in out.splitlines()
                 if line.startswith(("case", "ddp"))}
        assert procs[rank].returncode == 0, out
        for case, what in [(0, "rule or options"), (1, "rule or options"),
                           (2, "rule or options"), (3, "tensor length")]:
            line = lines[f"case {case}"]
            assert "error" in line and "do not run the same hook" in line, out
            assert f"{what} differ(s) from rank(s) [{1 - rank}]" in line, out
        assert lines["case 4"] == "case 4: ok", out
        assert "error" in lines["ddp"] and "do not run the same hook" in lines["ddp"], out


# ---------------------------------------------------------------------------------------------
# NCCL on GPUs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 4
                    or not dist.is_nccl_available(),
                    reason="needs 4 CUDA devices and NCCL")
def test_nccl_training_through_a_byzantine_rank():
    records = scaling_out.run(dataclasses.replace(TRAIN_CONFIG, backend="nccl"))
    for rec in records["checks"]:
        assert rec["ranks_identical"] and rec["max_diff_library"] < 1e-10
    start = {r["run"]: r["test_loss"] for r in records["curves"] if r["step"] == 0}
    for rec in records["runs"]:
        assert rec["ranks_identical"]
        if rec["rule"] == "mean":
            assert rec["final_loss"] > 10 * start[rec["run"]]
        else:
            assert rec["final_loss"] < 0.95 * start[rec["run"]]


@pytest.mark.cuda
@pytest.mark.parametrize("nan_row", [False, True], ids=["clean", "nan-row"])
def test_simulated_hooks_on_cuda_have_no_host_sync(nan_row, no_host_sync):
    """Every rule's fixed-iteration path, also with a rank that sends NaN (and the BGmD memory of
    a second round, and norm sampling on a CUDA generator): no host synchronisation."""
    G = rows(5, n=1000, device="cuda", dtype=torch.float32)
    if nan_row:
        G[2, ::7] = float("nan")
    rules = [(rule, {}) for rule in RULES] + [("bgmd", {"mode": "norm", "memory": "mean"}),
                                             ("gm", {"init": "mean"})]
    hooks = [robust_hook(rule, **options) for rule, options in rules]
    with no_host_sync():
        outs = [[hook.simulate(G, key="b") for _ in range(2)] for hook in hooks]
    for (rule, options), hook, out in zip(rules, hooks, outs):
        ref_hook = robust_hook(rule, **options)
        for step in range(2):
            ref = ref_hook.simulate(G.cpu(), key="b")
            assert torch.isfinite(out[step]).all(), rule
            if options.get("mode") != "norm":  # the CUDA generator draws other numbers
                torch.testing.assert_close(out[step].cpu(), ref, rtol=1e-4, atol=1e-3)
        assert hook.stats["dropped"] == (2 if nan_row else 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hook_future_on_cuda_single_rank_nccl(tmp_path):
    """World size 1 on NCCL: the hook's CUDA future goes through DDP; the step equals plain SGD."""
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        for rule in RULES:
            torch.manual_seed(0)
            model = torch.nn.Linear(8, 3).cuda()
            ref = torch.nn.Linear(8, 3).cuda()
            ref.load_state_dict(model.state_dict())
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
            ddp.register_comm_hook(None, robust_hook(rule, **({"k": 1.0} if rule == "bgmd" else {})))
            x = torch.randn(16, 8, device="cuda")
            ddp(x).square().sum().backward()
            ref(x).square().sum().backward()
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()

