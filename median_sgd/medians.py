"""Medians across samples: coordinate-wise median, geometric median (Weiszfeld), trimmed mean.

A sample matrix ``G`` has shape ``(..., n, d)``: ``n`` samples (rows) of ``d``-dimensional
vectors; leading dimensions are independent problems solved at once. Each function returns the
``(..., d)`` aggregate with ``G``'s dtype and device and never modifies ``G``. Derived in the
chapter "The median as a robust estimator of the mean".

Any finite input gives a finite result: sums that could overflow are taken of values scaled by a
power of two first (exact, so ordinary inputs give the same bits as the plain formula).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_finite, check_float_tensor, value_checks_enabled
from ._numerics import opmath_dtype
from ._numerics import pow2_scale as _pow2_scale

__all__ = [
    "coordinate_median",
    "trimmed_mean",
    "geometric_median",
    "geometric_median_objective",
    "GeometricMedianResult",
]

_HALF = (torch.float16, torch.bfloat16)


def _is_real(x) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _syncs_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing (the CPU) rather than a device
    synchronisation. The fast paths that read values (the CPU's ordered block selection, the
    adaptive loop's convergence checks every iteration) are taken only where this holds; tests
    patch it to run the device code paths on the CPU."""
    return device.type == "cpu"


def _scaled_top(dtype: torch.dtype, d: int) -> int:
    """The exponent ``t`` to which sums of ``d`` squares scale the largest entry: ``2**t`` in size,
    the largest sum of squares (of differences) is below the dtype's largest value, and values
    ``2**(2 t)`` times smaller still square to nonzero numbers: float32 data holding both ~1 and
    ~3e38 (2**128 apart) keep the ~1-sized distances (a scale to 1 would lose them to underflow)."""
    max_exp = int(math.log2(torch.finfo(dtype).max)) + 1  # 128 for float32
    return (max_exp - 4 - (d - 1).bit_length()) // 2


def _max_abs(X: torch.Tensor, dims) -> torch.Tensor:
    """``max |X|`` over ``dims`` (exact)."""
    return torch.linalg.vector_norm(X, ord=float("inf"), dim=dims)


def _max_abs_matrix(X: torch.Tensor) -> torch.Tensor:
    """``max |X|`` over the last two dimensions of ``X`` (..., n, d): shape (...,).

    On the CPU, where the infinity norm is a slow reduction, ``aminmax`` for one contiguous
    matrix, else the column blocks' ``|X|`` maxima (temporaries in cache).
    """
    if X.device.type != "cpu":
        return _max_abs(X, (-2, -1))
    if X.dim() == 2 and X.is_contiguous():
        lo, hi = torch.aminmax(X)
        return torch.maximum(hi, -lo)
    cols, out = _block_columns(X), None
    for start in range(0, X.shape[-1], cols):
        part = X[..., start : start + cols].abs().amax(dim=(-2, -1))
        out = part if out is None else torch.maximum(out, part)
    return out  # type: ignore[return-value]  # X has at least one column: set in the loop


def _mean_rows(X: torch.Tensor, *, owned: bool = False) -> torch.Tensor:
    """``sum_i X_i / m`` over the rows (dimension -2) of ``X`` (..., m, d), without overflow.

    The sum runs over ``X_i p`` with ``p = 2**-ceil(log2 m)`` (then ``/ (m p)``): each partial sum
    is at most ``max |X|``, so finite rows give a finite mean, and the scaling is exact, so the
    result is the plain mean up to the order of summation. Half precision accumulates in float32.
    ``owned``: ``X`` may be scaled in place (a temporary of the caller's).
    """
    if X.dtype in _HALF:
        return _mean_rows(X.float(), owned=True).to(X.dtype)
    m = X.shape[-2]
    p = 2.0 ** -((m - 1).bit_length())  # m p in (1/2, 1]
    if X.device.type == "cpu":
        # on the CPU a matrix-vector product (BLAS) is the fastest sum over rows
        total = torch.matmul(X.new_full((m,), p), X)
    else:
        # elsewhere a reduction: a matrix product could run in TF32 (torch.backends.cuda.matmul)
        total = (X.mul_(p) if owned else X * p).sum(-2)
    return total / (m * p)


