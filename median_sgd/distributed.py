"""Robust DDP communication hooks: ``bucket <- agg_r(g_r)`` over ranks ``r`` instead of ``mean_r g_r``.

``DistributedDataParallel`` averages each bucket of gradients across the ranks with one
all-reduce. :func:`robust_hook` returns a communication hook that replaces that mean by a robust
aggregate of the ranks' bucket gradients (chapter "Scaling out"), so that a minority of faulty
or Byzantine ranks cannot drag the update anywhere:

* ``"mean"``: the all-reduce mean (DDP's default, for comparison);
* ``"coordinate_median"`` and ``"trimmed_mean"``: per coordinate. Each rank receives one shard of
  every rank's vector (``all_to_all``), aggregates its shard, and the shards are gathered back
  (``all_gather``): about as many bytes per rank as a ring all-reduce, and no rank ever holds all
  gradients;
* ``"gm"``: the geometric median, by Weiszfeld rounds of all-reduce (RFA, Pillutla et al.): each
  round all-gathers the ranks' distances to the current iterate (one number per rank) and
  all-reduces the weighted sum ``sum_r beta_r (g_r - z)`` (one bucket); the iteration is that of
  :func:`median_sgd.geometric_median` (same smoothing floor, same stopping rule). It starts at
  the coordinate-wise median (``init="median"``), not at the mean as RFA does: from the mean, a
  rank that sends a huge vector leaves a trace that shrinks only geometrically with the number
  of rounds, so a fixed budget of rounds would not be robust to an unbounded attack;
* ``"bgmd"``: block geometric median descent per bucket (Acharya et al.): a memory is added to
  every rank's gradient, a block of ``k`` coordinates is chosen from the all-reduced squared column
  norms (:func:`median_sgd.select_block`'s rule), the geometric median of the block is computed by
  the rounds above in ``R^k``, and the rest goes to the memory.

Every rank computes the identical result: the inputs of every decision are all-reduced or
all-gathered values, the geometric median runs a fixed number of rounds (``fixed_iter=True``) or
stops on a test of such values, and the block sampler's generator is seeded identically. No rule
synchronises with the host in its default settings, so the hooks also run on NCCL.

The same code runs in one process on a ``(world_size, n)`` matrix of simulated ranks
(:meth:`RobustHook.simulate`): the collectives become sums, stacks and transposes along the rank
dimension. That is how the tests check the hook against the library's estimators, and how the
chapter explains it without starting processes.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Hashable, Optional

import torch
import torch.distributed as dist

from ._checks import check_choice, check_float_tensor, value_checks
from .bgmd import MODES as BLOCK_MODES
from .bgmd import _select_from_squares, resolve_block_size
from .medians import coordinate_median, trimmed_mean

__all__ = ["RULES", "RobustHook", "robust_hook", "SimulatedRanks"]

RULES = ("mean", "coordinate_median", "trimmed_mean", "gm", "bgmd")
MEMORY_RULES = ("median", "mean", None)
_OPTIONS = {
    "mean": (),
    "coordinate_median": (),
    "trimmed_mean": ("trim",),
    "gm": ("init", "eps", "tol", "max_iter", "fixed_iter"),
    "bgmd": ("k", "mode", "memory", "seed", "power", "init", "eps", "tol", "max_iter",
             "fixed_iter"),
}


# --------------------------------------------------------------------------------------------
# Communication: real process groups, or every rank simulated in one tensor


class _Counter:
    """Collective calls and elements sent per rank (ring / pairwise algorithms)."""

    def __init__(self) -> None:
        self.collectives = 0
        self.elements = 0.0

    def add(self, elements: float) -> None:
        self.collectives += 1
        self.elements += elements


class _ProcessGroupRanks:
    """The collectives of one rank in a ``torch.distributed`` process group.

    Local tensors have no rank dimension: a bucket is ``(n,)``, a per-rank number ``()``.
    """

    def __init__(self, group, counter: _Counter) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.counter = counter

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``sum_r t_r`` on every rank."""
        out = t.clone()
        dist.all_reduce(out, group=self.group)
        self.counter.add(2.0 * (self.world - 1) / self.world * t.numel())
        return out

    def gather_numbers(self, t: torch.Tensor) -> torch.Tensor:
        """A per-rank number ``()`` -> ``(world,)``, every rank's value, on every rank."""
        out = t.new_empty(self.world)
        _all_gather_into(out, t.reshape(1), self.group)
        self.counter.add(self.world - 1)
        return out

    def gather_shards(self, t: torch.Tensor) -> torch.Tensor:
        """Each rank's ``(c,)`` shard -> the ``(world * c,)`` concatenation, on every rank."""
        out = t.new_empty(self.world * t.numel())
        _all_gather_into(out, t.contiguous(), self.group)
        self.counter.add((self.world - 1) * t.numel())
        return out

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """``(world * c,)`` -> ``(world, c)``: row ``r`` is chunk ``self.rank`` of rank ``r``'s ``t``."""
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        self.counter.add((self.world - 1) / self.world * t.numel())
        return out.view(self.world, -1)

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's entry of a ``(world,)`` vector."""
        return t[self.rank]

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        """A value that is identical on every rank, as one copy (here: itself)."""
        return t

    def spread(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`shared`."""
        return t


class SimulatedRanks:
    """All ``world`` ranks in one process: every local tensor has a leading rank dimension.

    Rank ``r``'s bucket is row ``r`` of a ``(world, n)`` tensor; the collectives act along that
    dimension, so the aggregation code of :class:`RobustHook` runs unchanged and every rank's
    result comes out as a row.
    """

    def __init__(self, world: int, counter: Optional[_Counter] = None) -> None:
        self.world = world
        self.counter = counter or _Counter()

    def all_reduce(self, t):
        self.counter.add(2.0 * (self.world - 1) / self.world * t[0].numel())
        return t.sum(0, keepdim=True).expand_as(t).clone()

    def gather_numbers(self, t):  # (world,) -> (world, world): row r is what rank r receives
        self.counter.add(self.world - 1)
        return t.unsqueeze(0).expand(self.world, self.world).clone()

    def gather_shards(self, t):  # (world, c) -> (world, world * c)
        self.counter.add((self.world - 1) * t[0].numel())
        return t.reshape(1, -1).expand(self.world, -1).clone()

    def all_to_all(self, t):  # (world, world * c) -> (world, world, c), out[r, s] = chunk r of s
        self.counter.add((self.world - 1) / self.world * t[0].numel())
        return t.reshape(self.world, self.world, -1).transpose(0, 1).contiguous()

    def mine(self, t):  # (world, world) -> (world,): rank r's own entry of its copy
        idx = torch.arange(self.world, device=t.device)
        return t[idx, idx]

    def shared(self, t):
        return t[0]

    def spread(self, t):
        return t.unsqueeze(0).expand(self.world, *t.shape)


def _all_gather_into(out: torch.Tensor, t: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None)  # torch >= 2.13; older: the deprecated name
    if gather is None:
        gather = dist.all_gather_into_tensor
    gather(out, t, group=group)


# --------------------------------------------------------------------------------------------
# The hook


class RobustHook:
    """``hook(state, bucket) -> Future``: a robust aggregate of the ranks' bucket gradients.

    Made by :func:`robust_hook`. Register it with ``ddp_model.register_comm_hook(state, hook)``,
    where ``state`` is ``None`` (the default process group) or a process group. Besides DDP,
    ``hook.aggregate(x, group=None)`` aggregates any tensor across the ranks of ``group``, and
    ``hook.simulate(G)`` runs the same code on the rows of ``G`` (world_size, n) in one process.

    ``hook.stats`` counts, for this rank, the buckets aggregated (``"buckets"``), the collective
    calls (``"collectives"``) and the elements it sent (``"elements_sent"``, for ring all-reduce
    and pairwise all-gather / all-to-all algorithms); ``hook.reset_stats()`` zeroes them. The
    ``"bgmd"`` memory lives in ``hook.memory`` (one tensor per bucket, identical on every rank).
    """

    def __init__(self, rule: str, **options) -> None:
        check_choice(rule, "rule", RULES)
        unknown = sorted(set(options) - set(_OPTIONS[rule]))
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown} for rule {rule!r}; expected some of {list(_OPTIONS[rule])}"
            )
        self.rule = rule
        self.trim = _trim(options.get("trim", 0.25))
        self.eps = _positive(options.get("eps", 1e-8), "eps")
        self.tol = _nonnegative(options.get("tol", 1e-6), "tol")
        self.max_iter = _iterations(options.get("max_iter", 8))
        self.fixed_iter = _flag(options.get("fixed_iter", True), "fixed_iter")
        self.init = check_choice(options.get("init", "median"), "init", ("median", "mean"))
        k = options.get("k", 0.1)
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            raise TypeError(f"k must be an int (coordinates per bucket) or a float fraction, got {k!r}")
        if not isinstance(k, numbers.Integral):
            resolve_block_size(k, 1)  # validates the fraction
        elif k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.mode = check_choice(options.get("mode", "topk"), "mode", BLOCK_MODES)
        self.memory_rule = check_choice(options.get("memory", "median"), "memory", MEMORY_RULES)
        seed = options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        power = options.get("power", 2.0)
        if isinstance(power, bool) or not isinstance(power, numbers.Real) or not (
            math.isfinite(power) and power > 0
        ):
            raise ValueError(f"power must be a finite number > 0, got {power!r}")
        self.power = float(power)
        self.options = dict(options)
        self.memory: Dict[Hashable, torch.Tensor] = {}
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._counter = _Counter()
        self._buckets = 0
        # DDP reads the hook's __name__ (its built-in hooks are functions).
        self.__name__ = f"robust_hook_{rule}"
        self.__qualname__ = self.__name__

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"robust_hook({self.rule!r}{opts})"

    @property
    def stats(self) -> dict:
        return {"buckets": self._buckets, "collectives": self._counter.collectives,
                "elements_sent": self._counter.elements}

    def reset_stats(self) -> None:
        self._counter = _Counter()
        self._buckets = 0

    def reset(self) -> None:
        """Forget the ``"bgmd"`` memory and restart the block sampler (on every rank alike)."""
        self.memory.clear()
        self._generators.clear()

    def __call__(self, state, bucket):
        """The DDP communication hook: a completed future holding the aggregated bucket."""
        if state is not None and not isinstance(state, dist.ProcessGroup):
            raise TypeError(
                f"the hook's state must be None (the default group) or a ProcessGroup, got "
                f"{type(state).__name__}"
            )
        x = bucket.buffer()
        key = tuple(id(p) for p in bucket.parameters())
        result = self.aggregate(x, group=state, key=key)
        fut = torch.futures.Future(devices=[x.device] if x.device.type == "cuda" else None)
        fut.set_result(result)
        return fut

    def aggregate(self, x: torch.Tensor, group=None, *, key: Hashable = None) -> torch.Tensor:
        """The robust aggregate over the ranks of ``group`` of each rank's ``x`` (a new tensor).

        Every rank of the group must call it, in the same order, with tensors of one shape.
        ``key`` names the ``"bgmd"`` memory slot (one per bucket).
        """
        check_float_tensor(x, "x", min_dim=1)
        if x.dim() != 1:
            raise ValueError(f"x must be a flat (n,) tensor, got shape {tuple(x.shape)}")
        ranks = _ProcessGroupRanks(group, self._counter)
        self._buckets += 1
        with value_checks(False):
            return self._aggregate(x, ranks, key)

    def simulate(self, G: torch.Tensor, *, key: Hashable = None) -> torch.Tensor:
        """Every rank's result when rank ``r`` holds ``G[r]``: a ``(world_size, n)`` tensor.

        The same aggregation code as :meth:`aggregate`, with the collectives computed along the
        first dimension of ``G`` in this process (and counted in :attr:`stats` as one rank's).
        All rows are equal; the ``"bgmd"`` memory under ``key`` is the simulated one.
        """
        check_float_tensor(G, "G", min_dim=2)
        if G.dim() != 2 or G.shape[0] < 1 or G.shape[1] < 1:
            raise ValueError(f"G must have shape (world_size, n) with both >= 1, got {tuple(G.shape)}")
        self._buckets += 1
        with value_checks(False):
            return self._aggregate(G, SimulatedRanks(G.shape[0], self._counter), key)

    # The aggregation, written once for both kinds of ranks: ``x`` is (n,) on a real rank and
    # (world, n) when simulated; reductions act on the last dimension, the rank dimension (if
    # any) is carried along in front.

    def _aggregate(self, x, ranks, key):
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y = x.to(work)
        if self.rule == "mean":
            out = ranks.all_reduce(y) / ranks.world
        elif self.rule in ("coordinate_median", "trimmed_mean"):
            out = self._coordinatewise(y, ranks)
        elif self.rule == "gm":
            out = self._geometric_median(y, ranks)
        else:
            out = self._bgmd(y, ranks, key)
        return out.to(x.dtype)

    def _coordinatewise(self, y, ranks, rule=None):
        world, n = ranks.world, y.shape[-1]
        c = -(-n // world)  # shard length, the bucket padded to world * c
        padded = torch.nn.functional.pad(y, (0, world * c - n))
        shards = ranks.all_to_all(padded)  # (..., world, c): every rank's copy of my shard
        if (rule or self.rule) == "coordinate_median":
            mine = coordinate_median(shards)
        else:
            mine = trimmed_mean(shards, self.trim)
        return ranks.gather_shards(mine)[..., :n]

    def _geometric_median(self, y, ranks):
        """Weiszfeld by all-reduce rounds: the iteration of :func:`median_sgd.geometric_median`."""
        world = ranks.world
        if self.init == "mean":
            z = ranks.all_reduce(y) / world  # as geometric_median starts
        else:
            # the coordinate-wise median: within the honest ranks' range whatever the others send,
            # so a fixed number of rounds suffices however far they are
            z = self._coordinatewise(y, ranks, "coordinate_median")
        batch = z.shape[:-1]
        done = torch.zeros(batch, dtype=torch.bool, device=y.device)
        rounding = 4 * torch.finfo(y.dtype).eps
        for _ in range(self.max_iter):
            diff = y - z
            dist_all = ranks.gather_numbers(torch.linalg.vector_norm(diff, dim=-1))  # (..., world)
            floor = _distance_floor(dist_all, z, self.eps, rounding)
            beta = 1.0 / torch.maximum(dist_all, floor)  # (..., world), the same on every rank
            resultant = ranks.all_reduce(ranks.mine(beta).unsqueeze(-1) * diff)
            step = resultant / beta.sum(-1, keepdim=True)
            active = ~done
            z = torch.where(active.unsqueeze(-1), z + step, z)
            absorbed = torch.clamp_min(1.0 - dist_all / floor, 0.0).sum(-1)
            stationarity = torch.linalg.vector_norm(resultant, dim=-1) - absorbed
            done = done | (stationarity <= self.tol * world)
            if not self.fixed_iter and bool(done.all()):  # identical on every rank
                break
        return z

    def _bgmd(self, y, ranks, key):
        world, n = ranks.world, y.shape[-1]
        k = resolve_block_size(self.k, n) if not isinstance(self.k, numbers.Integral) else min(int(self.k), n)
        memory = self.memory.get(key)
        if memory is not None and memory.shape != y.shape[-1:]:
            memory = None  # the bucket changed (DDP rebuilds its buckets after the first step)
        a = y if memory is None else y + ranks.spread(memory)
        sq = ranks.shared(ranks.all_reduce(a * a))  # squared column norms ||A[:, j]||^2
        idx = _select_from_squares(sq, k, self.mode, self._generator(sq.device), self.power)
        block = a[..., idx]
        u_block = self._geometric_median(block, ranks)  # (..., k), the same on every rank
        out = torch.zeros_like(a).index_copy_(-1, idx, u_block)
        if self.memory_rule is None:
            self.memory.pop(key, None)
        else:
            if self.memory_rule == "mean":
                residual = ranks.all_reduce(a) / world
            else:
                residual = self._coordinatewise(a, ranks, "coordinate_median")
            if key not in self.memory and isinstance(key, tuple):
                # a rebuilt bucket: forget the memory of the old buckets of its parameters
                for stale in [k for k in self.memory if isinstance(k, tuple) and set(k) & set(key)]:
                    del self.memory[stale]
            self.memory[key] = ranks.shared(residual).index_fill(-1, idx, 0.0)
        return out

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.mode != "norm":
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def _distance_floor(dist, z, eps, rounding):
    """Weiszfeld's smoothing floor, as :func:`median_sgd.geometric_median` sets it (shape (..., 1)).

    ``eps`` times the median distance of the ranks to ``z`` (a scale that a minority of far
    ranks cannot inflate; the mean distance if the median is 0, else 1), and at least the
    rounding noise ``~ machine epsilon * ||z||``. Computed from all-gathered distances and the
    shared ``z``, so every rank gets the same floor.
    """
    med = dist.median(dim=-1).values
    mean = dist.mean(-1)
    scale = torch.where(med > 0, med, torch.where(mean > 0, mean, torch.ones_like(mean)))
    noise = rounding * torch.linalg.vector_norm(z, dim=-1)
    return torch.maximum(eps * scale, noise).unsqueeze(-1)


def robust_hook(rule: str, **options) -> RobustHook:
    """A DDP communication hook that aggregates each gradient bucket robustly across ranks.

    ``ddp_model.register_comm_hook(None, robust_hook("gm"))``. ``rule`` and its options:

    * ``"mean"``: the all-reduce mean (DDP's default behaviour);
    * ``"coordinate_median"``: per coordinate, the median over ranks (mean of the two middle
      values for an even world size);
    * ``"trimmed_mean"``: per coordinate, the mean after dropping ``floor(trim * world_size)``
      values at each end; ``trim=0.25``;
    * ``"gm"``: the geometric median of the ranks' bucket vectors by Weiszfeld rounds of
      all-reduce, with :func:`median_sgd.geometric_median`'s ``eps=1e-8`` (relative smoothing),
      ``tol=1e-6`` and ``max_iter=8``; ``fixed_iter=True`` (default) always runs ``max_iter``
      rounds, with no host synchronisation, ``False`` stops once the (all-reduced, hence
      identical) optimality test passes. ``init="median"`` (default) starts from the
      coordinate-wise median (robust: the rounds needed do not grow with how far a Byzantine
      rank's vector is), ``init="mean"`` from the mean (exactly
      :func:`median_sgd.geometric_median`'s iteration, and RFA's);
    * ``"bgmd"``: per bucket, ``k`` coordinates (an int, or a float fraction of the bucket:
      ``k=0.1``) chosen by ``mode`` (``"topk"``: the largest column norms, default; ``"norm"``:
      norm-proportional sampling with a generator seeded by ``seed`` on every rank; ``power`` as
      in :func:`median_sgd.select_block`) get the geometric median (the ``"gm"`` options apply),
      the others go to a memory: ``memory="median"`` (default: the coordinate-wise median over
      ranks of the memory-augmented gradients), ``"mean"`` (the paper's rule: their mean, which a
      Byzantine rank controls; see the chapter) or ``None``.

    Returns a :class:`RobustHook`.
    """
    return RobustHook(rule, **options)


def _trim(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= value < 0.5):
        raise ValueError(f"trim must be a number in [0, 0.5), got {value!r}")
    return float(value)


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _iterations(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {value!r}")
    return int(value)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value
