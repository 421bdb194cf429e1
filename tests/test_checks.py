"""Bad input raises a clear ValueError / TypeError; value_checks(False) switches off value checks."""

from __future__ import annotations

import threading

import pytest
import torch

import median_sgd as ms

NAN, INF = float("nan"), float("inf")

# Every function taking a tau, as f(x, tau) on a (4, 3) batch of vectors.
TAU_FUNCS = {
    "prox_l1": ms.prox_l1,
    "prox_l2": ms.prox_l2,
    "prox_sq": ms.prox_sq,
    "clip_l1": ms.clip_l1,
    "clip_l2": ms.clip_l2,
    **{f"spp_{d}": (lambda d: lambda x, tau: ms.spp_step(x, x.flip(0), tau, d))(d) for d in ("sq", "l2", "l1")},
    **{f"sgd_{d}": (lambda d: lambda x, tau: ms.sgd_step(x, x.flip(0), tau, d))(d) for d in ("sq", "l2", "l1")},
}
tau_funcs = pytest.mark.parametrize("f", list(TAU_FUNCS.values()), ids=list(TAU_FUNCS))


def X(*shape, dtype=torch.float64):
    return torch.arange(1, 1 + torch.Size(shape).numel(), dtype=dtype).reshape(shape) / 7


# ---------------------------------------------------------------------------------------------
# tau
# ---------------------------------------------------------------------------------------------


@tau_funcs
@pytest.mark.parametrize("tau", [0, 0.0, -0.0, -1.0, -1e-300, NAN, INF, -INF])
def test_bad_tau_number(f, tau):
    with pytest.raises(ValueError, match="tau"):
        f(X(4, 3), tau)


@tau_funcs
@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_bad_tau_tensor_value(f, bad):
    tau = torch.ones(4, dtype=torch.float64)
    tau[2] = bad
    with pytest.raises(ValueError, match="tau"):
        f(X(4, 3), tau)


@tau_funcs
@pytest.mark.parametrize("shape", [(3,), (4, 1), (2, 4), (4, 3)])
def test_bad_tau_tensor_shape(f, shape):
    # the batch shape is (4,): tau must broadcast to it without adding dimensions
    with pytest.raises(ValueError, match="tau"):
        f(X(4, 3), torch.ones(shape, dtype=torch.float64))


@tau_funcs
def test_tau_vector_against_a_single_vector_is_an_error(f):
    # one (3,) vector has batch shape (): a (3,)-shaped tau would be ambiguous
    with pytest.raises(ValueError, match="tau"):
        f(X(2, 3)[0], torch.ones(3, dtype=torch.float64))


@tau_funcs
@pytest.mark.parametrize("tau", [True, "0.1", None, [0.1], torch.ones(4, dtype=torch.complex64),
                                 torch.tensor(True), torch.ones(4, dtype=torch.bool)],
                         ids=["bool", "str", "None", "list", "complex", "bool-tensor", "bool-tensor-4"])
def test_tau_of_wrong_type(f, tau):
    with pytest.raises(TypeError):
        f(X(4, 3), tau)


@tau_funcs
def test_good_tau_forms_accepted(f):
    x = X(4, 3)
    for tau in (1, 0.5, torch.tensor(0.5), torch.full((4,), 0.5), torch.full((1,), 0.5)):
        assert f(x, tau).shape == (4, 3)


# ---------------------------------------------------------------------------------------------
# divergence names, vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [ms.spp_step, ms.sgd_step])
@pytest.mark.parametrize("div", ["L1", "l3", "huber", "", None, 1, "sq "])
def test_unknown_divergence(step, div):
    with pytest.raises(ValueError, match="div"):
        step(X(3), X(3), 0.1, div)


@tau_funcs
@pytest.mark.parametrize("shape", [(), (0,), (4, 0)])
def test_vector_must_have_a_nonempty_last_dimension(f, shape):
    with pytest.raises(ValueError):
        f(torch.zeros(shape, dtype=torch.float64), 0.1)


