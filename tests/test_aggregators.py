"""The aggregators' common interface, Krum against a brute-force transcription of Blanchard et
al.'s rule, and the by-name factory."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.stats
import torch

import median_sgd as ms
from median_sgd.aggregators import (
    AGGREGATORS,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Mean,
    TrimmedMean,
    krum,
    krum_scores,
    make_aggregator,
)


def rows(n=9, d=6, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def brute_force_krum(G, f, m=1):
    X = G.numpy()
    n = len(X)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((X[i] - X[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    order = np.argsort(scores, kind="stable")[:m]
    return np.array(scores), X[order].mean(0)


@pytest.mark.parametrize("n, f", [(7, 2), (10, 3), (12, 1), (5, 0)])
def test_krum_matches_brute_force(n, f):
    for seed in range(5):
        G = rows(n, 4, seed=seed)
        G[:f] += 8.0 * torch.randn(f, 4, generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64)
        scores, chosen = brute_force_krum(G, f)
        np.testing.assert_allclose(krum_scores(G, f).numpy(), scores, rtol=1e-9)
        np.testing.assert_allclose(krum(G, f).numpy(), chosen, rtol=1e-12)
        _, multi = brute_force_krum(G, f, m=n - f)
        np.testing.assert_allclose(krum(G, f, m=n - f).numpy(), multi, rtol=1e-9)


def test_krum_ignores_far_outliers():
    G = rows(11, 5)
    G[:4] = 1e6
    u = Krum(f=4)(G)
    assert torch.linalg.vector_norm(u) < 10
    assert any(torch.equal(u, G[i]) for i in range(4, 11)), "Krum returns one of the rows"


def test_krum_batched():
    Gs = torch.stack([rows(8, 3, seed=s) for s in range(4)])
    out = krum(Gs, 2, m=3)
    for i in range(4):
        torch.testing.assert_close(out[i], krum(Gs[i], 2, m=3))


def test_aggregators_against_oracles():
    G = rows(9, 6)
    torch.testing.assert_close(Mean()(G), G.mean(0))
    torch.testing.assert_close(CoordinateMedian()(G), torch.from_numpy(np.median(G.numpy(), 0)))
    torch.testing.assert_close(
        TrimmedMean(0.25)(G), torch.from_numpy(scipy.stats.trim_mean(G.numpy(), 0.25, axis=0)))
    gm = GeometricMedian(tol=1e-12, max_iter=5000)
    u = gm(G)
    # first-order optimality: the unit vectors to the points sum to ~0
    unit = (G - u) / torch.linalg.vector_norm(G - u, dim=1, keepdim=True)
    assert torch.linalg.vector_norm(unit.sum(0)) < 1e-8
    assert bool(gm.last_gm.converged)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_aggregator_keeps_dtype_device_shape_and_input(name, device, dtype):
    options = {"krum": {"f": 2}, "multi_krum": {"f": 2, "m": 4},
               "bgmd": {"k": 3, "generator": torch.Generator(device=device.type).manual_seed(0)}}
    agg = make_aggregator(name, **options.get(name, {}))
    G = rows(9, 8, dtype=dtype, device=device)
    before = G.clone()
    for _ in range(2):
        u = agg(G)
        assert u.shape == (8,) and u.dtype == dtype and u.device == device
    assert torch.equal(G, before)
    agg.reset()


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_positive_homogeneity(name):
    """agg(c G) = c agg(G): scaling by the step size before or after aggregating agrees."""
    options = {"krum": {"f": 2}, "multi_krum": {"f": 2, "m": 4}, "bgmd": {"k": 3, "mode": "topk"},
               "gmd": {"tol": 1e-12, "max_iter": 5000}, "gm": {"tol": 1e-12, "max_iter": 5000},
               "geometric_median": {"tol": 1e-12, "max_iter": 5000}}
    G = rows(9, 8)
    a = make_aggregator(name, **options.get(name, {}))(G * 0.01)
    b = make_aggregator(name, **options.get(name, {}))(G) * 0.01
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_breakdown_under_scaled_bit_flip():
    """40% of rows flipped to -100 g: the mean points the wrong way, the medians do not."""
    g = torch.linspace(1.0, 2.0, 20, dtype=torch.float64)
    G = g + 0.1 * rows(10, 20)
    G[:4] = -100 * G[:4]
    cos = lambda u: float(u @ g / (torch.linalg.vector_norm(u) * torch.linalg.vector_norm(g)))
    assert cos(make_aggregator("mean")(G)) < -0.9
    for name in ("cmd", "gmd", "krum", "trimmed_mean"):
        opts = {"krum": {"f": 4}, "trimmed_mean": {"trim": 0.45}}.get(name, {})
        assert cos(make_aggregator(name, **opts)(G)) > 0.95, name


def test_make_aggregator_names_and_errors():
    assert isinstance(make_aggregator("SGD"), Mean)
    assert isinstance(make_aggregator("coordinate_median"), CoordinateMedian)
    assert isinstance(make_aggregator("bgmd", k=0.2, memory="median"), ms.BGmD)
    assert make_aggregator("bgmd").k == 0.1
    with pytest.raises(ValueError, match="unknown aggregator 'median_of_means'.*cmd"):
        make_aggregator("median_of_means")
    with pytest.raises(TypeError):
        make_aggregator(3)
    with pytest.raises(TypeError, match="bad options"):
        make_aggregator("cmd", trim=0.1)
    with pytest.raises(TypeError):
        make_aggregator("krum")  # f is required
    with pytest.raises(ValueError, match="needs m"):
        make_aggregator("multi_krum", f=1)
    with pytest.raises(ValueError):
        make_aggregator("trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match="n - f - 2"):
        make_aggregator("krum", f=3)(rows(5, 2))
    with pytest.raises(ValueError):
        Krum(f=-1)
    with pytest.raises(ValueError):
        krum(rows(6, 2), 1, m=7)
    with pytest.raises(TypeError, match="geometric_median option"):
        make_aggregator("gmd", iters=3)


# ---------------------------------------------------------------------------------------------
# Workers' data: rows with NaN or Inf are dropped; huge rows do not overflow; finite data gives
# exactly the plain functions' numbers (the training chapters' outputs depend on that)

NAN_OPTIONS = {"krum": {"f": 2}, "multi_krum": {"f": 2, "m": 4},
               "bgmd": {"k": 0.5, "mode": "topk", "memory": "median"},
               "trimmed_mean": {"trim": 0.25}}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_dropped(name, value, dtype):
    G = rows(10, 6, seed=3, dtype=dtype)
    G[7] *= 50.0  # a finite outlier stays in
    bad = G.clone()
    bad[2] = value
    bad[5, 1] = value  # one coordinate is enough to drop the row
    finite = G[[0, 1, 3, 4, 6, 7, 8, 9]]
    agg = make_aggregator(name, **NAN_OPTIONS.get(name, {}))
    u = agg(bad)
    assert torch.isfinite(u).all() and int(agg.last_dropped) == 2
    # the rows that remain, aggregated (the trimmed mean still trims floor(0.25 * 10) = 2 values
    # at each end: of the 8 that remain, as floor(0.25 * 8) does)
    ref = make_aggregator(name, **NAN_OPTIONS.get(name, {}))(finite)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(u, ref, rtol=tol, atol=tol)


def test_every_row_dropped_gives_no_step():
    G = torch.full((5, 3), float("nan"))
    for name in sorted(AGGREGATORS):
        agg = make_aggregator(name, **NAN_OPTIONS.get(name, {"f": 1} if "krum" in name else {}))
        assert torch.equal(agg(G), torch.zeros(3)), name


def test_the_plain_functions_still_raise_on_nan():
    G = rows(7, 3)
    G[0, 0] = float("nan")
    for f in (ms.coordinate_median, lambda G: ms.trimmed_mean(G, 0.2), ms.geometric_median,
              lambda G: krum(G, 1), lambda G: krum_scores(G, 1)):
        with pytest.raises(ValueError, match="NaN"):
            f(G)


def test_bgmd_memory_is_not_poisoned_by_a_nan_row():
    """make_aggregator("bgmd") (the paper's mean memory) after a round with a NaN row: the memory
    is that of the finite rows, and later clean rounds are BGmD's own."""
    agg = make_aggregator("bgmd", k=0.25, mode="topk", fixed_iter=True, max_iter=20)
    ref = ms.BGmD(0.25, mode="topk", fixed_iter=True, max_iter=20, init="median")  # the aggregator's start
    for step in range(3):
        G = rows(8, 12, seed=step)
        finite = G
        if step == 1:
            G = G.clone()
            G[4, 7] = float("nan")
            finite = G[[0, 1, 2, 3, 5, 6, 7]]
        torch.testing.assert_close(agg(G), ref(finite), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(agg.memory, ref.memory, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_sums_do_not_overflow(dtype):
    """The mean and the trimmed mean of values near the dtype's largest summed in the dtype."""
    big = torch.finfo(dtype).max * 0.75  # two of them overflow
    G = torch.full((6, 4), big, dtype=dtype)
    G[0] = -big
    expected = {"mean": big / 6 * 4, "trimmed_mean": big, "cmd": big}
    for name, value in expected.items():
        opts = {"trim": 0.2} if name == "trimmed_mean" else {}
        u = make_aggregator(name, **opts)(G)
        assert u.dtype == dtype
        torch.testing.assert_close(u.double(), torch.full((4,), value, dtype=torch.float64),
                                   rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_finite_data_gives_the_plain_functions_numbers_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.float32, torch.float64):
        for shape in [(4, 7), (9, 30), (2, 10, 40)]:
            G = (2 * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
            assert torch.equal(make_aggregator("mean")(G), G.mean(-2))
            assert torch.equal(make_aggregator("cmd")(G), ms.coordinate_median(G))
            assert torch.equal(make_aggregator("krum", f=1)(G), krum(G, 1))
            assert torch.equal(make_aggregator("multi_krum", f=1, m=2)(G), krum(G, 1, 2))
            if dtype == torch.float16:
                continue
            for fixed in (False, True):
                for init in ("median", "mean"):  # the aggregator's default first
                    options = {"fixed_iter": fixed, "max_iter": 30, "init": init}
                    assert torch.equal(make_aggregator("gmd", **options)(G),
                                       ms.geometric_median(G, **options).median)
                assert torch.equal(make_aggregator("gmd", fixed_iter=fixed, max_iter=30)(G),
                                   ms.geometric_median(G, fixed_iter=fixed, max_iter=30,
                                                       init="median").median)
            for memory in ("mean", "median", "gm", None):
                agg = make_aggregator("bgmd", k=0.3, memory=memory, max_iter=20,
                                      generator=torch.Generator().manual_seed(2))
                ref = ms.BGmD(0.3, memory=memory, max_iter=20, init="median",
                              generator=torch.Generator().manual_seed(2))
                for _ in range(2):
                    H = (torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
                    assert torch.equal(agg(H), ref(H))


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_dropping_rows_on_cuda_has_no_host_sync(name, no_host_sync):
    options = {"krum": {"f": 2}, "multi_krum": {"f": 2, "m": 4}, "gmd": {"fixed_iter": True},
               "gm": {"fixed_iter": True}, "geometric_median": {"fixed_iter": True},
               "bgmd": {"k": 0.3, "fixed_iter": True, "max_iter": 20, "memory": "median",
                        "generator": torch.Generator(device="cuda").manual_seed(0)}}
    G = rows(9, 50, dtype=torch.float32, device="cuda")
    G[3, 7] = float("nan")
    G[5] = float("inf")
    agg = make_aggregator(name, **options.get(name, {}))
    with no_host_sync():
        outs = [agg(G) for _ in range(2)]
    for u in outs:
        assert u.device == G.device and torch.isfinite(u).all()
    assert int(agg.last_dropped) == 2


# --------------------------------------------------------------------------------------------
# The registry: one vocabulary of rule names and options for make_aggregator, SampleMedianSGD
# and robust_hook


def test_registry_every_name_resolves_to_one_rule():
    from median_sgd.aggregators import PLACES, REGISTRY, Rule, get_rule

    seen = {}
    for canonical, rule in REGISTRY.items():
        assert isinstance(rule, Rule) and rule.name == canonical and rule.summary
        assert rule.places and set(rule.places) <= set(PLACES)
        for name in rule.names:
            assert name not in seen, f"{name!r} names both {seen[name]} and {canonical}"
            seen[name] = canonical
            assert get_rule(name) is rule and get_rule(name.upper()) is rule
            for place in rule.places:
                assert get_rule(name, place) is rule
    # every name that worked before the registry still works, in each place it worked
    for name in ("mean", "sgd", "cmd", "coordinate_median", "gmd", "gm", "geometric_median",
                 "bgmd", "trimmed_mean", "krum", "multi_krum"):
        assert name in AGGREGATORS and get_rule(name, "aggregator")
    for name in ("mean", "coordinate_median", "trimmed_mean", "geometric_median"):
        assert get_rule(name, "optimizer")
    from median_sgd.distributed import RULES
    for name in RULES:
        assert get_rule(name, "hook")
    assert set(AGGREGATORS) == {n for r in REGISTRY.values() if "aggregator" in r.places
                                for n in r.names}
    with pytest.raises(TypeError):  # read-only: no caller changes a rule for everyone
        REGISTRY["bgmd"].options["hook"] = ()  # type: ignore[index]


def test_registry_options_have_one_default_per_place_and_differences_are_documented():
    from median_sgd.aggregators import PLACES, REGISTRY

    for place in PLACES:
        defaults = {}
        for rule in REGISTRY.values():
            if place in rule.places:
                for name, value in rule.defaults(place).items():
                    assert defaults.setdefault(name, value) == value, (place, name)
    for rule in REGISTRY.values():
        per_place = [rule.defaults(p) for p in rule.places]
        shared = set.intersection(*(set(d) for d in per_place))
        if any(d[k] != per_place[0][k] for d in per_place for k in shared):
            assert rule.differences, f"{rule.name}: defaults differ between places, say why"
        for option in (o for p in rule.places for o in rule.options_in(p)):
            if option.default is not ms.aggregators.REQUIRED:
                assert option.check(option.default) == option.default  # defaults are valid


def test_registry_defaults_are_the_ones_each_place_uses():
    import inspect

    from median_sgd.aggregators import REGISTRY
    from median_sgd.distributed import robust_hook
    from median_sgd.optim import SampleMedianSGD

    gm, bgmd = REGISTRY["geometric_median"], REGISTRY["bgmd"]
    signature = inspect.signature(ms.geometric_median).parameters
    iteration = {k: v for k, v in gm.defaults("aggregator").items() if k != "init"}
    assert iteration == {k: signature[k].default for k in iteration}
    # the aggregators start where the registry says (the function: at the mean)
    assert signature["init"].default == "mean" and gm.defaults("aggregator")["init"] == "median"
    assert make_aggregator("gmd").gm_options == {"init": "median"}
    assert make_aggregator("bgmd").gm_options == {"init": bgmd.defaults("aggregator")["init"]}
    signature = inspect.signature(ms.BGmD).parameters
    for name in ("mode", "memory", "power", "generator"):
        assert bgmd.defaults("aggregator")[name] == signature[name].default
    assert make_aggregator("bgmd").k == bgmd.defaults("aggregator")["k"]
    assert TrimmedMean().trim == REGISTRY["trimmed_mean"].defaults("aggregator")["trim"]
    assert Krum(1).m == REGISTRY["krum"].defaults("aggregator")["m"]

    opt = SampleMedianSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert opt.defaults["gm_options"] == {k: v for k, v in gm.defaults("optimizer").items()
                                          if k in ("init", "max_iter", "fixed_iter")}
    assert opt.defaults["trim"] == REGISTRY["trimmed_mean"].defaults("optimizer")["trim"]

    for name in ("trimmed_mean", "gm", "bgmd"):
        hook, rule = robust_hook(name), REGISTRY[ms.aggregators.get_rule(name).name]
        for option, value in rule.defaults("hook").items():
            assert hook.settings[option] == value, (name, option)


def test_one_vocabulary_across_the_three_places():
    """An alias runs the same rule as the canonical name in every place that rule runs."""
    from median_sgd.aggregators import REGISTRY
    from median_sgd.distributed import robust_hook
    from median_sgd.optim import SampleMedianSGD

    G = rows(7, 5)
    for rule in REGISTRY.values():
        for alias in rule.aliases:
            if "aggregator" in rule.places and not rule.name.endswith("krum"):
                assert torch.equal(make_aggregator(alias)(G), make_aggregator(rule.name)(G))
            if "hook" in rule.places:
                a, b = robust_hook(alias), robust_hook(rule.name)
                assert torch.equal(a.simulate(G), b.simulate(G))
                assert a._fingerprint() == b._fingerprint()  # ranks may spell the rule differently
            if "optimizer" in rule.places:
                steps = []
                for name in (alias, rule.name):
                    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
                    p.grad_sample = G.clone()
                    SampleMedianSGD([p], lr=1.0, aggregate=name).step()
                    steps.append(p.detach())
                assert torch.equal(*steps), alias


def test_registry_errors_are_clear():
    from median_sgd.aggregators import get_rule, resolve_rule
    from median_sgd.distributed import robust_hook
    from median_sgd.optim import SampleMedianSGD

    param = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"'krum' does not run in the hook"):
        robust_hook("krum", f=1)
    with pytest.raises(ValueError, match=r"unknown aggregate 'bgmd' \('bgmd' does not run in the optimizer\)"):
        SampleMedianSGD(param, lr=0.1, aggregate="bgmd")
    with pytest.raises(ValueError, match="unknown rule 'median'; expected one of .*coordinate_median"):
        get_rule("median", "hook")
    with pytest.raises(TypeError, match="rule name must be a string"):
        get_rule(None)
    with pytest.raises(ValueError, match="unknown place"):
        get_rule("mean", "server")
    with pytest.raises(TypeError, match=r"unknown geometric_median option\(s\) \['trim'\]; expected some of \['init'"):
        robust_hook("gm", trim=0.1)
    with pytest.raises(TypeError, match=r"unknown geometric_median option\(s\) \['iters'\]"):
        SampleMedianSGD(param, lr=0.1, gm_options={"iters": 3})
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got -1"):
        SampleMedianSGD(param, lr=0.1, aggregate="gm", gm_options={"eps": -1})
    with pytest.raises(ValueError, match=r"trim must be a finite number in \[0, 0.5\), got 0.5"):
        make_aggregator("trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match=r"trim must be"):  # a wrong type stays a ValueError too
        make_aggregator("trimmed_mean", trim="0.2")
    with pytest.raises(ValueError, match="memory"):
        robust_hook("bgmd", memory="gm")  # the hook has no geometric-median memory
    rule, options = resolve_rule("gm", "hook", max_iter=3)
    assert rule.name == "geometric_median"
    assert options == {"init": "median", "eps": 1e-8, "tol": 1e-6, "max_iter": 3, "fixed_iter": True}
    with pytest.raises(TypeError, match="unknown bgmd option"):
        resolve_rule("bgmd", "hook", generator=None)  # the hook seeds its own sampler


def test_finite_rows_and_zero_dropped_copy_nothing_when_every_row_counts():
    from median_sgd import _masked

    G = rows(6, 5, seed=4)
    G[1, 2], G[3, 0], G[4, 4], G[5] = float("nan"), float("inf"), -float("inf"), 1e308
    ok = _masked.finite_rows(G)
    assert ok.tolist() == [True, False, True, False, False, True]
    dropped = _masked.zero_dropped(G, ok)
    assert torch.equal(dropped[ok], G[ok]) and torch.equal(dropped[~ok], torch.zeros(3, 5))
    # every row ok, on the CPU: G itself (no copy of G: the aggregators only read it)
    clean = rows(6, 5, seed=5)
    assert _masked.zero_dropped(clean, _masked.finite_rows(clean)) is clean
    # sums that overflow are still redone from scaled terms (finite ones: no redo)
    huge = torch.full((4, 3), 1e308, dtype=torch.float64)
    count = torch.tensor([4])
    torch.testing.assert_close(_masked.sum_rows_over(huge, count), torch.full((3,), 1e308,
                                                                               dtype=torch.float64))
    torch.testing.assert_close(_masked.sum_rows_over(clean, torch.tensor([6])), clean.mean(0),
                               rtol=0, atol=0)
