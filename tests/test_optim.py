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
    for _ in range(3000):
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
    with pytest.raises(NotImplementedError, match="meta"):  # "raise" must read a flag: documented to synchronise
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
    from median_sgd.estimators import estimator_update

    shapes = [(300, 300), (7,), (2, 3)]
    ms_ = [torch.empty(s, device="meta") for s in shapes]
    gs = [torch.empty(s, device="meta") for s in shapes]
    ws = [torch.empty(s, device="meta") for s in shapes]
    estimator_update(ms_, gs, tau=0.5, div=div, method=method, scope=scope, foreach="auto",
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


def _net_with_sample_gradients(n: int, seed: int):
    """``small_net``'s parameters with ``n`` random float64 per-sample gradients each
    (``p.grad_sample``): ``(params, samples, params before any step)``."""
    params = list(small_net().parameters())
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randn(n, *p.shape, generator=gen, dtype=torch.float64) for p in params]
    before = [p.detach().clone() for p in params]
    for p, s in zip(params, samples):
        p.grad_sample = s
    return params, samples, before


@pytest.mark.parametrize("aggregate", ["mean", "coordinate_median", "trimmed_mean",
                                       "geometric_median"])
@pytest.mark.parametrize("scope", SCOPES)
def test_sample_median_sgd_steps_along_the_aggregate(aggregate, scope):
    params, samples, before = _net_with_sample_gradients(7, seed=1)
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


@pytest.mark.parametrize("init", ["mean", "median"])
def test_sample_median_sgd_passes_the_geometric_median_start(init):
    params, samples, before = _net_with_sample_gradients(5, seed=3)
    opt = SampleMedianSGD(params, lr=0.5, aggregate="geometric_median", gm_options={"init": init})
    assert opt.defaults["gm_options"] == {"init": init, "max_iter": 10, "fixed_iter": True}
    opt.step()
    flat = ms.geometric_median(torch.cat([s.reshape(5, -1) for s in samples], 1), init=init,
                               max_iter=10, fixed_iter=True).median
    for p, b, a in zip(params, before, flat.split([q.numel() for q in params])):
        torch.testing.assert_close(p.detach(), b - 0.5 * a.view_as(b), rtol=1e-12, atol=1e-12)


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


# ---------------------------------------------------------------------------------------------
# Hostile magnitudes (issue 12, items 3 and 10)

FOREACH = [False, True, None]
FOREACH_IDS = ["loop", "foreach", "default"]


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("method,scope", list(itertools.product(METHODS, SCOPES)))
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 1e37),
                                         (torch.bfloat16, 1e37), (torch.float64, 1e200)],
                         ids=["f32-1e20", "f32-1e37", "bf16-1e37", "f64-1e200"])
def test_l2_step_with_an_overflowing_norm_moves_tau(dtype, scale, method, scope, foreach):
    """||g|| overflows the dtype: the estimate still moves by tau towards g (it stayed at 0)."""
    shapes = [(70_000,), (40,), (3, 5)]  # one tensor for the loop of the default CPU path
    g = torch.Generator().manual_seed(3)
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = (scale * (0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64))).to(dtype)
    opt = MedianSGD(params, lr=1.0, tau=0.5, div="l2", method=method, scope=scope, foreach=foreach)
    opt.step()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    steps = []
    for p in params:
        m = opt.state[p]["estimate"].double()
        assert bool(torch.isfinite(m).all())
        unit = p.grad.double() / scale
        if scope == "param":
            torch.testing.assert_close(m, 0.5 * unit / torch.linalg.vector_norm(unit), rtol=tol, atol=0)
        steps.append((m, unit))
        torch.testing.assert_close(p.detach().double(), -m.to(dtype).double(), rtol=0, atol=0)
    if scope == "global":
        total = torch.linalg.vector_norm(torch.cat([u.flatten() for _, u in steps]))
        for m, u in steps:
            torch.testing.assert_close(m, 0.5 * u / total, rtol=tol, atol=0)


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_float16_l2_weight_below_float16_range(scope, foreach):
    """tau / ||g - m|| = 1.7e-7 is subnormal in float16: the step is still tau (it was 40% off)."""
    params = [torch.zeros(10_000, dtype=torch.float16, requires_grad=True),
              torch.zeros(70_000, dtype=torch.float16, requires_grad=True)]
    for p in params:
        p.grad = torch.full_like(p, 6e4)
    opt = MedianSGD(params, lr=1.0, tau=1.0, div="l2", scope=scope, foreach=foreach)
    opt.step()
    if scope == "param":
        for p in params:
            norm = torch.linalg.vector_norm(opt.state[p]["estimate"].double())
            assert norm.item() == pytest.approx(1.0, rel=1e-2)
    else:
        norm = torch.linalg.vector_norm(torch.cat([opt.state[p]["estimate"].double() for p in params]))
        assert norm.item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tau", [1e-6, 0.3, 50.0, 6e4])