@tau_funcs
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_vectors(f, bad):
    x = X(4, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        f(x, 0.1)


@pytest.mark.parametrize("step", [ms.spp_step, ms.sgd_step])
@pytest.mark.parametrize("which", ["m", "g"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_nonfinite_m_or_g(step, which, bad):
    m, g = X(2, 3), X(2, 3) * 2
    (m if which == "m" else g)[0, 1] = bad
    with pytest.raises(ValueError, match=which):
        step(m, g, 0.1, "l2")


@pytest.mark.parametrize("step", [ms.spp_step, ms.sgd_step])
def test_m_g_mismatch(step):
    with pytest.raises(TypeError, match="dtype"):
        step(X(3), X(3, dtype=torch.float32), 0.1, "l1")
    with pytest.raises(ValueError, match="vector dimension"):
        step(X(3), X(4), 0.1, "l1")
    with pytest.raises(ValueError):
        step(X(2, 3), X(5, 3), 0.1, "l1")  # batch dims do not broadcast
    with pytest.raises(TypeError):
        step([1.0, 2.0], X(2), 0.1, "l1")


@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_tensors_rejected(int_dtype):
    xi = torch.ones(4, 3, dtype=int_dtype)
    for f in TAU_FUNCS.values():
        with pytest.raises(TypeError):
            f(xi, 0.1)
    for step in (ms.spp_step, ms.sgd_step):
        with pytest.raises(TypeError):
            step(xi, xi, 0.1, "l2")
    for agg in (ms.coordinate_median, ms.geometric_median, lambda G: ms.trimmed_mean(G, 0.1)):
        with pytest.raises(TypeError):
            agg(xi)
    with pytest.raises(TypeError):
        ms.geometric_median(X(4, 3), torch.ones(4, dtype=int_dtype))
    with pytest.raises(TypeError):
        ms.geometric_median_objective(X(4, 3), torch.ones(3, dtype=int_dtype))


# ---------------------------------------------------------------------------------------------
# sample matrices
# ---------------------------------------------------------------------------------------------

AGGREGATORS = {
    "coordinate_median": ms.coordinate_median,
    "trimmed_mean": lambda G: ms.trimmed_mean(G, 0.1),
    "geometric_median": ms.geometric_median,
    "gm_objective": lambda G: ms.geometric_median_objective(G, torch.zeros(3, dtype=torch.float64)),
}
aggregators = pytest.mark.parametrize("agg", list(AGGREGATORS.values()), ids=list(AGGREGATORS))


@aggregators
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0), (2, 0, 3), (2, 3, 0)])
def test_empty_sample_matrix(agg, shape):
    with pytest.raises(ValueError, match="G"):
        agg(torch.zeros(shape, dtype=torch.float64))


@aggregators
@pytest.mark.parametrize("shape", [(5,), ()])
def test_sample_matrix_needs_two_dims(agg, shape):
    with pytest.raises(ValueError, match="G"):
        agg(torch.ones(shape, dtype=torch.float64))


@aggregators
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_sample_matrix(agg, bad):
    G = X(2, 5, 3)
    G[1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        agg(G)


@aggregators
def test_sample_matrix_not_a_tensor(agg):
    with pytest.raises(TypeError):
        agg([[1.0, 2.0], [3.0, 4.0]])


# ---------------------------------------------------------------------------------------------
# geometric_median options and weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0, 0.0, -1e-8, NAN, INF, True, "1e-8", None])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        ms.geometric_median(X(5, 2), eps=eps)


@pytest.mark.parametrize("tol", [-1e-6, NAN, INF, None])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match="tol"):
        ms.geometric_median(X(5, 2), tol=tol)


@pytest.mark.parametrize("max_iter", [0, -1, 1.5, 10.0, True, None, "10"])
def test_bad_max_iter(max_iter):
    with pytest.raises(ValueError, match="max_iter"):
        ms.geometric_median(X(5, 2), max_iter=max_iter)


def test_max_iter_one_and_tol_zero_are_fine():
    res = ms.geometric_median(X(5, 2), max_iter=1, tol=0.0)
    assert int(res.n_iter) == 1


@pytest.mark.parametrize(
    "weights",
    [
        torch.tensor([1.0, -0.1, 1.0, 1.0, 1.0]),  # negative
        torch.zeros(5),  # all zero
        torch.tensor([1.0, NAN, 1.0, 1.0, 1.0]),
        torch.tensor([1.0, INF, 1.0, 1.0, 1.0]),
    ],
    ids=["negative", "all-zero", "nan", "inf"],
)
def test_bad_weight_values(weights):
    with pytest.raises(ValueError, match="weights"):
        ms.geometric_median(X(5, 2), weights.double())


def test_all_zero_weights_in_one_problem_of_a_batch():
    w = torch.ones(3, 5, dtype=torch.float64)
    w[1] = 0.0
    with pytest.raises(ValueError, match="weights"):
        ms.geometric_median(X(3, 5, 2), w)


@pytest.mark.parametrize("shape", [(4,), (6,), (5, 1), (2, 5), (3, 3, 5), (), (1, 3, 5)])
def test_weights_of_wrong_shape(shape):
    # G has batch shape (3,) and n = 5: weights must be (5,), (1, 5) or (3, 5)
    with pytest.raises(ValueError, match="weights"):
        ms.geometric_median(X(3, 5, 2), torch.ones(shape, dtype=torch.float64))


def test_good_weight_shapes_accepted():
    G = X(3, 5, 2)
    for shape in [(5,), (1, 5), (3, 5)]:
        assert ms.geometric_median(G, torch.ones(shape, dtype=torch.float64)).median.shape == (3, 2)


def test_weights_not_a_tensor():
    with pytest.raises(TypeError):
        ms.geometric_median(X(5, 2), [1.0] * 5)


# ---------------------------------------------------------------------------------------------
# value_checks(False)
# ---------------------------------------------------------------------------------------------


def _nan_v():
    v = X(4, 3)
    v[0, 0] = NAN
    return v


