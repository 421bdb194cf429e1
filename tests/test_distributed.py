"""median_sgd.distributed: robust DDP communication hooks.

* One process: the hook's aggregation code, run on simulated ranks (``RobustHook.simulate``),
  against the library's estimators of the same rows (coordinate_median, trimmed_mean,
  geometric_median, BGmD), which test_medians.py and test_bgmd.py check against scipy and
  brute force.
* Several processes (gloo, world size 4, one rank Byzantine, its loss multiplied by -100):
  real collectives give the simulated result on every rank, and DDP training with the mean hook
  diverges while every robust hook converges. One spawn for the whole module (starting the
  processes is the slow part), with a timeout so that a hang fails instead of blocking.
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
    for step in range(4):
        G = torch.randn(5, 40, generator=gen, dtype=torch.float64)
        G[0] *= -100.0
        out = hook.simulate(G, key="bucket")
        assert torch.equal(out, out[:1].expand_as(out))
        torch.testing.assert_close(out[0], agg(G), rtol=1e-12, atol=1e-10)
        if memory is None:
            assert "bucket" not in hook.memory
        else:
            torch.testing.assert_close(hook.memory["bucket"], agg.memory, rtol=1e-12, atol=1e-10)


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
    with pytest.raises(Exception):
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
        assert rec["max_diff_simulated"] < 1e-12, rule
        assert rec["max_diff_library"] < 1e-10, rule


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


SMALL = dataclasses.replace(TRAIN_CONFIG, world_size=2, steps=2, check_size=10)


def test_worker_failure_is_reported_not_hung():
    bad = dataclasses.replace(SMALL, runs=(("bad", "mean", (("trim", 0.1),), True),))
    with pytest.raises(RuntimeError, match="worker process failed"):
        scaling_out.run(bad)


def test_a_hang_times_out_and_the_workers_are_stopped():
    with pytest.raises(TimeoutError, match="did not finish"):
        scaling_out.run(dataclasses.replace(SMALL, timeout_s=0.5))


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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_simulated_hooks_on_cuda_have_no_host_sync():
    G = rows(5, n=1000, device="cuda", dtype=torch.float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = {rule: robust_hook(rule).simulate(G) for rule in RULES}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for rule, out in outs.items():
        ref = robust_hook(rule).simulate(G.cpu())
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-3)


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