def test_sign_step_is_tau_for_the_tiniest_differences(dtype, tau, foreach):
    """g - m = the smallest subnormal (or a difference far below tau): the step is still tau."""
    if tau > torch.finfo(dtype).max:
        pytest.skip("tau beyond the dtype")
    fi = torch.finfo(dtype)
    tiniest = fi.smallest_normal * fi.eps
    p = torch.zeros(6, dtype=dtype, requires_grad=True)
    p.grad = torch.tensor([tiniest, -tiniest, fi.smallest_normal, 0.0, fi.max, float("nan")],
                          dtype=dtype)
    big = torch.zeros(70_000, dtype=dtype, requires_grad=True)  # the loop of the default path
    big.grad = torch.full_like(big, tiniest)
    opt = MedianSGD([p, big], lr=0.0, tau=tau, div="l1", method="sgd", foreach=foreach)
    opt.step()
    t = torch.tensor(tau, dtype=dtype)
    m = opt.state[p]["estimate"]
    assert torch.equal(m[:5], torch.stack([t, -t, t, torch.zeros_like(t), t]))
    assert torch.isnan(m[5])
    assert torch.equal(opt.state[big]["estimate"], torch.full_like(big, tau))


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("div", DIVS)
def test_tau_beyond_the_dtype_range(div, foreach):
    """spp: a radius beyond float32 means no clipping (m = g, and momentum weight ~1);
    sgd: a step of length 1e39 is inf in float32, a clear error before anything moves."""
    params = make_params(dtype=torch.float32)
    grads = grad_sequence(params, 1)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    MedianSGD(params, lr=0.0, tau=1e39, div=div, foreach=foreach).step()
    opt = MedianSGD(params, lr=0.0, tau=1e39, div=div, foreach=foreach)
    opt.step()
    for p, g in zip(params, grads):
        torch.testing.assert_close(opt.state[p]["estimate"], g)
    opt = MedianSGD(params, lr=0.1, tau=1e39, div=div, method="sgd", foreach=foreach)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="tau"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before)) and not opt.state


# ---------------------------------------------------------------------------------------------
# Checked before anything moves: options at every step, nonfinite="raise" across groups
# (issue 12, items 8 and 9)


def two_groups(**kwargs):
    params = make_params()
    opt = MedianSGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, tau=0.5, **kwargs)
    for p, g in zip(params, grad_sequence(params, 1)[0]):
        p.grad = g
    return params, opt


def assert_untouched(params, before, opt, states=None):
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    if states is None:
        assert not opt.state
    else:
        for p, m in zip(params, states):
            assert torch.equal(opt.state[p]["estimate"], m)


def test_nonfinite_raise_checks_every_group_before_any_steps():
    params, opt = two_groups(nonfinite="raise")
    params[2].grad[0, 0, 0] = float("nan")  # only the second group is broken
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="parameter group 1"):
        opt.step()
    assert_untouched(params, before, opt)
    # and only the groups asking for it are checked: "propagate" in group 1 lets NaN through
    opt.param_groups[1]["nonfinite"] = "propagate"
    opt.step()
    assert bool(torch.isnan(params[2]).any()) and bool(torch.isfinite(params[0]).all())


@pytest.mark.parametrize("key,value,error,match", [
    ("div", "l3", ValueError, "div"),
    ("method", "adam", ValueError, "method"),
    ("tau", -3.0, ValueError, "tau"),
    ("tau", float("nan"), ValueError, "tau"),
    ("lr", "0.1", TypeError, "lr"),
    ("scope", "layer", ValueError, "scope"),
    ("nonfinite", "skip", ValueError, "nonfinite"),
    ("maximize", 1, TypeError, "maximize"),
])
def test_options_edited_in_param_groups_are_checked_at_step(key, value, error, match):
    params, opt = two_groups()
    opt.step()
    before = [p.detach().clone() for p in params]
    states = [opt.state[p]["estimate"].clone() for p in params]
    opt.param_groups[1][key] = value
    with pytest.raises(error, match=f"parameter group 1: .*{match}"):
        opt.step()
    assert_untouched(params, before, opt, states)