def test_value_checks_off_skips_value_checks_and_is_restored():
    neg_tau = torch.full((4,), -1.0, dtype=torch.float64)
    G_inf = X(5, 2)
    G_inf[0, 0] = INF
    neg_w = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    with ms.value_checks(False):
        out = ms.prox_l1(_nan_v(), 0.1)
        assert torch.isnan(out[0, 0]) and torch.isfinite(out[1:]).all()
        ms.spp_step(_nan_v(), X(4, 3), 0.1, "l2")
        ms.clip_l2(X(4, 3), neg_tau)  # a tensor tau's sign is a value check
        ms.coordinate_median(G_inf)
        ms.geometric_median(X(5, 2), neg_w, max_iter=3)
        ms.sample_stable(torch.tensor([1.0, 3.0]), 2)  # alpha range is a value check too
    # restored after the block
    with pytest.raises(ValueError):
        ms.prox_l1(_nan_v(), 0.1)
    with pytest.raises(ValueError):
        ms.clip_l2(X(4, 3), neg_tau)
    with pytest.raises(ValueError):
        ms.coordinate_median(G_inf)
    with pytest.raises(ValueError):
        ms.geometric_median(X(5, 2), neg_w)


def test_value_checks_off_keeps_shape_dtype_and_number_checks():
    with ms.value_checks(False):
        with pytest.raises(ValueError):
            ms.coordinate_median(X(5))  # 1-D G
        with pytest.raises(ValueError):
            ms.geometric_median(X(0, 3))  # n = 0
        with pytest.raises(ValueError):
            ms.spp_step(X(3), X(4), 0.1, "l1")  # vector dimension
        with pytest.raises(TypeError):
            ms.spp_step(X(3), X(3, dtype=torch.float32), 0.1, "l1")  # dtype
        with pytest.raises(ValueError):
            ms.prox_l2(X(4, 3), torch.ones(3, dtype=torch.float64))  # tau shape
        with pytest.raises(ValueError):
            ms.geometric_median(X(3, 5, 2), torch.ones(4, dtype=torch.float64))  # weights shape
        with pytest.raises(ValueError):
            ms.spp_step(X(3), X(3), 0.1, "l3")  # divergence name
        with pytest.raises(ValueError):
            ms.prox_l1(X(3), -1.0)  # a Python number is checked for free
        with pytest.raises(ValueError):
            ms.geometric_median(X(5, 2), max_iter=0)
        with pytest.raises(TypeError):
            ms.prox_l1(torch.ones(3, dtype=torch.int64), 0.1)


def test_value_checks_restored_after_exception_and_nesting():
    with pytest.raises(RuntimeError):
        with ms.value_checks(False):
            raise RuntimeError("boom")
    with pytest.raises(ValueError):
        ms.prox_l1(_nan_v(), 0.1)
    with ms.value_checks(False):
        with ms.value_checks(True):
            with pytest.raises(ValueError):
                ms.prox_l1(_nan_v(), 0.1)
        ms.prox_l1(_nan_v(), 0.1)  # back to off after the inner block
    with pytest.raises(ValueError):
        ms.prox_l1(_nan_v(), 0.1)


def test_value_checks_are_per_thread():
    seen = {}

    def other():
        try:
            ms.prox_l1(_nan_v(), 0.1)
            seen["raised"] = False
        except ValueError:
            seen["raised"] = True

    with ms.value_checks(False):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["raised"] is True


def test_check_real_bounds_types_and_messages():
    from median_sgd._checks import ArgumentTypeError, check_real

    assert check_real(3, "tau", 0, lo_open=True) == 3.0
    assert isinstance(check_real(3, "tau", 0, lo_open=True), float)
    assert check_real(0, "trim", 0, 0.5, hi_open=True) == 0.0
    assert check_real(4, "max_iter", 1, integer=True) == 4
    assert isinstance(check_real(4, "max_iter", 1, integer=True), int)
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0, got 0"):
        check_real(0, "tau", 0, lo_open=True)
    with pytest.raises(ValueError, match=r"trim must be a finite number in \[0, 0.5\), got 0.5"):
        check_real(0.5, "trim", 0, 0.5, hi_open=True)
    with pytest.raises(ValueError, match=r"<= 1"):
        check_real(1.5, "p", hi=1)
    with pytest.raises(ValueError, match="finite"):
        check_real(float("nan"), "eps")
    with pytest.raises(ValueError, match="finite"):
        check_real(float("inf"), "eps", 0)
    for bad in (True, "1", None, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="eps must be"):
            check_real(bad, "eps", 0)
        with pytest.raises(ArgumentTypeError):
            check_real(bad, "eps", 0)
    with pytest.raises(ValueError, match="an integer >= 1"):
        check_real(2.0, "max_iter", 1, integer=True)  # ArgumentTypeError is a ValueError too
    with pytest.raises(ValueError, match="an integer >= 1, got 0"):
        check_real(0, "max_iter", 1, integer=True)
