"""median_sgd.optim: MedianSGD, Clip21, SampleMedianSGD and sample_gradients.

Oracles: the library's own one-step estimators (spp_step / sgd_step, tested against closed forms
in test_estimators.py) applied to flattened vectors in a plain Python loop; torch.optim.SGD for
the momentum special case; per-sample gradients from one backward pass per sample.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import median_sgd as ms
from median_sgd.optim import Clip21, MedianSGD, SampleMedianSGD, sample_gradients

DIVS = ["sq", "l1", "l2"]
METHODS = ["spp", "sgd"]
SCOPES = ["param", "global"]
STEP = {"spp": ms.spp_step, "sgd": ms.sgd_step}
RULES = list(itertools.product(DIVS, METHODS, SCOPES))


def make_params(device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 1, 3)]
    return [torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_() for s in shapes]


def grad_sequence(params, steps, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
            for _ in range(steps)]


def oracle(params, grads_seq, *, lr, tau, div, method, scope, weight_decay=0.0, init="zeros"):
    """The method (17) with spp_step / sgd_step on flattened vectors."""
    w = [p.detach().clone() for p in params]
    m = None
    step = STEP[method]
    for gs in grads_seq:
        gs = [g + weight_decay * x for g, x in zip(gs, w)]
        if m is None and init == "grad":
            m = [g.clone() for g in gs]
        else:
            if m is None:
                m = [torch.zeros_like(x) for x in w]
            if scope == "global":
                flat = step(torch.cat([x.flatten() for x in m]), torch.cat([g.flatten() for g in gs]),
                            tau, div)
                m = [piece.view_as(x) for piece, x in zip(flat.split([x.numel() for x in m]), m)]
            else:
                m = [step(x.flatten(), g.flatten(), tau, div).view_as(x) for x, g in zip(m, gs)]
        w = [x - lr * y for x, y in zip(w, m)]
    return w, m


def run_optimizer(opt, params, grads_seq):
    for gs in grads_seq:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


# ---------------------------------------------------------------------------------------------
# MedianSGD: the method (17) for every rule, both paths, both scopes


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("div,method,scope", RULES)
def test_median_sgd_matches_estimator_oracle(div, method, scope, foreach):
    params = make_params()
    grads = grad_sequence(params, 6)
    w_ref, m_ref = oracle(params, grads, lr=0.05, tau=0.7, div=div, method=method, scope=scope)
    opt = MedianSGD(params, lr=0.05, tau=0.7, div=div, method=method, scope=scope, foreach=foreach)
    run_optimizer(opt, params, grads)
    for p, w, m in zip(params, w_ref, m_ref):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["estimate"], m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("div,method", list(itertools.product(DIVS, METHODS)))
def test_scope_changes_only_l2(div, method):
    params_a, params_b = make_params(), make_params()
    grads = grad_sequence(params_a, 4)
    opt_a = MedianSGD(params_a, lr=0.1, tau=0.5, div=div, method=method, scope="param")
    opt_b = MedianSGD(params_b, lr=0.1, tau=0.5, div=div, method=method, scope="global")
    run_optimizer(opt_a, params_a, grads)
    run_optimizer(opt_b, params_b, grads)
    same = all(torch.allclose(a, b, rtol=0, atol=1e-14) for a, b in zip(params_a, params_b))
    assert same == (div != "l2")


def test_global_l2_clips_the_whole_innovation_to_tau():
    params = make_params()
    opt = MedianSGD(params, lr=0.0, tau=0.25, div="l2", scope="global")
    for p in params:
        p.grad = 100.0 * torch.ones_like(p)
    opt.step()
    total = torch.sqrt(sum((opt.state[p]["estimate"] ** 2).sum() for p in params))
    assert total.item() == pytest.approx(0.25, rel=1e-12)
    # per parameter instead: each tensor's estimate has norm tau
    opt = MedianSGD(make_params(), lr=0.0, tau=0.25, div="l2", scope="param")
    for p in opt.param_groups[0]["params"]:
        p.grad = 100.0 * torch.ones_like(p)
    opt.step()
    for p in opt.param_groups[0]["params"]:
        assert torch.linalg.vector_norm(opt.state[p]["estimate"]).item() == pytest.approx(0.25, rel=1e-12)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_spp_sq_with_init_grad_is_torch_sgd_momentum(foreach):
    tau = 0.5
    beta = 1.0 / (1.0 + tau)
    params_a, params_b = make_params(), make_params()
    grads = grad_sequence(params_a, 8)
    ours = MedianSGD(params_a, lr=0.1, tau=tau, div="sq", init="grad", foreach=foreach)
    theirs = torch.optim.SGD(params_b, lr=0.1, momentum=beta, dampening=beta)
    run_optimizer(ours, params_a, grads)
    run_optimizer(theirs, params_b, grads)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("div,method", [("l1", "spp"), ("l2", "sgd"), ("sq", "spp")])
def test_init_grad_takes_the_first_sample(div, method):
    params = make_params()
    grads = grad_sequence(params, 5)
    w_ref, _ = oracle(params, grads, lr=0.1, tau=0.4, div=div, method=method, scope="global",
                      init="grad")
    opt = MedianSGD(params, lr=0.1, tau=0.4, div=div, method=method, scope="global", init="grad")
    run_optimizer(opt, params, grads)
    for p, w in zip(params, w_ref):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_coupled_weight_decay_is_part_of_the_sample(foreach):
    params = make_params()
    grads = grad_sequence(params, 5)
    w_ref, _ = oracle(params, grads, lr=0.1, tau=0.3, div="l2", method="spp", scope="param",
                      weight_decay=0.2)
    opt = MedianSGD(params, lr=0.1, tau=0.3, div="l2", weight_decay=0.2, foreach=foreach)
    run_optimizer(opt, params, grads)
    for p, w in zip(params, w_ref):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_decoupled_weight_decay_shrinks_before_the_step(foreach):
    params = make_params()
    grads = grad_sequence(params, 4)
    lr, wd, tau = 0.1, 0.3, 0.5
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    for gs in grads:
        m = [ms.spp_step(x.flatten(), g.flatten(), tau, "l1").view_as(x) for x, g in zip(m, gs)]
        w = [(1 - lr * wd) * x - lr * y for x, y in zip(w, m)]
    opt = MedianSGD(params, lr=lr, tau=tau, weight_decay=wd, decoupled_weight_decay=True,
                    foreach=foreach)
    run_optimizer(opt, params, grads)
    for p, x in zip(params, w):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-12)


def test_maximize_is_descent_on_the_negated_gradient():
    params_a, params_b = make_params(), make_params()
    grads = grad_sequence(params_a, 4)
    opt_a = MedianSGD(params_a, lr=0.1, tau=0.5, div="l2", maximize=True)
    opt_b = MedianSGD(params_b, lr=0.1, tau=0.5, div="l2")
    run_optimizer(opt_a, params_a, grads)
    run_optimizer(opt_b, params_b, [[-g for g in gs] for gs in grads])
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_param_groups_have_their_own_rules():
    params = make_params()
    grads = grad_sequence(params, 3)
    opt = MedianSGD([{"params": params[:1], "div": "sq", "tau": 0.2},
                     {"params": params[1:], "lr": 0.3}], lr=0.1, tau=0.6, div="l1")
    refs = []
    for idx, kw in [([0], dict(lr=0.1, tau=0.2, div="sq")),
                    ([1, 2], dict(lr=0.3, tau=0.6, div="l1"))]:
        refs += oracle([params[i] for i in idx], [[gs[i] for i in idx] for gs in grads],
                       method="spp", scope="param", **kw)[0]
    run_optimizer(opt, params, grads)
    for p, w in zip(params, refs):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_parameters_without_gradient_are_left_alone():
    params = make_params()
    before = params[1].detach().clone()
    opt = MedianSGD(params, lr=0.1, tau=0.5)
    for i, p in enumerate(params):
        p.grad = None if i == 1 else torch.ones_like(p)
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert "estimate" not in opt.state[params[1]]


def test_gradients_are_not_modified():
    params = make_params()
    grads = grad_sequence(params, 1)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    MedianSGD(params, lr=0.1, tau=0.5, div="l2", weight_decay=0.1, maximize=True).step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


# ---------------------------------------------------------------------------------------------
# A standard torch.optim.Optimizer: closure, zero_grad, state_dict, training a model


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = MedianSGD(model.parameters(), lr=0.1, tau=1.0, div="l2")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(model.weight.detach(), before)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_pickled_optimizer_keeps_stepping():
    import pickle

    params = make_params()
    opt = MedianSGD(params, lr=0.1, tau=0.5, div="l2", foreach=False)
    run_optimizer(opt, params, grad_sequence(params, 2))
    clone = pickle.loads(pickle.dumps(opt))
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()  # the loop's work buffers are rebuilt, not pickled


@pytest.mark.parametrize("div,method", [("l1", "spp"), ("l2", "sgd"), ("sq", "spp")])
def test_state_dict_round_trip_resumes_exactly(div, method):
    params_a = make_params()
    grads = grad_sequence(params_a, 6)
    opt_a = MedianSGD(params_a, lr=0.1, tau=0.5, div=div, method=method, scope="global")
    run_optimizer(opt_a, params_a, grads)

    params_b = make_params()
    opt_b = MedianSGD(params_b, lr=0.1, tau=0.5, div=div, method=method, scope="global")
    run_optimizer(opt_b, params_b, grads[:3])
    saved = copy.deepcopy(opt_b.state_dict())
    params_c = [p.detach().clone().requires_grad_() for p in params_b]
    opt_c = MedianSGD(params_c, lr=123.0, tau=9.0, div=div, method=method, scope="global")
    opt_c.load_state_dict(saved)
    assert opt_c.param_groups[0]["lr"] == 0.1 and opt_c.param_groups[0]["tau"] == 0.5
    run_optimizer(opt_c, params_c, grads[3:])
    for a, c in zip(params_a, params_c):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("div", DIVS)
def test_trains_a_least_squares_model_through_outliers(div):
    """w* of a linear model, with 5% of the samples' targets corrupted by huge values."""
    gen = torch.Generator().manual_seed(3)
    d, n = 5, 400
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = X @ w_star
    corrupt = torch.rand(n, generator=gen) < 0.05
    y[corrupt] += 1e4 * torch.randn(int(corrupt.sum()), generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    tau = {"sq": 0.1, "l1": 0.05, "l2": 0.05}[div]
    opt = MedianSGD(model.parameters(), lr=0.05, tau=tau, div=div, scope="global")
    for t in range(3000):
        i = int(torch.randint(n, (1,), generator=gen))
        opt.zero_grad()
        (0.5 * (model(X[i]) - y[i]) ** 2).sum().backward()
        opt.step()
    err = torch.linalg.vector_norm(model.weight.detach().flatten() - w_star).item()
    if div == "sq":
        assert err > 1.0  # momentum follows the corrupted samples
    else:
        assert err < 0.2  # the median estimators do not


# ---------------------------------------------------------------------------------------------
# NaN and Inf


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("div,method", list(itertools.product(DIVS, METHODS)))
def test_nan_propagates_by_default(div, method, foreach):
    params = make_params()
    opt = MedianSGD(params, lr=0.1, tau=0.5, div=div, method=method, foreach=foreach)
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[0].detach()[0, 0])
    assert torch.isfinite(params[1].detach()).all()


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("method", METHODS)
def test_inf_is_an_outlier_for_l1_and_nan_for_the_others(method, foreach):
    for div in DIVS:
        params = make_params()
        start = params[0].detach().clone()
        opt = MedianSGD(params, lr=1.0, tau=0.5, div=div, method=method, foreach=foreach)
        for p in params:
            p.grad = torch.zeros_like(p)
        params[0].grad[0, 0] = float("inf")
        opt.step()
        value = params[0].detach()[0, 0]
        if div == "l1":
            assert value.item() == pytest.approx(start[0, 0].item() - 0.5, abs=1e-12)
        else:
            assert not torch.isfinite(value)