def test_loading_another_optimizers_state_dict_is_a_clear_error():
    params, opt = two_groups()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    sgd = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(ValueError, match="not a MedianSGD parameter group"):
        opt.load_state_dict(sgd.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k]["estimate"], v["estimate"])
    opt.step()  # still usable


@pytest.mark.parametrize("key,value", [("div", "l3"), ("method", "sgdm"), ("tau", -3.0), ("init", 1)])
def test_loaded_options_are_checked(key, value):
    params, opt = two_groups()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0][key] = value
    fresh = MedianSGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, tau=0.5)
    with pytest.raises((ValueError, TypeError), match=f"parameter group 0: .*{key}"):
        fresh.load_state_dict(saved)
    assert not fresh.state and fresh.param_groups[0][key] != value


def test_older_state_dicts_without_newer_options_load():
    params, opt = two_groups(div="l2", scope="global")
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("foreach", "nonfinite", "init", "decoupled_weight_decay", "maximize"):
            del group[key]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["nonfinite"] == "propagate" and opt.param_groups[1]["foreach"] is None
    assert opt.param_groups[0]["scope"] == "global"
    opt.step()


def test_state_dict_with_estimates_of_another_shape_is_refused():
    params, opt = two_groups()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["estimate"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape"):
        MedianSGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, tau=0.5).load_state_dict(saved)


# ---------------------------------------------------------------------------------------------
# torch.optim conventions (issue 12, item 11): tensor lr, required options, add_param_group


