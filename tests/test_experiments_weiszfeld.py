"""experiments.weiszfeld: the textbook and smoothed Weiszfeld paths, the smoothed objective."""

import pytest
import torch
from scipy.optimize import minimize

import median_sgd as ms
from median_sgd.experiments import weiszfeld


def sample(seed=0, shape=(30, 3)):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*shape, generator=gen, dtype=torch.float64)
    X[..., :5, :] *= 20
    return X


def test_smoothed_objective_matches_a_loop_and_sandwiches_f():
    X, gen = sample(), torch.Generator().manual_seed(1)
    for nu in (1e-3, 0.5, 5.0):
        for _ in range(20):
            z = 3 * torch.randn(3, generator=gen, dtype=torch.float64)
            loop = 0.0
            for x in X:
                r = float(torch.linalg.vector_norm(z - x))
                loop += r if r >= nu else r * r / (2 * nu) + nu / 2
            f_nu = float(weiszfeld.smoothed_objective(X, z, nu))
            f = float(ms.geometric_median_objective(X, z))
            assert f_nu == pytest.approx(loop, rel=1e-12)
            assert f - 1e-12 <= f_nu <= f + nu * len(X) / 2 + 1e-12


def test_smoothed_path_is_mm_and_reaches_the_scipy_minimiser():
    X = sample()
    for nu in (0.05, 1.0, 4.0):
        path = weiszfeld.weiszfeld_path(X, 300, nu=nu)
        values = weiszfeld.smoothed_objective(X.expand(301, *X.shape), path, nu)
        assert bool((values[1:] <= values[:-1] + 1e-10).all())  # majorise-minimise: monotone
        res = minimize(lambda v: float(weiszfeld.smoothed_objective(X, torch.as_tensor(v), nu)),
                       X.mean(0).numpy(), method="Nelder-Mead",
                       options={"xatol": 1e-11, "fatol": 1e-13, "maxiter": 40000})
        assert torch.linalg.vector_norm(path[-1] - torch.as_tensor(res.x)) < 1e-6


def test_plain_path_agrees_with_the_library_and_breaks_on_a_data_point():
    X = sample(2)
    path = weiszfeld.weiszfeld_path(X, 200)
    gm = ms.geometric_median(X, tol=1e-12, max_iter=5000).median
    assert torch.linalg.vector_norm(path[-1] - gm) < 1e-8
    # five coincident points: the median is that point, and the textbook iteration divides 0/0
    Y = torch.cat([torch.ones(5, 2, dtype=torch.float64), 3 * sample(3, (4, 2))])
    plain = weiszfeld.weiszfeld_path(Y, 60)
    assert bool(torch.isnan(plain[-1]).all())
    smoothed = weiszfeld.weiszfeld_path(Y, 60, nu=1e-6)
    assert torch.allclose(smoothed[-1], torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_path_is_batched_weighted_and_leaves_inputs_alone():
    X = sample(4, (2, 7, 3))
    X0 = X.clone()
    w = torch.rand(2, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    path = weiszfeld.weiszfeld_path(X, 5, nu=0.1, weights=w)
    assert path.shape == (6, 2, 3) and torch.equal(X, X0)
    for b in range(2):
        single = weiszfeld.weiszfeld_path(X[b], 5, nu=0.1, weights=w[b])
        assert torch.allclose(single, path[:, b])
    assert torch.allclose(path[0], (w.unsqueeze(-1) * X).sum(-2) / w.sum(-1, keepdim=True))
    assert weiszfeld.weiszfeld_path(X.float(), 2).dtype == torch.float32
    start = torch.zeros(2, 3, dtype=torch.float64)
    assert torch.equal(weiszfeld.weiszfeld_path(X, 1, start=start)[0], start)


def test_objective_trace_follows_the_library():
    X = sample(5)
    trace = weiszfeld.objective_trace(X, 8)
    assert trace.shape == (9,)
    assert float(trace[0]) == pytest.approx(float(ms.geometric_median_objective(X, X.mean(0))))
    z3 = ms.geometric_median(X, max_iter=3, tol=0.0).median
    assert float(trace[3]) == pytest.approx(float(ms.geometric_median_objective(X, z3)))
    assert bool((trace[1:] <= trace[:-1] + 1e-10).all())


def test_bad_input():
    X = sample()
    with pytest.raises(ValueError, match="iters"):
        weiszfeld.weiszfeld_path(X, -1)
    with pytest.raises(ValueError, match="nu"):
        weiszfeld.weiszfeld_path(X, 1, nu=-1.0)
    with pytest.raises(ValueError, match="nu"):
        weiszfeld.smoothed_objective(X, X[0], 0.0)
    with pytest.raises(ValueError, match="weights"):
        weiszfeld.weiszfeld_path(X, 1, weights=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        weiszfeld.weiszfeld_path(X, 1, weights=-torch.ones(30, dtype=torch.float64))
    with pytest.raises(ValueError, match="start"):
        weiszfeld.weiszfeld_path(X, 1, start=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_iter"):
        weiszfeld.objective_trace(X, 2, max_iter=3)
    with pytest.raises(TypeError):
        weiszfeld.weiszfeld_path(X.long(), 1)
    with pytest.raises(ValueError):
        weiszfeld.smoothed_objective(X, torch.zeros(2, dtype=torch.float64), 1.0)