def test_nonfinite_raise_modifies_nothing():
    params = make_params()
    opt = MedianSGD(params, lr=0.1, tau=0.5, nonfinite="raise")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    estimates = [opt.state[p]["estimate"].clone() for p in params]
    params[2].grad[0, 0, 1] = float("-inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    for p, b, m in zip(params, before, estimates):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["estimate"], m)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("div,method", list(itertools.product(DIVS, METHODS)))
def test_nonfinite_mask_treats_entries_as_missing(div, method, foreach):
    params = make_params()
    grads = grad_sequence(params, 3)
    opt = MedianSGD(params, lr=0.1, tau=0.5, div=div, method=method, nonfinite="mask",
                    foreach=foreach)
    run_optimizer(opt, params, grads[:2])
    m_before = opt.state[params[0]]["estimate"].clone()
    bad = grads[2][0].clone()
    bad[1, 2] = float("nan")
    bad[0, 0] = float("inf")
    for p, g in zip(params, [bad] + grads[2][1:]):
        p.grad = g
    opt.step()
    m_after = opt.state[params[0]]["estimate"]
    assert torch.isfinite(m_after).all() and all(torch.isfinite(p).all() for p in params)
    assert m_after[1, 2] == m_before[1, 2] and m_after[0, 0] == m_before[0, 0]
    # the other coordinates moved as they would with the gap filled by the estimate
    filled = torch.where(torch.isfinite(bad), bad, m_before)
    expected = STEP[method](m_before.flatten(), filled.flatten(), 0.5, div).view_as(m_before)
    torch.testing.assert_close(m_after, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# No host synchronisation, dtypes and devices


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("div,method,scope", RULES)
def test_step_never_reads_tensor_values_on_the_host(div, method, scope, foreach):
    """On the meta device any host read (``.item()``, ``bool()``) raises: the step has none."""
    params = [torch.empty(s, device="meta", requires_grad=True) for s in [(3, 4), (5,)]]
    for p in params:
        p.grad = torch.empty_like(p)
    for nonfinite in ("propagate", "mask"):
        opt = MedianSGD(params, lr=0.1, tau=0.5, div=div, method=method, scope=scope,
                        weight_decay=0.1, nonfinite=nonfinite, foreach=foreach)
        opt.step()
        opt.step()
    opt = MedianSGD(params, lr=0.1, tau=0.5, nonfinite="raise")
    with pytest.raises(Exception):  # "raise" must read a flag: documented to synchronise
        opt.step()


@pytest.mark.parametrize("div,method,scope", RULES)
def test_dtype_device_kept_and_paths_agree(device, dtype, div, method, scope):
    results = []
    for foreach in (False, True):
        params = make_params(device=device, dtype=dtype)
        grads = grad_sequence(params, 3)
        opt = MedianSGD(params, lr=0.1, tau=0.5, div=div, method=method, scope=scope,
                        foreach=foreach)
        run_optimizer(opt, params, grads)
        for p in params:
            m = opt.state[p]["estimate"]
            assert p.dtype == dtype and p.device.type == device.type
            assert m.dtype == dtype and m.device == p.device and m.shape == p.shape
        results.append([p.detach() for p in params])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("div,method,scope", RULES)
def test_default_cpu_path_mixes_loop_and_multi_tensor_kernels(div, method, scope):
    """foreach=None on the CPU: large tensors in the loop, small ones in multi-tensor kernels."""
    g = torch.Generator().manual_seed(4)
    shapes = [(300, 300), (7,), (70_000,), (2, 3)]  # two above SMALL_TENSOR, two below
    params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    grads = grad_sequence(params, 3)
    w_ref, m_ref = oracle(params, grads, lr=0.05, tau=0.7, div=div, method=method, scope=scope)
    opt = MedianSGD(params, lr=0.05, tau=0.7, div=div, method=method, scope=scope)
    run_optimizer(opt, params, grads)
    for p, w, m in zip(params, w_ref, m_ref):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["estimate"], m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("div,method,scope", RULES)
def test_mixed_path_never_reads_tensor_values_on_the_host(div, method, scope):
    from median_sgd.optim import _estimator_update

    shapes = [(300, 300), (7,), (2, 3)]
    ms_ = [torch.empty(s, device="meta") for s in shapes]
    gs = [torch.empty(s, device="meta") for s in shapes]
    ws = [torch.empty(s, device="meta") for s in shapes]
    _estimator_update(ms_, gs, tau=0.5, div=div, method=method, scope=scope, foreach="auto",
                      weights=ws, lr=0.1, shrink=0.9)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_half_precision_per_tensor_norm_does_not_overflow(foreach):
    p = torch.zeros(300, dtype=torch.float16, requires_grad=True)
    p.grad = torch.full_like(p, 30000.0)  # ||g|| = 5.2e5 > float16's 65504
    MedianSGD([p], lr=1.0, tau=1.0, div="l2", foreach=foreach).step()
    assert torch.linalg.vector_norm(p.detach().double()).item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("tau", [1e-3, 0.3, 50.0])
def test_sign_step_is_exactly_tau_times_the_sign(dtype, tau, foreach):
    p = torch.zeros(5, dtype=dtype, requires_grad=True)
    p.grad = torch.tensor([5.0, -3.0, 0.0, 1e-2, float("nan")], dtype=dtype)
    opt = MedianSGD([p], lr=0.0, tau=tau, div="l1", method="sgd", foreach=foreach)
    opt.step()
    m = opt.state[p]["estimate"]
    t = torch.tensor(tau, dtype=dtype)
    assert torch.equal(m[:4], torch.stack([t, -t, torch.zeros_like(t), t]))
    assert torch.isnan(m[4])


def test_half_precision_global_norm_does_not_overflow():
    params = [torch.zeros(300, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.full_like(p, 3000.0)  # sum of squares 8.1e9 > float16's 65504
    opt = MedianSGD(params, lr=1.0, tau=1.0, div="l2", scope="global")
    opt.step()
    total = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
    assert total.item() == pytest.approx(1.0, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(lr=-0.1), ValueError),
        (dict(lr=float("nan")), ValueError),
        (dict(tau=0.0), ValueError),
        (dict(tau=-1.0), ValueError),
        (dict(tau="1"), TypeError),
        (dict(div="l3"), ValueError),
        (dict(method="adam"), ValueError),
        (dict(scope="layer"), ValueError),
        (dict(weight_decay=-1.0), ValueError),
        (dict(init="ones"), ValueError),
        (dict(nonfinite="skip"), ValueError),
        (dict(foreach=1), TypeError),
        (dict(maximize=1), TypeError),
    ],
)
def test_bad_hyperparameters(kwargs, error):
    base = dict(lr=0.1, tau=0.5)
    base.update(kwargs)
    with pytest.raises(error):
        MedianSGD(make_params(), **base)


def test_bad_param_group_is_rejected():
    opt = MedianSGD(make_params()[:1], lr=0.1, tau=0.5)
    with pytest.raises(ValueError, match="div"):
        opt.add_param_group({"params": make_params()[1:], "div": "l0"})


def test_integer_parameters_and_sparse_gradients_are_rejected():
    with pytest.raises(TypeError, match="floating"):
        MedianSGD([torch.zeros(3, dtype=torch.int64)], lr=0.1, tau=0.5)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        MedianSGD(emb.parameters(), lr=0.1, tau=0.5).step()


# ---------------------------------------------------------------------------------------------
# Clip21


def clip21_oracle(params, rounds, *, lr, tau, n, div="l2", scope="global", init="zeros"):
    """Per worker the SPP step on the flattened model; the server steps along the mean."""
    w = [p.detach().clone() for p in params]
    sizes = [x.numel() for x in w]
    est = [None] * n

    def flat(xs):
        return torch.cat([x.flatten() for x in xs])

    for grads_by_worker in rounds:
        for i, gs in enumerate(grads_by_worker):
            if gs is None:
                continue
            if est[i] is None and init == "grad":
                est[i] = flat(gs)
                continue
            if est[i] is None:
                est[i] = torch.zeros(sum(sizes), dtype=w[0].dtype)
            if scope == "global":
                est[i] = ms.spp_step(est[i], flat(gs), tau, div)
            else:
                pieces = [ms.spp_step(e, g.flatten(), tau, div)
                          for e, g in zip(est[i].split(sizes), gs)]
                est[i] = torch.cat(pieces)
        mean = sum(e for e in est if e is not None) / n
        w = [x - lr * piece.view_as(x) for x, piece in zip(w, mean.split(sizes))]
    return w


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("div,scope,init", [("l2", "global", "zeros"), ("l2", "param", "zeros"),
                                            ("l1", "global", "zeros"), ("l2", "global", "grad")])
def test_clip21_matches_per_worker_spp_oracle(div, scope, init, foreach):
    n = 3
    params = make_params()
    rounds = []
    for r in range(5):
        per_worker = grad_sequence(params, n, seed=10 + r)
        if r == 2:
            per_worker[1] = None  # worker 1 skips a round (partial participation)
        rounds.append(per_worker)
    w_ref = clip21_oracle(params, rounds, lr=0.1, tau=0.8, n=n, div=div, scope=scope, init=init)
    opt = Clip21(params, lr=0.1, tau=0.8, n_workers=n, div=div, scope=scope, init=init,
                 foreach=foreach)
    for per_worker in rounds:
        for i, gs in enumerate(per_worker):
            if gs is None:
                continue
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.worker_step(i)
        opt.step()
    for p, w in zip(params, w_ref):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    # the server's running mean is the mean of the workers' estimates
    for p in params:
        state = opt.state[p]
        torch.testing.assert_close(state["estimate"], state["workers"].mean(0), rtol=1e-12,
                                   atol=1e-12)


def test_clip21_messages_have_norm_at_most_tau():
    params = make_params()
    opt = Clip21(params, lr=0.1, tau=0.3, n_workers=2)
    for p in params:
        p.grad = 50.0 * torch.ones_like(p)
    opt.worker_step(0)
    workers = torch.cat([opt.state[p]["workers"][0].flatten() for p in params])
    assert torch.linalg.vector_norm(workers).item() == pytest.approx(0.3, rel=1e-12)
    server = torch.cat([opt.state[p]["estimate"].flatten() for p in params])
    torch.testing.assert_close(server, workers / 2)


def test_clip21_bad_input():
    with pytest.raises(ValueError):
        Clip21(make_params(), lr=0.1, tau=0.5, n_workers=0)
    with pytest.raises(ValueError):
        Clip21(make_params(), lr=0.1, tau=0.5, n_workers=2, div="sq")
    opt = Clip21(make_params(), lr=0.1, tau=0.5, n_workers=2)
    with pytest.raises(ValueError):
        opt.worker_step(2)


def test_clip21_state_dict_round_trip():
    params = make_params()
    opt = Clip21(params, lr=0.1, tau=0.5, n_workers=2)
    for i in range(2):
        for p, g in zip(params, grad_sequence(params, 1, seed=i)[0]):
            p.grad = g
        opt.worker_step(i)
    opt.step()
    clone = [p.detach().clone().requires_grad_() for p in params]
    other = Clip21(clone, lr=0.1, tau=0.5, n_workers=2)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step()
    other.step()
    for a, b in zip(params, clone):
        assert torch.equal(a.detach(), b.detach())


# ---------------------------------------------------------------------------------------------
# Sample-median SGD


def small_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def loop_grads(model, loss_fn, xs, ys):
    """One backward pass per row: the oracle of sample_gradients."""
    out = []
    for x, y in zip(xs, ys):
        model.zero_grad()
        loss_fn(model(x), y).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(col) for col in zip(*out)]


@pytest.mark.parametrize("micro_batches", [None, 4])
def test_sample_gradients_match_one_backward_per_row(micro_batches):
    model = small_net()
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (8,), generator=gen)
    losses, grads = sample_gradients(model, loss_fn, x, y, micro_batches=micro_batches)
    rows = 8 if micro_batches is None else micro_batches
    xs, ys = x.reshape(rows, -1, 4), y.reshape(rows, -1)
    expected = loop_grads(model, loss_fn, xs, ys)
    assert losses.shape == (rows,)
    for p, g, e in zip(model.parameters(), grads, expected):
        assert g.shape == (rows, *p.shape)
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        assert p.grad_sample is g