@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_tensor_lr_matches_float_lr(foreach, decoupled):
    runs = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64)):
        params = make_params()
        opt = MedianSGD(params, lr=lr, tau=0.5, div="l2", init="grad", weight_decay=0.1,
                        decoupled_weight_decay=decoupled, foreach=foreach)
        run_optimizer(opt, params, grad_sequence(params, 3))
        runs.append([p.detach() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        MedianSGD(make_params(), lr=torch.tensor([0.1, 0.1]), tau=0.5)
    with pytest.raises(ValueError, match="lr"):
        MedianSGD(make_params(), lr=torch.tensor(-0.1), tau=0.5)


@pytest.mark.parametrize("cls,extra", [(MedianSGD, {"tau": 1.0}), (Clip21, {"tau": 1.0}),
                                       (SampleMedianSGD, {})], ids=lambda x: getattr(x, "__name__", ""))
def test_options_may_come_from_the_groups_alone(cls, extra):
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    kwargs = {"n_workers": 2} if cls is Clip21 else {}
    opt = cls([{"params": [w], "lr": 0.1, **extra}], **kwargs)
    assert opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="required optimization parameter lr"):
        cls([{"params": [w], **extra}], **kwargs)


@pytest.mark.parametrize("cls,bad", [(MedianSGD, {"div": "l0"}), (MedianSGD, {"tau": -1.0}),
                                     (Clip21, {"scope": "layer"}), (Clip21, {"n_workers": 3}),
                                     (SampleMedianSGD, {"aggregate": "max"})],
                         ids=["median-div", "median-tau", "clip21-scope", "clip21-workers", "sample"])
def test_add_param_group_with_a_bad_option_adds_nothing(cls, bad):
    params = make_params()
    kwargs = {"lr": 0.1, **({"tau": 0.5} if cls is not SampleMedianSGD else {}),
              **({"n_workers": 2} if cls is Clip21 else {})}
    opt = cls(params[:1], **kwargs)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": params[1:], **bad})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:]})  # the parameters are still free to be added
    assert len(opt.param_groups) == 2


# ---------------------------------------------------------------------------------------------
# Clip21: n_workers is state, "seen" per parameter and a CPU bool, GradScaler (items 7, 10, 11)


def clip21_run(params, opt, rounds):
    for per_worker in rounds:
        for i, gs in enumerate(per_worker):
            if gs is None:
                continue
            for p, g in zip(params, gs):
                p.grad = None if g is None else g.clone()
            opt.worker_step(i)
        opt.step()


def test_clip21_state_dict_keeps_n_workers_and_refuses_another_count():
    params = make_params()
    opt = Clip21(params, lr=0.1, tau=0.5, n_workers=3)
    clip21_run(params, opt, [grad_sequence(params, 3, seed=s) for s in range(2)])
    saved = copy.deepcopy(opt.state_dict())
    assert all(g["n_workers"] == 3 for g in saved["param_groups"])
    for n in (2, 4):
        other = Clip21([p.detach().clone().requires_grad_() for p in params], lr=0.1, tau=0.5,
                       n_workers=n)
        with pytest.raises(ValueError, match="n_workers|workers"):
            other.load_state_dict(copy.deepcopy(saved))
        assert other.n_workers == n and not other.state
    # a state dict saved before n_workers was part of it: read from the estimates' shape
    for g in saved["param_groups"]:
        del g["n_workers"]
    with pytest.raises(ValueError, match="workers"):
        Clip21(make_params(), lr=0.1, tau=0.5, n_workers=2).load_state_dict(copy.deepcopy(saved))
    same = Clip21(make_params(), lr=0.1, tau=0.5, n_workers=3)
    same.load_state_dict(saved)
    assert same.param_groups[0]["n_workers"] == 3


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_clip21_copies_keep_n_workers_and_step_identically(how):
    import pickle

    params = make_params()
    opt = Clip21(params, lr=0.1, tau=0.5, n_workers=3, init="grad")
    rounds = [grad_sequence(params, 3, seed=s) for s in range(4)]
    clip21_run(params, opt, rounds[:2])
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    clone_params = clone.param_groups[0]["params"]
    assert clone.n_workers == 3
    clip21_run(params, opt, rounds[2:])
    clip21_run(clone_params, clone, rounds[2:])
    for a, b in zip(params, clone_params):
        assert torch.equal(a.detach(), b.detach())


def test_clip21_seen_stays_a_cpu_bool_after_loading():
    params = make_params(dtype=torch.float64)
    opt = Clip21(params, lr=0.1, tau=0.5, n_workers=2, init="grad")
    clip21_run(params, opt, [grad_sequence(params, 2)])
    other = Clip21([p.detach().clone().requires_grad_() for p in params], lr=0.1, tau=0.5,
                   n_workers=2, init="grad")
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for state in other.state.values():
        assert state["seen"].dtype == torch.bool and state["seen"].device.type == "cpu"
        assert state["seen"].tolist() == [True, True]


@pytest.mark.parametrize("scope", SCOPES)
def test_clip21_init_grad_tracks_each_parameter(scope):
    """A parameter without a gradient in a worker's first round still gets its first gradient
    sent unclipped later (before: only the group's first parameter was tracked)."""
    params = make_params()
    n = 2
    rounds = [grad_sequence(params, n, seed=20 + r) for r in range(3)]
    for per_worker in rounds[:1]:
        for gs in per_worker:
            gs[1] = None  # parameter 1 has no gradient in round 0
    opt = Clip21(params, lr=0.1, tau=0.3, n_workers=n, scope=scope, init="grad")
    clip21_run(params, opt, rounds[:2])
    # after round 1, parameter 1's worker estimates are its round-1 gradients, unclipped
    for i in range(n):
        torch.testing.assert_close(opt.state[params[1]]["workers"][i], rounds[1][i][1])
        # the others were clipped in round 1: their estimates moved by at most tau from round 0's
        if scope == "param":
            moved = opt.state[params[0]]["workers"][i] - rounds[0][i][0]
            assert torch.linalg.vector_norm(moved).item() <= 0.3 + 1e-12


def test_clip21_with_grad_scaler_matches_unscaled_and_skips_nonfinite_workers():
    """The documented recipe: scaler.step(opt.worker(i)) per worker, opt.step() for the server."""
    def run(use_scaler, poison):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).double()
        opt = Clip21(model.parameters(), lr=0.1, tau=0.5, n_workers=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
        g = torch.Generator().manual_seed(1)
        data = [[(torch.randn(8, 4, generator=g, dtype=torch.float64),
                  torch.randn(8, 2, generator=g, dtype=torch.float64)) for _ in range(3)]
                for _ in range(4)]
        scales = []
        for r, batches in enumerate(data):
            for i, (x, y) in enumerate(batches):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                if (r, i) == poison:
                    loss = loss * float("inf")
                if use_scaler:
                    scaler.scale(loss).backward()
                    scaler.step(opt.worker(i))
                    scaler.update()
                    scales.append(scaler.get_scale())
                elif (r, i) != poison:  # the reference: that worker skips that round
                    loss.backward()
                    opt.worker_step(i)
            opt.step()
        return [p.detach().clone() for p in model.parameters()], scales

    for poison in (None, (1, 2)):
        ref, _ = run(False, poison)
        got, scales = run(True, poison)
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
        if poison is not None:
            # the scaler saw the Inf (and only there) and backed off
            assert [k for k in range(1, len(scales)) if scales[k] < scales[k - 1]] == [1 * 3 + 2]


# ---------------------------------------------------------------------------------------------
# CUDA: MedianSGD.step makes no host synchronisation and matches the CPU (issue 13)


@pytest.mark.cuda
@pytest.mark.parametrize("foreach", FOREACH, ids=FOREACH_IDS)
@pytest.mark.parametrize("div,method,scope", RULES)
def test_median_sgd_step_cuda_no_host_sync_and_matches_cpu(no_host_sync, div, method, scope, foreach):
    device = torch.device("cuda", torch.cuda.current_device())
    shapes = [(300, 300), (7,), (70_000,), (2, 3)]
    g = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[3 * torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    grads[1][1][0] = float("nan")  # masked below
    configs = [dict(nonfinite="mask", weight_decay=0.1),
               dict(init="grad", weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
               dict(lr=torch.tensor(0.05, device=device))]
    for config in configs:
        results = []
        for dev in ("cpu", device):
            params = [x.to(dev).requires_grad_() for x in start]
            kwargs = dict(lr=0.05, tau=0.5, div=div, method=method, scope=scope, foreach=foreach)
            kwargs.update(config)
            if isinstance(kwargs["lr"], torch.Tensor):
                kwargs["lr"] = kwargs["lr"].to(dev)
            opt = MedianSGD(params, **kwargs)
            for gs in grads:
                for p, x in zip(params, gs):
                    p.grad = x.to(dev)
                if "nonfinite" not in config:
                    for p in params:
                        p.grad = torch.nan_to_num(p.grad)
                if dev == "cpu":
                    opt.step()
                else:
                    with no_host_sync():
                        opt.step()
            results.append([p.detach().cpu() for p in params])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float16, 6e4)], ids=["f32", "f16"])
