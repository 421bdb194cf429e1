"""The experiments draw on a CPU generator and move the draws: the same samples on every device.

A chapter run on a GPU must see the samples of the stored CPU run (its numbers then agree with the
book's up to rounding). The ``meta`` device stands in for an accelerator on a machine without one:
it accepts tensors moved from the CPU but has no generator of its own, so an experiment that
seeds a generator on its compute device fails there. The CUDA tests compare the numbers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import median_sgd as ms
from median_sgd.experiments import _random
from median_sgd.experiments import aggregation_cost as ac
from median_sgd.experiments import bgmd_theory as bth
from median_sgd.experiments import gm_breakdown as gb
from median_sgd.experiments import in_the_wild as itw
from median_sgd.experiments import sample_median_sgd as smsgd
from median_sgd.experiments import stable_noise as sn

TINY_SN = sn.StableNoiseConfig(dim=4, steps=60, seeds=3, tau=0.05, inv_alphas=(0.5, 1.0, 1.5),
                               chunk=25, curve_every=20)


def test_generator_is_the_plain_cpu_stream():
    a = _random.randn((4, 3), generator=_random.generator(7), dtype=torch.float64)
    b = torch.randn(4, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert a.device.type == "cpu" and torch.equal(a, b)
    s = _random.stable(1.5, (5, 2), loc=torch.ones(2), generator=_random.generator(1))
    assert torch.equal(s, ms.sample_stable(1.5, (5, 2), loc=torch.ones(2),
                                           generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("draw", [
    lambda g, device: _random.rand((3, 2), generator=g, device=device),
    lambda g, device: _random.randn(6, generator=g, device=device, dtype=torch.float64),
    lambda g, device: _random.randint(10, (4,), generator=g, device=device),
    lambda g, device: _random.randperm(7, generator=g, device=device),
    lambda g, device: _random.stable(torch.tensor([1.0, 2.0]).view(2, 1), (2, 3),
                                     loc=torch.zeros(3), generator=g, device=device),
])
def test_draws_come_from_the_generator_and_land_on_the_device(draw):
    on_cpu, on_meta = draw(_random.generator(5), "cpu"), None
    g = _random.generator(5)
    on_meta = draw(g, "meta")
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape
    assert on_meta.dtype == on_cpu.dtype
    # the CPU stream advanced exactly as for the CPU draw
    reference = _random.generator(5)
    draw(reference, "cpu")
    assert torch.equal(g.get_state(), reference.get_state())


def test_to_device_returns_a_tensor_already_there_and_checks_the_generator():
    x = torch.zeros(3)
    assert _random.to_device(x, "cpu") is x
    assert _random.to_device(x, torch.device("cpu")) is x
    assert _random.to_device(x, "meta").device.type == "meta"
    with pytest.raises(TypeError, match="generator"):
        _random.rand(3, generator=5)


class _RecordingGenerator(torch.Generator):
    """torch.Generator that records the device of every generator an experiment creates."""

    made: list = []

    def __new__(cls, device="cpu"):
        cls.made.append(torch.device(device))
        return super().__new__(cls, device)


@pytest.fixture
def generators(monkeypatch):
    _RecordingGenerator.made = []
    monkeypatch.setattr(torch, "Generator", _RecordingGenerator)
    return _RecordingGenerator.made


def test_stable_noise_on_another_device_draws_on_the_cpu(generators):
    errors, target = sn.simulate(TINY_SN, device="meta")
    assert errors.device.type == "meta" and target.device.type == "meta"
    assert generators and all(d.type == "cpu" for d in generators)


def test_sample_median_sgd_simulate_takes_a_cpu_generator_for_any_device():
    h = smsgd.curvatures(smsgd.CONFIGS["ci"]).to("meta")
    out = smsgd.simulate(estimator="coordinate median", batch=(2, 3), n=5, h=h, steps=4, eta0=0.1,
                         t0=None, sigma0=1.0, sigma1=1.0, start=1.0,
                         alpha=torch.tensor([1.0, 2.0]).view(2, 1, 1, 1),
                         generator=torch.Generator().manual_seed(0))
    assert out["final"].device.type == "meta" and out["final"].shape == (2, 3, 10)


def test_init_params_and_lomax_draw_on_the_generator():
    from median_sgd.experiments import tracking

    params = itw.init_params(2, 5, 3, 4, generator=torch.Generator().manual_seed(0), device="meta")
    assert [p.device.type for p in params] == ["meta"] * 4
    x = tracking.sample_lomax(1.5, (3, 2), generator=torch.Generator().manual_seed(0), device="meta")
    assert x.device.type == "meta" and x.shape == (3, 2)


# ------------------------------------------------------------------------------------ on CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_stable_noise_on_cuda_matches_the_cpu_run(no_host_sync):
    cpu_errors, cpu_target = sn.simulate(TINY_SN)
    with no_host_sync():  # the draws' copies to the device do not wait for it
        errors, target = sn.simulate(TINY_SN, device="cuda")
    assert torch.equal(target.cpu(), cpu_target)
    torch.testing.assert_close(errors.cpu(), cpu_errors, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
@cuda
def test_sample_median_sgd_on_cuda_matches_the_cpu_run():
    cfg = dataclasses.replace(smsgd.CONFIGS["ci"], stationary_steps=40, stationary_seeds=6,
                              gm_n=20, gm_seeds=3, passes=3, weiszfeld_iters=4)
    for study in (smsgd.stationary_study, smsgd.gm_passes_study):
        for a, b in zip(study(cfg), study(cfg, device="cuda")):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, float):
                    assert b[key] == pytest.approx(value, rel=1e-8, abs=1e-12), (study, key)
                else:
                    assert b[key] == value


@pytest.mark.cuda
@cuda
def test_in_the_wild_on_cuda_trains_from_the_cpu_draws():
    cfg = dataclasses.replace(itw.CONFIGS["ci"], steps=20, seeds=2, eval_every=10)
    cpu, gpu = itw.run(cfg).curves, itw.run(cfg, device="cuda").curves
    start = [(a, b) for a, b in zip(cpu, gpu) if a["step"] == 0]
    for a, b in start:  # the same initial weights
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
    for a, b in zip(cpu, gpu):  # the same batches and noise: only float32 rounding differs
        assert (a["setting"], a["method"], a["seed"], a["step"]) == (
            b["setting"], b["method"], b["seed"], b["step"])
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=0.02)


@pytest.mark.cuda
@cuda
def test_chapter_9_and_10_samples_on_cuda_match_the_cpu():
    cfg = dataclasses.replace(gb.CONFIGS["ci"], seeds=4, fractions=(0.0, 0.2))
    for a, b in zip(gb.breakdown_curves(cfg), gb.breakdown_curves(cfg, device="cuda")):
        assert b["median"] == pytest.approx(a["median"], rel=1e-8)
    tcfg = dataclasses.replace(bth.CONFIGS["ci"], d=200, draws=50)
    for a, b in zip(bth.contraction_study(tcfg), bth.contraction_study(tcfg, device="cuda")):
        assert b["mean"] == pytest.approx(a["mean"], rel=1e-10)
    mem_cpu = bth.memory_identity("ci", psi=0.2)
    mem_gpu = bth.memory_identity("ci", psi=0.2, device="cuda")
    assert mem_gpu[5]["distance"] == pytest.approx(mem_cpu[5]["distance"], rel=1e-6)
    small = dataclasses.replace(ac.CONFIGS["ci"], dims=(2**10,), ns=(8,), n_sweep_dim=2**10,
                                repeats=1)
    iters = [r for r in ac.gm_cost_study(small, device="cuda") if r["sweep"] == "iterations"]
    assert iters and iters[0]["converged"]