def test_sample_gradients_bad_input():
    model = small_net()
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="divisible"):
        sample_gradients(model, loss_fn, x, y, micro_batches=4)
    with pytest.raises(ValueError):
        sample_gradients(model, loss_fn, x, y[:5])


@pytest.mark.parametrize("aggregate", ["mean", "coordinate_median", "trimmed_mean",
                                       "geometric_median"])
@pytest.mark.parametrize("scope", SCOPES)
def test_sample_median_sgd_steps_along_the_aggregate(aggregate, scope):
    model = small_net()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randn(7, *p.shape, generator=gen, dtype=torch.float64) for p in params]
    before = [p.detach().clone() for p in params]
    for p, s in zip(params, samples):
        p.grad_sample = s
    gm = {"max_iter": 200, "fixed_iter": False, "tol": 1e-12}
    opt = SampleMedianSGD(params, lr=0.5, aggregate=aggregate, scope=scope, trim=0.2,
                          gm_options=gm)
    opt.step()
    rows = [s.reshape(7, -1) for s in samples]
    if aggregate == "geometric_median" and scope == "global":
        flat = ms.geometric_median(torch.cat(rows, 1), **gm).median
        agg = list(flat.split([r.shape[1] for r in rows]))
    else:
        fn = {"mean": lambda r: r.mean(0), "coordinate_median": ms.coordinate_median,
              "trimmed_mean": lambda r: ms.trimmed_mean(r, 0.2),
              "geometric_median": lambda r: ms.geometric_median(r, **gm).median}[aggregate]
        agg = [fn(r) for r in rows]
    for p, b, a in zip(params, before, agg):
        torch.testing.assert_close(p.detach(), b - 0.5 * a.view_as(b), rtol=1e-12, atol=1e-12)
    opt.zero_grad()
    assert all(p.grad_sample is None for p in params)


def test_sample_median_sgd_resists_a_corrupted_sample():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()  # the gradient grows with the input
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (9,), generator=gen)
    x[0] *= 1e6  # one wild sample
    moves = {}
    for aggregate in ["mean", "coordinate_median", "geometric_median"]:
        net = copy.deepcopy(model)
        before = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
        opt = SampleMedianSGD(net.parameters(), lr=0.1, aggregate=aggregate)
        sample_gradients(net, loss_fn, x, y)
        opt.step()
        after = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
        moves[aggregate] = torch.linalg.vector_norm(after - before).item()
    assert moves["mean"] > 1e3
    assert moves["coordinate_median"] < 1.0 and moves["geometric_median"] < 1.0


def test_sample_median_sgd_bad_input():
    params = list(small_net().parameters())
    with pytest.raises(ValueError):
        SampleMedianSGD(params, lr=0.1, aggregate="median")
    with pytest.raises(TypeError):
        SampleMedianSGD(params, lr=0.1, gm_options={"iters": 3})
    with pytest.raises(ValueError):
        SampleMedianSGD(params, lr=0.1, trim=0.5)
    opt = SampleMedianSGD(params, lr=0.1)
    params[0].grad_sample = torch.zeros(3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_sample"):
        opt.step()
