"""experiments.in_the_wild: the batched training run against a plain per-run loop, independence of
the runs, the chapter's claims at a tiny size, configs, sweeps and bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import median_sgd as ms
from median_sgd.experiments import SCALES
from median_sgd.experiments import in_the_wild as itw
from median_sgd.optim import MedianSGD

TINY = itw.InTheWildConfig(steps=100, seeds=2, eval_every=50, hidden=8, sweep_steps=30, sweep_seeds=1)


@pytest.fixture(autouse=True)
def one_thread():
    """The replays below loop over small tensors: one thread is much faster (and deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_result():
    return itw.run(TINY)


def test_records_are_tidy(tiny_result):
    curves = tiny_result.curves
    assert len(curves) == len(TINY.methods) * len(TINY.settings) * TINY.seeds * 3  # steps 0, 50, 100
    assert {r["step"] for r in curves} == {0, 50, 100}
    for r in curves:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["test_loss"] > 0 and r["train_loss"] > 0 and r["grad_norm"] >= 0
        assert math.isnan(r["cosine"]) or -1.0 - 1e-5 <= r["cosine"] <= 1.0 + 1e-5
    assert len(tiny_result.final) == len(TINY.methods) * len(TINY.settings)
    for r in tiny_result.final:
        assert r["accuracy_min"] <= r["accuracy_mean"] <= r["accuracy_max"]
    # every run starts from the same weights per seed: identical step-0 records across methods
    start = {(r["setting"], r["seed"]): r["test_loss"] for r in curves
             if r["step"] == 0 and r["method"] == "SGD"}
    assert all(r["test_loss"] == start[r["setting"], r["seed"]] for r in curves if r["step"] == 0)


def test_claims_hold_at_a_tiny_size(tiny_result):
    final = {(r["setting"], r["method"]): r for r in tiny_result.final}
    assert final["clean", "SGD"]["accuracy_mean"] > 0.7
    # Corrupted batches: SGD ascends (the mean gradient is -1.2 g); CClip descends.
    assert final["corrupted batches", "SGD"]["loss_mean"] > 10 * final["clean", "SGD"]["loss_mean"]
    assert final["corrupted batches", "CClip"]["accuracy_mean"] > 0.7
    # Cauchy noise: the coordinate-median estimator beats SGD by far.
    heavy = "heavy-tailed noise"
    assert final[heavy, "CClip"]["accuracy_mean"] > final[heavy, "SGD"]["accuracy_mean"] + 0.2


def test_runs_do_not_interact():
    """A method trained alone gives exactly the records it gives among all methods."""
    alone = itw.run(dataclasses.replace(TINY, methods=("VClip",)))
    together = itw.run(dataclasses.replace(TINY, methods=("SGD", "VClip", "CClip")))
    mine = [r for r in together.curves if r["method"] == "VClip"]
    assert len(mine) == len(alone.curves)
    for a, b in zip(alone.curves, mine):
        for key in ("test_loss", "test_accuracy", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)


@pytest.mark.parametrize("method", ["CClip", "VClip", "clipped SGD"])
def test_batched_run_equals_a_plain_loop_per_seed(method):
    """Replay one (method, heavy-tailed noise) run with plain tensors, the library's optimizer and
    the same random draws; compare the final test loss of each seed."""
    cfg = dataclasses.replace(TINY, methods=(method,), settings=("heavy-tailed noise",), steps=20,
                              eval_every=20)
    out = itw.run(cfg)
    x_train, y_train, x_test, y_test = itw.load_data(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    init = itw.init_params(cfg.seeds, 64, cfg.hidden, 10, generator=gen)
    params = [[p[s].clone().requires_grad_(True) for p in init] for s in range(cfg.seeds)]
    total = sum(p[0].numel() for p in init)
    opts = [itw.make_optimizer(method, [run], cfg) for run in params]
    for _ in range(cfg.steps):
        idx = torch.randint(len(x_train), (cfg.seeds, cfg.batch_size), generator=gen)
        noise = ms.sample_stable(cfg.noise_alpha, (cfg.seeds, total), scale=cfg.noise_scale, generator=gen)
        for s, (W1, b1, W2, b2) in enumerate(params):
            logits = torch.tanh(x_train[idx[s]] @ W1 + b1) @ W2 + b2
            loss = torch.nn.functional.cross_entropy(logits, y_train[idx[s]])
            for p in params[s]:
                p.grad = None
            loss.backward()
            offset = 0
            for p in params[s]:
                p.grad += noise[s, offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
            if method == "clipped SGD":
                torch.nn.utils.clip_grad_norm_(params[s], cfg.tau_clip)
            opts[s].step()
    for s, (W1, b1, W2, b2) in enumerate(params):
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(torch.tanh(x_test @ W1 + b1) @ W2 + b2, y_test).item()
        got = [r["test_loss"] for r in out.curves if r["seed"] == s and r["step"] == cfg.steps][0]
        assert got == pytest.approx(want, rel=1e-4)


def test_forward_matches_a_loop_over_runs():
    gen = torch.Generator().manual_seed(1)
    params = itw.init_params(3, 5, 4, 2, generator=gen)
    x = torch.randn(3, 7, 5, generator=gen)
    out = itw.forward(params, x)
    for r in range(3):
        W1, b1, W2, b2 = (p[r] for p in params)
        torch.testing.assert_close(out[r], torch.tanh(x[r] @ W1 + b1) @ W2 + b2)
    shared = itw.forward(params, x[0])  # a (B, d) batch is used by every run
    torch.testing.assert_close(shared[2], torch.tanh(x[0] @ params[0][2] + params[1][2]) @ params[2][2] + params[3][2])


def test_optimizers_are_the_documented_ones():
    run = [torch.zeros(3, requires_grad=True)]
    assert type(itw.make_optimizer("SGD", [run], TINY)) is torch.optim.SGD
    vclip = itw.make_optimizer("VClip", [run, [torch.zeros(2, requires_grad=True)]], TINY)
    assert isinstance(vclip, MedianSGD) and len(vclip.param_groups) == 2  # one group per run
    assert vclip.param_groups[0]["scope"] == "global" and vclip.param_groups[0]["div"] == "l2"
    momentum = itw.make_optimizer("momentum", [run], TINY)
    assert momentum.param_groups[0]["tau"] == pytest.approx(1 / TINY.beta - 1)
    sign = itw.make_optimizer("signed increment", [run], TINY)
    assert (sign.param_groups[0]["method"], sign.param_groups[0]["div"]) == ("sgd", "l1")
    with pytest.raises(ValueError, match="unknown method"):
        itw.make_optimizer("Adam", [run], TINY)


def test_sweep_records_and_bad_parameters():
    records = itw.sweep(TINY, "tau_cclip", [0.005, 0.02], methods=("CClip",), settings=("clean",))
    assert [(r["parameter"], r["value"], r["method"], r["setting"]) for r in records] == [
        ("tau_cclip", 0.005, "CClip", "clean"), ("tau_cclip", 0.02, "CClip", "clean")]
    with pytest.raises(ValueError, match="cannot sweep"):
        itw.sweep(TINY, "methods", [("SGD",)], methods=("SGD",))
    with pytest.raises(ValueError, match="cannot sweep"):
        itw.sweep(TINY, "learning_rate", [0.1], methods=("SGD",))


def test_run_is_reproducible_and_single_threaded(tiny_result):
    torch.set_num_threads(2)
    again = itw.run(TINY)
    assert again.curves == tiny_result.curves
    assert torch.get_num_threads() == 2  # restored after the single-threaded run


def test_scales_differ_only_in_sizes():
    assert set(itw.CONFIGS) == set(SCALES)
    ci, paper = itw.CONFIGS["ci"], itw.CONFIGS["paper"]
    changed = {f.name for f in dataclasses.fields(ci) if getattr(ci, f.name) != getattr(paper, f.name)}
    assert changed <= {"steps", "seeds", "eval_every", "sweep_steps", "sweep_seeds"}
    assert paper.steps > ci.steps and paper.seeds > ci.seeds


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown scale"):
        itw.run("huge")
    with pytest.raises(TypeError, match="config"):
        itw.run(1.0)
    bad = [dict(steps=0), dict(lr=0.0), dict(tau_vclip=-1.0), dict(beta=1.0), dict(noise_alpha=2.5),
           dict(corrupt_prob=1.5), dict(corrupt_factor=math.inf), dict(methods=("SGD", "SGD")),
           dict(methods=("Adam",)), dict(settings=()), dict(test_fraction=1.0), dict(seeds=True),
           dict(early_fraction=0.0)]
    for kw in bad:
        with pytest.raises(ValueError):
            itw.InTheWildConfig(**kw)
    with pytest.raises(TypeError, match="dtype"):
        itw.run(TINY, dtype=torch.int32)