def coordinate_median(G: torch.Tensor) -> torch.Tensor:
    """``median_j G[..., :, j]`` per coordinate; the mean of the two middle values when n is even.

    Uses ``kthvalue`` (no size limit, unlike ``torch.quantile``'s 2**24 elements). The two middle
    values are averaged without overflow (``a/2 + b/2`` where ``(a + b)/2`` would overflow).
    """
    _check_sample_matrix_fast(G)
    n = G.shape[-2]
    lower = torch.kthvalue(G, (n + 1) // 2, dim=-2).values
    if n % 2 == 1:
        return lower
    upper = torch.kthvalue(G, n // 2 + 1, dim=-2).values
    mid = (lower + upper) / 2
    # a + b overflows for two values near the dtype's largest (half precision: above ~32,752);
    # halving each first is exact for normal numbers, so elsewhere the bits are those of (a + b)/2
    return torch.where(torch.isfinite(mid), mid, lower / 2 + upper / 2)


def trimmed_mean(G: torch.Tensor, trim: float) -> torch.Tensor:
    """Per coordinate, the mean of the values left after dropping ``floor(trim n)`` from each end.

    ``0 <= trim < 1/2`` (a real number: Python or numpy); ``trim = 0`` is the mean. Matches
    ``scipy.stats.trim_mean(G, trim, axis=-2)``. Finite values give a finite mean (the sum is
    taken of scaled values; half precision accumulates in float32).
    """
    _check_sample_matrix_fast(G)
    if not (_is_real(trim) and 0.0 <= float(trim) < 0.5):
        raise ValueError(f"trim must be a real number in [0, 0.5), got {trim!r}")
    n = G.shape[-2]
    k = int(math.floor(float(trim) * n))
    if k == 0:
        return _mean_rows(G)
    kept = torch.sort(G, dim=-2).values[..., k : n - k, :]
    return _mean_rows(kept, owned=True)


@dataclass(frozen=True)
class GeometricMedianResult:
    """What :func:`geometric_median` returns.

    ``median`` (..., d): the estimate; ``n_iter`` (...): Weiszfeld iterations each problem used;
    ``converged`` (...): whether each problem met the stopping rule within ``max_iter``.
    """

    median: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor


def geometric_median(
    G: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-8,
    tol: float = 1e-6,
    max_iter: int = 100,
    fixed_iter: bool = False,
) -> GeometricMedianResult:
    """``argmin_z sum_i w_i ||z - G_i||_2`` by smoothed Weiszfeld, started at the weighted mean.

    One iteration: ``r_i = ||G_i - z||``, ``b_i = w_i / max(r_i, eps s)``,
    ``z <- z + sum_i b_i (G_i - z) / sum_i b_i``, where ``s`` is the weighted median of the
    distances ``r_i`` (a robust scale: ``eps`` is relative, the result is scale-equivariant, and
    far outliers cannot inflate the floor), floored at the distances' rounding noise. The floor
    keeps every iterate finite when it lands on a data point or when all points coincide.

    Stopping rule (relative, scale-free): a problem has converged once
    ``||sum_i b_i (G_i - z)|| - sum_{i near z} w_i (1 - r_i / (eps s)) <= tol * sum_i w_i``: the
    weighted average of the unit vectors pointing from ``z`` to the points has norm at most
    ``tol`` (it is 0 at the geometric median, by first-order optimality, and at most 1), except
    that points within the floor of ``z`` may absorb up to their weight of it, which is the
    optimality condition when the median is a data point (the floor is at least the distances'
    rounding noise, but only the smoothing floor ``eps s`` absorbs). Converged problems keep their
    result while the others go on.

    Precision: the iteration is translation- and scale-equivariant in floating point too. It
    works on the data scaled by a power of two (``max |G| -> 1``, exact), so that no norm
    overflows or underflows however large or small the values (any finite input gives a finite
    answer); and it carries the iterate as a centre (the previous iterate, rounded) plus an
    offset, computing ``G_i - z`` as ``(G_i - centre) - offset``: data sharing a large common
    component (far from the origin relative to their spread) converge as well as centred data,
    and ``tol`` may be far below the data's relative precision. The answer is rounded to ``G``'s
    dtype at the end. (Half precision is iterated in float32.)

    ``fixed_iter=False`` stops once every problem has converged. On a GPU that costs a host
    synchronisation per check (every iteration for the first four, then every fourth; frozen
    problems keep their result). ``fixed_iter=True`` always runs ``max_iter`` iterations with no
    host synchronisation (for CUDA graphs and ``torch.compile``); its results equal the adaptive
    mode's bit for bit (where the latter does not take the Gram route below).

    Speed: an iteration reads ``G`` once, in column blocks so that no temporary as large as ``G``
    is made: each block gives its part of the new iterate (a weighted sum of the rows) and the
    rows' distances to it. When few samples have many coordinates (``n <= 64`` and
    ``n d >= 2**16``), the adaptive mode first iterates on the coefficients ``c`` of
    ``z = sum_j c_j G_j`` (every Weiszfeld iterate is such a combination) using the ``n x n``
    Gram matrix of the centred rows (one pass over ``G``; the iteration in float64): an
    iteration then costs ``O(n^2)`` instead of ``O(n d)``. It hands the result to the exact
    iteration above, which checks the stopping rule on ``G`` itself and goes on if needed, so
    the answer satisfies the same rule and agrees with ``fixed_iter=True`` up to rounding.

    ``weights`` (..., n) are nonnegative with a positive sum per problem. The breakdown point is
    1/2: fewer than half of the total weight in outliers, however far, moves the median a bounded
    amount. Gradients flow through the final Weiszfeld step (the weights ``b_i`` are treated as
    constants), as in the RFA reference implementation; the value returned is the last iterate.
    """
    _check_sample_matrix_fast(G, values=False)  # finiteness: below, from the mean
    n, d = G.shape[-2], G.shape[-1]
    batch = G.shape[:-2]
    if not (_is_real(eps) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite real number > 0, got {eps!r}")
    if not (_is_real(tol) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite real number >= 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(fixed_iter, bool):
        raise TypeError(f"fixed_iter must be a bool (True or False), got {fixed_iter!r}")
    eps, tol, max_iter = float(eps), float(tol), int(max_iter)

    # Half precision: iterate in float32 and return the input's dtype.
    work_dtype = opmath_dtype(G.dtype)
    X = G.to(work_dtype)
    if weights is None:
        w = X.new_ones(())
        w = w.expand(*batch, n)
    else:
        check_float_tensor(weights, "weights", min_dim=1)
        if weights.device != G.device:
            raise ValueError(f"weights must be on G's device {G.device}, got {weights.device}")
        if weights.shape[-1] != n:
            raise ValueError(
                f"weights must have shape (..., n) with n = {n} samples, got {tuple(weights.shape)}"
            )
        try:
            fits = torch.broadcast_shapes(weights.shape[:-1], batch) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} do not broadcast to G's batch shape "
                f"{tuple(batch)}"
            )
        check_finite(weights, "weights")
        if value_checks_enabled():
            if bool((weights < 0).any()):
                raise ValueError("weights must be nonnegative")
            if bool((weights.sum(-1) <= 0).any()):
                raise ValueError("weights must have a positive sum for every problem")
        w = weights.to(work_dtype)
        # The iteration is invariant to scaling the weights; by a power of two (exact) that brings
        # the largest to 1, their sums cannot overflow.
        w = (w * _pow2_scale(_max_abs(w.detach(), -1)).unsqueeze(-1)).expand(*batch, n)

    uniform = weights is None
    with torch.no_grad():
        X0 = X.detach()
        w0 = w.detach()
        w_sum = w0.sum(-1)  # (...,)
        z = _weighted_mean(X0, w0, w_sum, uniform)
        if value_checks_enabled():
            # NaN and +-Inf propagate through sums, so a finite mean proves finite data (no pass
            # of its own); zero weights could hide a row, so weighted problems sum G instead
            probe = z if uniform else X0.sum()
            if not bool(torch.isfinite(probe).all()):
                check_finite(G, "G")  # decides (a non-finite sum may also be an overflow)
        # Everything below works on X s - centre: s (a power of two, exact) brings max |X| to the
        # middle of the dtype's range (_scaled_top), so no sum of squares over- or underflows; the
        # centre is the previous iterate, rounded, and the iterate is carried as centre + offset.
        # (The centre is kept negated: X s + neg.)
        amax = _max_abs_matrix(X0)
        s = _pow2_scale(amax, _scaled_top(work_dtype, d))  # (...,)
        s_rows = s[..., None, None]
        neg = z * -s[..., None]
        done = torch.zeros(batch, dtype=torch.bool, device=G.device)
        n_iter = torch.zeros(batch, dtype=torch.int64, device=G.device)
        resolution = torch.finfo(work_dtype).eps
        rounding = 4 * resolution
        cols = _block_columns(X0)
        budget = max_iter
        beta = w0  # the iterate is sum_i beta_i X_i / sum_i beta_i
        if not fixed_iter and max_iter > 1 and n <= _GRAM_MAX_N and n * d >= _GRAM_MIN_SIZE:
            c, n_iter = _weiszfeld_gram(X0, s_rows, neg, amax, w0, w_sum, eps, tol, max_iter - 1,
                                        rounding, uniform)
            beta = c.to(work_dtype)
            budget = max_iter - int(n_iter.min()) if n_iter.numel() else 1
        check = _check_schedule(G.device)
        tol_w = tol * w_sum
        buffer = X0.new_empty(*batch, d) if cols < d else None
        # the iterate z = -neg + offset (scaled), and the distances of the rows to it
        offset, dist = _weiszfeld_pass(X0, s_rows, neg, beta / beta.sum(-1, keepdim=True), cols, buffer)
        rounded = neg - offset  # -z in working precision
        result = rounded
        floor = None
        for it in range(budget):
            # The smoothing floor, raised to the distances' rounding noise (they were computed
            # relative to the centre, with a rounding relative to the offset); resolution: the
            # rounding of the iterate itself (of the answer).
            smooth = _distance_floor(dist, w0, w_sum, resolution * torch.linalg.vector_norm(rounded, dim=-1),
                                     eps, uniform=uniform)  # (..., 1)
            floor = torch.maximum(smooth, rounding * torch.linalg.vector_norm(offset, dim=-1, keepdim=True))
            beta = w0 / torch.maximum(dist, floor)
            beta_sum = beta.sum(-1, keepdim=True)
            # First-order optimality of sum_i w_i ||z - G_i||: the resultant of the unit vectors
            # must vanish, except that points within the smoothing floor of z (z on a data point)
            # may absorb up to their weight of it (the subdifferential of ||.|| at 0 is the unit
            # ball). Not within the noise: right after a long move (the first steps from a far
            # start), points that differ by less than its rounding only look coincident with z.
            near = torch.clamp_min(1.0 - dist / smooth, 0.0)
            absorbed = (near if uniform else w0 * near).sum(-1)
            active = ~done if budget == max_iter else ~done & (n_iter < max_iter)
            # Re-centre on the iterate rounded: z = -rounded + rest, exactly when the offset is
            # smaller than the centre (when it moves a lot, precision does not matter yet).
            rest = offset + (rounded - neg)
            neg = rounded
            offset, dist = _weiszfeld_pass(X0, s_rows, neg, beta / beta_sum, cols, buffer)
            # the Weiszfeld step z_next - z = resultant / sum(beta), resultant = sum_i beta_i (G_i - z)
            res_norm = beta_sum.squeeze(-1) * torch.linalg.vector_norm(offset - rest, dim=-1)
            rounded = neg - offset
            # Converged problems keep their result (they go on iterating, unseen): the answer
            # does not depend on how long the others take, so fixed_iter gives the same bits.
            result = torch.where(active.unsqueeze(-1), rounded, result)
            n_iter = n_iter + active
            done = done | ((res_norm - absorbed <= tol_w) & active)
            if not fixed_iter and check(it) and bool(
                (done if budget == max_iter else done | (n_iter >= max_iter)).all()
            ):
                break
        z = result / -s[..., None]  # exact: s is a power of two

    if torch.is_grad_enabled() and (G.requires_grad or (weights is not None and weights.requires_grad)):
        # One differentiable Weiszfeld step from the (detached) solution: the "one-step" gradient.
        # Its value equals the solution (the step's own value is rounded in the work dtype).
        with torch.no_grad():
            bound = torch.maximum(_distances(X0, s_rows, result, cols), floor)
        b = w / bound
        step = torch.matmul((b / b.sum(-1, keepdim=True)).unsqueeze(-2), X).squeeze(-2)
        z = z + (step - step.detach())
    return GeometricMedianResult(median=z.to(G.dtype), n_iter=n_iter, converged=done)


# The Gram (coefficient) iteration pays off when n is small against d: its set-up costs n^2 d
# multiply-adds once, an exact iteration about n d memory reads every time.
_GRAM_MAX_N = 64
_GRAM_MIN_SIZE = 1 << 16
# Column blocks of at most this many elements (1 MiB in float32): temporaries stay in cache and
# below the allocator's mmap threshold, instead of a fresh G-sized array every iteration.
_BLOCK_ELEMENTS = 1 << 18
# The Gram matrix sums its products over at most this many columns in the work dtype (then in
# float64): its entries are then within about _GRAM_ERR machine epsilons of exact (relative to
# sqrt(K_ii K_jj); measured: at most ~3).
_GRAM_BLOCK_COLUMNS = 1 << 14
_GRAM_ERR = 16


# On a GPU a block is a few kernel launches whatever its size (each costs microseconds) and the
# device's cache is larger: blocks of up to 2**24 elements (64 MiB in float32).
_BLOCK_ELEMENTS_DEVICE = 1 << 24


def _block_columns(X: torch.Tensor) -> int:
    rows = max(1, X.numel() // X.shape[-1])
    elements = _BLOCK_ELEMENTS if X.device.type == "cpu" else _BLOCK_ELEMENTS_DEVICE
    return max(1, elements // rows)


def _check_schedule(device: torch.device):
    """When the adaptive loop asks the host whether every problem has converged."""
    if _syncs_are_free(device):
        return lambda it: True  # free on the CPU
    return lambda it: it < 4 or it % 4 == 3


def _weighted_mean(X, w, w_sum, uniform):
    """``sum_i w_i X_i / sum_i w_i`` (..., d), with the weights scaled by a power of two so that
    ``sum w = [1/2, 1)``: no partial sum exceeds ``max |X|`` (no overflow), and the bits are those
    of the unscaled formula otherwise."""
    if uniform:
        n = X.shape[-2]
        p = 2.0 ** -((n - 1).bit_length())
        return torch.matmul(w.mul(p).unsqueeze(-2), X).squeeze(-2) / (n * p)
    p = _pow2_scale(w_sum)
    return torch.matmul((w * p.unsqueeze(-1)).unsqueeze(-2), X).squeeze(-2) / (w_sum * p).unsqueeze(-1)


def _weiszfeld_pass(X, s, neg, omega, cols, out=None):
    """One pass over ``X`` (..., n, d) in column blocks, in scaled coordinates ``X s + neg``.

    ``neg`` (..., d) is the centre, negated; ``omega`` (..., n) the Weiszfeld weights, summing to
    1. Returns the offset ``y = sum_i omega_i (X_i s + neg)`` of the iterate ``z = -neg + y``
    (..., d; written into ``out`` when given) and the distances ``||X_i s - z||`` (..., n).
    Each block is read once: ``D = X s + neg`` (exact up to one rounding relative to ``|D|``),
    its part of ``y``, then ``D - y``. Rows and centre are at most about 1 in size after
    scaling, so the sums of squares can neither overflow nor underflow.
    """
    d = X.shape[-1]
    omega = omega.unsqueeze(-2)  # (..., 1, n)
    neg = neg.unsqueeze(-2)  # (..., 1, d)
    if cols >= d:
        D = torch.addcmul(neg, X, s)
        y = torch.matmul(omega, D)
        return y.squeeze(-2), torch.linalg.vector_norm(D.sub_(y), dim=-1)
    y_out = out.unsqueeze(-2) if out is not None else X.new_empty(*X.shape[:-2], 1, d)
    sq = None
    for start in range(0, d, cols):
        D = torch.addcmul(neg[..., start : start + cols], X[..., start : start + cols], s)
        y = y_out[..., start : start + cols]
        torch.matmul(omega, D, out=y) if y.is_contiguous() else y.copy_(torch.matmul(omega, D))
        part = torch.linalg.vector_norm(D.sub_(y), dim=-1).square()
        sq = part if sq is None else sq + part
    return y_out.squeeze(-2), sq.sqrt()


def _distances(X, s, neg, cols):
    """``||X_i s + neg||`` (..., n): the (scaled) distances to the point ``-neg`` (..., d)."""
    d = X.shape[-1]
    neg = neg.unsqueeze(-2)
    sq = None
    for start in range(0, d, cols):
        D = torch.addcmul(neg[..., start : start + cols], X[..., start : start + cols], s)
        part = torch.linalg.vector_norm(D, dim=-1)
        if cols >= d:
            return part
        sq = part.square() if sq is None else sq + part.square()
    return sq.sqrt()


def _weiszfeld_gram(X, s, neg, amax, w, w_sum, eps, tol, max_iter, rounding, uniform):
    """Weiszfeld on the coefficients ``c`` of ``z = sum_j c_j X_j`` (``sum_j c_j = 1``).

    With the Gram matrix ``K = Y Y^T`` of the scaled rows ``Y = X s`` (:func:`_gram_matrix`:
    centred, ``Y = X s + neg``, when a component common to all rows would cancel),
    ``||Y_i - y||^2 = K_ii - 2 (K c)_i + c^T K c`` and
    ``||y||^2 = c^T K c`` for ``y = sum_j c_j Y_j``; the Weiszfeld update is ``c <- b / sum b``
    and the resultant's norm is ``sqrt(u^T K u)``, ``u = b - (sum b) c``. A distance computed so
    carries K's rounding, a relative error of about
    ``delta_i = _GRAM_ERR eps (K_ii + c^T K c) / r_i^2``, large near a data point; a problem stops
    here once its stopping quantity is within ``tol`` plus ``sum_i w_i delta_i`` of zero: beyond
    that this iteration cannot tell, and the exact one takes over. Returns ``c`` at the last
    iterate *before* the step whose test passed (the exact iteration repeats that step on the
    data) and the number of steps taken.
    """
    f64 = torch.float64
    batch = X.shape[:-2]
    resolution = torch.finfo(X.dtype).eps * torch.linalg.vector_norm(neg, dim=-1).to(f64)
    w64, w_sum64 = w.to(f64), w_sum.to(f64)
    K = _gram_matrix(X, s, neg, amax, w64 / w_sum64.unsqueeze(-1))
    K_diag = K.diagonal(dim1=-2, dim2=-1)
    rel_err = _GRAM_ERR * torch.finfo(X.dtype).eps
    c = w64 / w_sum64.unsqueeze(-1)
    done = torch.zeros(batch, dtype=torch.bool, device=X.device)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=X.device)
    check = _check_schedule(X.device)
    for it in range(max_iter):
        Kc = torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        cKc = (c * Kc).sum(-1, keepdim=True)
        dist_sq = (K_diag - 2 * Kc + cKc).clamp_min(0.0)
        dist = dist_sq.sqrt()
        z_norm = cKc.squeeze(-1).clamp_min(0.0).sqrt()
        floor = torch.maximum(_distance_floor(dist, w64, w_sum64, resolution, eps, uniform=uniform),
                              (rounding * z_norm).unsqueeze(-1))
        beta = w64 / torch.maximum(dist, floor)
        beta_sum = beta.sum(-1)
        u = beta - beta_sum.unsqueeze(-1) * c
        res_sq = (u * torch.matmul(K, u.unsqueeze(-1)).squeeze(-1)).sum(-1)
        absorbed = (w64 * torch.clamp_min(1.0 - dist / floor, 0.0)).sum(-1)
        stationarity = res_sq.clamp_min(0.0).sqrt() - absorbed
        noise = (w64 * (rel_err * (K_diag + cKc) / dist_sq.clamp_min(floor.square())).clamp_max(1.0)).sum(-1)
        done = done | (stationarity <= tol * w_sum64 + noise)
        c = torch.where(done.unsqueeze(-1), c, beta / beta_sum.unsqueeze(-1))
        n_iter = n_iter + ~done
        if check(it) and bool(done.all()):
            break
    return c, n_iter


def _gram_matrix(X, s, neg, amax, c0):
    """``K = Y Y^T`` (..., n, n) in float64 for :func:`_weiszfeld_gram`, ``Y`` the scaled rows.

    First the plain products ``X X^T`` (no temporaries: the matrix product reads ``X`` in place),
    scaled by ``s^2`` afterwards. They are used unless the entries could over- or underflow in
    the work dtype (``max |X|`` far from 1) or the rows share a component much larger than their
    spread (the trace of the centred matrix, ``tr K - 2 1^T K c0 + n c0^T K c0`` with ``c0`` the
    mean's coefficients, below 2**-8 of ``tr K``): then ``Y = X s + neg``, centred on the start
    and scaled, block by block (a temporary per block). The choice reads values on the host: this
    route is taken by the adaptive mode only.
    """
    f64 = torch.float64
    n, d = X.shape[-2], X.shape[-1]
    batch = X.shape[:-2]
    finfo = torch.finfo(X.dtype)
    bound = 2.0 ** ((int(math.log2(finfo.max)) - 8 - (d - 1).bit_length()) // 2)
    if bool(((amax < bound) & (amax > 1.0 / bound)).all()):
        K = torch.zeros(*batch, n, n, dtype=f64, device=X.device)
        for start in range(0, d, _GRAM_BLOCK_COLUMNS):
            block = X[..., start : start + _GRAM_BLOCK_COLUMNS]
            K = K + torch.matmul(block, block.mT).to(f64)
        K = K * s.to(f64).square()
        trace = K.diagonal(dim1=-2, dim2=-1).sum(-1)
        Kc0 = torch.matmul(K, c0.unsqueeze(-1)).squeeze(-1)
        centred = trace - 2 * Kc0.sum(-1) + n * (c0 * Kc0).sum(-1)
        if bool((centred >= trace * 2.0**-8).all()):
            return K
    neg = neg.unsqueeze(-2)  # the centre, negated
    K = torch.zeros(*batch, n, n, dtype=f64, device=X.device)
    cols = min(_GRAM_BLOCK_COLUMNS, _block_columns(X))  # the centred block is a temporary
    for start in range(0, d, cols):
        block = torch.addcmul(neg[..., start : start + cols], X[..., start : start + cols], s)
        K = K + torch.matmul(block, block.mT).to(f64)
    return K


def _distance_floor(dist, w, w_sum, resolution, eps, *, uniform):
    """The smoothing floor of Weiszfeld's weights, shape (..., 1) (callers raise it to the
    rounding noise of their distances, below which a point is indistinguishable from ``z``).

    ``eps`` times the weighted median distance from ``z``: a robust scale, which outliers (less
    than half of the weight), however far, cannot inflate. Falls back to the mean distance when at least half of the weight sits on ``z`` (the
    median distance is at most ``resolution`` (...,), the rounding of ``z`` itself: then ``z`` is
    optimal, and the points there must fall within the floor, which would otherwise shrink with
    them and leave Weiszfeld creeping towards the point), and to 1 when every point coincides
    with ``z`` (then any floor works).
    """
    if uniform:
        med = dist.median(dim=-1).values
    else:
        sorted_dist, order = dist.sort(dim=-1)
        cum = w.gather(-1, order).cumsum(-1)
        k = (cum < 0.5 * w_sum.unsqueeze(-1)).sum(-1, keepdim=True).clamp_max(dist.shape[-1] - 1)
        med = sorted_dist.gather(-1, k).squeeze(-1)
    mean = dist.mean(-1) if uniform else (w * dist).sum(-1) / w_sum
    scale = torch.where(med > resolution, med, torch.where(mean > 0, mean, 1.0))
    return (eps * scale).unsqueeze(-1)


def _check_sample_matrix_fast(G, values: bool = True) -> None:
    """:func:`check_sample_matrix` with a cheaper finiteness test (none with ``values=False``).

    A sum is finite only if every term is (NaN and +-Inf propagate through additions), so one
    reduction replaces ``isfinite(G).all()`` (which writes a G-sized mask); only when the sum is
    not finite, which overflow can also cause, does the exact test decide.
    """
    check_float_tensor(G, "G", min_dim=2)
    n, d = G.shape[-2], G.shape[-1]
    if n == 0:
        raise ValueError(f"G has no samples (n = 0): shape {tuple(G.shape)}")
    if d == 0:
        raise ValueError(f"G has empty vectors (d = 0): shape {tuple(G.shape)}")
    if values and value_checks_enabled() and not bool(torch.isfinite(G.sum())):
        check_finite(G, "G")


def geometric_median_objective(
    G: torch.Tensor, z: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``sum_i w_i ||z - G_i||_2`` for each problem: shape (...,), in ``G``'s dtype.

    Computed in the wider of ``G``'s and ``z``'s dtypes (at least float32), on values scaled by
    a power of two so that no norm overflows; ``weights`` (..., n) must be nonnegative.
    """
    _check_sample_matrix_fast(G)
    check_float_tensor(z, "z", min_dim=1)
    if z.shape[-1] != G.shape[-1]:
        raise ValueError(f"z must have d = {G.shape[-1]} entries, got shape {tuple(z.shape)}")
    if z.device != G.device:
        raise ValueError(f"z must be on G's device {G.device}, got {z.device}")
    check_finite(z, "z")
    dtype = torch.promote_types(G.dtype, z.dtype)
    if weights is not None:
        check_float_tensor(weights, "weights", min_dim=1)
        if weights.device != G.device:
            raise ValueError(f"weights must be on G's device {G.device}, got {weights.device}")
        if weights.shape[-1] != G.shape[-2]:
            raise ValueError(
                f"weights must have shape (..., n) with n = {G.shape[-2]} samples, got {tuple(weights.shape)}"
            )
        check_finite(weights, "weights")
        if value_checks_enabled() and bool((weights < 0).any()):
            raise ValueError("weights must be nonnegative")
        dtype = torch.promote_types(dtype, weights.dtype)
    dtype = opmath_dtype(dtype)
    Gw, zw = G.to(dtype), z.to(dtype)
    s = _pow2_scale(torch.maximum(_max_abs(Gw, (-2, -1)), _max_abs(zw, -1)))  # (...,)
    diff = torch.addcmul((zw * s.unsqueeze(-1)).neg().unsqueeze(-2), Gw, s[..., None, None])
    dist = torch.linalg.vector_norm(diff, dim=-1)  # (..., n), scaled by s
    total = dist.sum(-1) if weights is None else (weights.to(dtype) * dist).sum(-1)
    return (total / s).to(G.dtype)
