"""Hostile data: no minority of bad rows may make a robust aggregate non-finite or drag it away.

Property-based (hypothesis, the suite's derandomized profile): matrices in float16, float32 and
float64 whose rows are honest (standard normal around a random centre) except for fewer than half
of them, which hold NaN, +-Inf, huge finite (up to the dtype's largest value) or tiny (down to
subnormal) values, in the whole row or in some of its coordinates. Every aggregator of
:func:`median_sgd.aggregators.make_aggregator` and every rule of
:func:`median_sgd.distributed.robust_hook` (through ``simulate``) must

* return a finite result and count the non-finite rows as dropped;
* for the coordinate-wise rules (the median; the trimmed mean when it trims at least as many
  values at each end as there are bad rows): stay inside the honest rows' range, per coordinate;
* for the geometric rules (the geometric median; BGmD when its block is the whole vector): stay
  within twice the honest spread of the honest rows' geometric median. (With ``k`` bad rows out
  of ``n`` the exact geometric median lies within ``1 / sqrt(1 - (k / (n - k))^2)`` spreads of it,
  at most 1.94 for the ``n <= 13`` drawn here; the spread is the largest distance of an honest row
  to their geometric median.)

The plain functions (``geometric_median``, ``coordinate_median``, ...) are not tested here: they
raise ``ValueError`` on NaN, which there means a bug in the caller's code.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import median_sgd as ms
from median_sgd.aggregators import make_aggregator
from median_sgd.distributed import robust_hook

DTYPES = (torch.float16, torch.float32, torch.float64)
KINDS = ("nan", "inf", "-inf", "huge", "-huge", "tiny", "mixed")
GEOMETRIC = ("gmd", "gm", "geometric_median", "bgmd")


def _huge(dtype, fraction):
    return torch.finfo(dtype).max * fraction


def _tiny(dtype, subnormal):
    info = torch.finfo(dtype)
    return info.tiny * info.eps if subnormal else info.tiny


@st.composite
def hostile(draw, kinds=KINDS, dtypes=DTYPES):
    """``(G, honest, n_nonfinite)``: a hostile matrix, the indices of its honest rows, and how
    many of its rows hold a NaN or Inf."""
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(3, 13))
    d = draw(st.integers(1, 8))
    n_bad = draw(st.integers(1, (n - 1) // 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    centre = draw(st.sampled_from([0.0, 3.0, -20.0]))
    G = (centre + torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)
    bad_rows = draw(st.permutations(range(n)))[:n_bad]
    nonfinite = 0
    for r in bad_rows:
        kind = draw(st.sampled_from(kinds))
        whole = draw(st.booleans())
        cols = list(range(d)) if whole else sorted(draw(
            st.sets(st.integers(0, d - 1), min_size=1, max_size=d)))
        fraction = draw(st.sampled_from([1.0, 0.5, 2.0**-10]))
        subnormal = draw(st.booleans())
        sign = draw(st.sampled_from([1.0, -1.0]))
        values = {
            "nan": math.nan, "inf": math.inf, "-inf": -math.inf,
            "huge": _huge(dtype, fraction), "-huge": -_huge(dtype, fraction),
            "tiny": sign * _tiny(dtype, subnormal),
        }
        if kind == "mixed":  # NaN, Inf and huge values in one row
            for j, c in enumerate(cols):
                G[r, c] = (math.nan, math.inf, _huge(dtype, fraction))[j % 3]
        else:
            G[r, cols] = values[kind]
        nonfinite += int(not bool(torch.isfinite(G[r]).all()))
    honest = [i for i in range(n) if i not in bad_rows]
    return G, honest, nonfinite


def _has_huge(G):
    finite = G[torch.isfinite(G)].double().abs()
    return bool((finite > 1e3).any())  # honest rows are N(centre, 1), |centre| <= 20


def _slack(H, dtype):
    """Rounding room of a result stored in ``dtype`` near the honest rows ``H``."""
    return 8 * torch.finfo(dtype).eps * float(H.abs().max()) + torch.finfo(dtype).tiny


def _honest_reference(G, honest):
    H = G[honest].double()
    gm = ms.geometric_median(H, tol=1e-13, max_iter=100_000).median
    spread = float(torch.linalg.vector_norm(H - gm, dim=1).max())
    return H, gm, spread


def _check_finite(u, what):
    assert bool(torch.isfinite(u).all()), f"{what}: non-finite result {u}"


def _check_range(u, H, dtype, what):
    slack = _slack(H, dtype)
    lo, hi = H.min(0).values, H.max(0).values
    u = u.double()
    assert bool(((u >= lo - slack) & (u <= hi + slack)).all()), (
        f"{what}: {u} leaves the honest range [{lo}, {hi}]")


def _check_near_gm(u, gm, spread, H, dtype, what):
    gap = float(torch.linalg.vector_norm(u.double() - gm))
    room = 2 * spread + math.sqrt(H.shape[1]) * _slack(H, dtype)
    assert gap <= room, f"{what}: {gap:.4g} from the honest median, spread {spread:.4g}"


def _aggregators(n, n_bad):
    """(name, options, property) for every aggregator of make_aggregator."""
    out = [
        ("mean", {}, "finite"), ("sgd", {}, "finite"),
        ("cmd", {}, "range"), ("coordinate_median", {}, "range"),
        ("trimmed_mean", {}, "finite"), ("trimmed_mean", {"trim": 0.49}, "range"),
        ("gmd", {}, "gm"), ("gm", {}, "gm"), ("geometric_median", {"fixed_iter": True}, "gm"),
        ("bgmd", {"k": 1.0}, "gm"), ("bgmd", {"k": 0.5, "memory": "median"}, "finite"),
        ("bgmd", {"k": 0.3, "memory": "gm", "mode": "topk"}, "finite"),
    ]
    if n >= n_bad + 3:
        out += [("krum", {"f": n_bad}, "row"),
                ("multi_krum", {"f": n_bad, "m": n - n_bad}, "finite")]
    return out


def _run_aggregators(G, honest, nonfinite, skip_geometric_huge):
    H, gm, spread = _honest_reference(G, honest)
    before = G.clone()
    for name, options, prop in _aggregators(G.shape[0], G.shape[0] - len(honest)):
        if skip_geometric_huge and name in GEOMETRIC:
            continue
        what = f"make_aggregator({name!r}, **{options})"
        agg = make_aggregator(name, **options)
        for call in range(2):  # twice: BGmD's memory must not carry a bad value over
            u = agg(G)
            assert u.dtype == G.dtype and u.shape == G.shape[-1:]
            _check_finite(u, what)
            assert int(agg.last_dropped) == nonfinite, what
            if prop == "range":
                _check_range(u, H, G.dtype, what)
            elif prop == "gm" and call == 0:
                _check_near_gm(u, gm, spread, H, G.dtype, what)
            elif prop == "row":  # Krum returns one of the finite rows
                assert any(torch.equal(u, G[i]) for i in range(G.shape[0])
                           if bool(torch.isfinite(G[i]).all())), what
    torch.testing.assert_close(G, before, rtol=0, atol=0, equal_nan=True)


@given(hostile())
def test_aggregators_survive_hostile_rows(case):
    G, honest, nonfinite = case
    # the geometric aggregators with huge finite rows: test_geometric_aggregators_with_huge_rows
    _run_aggregators(G, honest, nonfinite, skip_geometric_huge=_has_huge(G))


# From the mean, Weiszfeld divides its distance to the inliers per iteration only by about the
# ratio of inlier to outlier weight: a row near the dtype's largest value (1e308 in float64)
# needed more than max_iter = 100 iterations (this test was an expected failure). The
# aggregators now start at the coordinate-wise median, in the honest range.
@given(hostile(kinds=("huge", "-huge", "mixed")))
def test_geometric_aggregators_with_huge_rows(case):
    G, honest, nonfinite = case
    _run_aggregators(G, honest, nonfinite, skip_geometric_huge=False)


HOOK_RULES = (
    ("mean", {}, "finite"),
    ("coordinate_median", {}, "range"),
    ("trimmed_mean", {}, "finite"),
    ("trimmed_mean", {"trim": 0.49}, "range"),
    ("gm", {}, "gm"),
    ("gm", {"init": "mean"}, "finite"),  # from the mean, 8 rounds are not robust (see the module)
    ("bgmd", {}, "finite"),
    ("bgmd", {"k": 1.0}, "gm"),
    ("bgmd", {"k": 0.5, "memory": "mean"}, "finite"),
)


@given(hostile())
def test_hook_rules_survive_hostile_ranks(case):
    G, honest, nonfinite = case
    H, gm, spread = _honest_reference(G, honest)
    before = G.clone()
    for rule, options, prop in HOOK_RULES:
        what = f"robust_hook({rule!r}, **{options})"
        hook = robust_hook(rule, **options)
        for call in range(2):  # twice: the "bgmd" memory must not carry a bad value over
            out = hook.simulate(G, key="bucket")
            assert out.dtype == G.dtype and out.shape == G.shape
            assert torch.equal(out, out[:1].expand_as(out)), f"{what}: ranks differ"
            u = out[0]
            _check_finite(u, what)
            if prop == "range":
                _check_range(u, H, G.dtype, what)
            elif prop == "gm" and call == 0:
                _check_near_gm(u, gm, spread, H, G.dtype, what)
        # BGmD's mean memory may push a huge row over the top: then that row is dropped too
        exact = not (rule == "bgmd" and options.get("memory") == "mean")
        assert hook.stats["dropped"] == 2 * nonfinite or (
            not exact and hook.stats["dropped"] >= 2 * nonfinite), what
    torch.testing.assert_close(G, before, rtol=0, atol=0, equal_nan=True)
