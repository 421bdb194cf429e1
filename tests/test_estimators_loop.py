"""The CPU loop of ``estimator_update`` (two-level ``"l2"`` norms, scratch views, numbers as
weights) against the per-tensor path it replaced: bitwise for ``"sq"`` and ``"l1"``, within a
few roundings of the norm for ``"l2"`` (the order of summation of each norm changed)."""

import itertools

import pytest
import torch

import median_sgd.estimators as est
from median_sgd.estimators import estimator_update
from median_sgd.optim import MedianSGD
from median_sgd.prox import l2_step_weight

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# across NORM_ROW (4096) and SMALL_TENSOR (65536): whole rows, a padded last row, one short row
SHAPES = [(260, 260), (7,), (2, 3), (5000,), (64, 64), (3, 4099)]
RULES = [(div, method, scope) for div, method in itertools.product(("sq", "l1", "l2"), ("spp", "sgd"))
         for scope in (("param", "global") if div == "l2" else ("param",))]


def tensors(dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    def one(s):
        return (scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
    return [one(s) for s in SHAPES], [one(s) for s in SHAPES], [one(s) for s in SHAPES]


def per_tensor_reference(ms, gs, ws, *, tau, div, method, scope, lr, shrink):
    """The per-tensor path: each tensor's whole-tensor norm (one accumulation), ``lerp_`` with a
    0-dim weight; the global scope's norm from the per-tensor norms."""
    ms, ws = [m.clone() for m in ms], [w.clone() for w in ws]
    clip = method == "spp"
    if div == "l2":
        work = [torch.float32 if m.dtype == torch.bfloat16 else m.dtype for m in ms]
        norms = [torch.linalg.vector_norm(g - m, dtype=t) for m, g, t in zip(ms, gs, work)]
        if scope == "global":
            total = torch.linalg.vector_norm(torch.stack(norms))
            norms = [total] * len(ms)
        for m, g, n in zip(ms, gs, norms):
            m.lerp_(g, l2_step_weight(n, None, tau, clip=clip).to(m.dtype))
    for i, (m, g) in enumerate(zip(ms, gs)):
        if div == "sq":
            m.lerp_(g, tau / (1.0 + tau) if clip else tau)
        elif div == "l1":
            d = g - m
            if clip:
                m.add_(d.clamp_(-tau, tau))
            else:
                muls, big, t, alpha = est._sign_plan(m.dtype, tau)
                for _ in range(muls):
                    d.mul_(big)
                m.add_(d.clamp_(-t, t), alpha=alpha)
        ws[i].mul_(shrink).add_(m, alpha=-lr)
    return ms, ws


def l2_tolerance(dtype, gs, ms):
    """Two sums of the same squares in another order differ by a few roundings of the norm, so
    the weights (and the steps) by a few of theirs; bfloat16 rounds the weight to 8 bits, where
    one rounding of the float32 norm can move it by one bfloat16 step."""
    if dtype == torch.bfloat16:
        return dict(rtol=2**-7, atol=2**-7)
    eps = torch.finfo(dtype).eps
    spread = max(float((g - m).abs().max()) for g, m in zip(gs, ms))
    return dict(rtol=16 * eps, atol=16 * eps * spread)


@pytest.mark.parametrize("run", [est.L2_RUN, 10_000], ids=["runs", "short-runs"])
@pytest.mark.parametrize("foreach", [False, "auto"], ids=["loop", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div,method,scope", RULES)
def test_loop_matches_the_per_tensor_path(div, method, scope, dtype, foreach, run, monkeypatch):
    monkeypatch.setattr(est, "L2_RUN", run)
    ms, gs, ws = tensors(dtype)
    tau, lr, shrink = (3.0 if div == "l2" else 0.1), 0.05, 0.99  # tau 3: some tensors inside the ball
    want_m, want_w = per_tensor_reference(ms, gs, ws, tau=tau, div=div, method=method, scope=scope,
                                          lr=lr, shrink=shrink)
    got_m, got_w = [m.clone() for m in ms], [w.clone() for w in ws]
    scratch: dict = {}
    for _ in range(2):  # the second call reuses the scratch buffer and its views
        got_m, got_w = [m.clone() for m in ms], [w.clone() for w in ws]
        estimator_update(got_m, gs, tau=tau, div=div, method=method, scope=scope, foreach=foreach,
                         weights=got_w, lr=lr, shrink=shrink, scratch=scratch)
    tol = l2_tolerance(dtype, gs, ms)
    for a, b in zip(got_m + got_w, want_m + want_w):
        in_loop = foreach is False or a.numel() >= est.SMALL_TENSOR
        if div != "l2" and in_loop:
            assert torch.equal(a, b)
        else:  # the l2 norms; or the multi-tensor kernels (unchanged), a rounding apart
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_level_norms_are_as_accurate_as_one_accumulation(dtype):
    """Each tensor's norm from its rows' norms is within a few roundings of the exact norm."""
    ms, gs, _ = tensors(dtype, seed=3)
    lists = est._Lists(ms, gs, [None] * len(ms), [None] * len(ms))
    rule = est._Rule(0.1, "l2", "spp", 0.0, 1.0, 0.0)
    runs, need = est._runs(ms)
    scratch: dict = {}
    parts = [est._run_norms(lists, run, rule, scratch, need) for run in runs]
    assert all(scales is None for _, scales in parts)
    norms = torch.cat([n for n, _ in parts])
    exact = torch.stack([torch.linalg.vector_norm((g.double() - m.double())) for m, g in zip(ms, gs)])
    eps = torch.finfo(torch.float32 if dtype == torch.bfloat16 else dtype).eps
    if dtype == torch.bfloat16:  # the difference itself is rounded to bfloat16 first
        exact = torch.stack([torch.linalg.vector_norm((g - m).double()) for m, g in zip(ms, gs)])
    torch.testing.assert_close(norms.double(), exact, rtol=64 * eps, atol=0)


def test_stale_scratch_never_reaches_a_norm():
    """The padding of the last row is zeroed every step: a scratch buffer full of NaN (left by
    another layout) gives the same steps as a fresh one."""
    ms, gs, ws = tensors(torch.float32, seed=5)
    fresh_m, fresh_w = [m.clone() for m in ms], [w.clone() for w in ws]
    estimator_update(fresh_m, gs, tau=0.5, div="l2", foreach=False, weights=fresh_w, lr=0.1, scratch={})
    scratch: dict = {}
    estimator_update([m.clone() for m in ms[::-1]], gs[::-1], tau=0.5, div="l2", foreach=False, scratch=scratch)
    for value in scratch.values():
        if isinstance(value, torch.Tensor):
            value.fill_(float("nan"))
    got_m, got_w = [m.clone() for m in ms], [w.clone() for w in ws]
    estimator_update(got_m, gs, tau=0.5, div="l2", foreach=False, weights=got_w, lr=0.1, scratch=scratch)
    for a, b in zip(got_m + got_w, fresh_m + fresh_w):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div,method,scope", RULES)
def test_median_sgd_default_path_with_weight_decay(div, method, scope, dtype, decoupled):
    """MedianSGD's default CPU path (the loop and, for small tensors, the multi-tensor kernels)
    with weight decay against the per-tensor path, over three steps."""
    ms0, gs_seq, ws0 = tensors(dtype, seed=7)
    params = [torch.nn.Parameter(w.clone()) for w in ws0]
    wd, lr, tau = 0.1, 0.05, (3.0 if div == "l2" else 0.1)
    opt = MedianSGD(params, lr=lr, tau=tau, div=div, method=method, scope=scope, weight_decay=wd,
                    decoupled_weight_decay=decoupled)
    ref_m = [torch.zeros_like(w) for w in ws0]
    ref_w = [w.clone() for w in ws0]
    for step in range(3):
        grads = tensors(dtype, seed=10 + step)[1]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        samples = grads if decoupled else [torch.add(g, w, alpha=wd) for g, w in zip(grads, ref_w)]
        ref_m, ref_w = per_tensor_reference(ref_m, samples, ref_w, tau=tau, div=div, method=method,
                                            scope=scope, lr=lr, shrink=1.0 - lr * wd if decoupled else 1.0)
    got_m = [opt.state[p]["estimate"] for p in params]
    got_w = [p.detach() for p in params]
    # the small tensors go through the multi-tensor kernels (m + f (g - m), not lerp): a rounding
    # apart from the loop, for every rule
    eps = 2**-7 if dtype == torch.bfloat16 else 64 * torch.finfo(dtype).eps
    for a, b in zip(got_m + got_w, ref_m + ref_w):
        torch.testing.assert_close(a, b, rtol=eps, atol=eps)


def test_a_run_holds_one_dtype():
    """Tensors of two dtypes, alternating: each run of the loop's l2 norms holds one dtype (a
    float64 difference written into a float32 buffer would lose its precision)."""
    gen = torch.Generator().manual_seed(11)
    dtypes = [torch.float32, torch.float64] * 3
    ms = [torch.randn(300, generator=gen, dtype=torch.float64).to(t) for t in dtypes]
    gs = [torch.randn(300, generator=gen, dtype=torch.float64).to(t) for t in dtypes]
    ws = [torch.zeros(300, dtype=t) for t in dtypes]
    want_m, _ = per_tensor_reference(ms, gs, ws, tau=3.0, div="l2", method="spp", scope="param",
                                     lr=0.0, shrink=1.0)
    got_m = [m.clone() for m in ms]
    estimator_update(got_m, gs, tau=3.0, div="l2", foreach=False, scratch={})
    for a, b, g, m in zip(got_m, want_m, gs, ms):
        torch.testing.assert_close(a, b, **l2_tolerance(a.dtype, [g], [m]))


def test_number_weights_round_as_tensor_weights():
    """``_lerp_weights``: a Python number gives the step a tensor weight of the tensor's dtype
    gives, bit for bit (bfloat16: the weight rounded to bfloat16 first)."""
    gen = torch.Generator().manual_seed(12)
    for dtype in DTYPES:
        m = torch.randn(4000, generator=gen).to(dtype)
        g = torch.randn(4000, generator=gen).to(dtype)
        f = torch.tensor([0.3, 0.7001], dtype=est.opmath_dtype(dtype))
        for fi, number in zip(f, est._lerp_weights(f, dtype)):
            with_tensor, with_number = m.clone(), m.clone()
            est._lerp_(with_tensor, g, fi)
            est._lerp_(with_number, g, number)
            assert torch.equal(with_tensor, with_number), dtype


def test_subgradient_step_of_a_tensor_at_its_sample_stays_put():
    """``method="sgd"``: a tensor whose sample equals its estimate (norm 0) does not move and
    stays finite, next to tensors of the same run that do move."""
    ms, gs, _ = tensors(torch.float32, seed=13)
    gs[1] = ms[1].clone()
    got = [m.clone() for m in ms]
    estimator_update(got, gs, tau=0.1, div="l2", method="sgd", foreach=False, scratch={})
    assert torch.equal(got[1], ms[1])
    assert all(bool(torch.isfinite(a).all()) for a in got)
    assert not torch.equal(got[2], ms[2])


def test_an_overflowing_norm_next_to_nan_data_is_scaled():
    """A run with one tensor of NaN data and one whose squares overflow float32: the large
    tensor's step is the one it gets alone (its norm scaled, not Inf), whatever the NaN does."""
    m = torch.zeros(300)
    huge = torch.full((300,), 1e30)
    nan = torch.full((7,), float("nan"))
    alone = [m.clone()]
    estimator_update(alone, [huge], tau=0.5, div="l2", foreach=False, scratch={})
    assert float(alone[0].norm()) == pytest.approx(0.5, rel=1e-5)  # one step of tau toward g
    both = [torch.zeros(7), m.clone()]
    estimator_update(both, [nan, huge], tau=0.5, div="l2", foreach=False, scratch={})
    assert torch.equal(both[1], alone[0])