def test_median_sgd_l2_cuda_overflow_path_no_host_sync(no_host_sync, dtype, scale):
    """On a GPU every l2 norm takes the scaled path; it must not read anything on the host."""
    device = torch.device("cuda", torch.cuda.current_device())
    for method, scope, foreach in itertools.product(METHODS, SCOPES, (False, True)):
        params = [torch.zeros(s, dtype=dtype, device=device, requires_grad=True) for s in [(4000,), (3, 5)]]
        for p in params:
            p.grad = torch.full_like(p, scale)
        opt = MedianSGD(params, lr=1.0, tau=0.5, div="l2", method=method, scope=scope, foreach=foreach)
        with no_host_sync():
            opt.step()
        norms = [torch.linalg.vector_norm(opt.state[p]["estimate"].double()) for p in params]
        if scope == "param":
            assert all(n.item() == pytest.approx(0.5, rel=1e-2) for n in norms)
        else:
            assert torch.linalg.vector_norm(torch.stack(norms)).item() == pytest.approx(0.5, rel=1e-2)


@pytest.mark.cuda
def test_clip21_cuda_no_host_sync_after_loading(no_host_sync):
    device = torch.device("cuda", torch.cuda.current_device())
    params = [torch.randn(5, 4, device=device, requires_grad=True), torch.randn(3, device=device, requires_grad=True)]
    opt = Clip21(params, lr=0.1, tau=0.5, n_workers=2, init="grad")
    other = Clip21(params, lr=0.1, tau=0.5, n_workers=2, init="grad")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.worker_step(0)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # "seen" must come back to the CPU
    with no_host_sync():
        for o in (opt, other):
            o.worker_step(0)
            o.worker_step(1)
            o.step()


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float16, 6e4)], ids=["f32", "f16"])
def test_clip21_message_with_an_overflowing_norm_has_norm_tau(dtype, scale, scope, foreach):
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in [(4000,), (3, 5)]]
    for p in params:
        p.grad = torch.full_like(p, scale)
    opt = Clip21(params, lr=1.0, tau=0.5, n_workers=2, scope=scope, foreach=foreach)
    opt.worker_step(0)
    norms = [torch.linalg.vector_norm(opt.state[p]["workers"][0].double()) for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms)) if scope == "global" else None
    for n in ([total] if scope == "global" else norms):
        assert n.item() == pytest.approx(0.5, rel=1e-2)
