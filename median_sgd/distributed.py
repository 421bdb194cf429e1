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

**Non-finite contributions are dropped.** A rank whose bucket holds a NaN or an Inf (a broken
worker, an overflow, an attacker) is maximally outlying: every rule, ``"mean"`` included, gives
its bucket weight 0 in that round, as if it had not been sent, and counts it in
``hook.stats["dropped"]``. Each rank knows whether its own bucket is finite; the flag travels
with the collectives the rule makes anyway (one more element in the all-reduce or per all-to-all
chunk, a NaN in place of the distance in the Weiszfeld gathers), so every rank drops the same
ranks. The whole bucket goes, also for the coordinate-wise rules. When every rank is dropped the
result is 0. Huge but finite values are outliers like any other: distances are computed scaled
(so they overflow only when the work dtype cannot hold them; such a rank then weighs 0 in the
Weiszfeld round, the limit of ``1 / distance``), and sums are divided by their count first.

**Ranks must register the same rule.** At its first call on a process group, the hook all-gathers
a fingerprint of its rule, its options and the tensor's length and dtype (three integers per rank)
and raises ``RuntimeError`` on every rank if they differ, instead of deadlocking in mismatched
collectives until the group's timeout. That first call synchronises with the host once.

The same code runs in one process on a ``(world_size, n)`` matrix of simulated ranks
(:meth:`RobustHook.simulate`): the collectives become sums, stacks and transposes along the rank
dimension. That is how the tests check the hook against the library's estimators, and how the
chapter explains it without starting processes.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Dict, Hashable, Optional

import torch
import torch.distributed as dist

from ._checks import check_float_tensor, value_checks
from ._masked import masked_coordinate_median, masked_trimmed_mean
from .aggregators import get_rule, place_defaults
from .bgmd import bgmd_step, resolve_block_size
from .weiszfeld import CollectiveCounter, ProcessGroupRanks, SimulatedRanks, ranks_weiszfeld

__all__ = ["RULES", "RobustHook", "robust_hook", "SimulatedRanks"]

# The hook's names of its rules; the registry (median_sgd.aggregators.REGISTRY) holds their
# options and defaults, and also takes the other names of each ("geometric_median" for "gm").
RULES = ("mean", "coordinate_median", "trimmed_mean", "gm", "bgmd")
_DEFAULTS = place_defaults("hook")


# --------------------------------------------------------------------------------------------
# The hook


class RobustHook:
    """``hook(state, bucket) -> Future``: a robust aggregate of the ranks' bucket gradients.

    Made by :func:`robust_hook`. Register it with ``ddp_model.register_comm_hook(state, hook)``,
    where ``state`` is ``None`` (the default process group) or a process group. Besides DDP,
    ``hook.aggregate(x, group=None)`` aggregates any tensor across the ranks of ``group``, and
    ``hook.simulate(G)`` runs the same code on the rows of ``G`` (world_size, n) in one process.

    ``hook.stats`` counts, for this rank, the buckets aggregated (``"buckets"``), the collective
    calls (``"collectives"``), the elements it sent (``"elements_sent"``, for ring all-reduce
    and pairwise all-gather / all-to-all algorithms) and the ranks' contributions dropped because
    they were not finite (``"dropped"``: one per rank and bucket; the same on every rank). The
    drops are counted on the device, so that the hook never waits for the host: reading
    ``stats`` synchronises once. ``hook.reset_stats()`` zeroes them. The ``"bgmd"`` memory lives
    in ``hook.memory`` (one tensor per bucket, identical on every rank).
    """

    def __init__(self, rule: str, **options) -> None:
        self.spec = get_rule(rule, "hook")
        settings = {**_DEFAULTS, **self.spec.check(options, "hook")}
        self.rule = rule
        self.trim: float = settings["trim"]
        self.eps: float = settings["eps"]
        self.tol: float = settings["tol"]
        self.max_iter: int = settings["max_iter"]
        self.fixed_iter: bool = settings["fixed_iter"]
        self.init: str = settings["init"]
        self.k = settings["k"]
        self.mode: str = settings["mode"]
        self.memory_rule: Optional[str] = settings["memory"]
        self.seed: int = settings["seed"]
        self.power: float = settings["power"]
        self.options = dict(options)
        self.memory: Dict[Hashable, torch.Tensor] = {}
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._counter = CollectiveCounter()
        self._buckets = 0
        self._dropped: Dict[torch.device, torch.Tensor] = {}
        self._verified: set = set()  # the process groups whose ranks were checked to match
        # DDP reads the hook's __name__ (its built-in hooks are functions).
        self.__name__ = f"robust_hook_{rule}"
        self.__qualname__ = self.__name__

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"robust_hook({self.rule!r}{opts})"

    @property
    def stats(self) -> dict:
        dropped = sum(int(t) for t in self._dropped.values())  # the one host read
        return {"buckets": self._buckets, "collectives": self._counter.collectives,
                "elements_sent": self._counter.elements, "dropped": dropped}

    def reset_stats(self) -> None:
        self._counter = CollectiveCounter()
        self._buckets = 0
        self._dropped = {}

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

        Every rank must call it, in the same order, with tensors of one shape, and with hooks of
        the same rule and options: the first call on a group checks that (see the module's
        docstring) and raises ``RuntimeError`` on every rank if not. ``key`` names the
        ``"bgmd"`` memory slot (one per bucket).
        """
        check_float_tensor(x, "x", min_dim=1)
        if x.dim() != 1:
            raise ValueError(f"x must be a flat (n,) tensor, got shape {tuple(x.shape)}")
        ranks = ProcessGroupRanks(group, self._counter)
        if ranks.world > 1 and group not in self._verified:
            self._check_same_hook(x, ranks)
            self._verified.add(group)
        self._buckets += 1
        with value_checks(False):
            return self._aggregate(x, ranks, key)

    def simulate(self, G: torch.Tensor, *, key: Hashable = None) -> torch.Tensor:
        """Every rank's result when rank ``r`` holds ``G[r]``: a ``(world_size, n)`` tensor.

        The same aggregation code as :meth:`aggregate`, with the collectives computed along the
        first dimension of ``G`` in this process (and counted in :attr:`stats` as one rank's).
        All rows are equal; the ``"bgmd"`` memory under ``key`` is the simulated one. A row
        with a NaN or Inf is a rank whose bucket is dropped.
        """
        check_float_tensor(G, "G", min_dim=2)
        if G.dim() != 2 or G.shape[0] < 1 or G.shape[1] < 1:
            raise ValueError(f"G must have shape (world_size, n) with both >= 1, got {tuple(G.shape)}")
        self._buckets += 1
        with value_checks(False):
            return self._aggregate(G, SimulatedRanks(G.shape[0], self._counter), key)

    # ----------------------------------------------------------------------------------------
    # Every rank must run the same rule: a mismatch would pair different collectives and hang.

    def _fingerprint(self) -> int:
        """A 56-bit hash of the rule and its effective options (the defaults filled in)."""
        attrs = {"memory": "memory_rule"}
        values = tuple((o.name, getattr(self, attrs.get(o.name, o.name)))
                       for o in self.spec.options_in("hook"))
        return _hash56(repr((self.spec.name, values)))  # aliases of one rule match

    def _check_same_hook(self, x: torch.Tensor, ranks: "ProcessGroupRanks") -> None:
        """All-gather (rule and options, length, dtype) once; raise on every rank if they differ."""
        mine = torch.tensor([self._fingerprint(), x.numel(), _hash56(str(x.dtype))],
                            dtype=torch.int64, device=x.device)
        table = ranks.gather_shards(mine).view(ranks.world, 3).tolist()  # the one host read
        me = table[ranks.rank]
        problems = []
        for column, what in ((0, "rule or options"), (1, "tensor length"), (2, "tensor dtype")):
            other = [r for r, row in enumerate(table) if row[column] != me[column]]
            if other:
                problems.append(f"{what} differ(s) from rank(s) {other}")
        if problems:
            raise RuntimeError(
                f"robust_hook: the ranks of the process group do not run the same hook: on rank "
                f"{ranks.rank}, {'; '.join(problems)}. This rank has {self!r} on a tensor of "
                f"{x.numel()} {x.dtype} elements. Every rank must register the same rule with "
                f"the same options, and aggregate tensors of one shape and dtype."
            )

    # ----------------------------------------------------------------------------------------
    # The aggregation, written once for both kinds of ranks: ``x`` is (n,) on a real rank and
    # (world, n) when simulated; reductions act on the last dimension, the rank dimension (if
    # any) is carried along in front. ``good`` is each rank's own flag "my bucket is finite":
    # () on a real rank, (world,) simulated.

    def _aggregate(self, x, ranks, key):
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y = x.to(work)
        rule = self.spec.name
        if rule == "bgmd":
            out, dropped = self._bgmd(y, ranks, key)
        else:
            good = _finite(y)
            if rule == "mean":
                out, dropped = self._mean(y, good, ranks)
            elif rule in ("coordinate_median", "trimmed_mean"):
                out, dropped = self._coordinatewise(y, good, ranks)
            else:
                out, dropped = self._geometric_median(y, good, ranks)
        self._count_dropped(ranks.shared(dropped))
        return out.to(x.dtype)

    def _count_dropped(self, dropped: torch.Tensor) -> None:
        total = self._dropped.get(dropped.device)
        self._dropped[dropped.device] = dropped if total is None else total + dropped

    def _mean(self, y, good, ranks):
        """The mean of the finite ranks, by one all-reduce of ``[y / W, 1]`` (``[0, 0]`` from a
        dropped rank): the sum, and the number of ranks in it. Dividing by ``W`` first (as DDP's
        own hook does) keeps the sum from overflowing. Returns the mean and the ranks dropped."""
        world, n = ranks.world, y.shape[-1]
        buf = y.new_empty(*y.shape[:-1], n + 1)
        torch.div(y, world, out=buf[..., :n])
        buf[..., :n].masked_fill_(~good.unsqueeze(-1), 0.0)
        buf[..., n] = good
        total = ranks.all_reduce(buf, inplace=True)
        count = total[..., n:]  # (..., 1), a whole number; with count 0 the sum is 0 too
        mean = total[..., :n] * (world / count.clamp_min(1.0))
        return mean, (world - count.squeeze(-1)).round().long()

    def _coordinatewise(self, y, good, ranks, rule=None):
        """The sharded per-coordinate rule over the finite ranks, and the ranks dropped.

        Chunk ``s`` of the bucket (padded to ``world * c``) goes to rank ``s`` with this rank's
        flag appended (``c + 1`` elements), so every rank learns which ranks to leave out.
        """
        world, n = ranks.world, y.shape[-1]
        c = -(-n // world)  # shard length, the bucket padded to world * c
        lead = y.shape[:-1]
        padded = torch.nn.functional.pad(y, (0, world * c - n)).view(*lead, world, c)
        flag = good.to(y.dtype)[..., None, None].expand(*lead, world, 1)
        chunks = torch.cat([padded, flag], dim=-1).view(*lead, world * (c + 1))
        received = ranks.all_to_all(chunks)  # (..., world, c + 1): every rank's copy of my shard
        ok = received[..., c] > 0.5  # (..., world): which ranks' buckets are finite
        shards = received[..., :c]
        if (rule or self.spec.name) == "coordinate_median":
            mine = masked_coordinate_median(shards, ok)
        else:
            mine = masked_trimmed_mean(shards, ok, int(math.floor(self.trim * world)))
        return ranks.gather_shards(mine)[..., :n], (~ok).sum(-1)

    def _geometric_median(self, y, good, ranks):
        """Weiszfeld by all-reduce rounds (:func:`median_sgd.weiszfeld.ranks_weiszfeld`: the
        iteration of :func:`median_sgd.geometric_median`) over the finite ranks. Returns the
        median and the ranks dropped."""
        if self.init == "mean":
            centre, dropped = self._mean(y, good, ranks)  # as geometric_median starts
        else:
            # the coordinate-wise median: within the honest ranks' range whatever the others send,
            # so a fixed number of rounds suffices however far they are
            centre, dropped = self._coordinatewise(y, good, ranks, "coordinate_median")
        median = ranks_weiszfeld(y, good, centre, ranks, eps=self.eps, tol=self.tol,
                                 max_iter=self.max_iter, fixed_iter=self.fixed_iter)
        return median, dropped

    def _bgmd(self, y, ranks, key):
        n = y.shape[-1]
        k = resolve_block_size(self.k, n) if not isinstance(self.k, numbers.Integral) else min(int(self.k), n)
        memory = self.memory.get(key)
        if memory is not None and memory.shape != y.shape[-1:]:
            memory = None  # the bucket changed (DDP rebuilds its buckets after the first step)
        a = y if memory is None else y + ranks.spread(memory)
        good = _finite(a)
        # squared column norms ||A[:, j]||^2 of the finite ranks
        sq = ranks.shared(ranks.all_reduce(torch.where(good.unsqueeze(-1), a * a, 0.0),
                                           inplace=True))
        dropped = []

        def block_median(idx):  # the same on every rank
            u_block, dropped_ranks = self._geometric_median(a[..., idx], good, ranks)
            dropped.append(dropped_ranks)
            return u_block

        def memory_of(idx):
            if self.memory_rule == "mean":
                residual, _ = self._mean(a, good, ranks)
            else:
                residual, _ = self._coordinatewise(a, good, ranks, "coordinate_median")
            return ranks.shared(residual)

        _, out, memory = bgmd_step(sq, k, self.mode, self._generator(sq.device), self.power,
                                   block_median, memory_of if self.memory_rule else None)
        if memory is None:
            self.memory.pop(key, None)
        else:
            if key not in self.memory and isinstance(key, tuple):
                # a rebuilt bucket: forget the memory of the old buckets of its parameters
                for stale in [k for k in self.memory if isinstance(k, tuple) and set(k) & set(key)]:
                    del self.memory[stale]
            self.memory[key] = memory
        return out, dropped[0]

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.mode != "norm":
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def _finite(y: torch.Tensor) -> torch.Tensor:
    """Whether all of ``y`` is finite, over the last dimension: ``max |y_j|`` is (NaN and inf
    propagate through it; one pass, no mask of ``y``'s size)."""
    return torch.isfinite(y.abs().amax(-1))


def _hash56(text: str) -> int:
    """A 56-bit integer hash of ``text`` (fits an int64 exactly; the same in every process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def robust_hook(rule: str, **options) -> RobustHook:
    """A DDP communication hook that aggregates each gradient bucket robustly across ranks.

    ``ddp_model.register_comm_hook(None, robust_hook("gm"))``. The rules, their other names
    (``"geometric_median"`` for ``"gm"``, ``"cmd"``, ...), options and defaults are those of
    :data:`median_sgd.aggregators.REGISTRY` for the ``"hook"`` (``rule.differences`` says why
    some defaults differ from :func:`~median_sgd.aggregators.make_aggregator`'s):

    * ``"mean"``: the all-reduce mean (DDP's default); ``"coordinate_median"``: per coordinate,
      the median over ranks; ``"trimmed_mean"``: per coordinate, the mean after dropping
      ``floor(trim * world_size)`` values at each end (``trim=0.25``);
    * ``"gm"``: the geometric median by Weiszfeld rounds of all-reduce (``eps=1e-8``,
      ``tol=1e-6`` as in :func:`median_sgd.geometric_median`; ``max_iter=8`` rounds, all of them
      with ``fixed_iter=True``, no host synchronisation; ``False`` stops once the all-reduced
      optimality test passes), from the coordinate-wise median (``init="median"``: the rounds
      needed do not grow with how far a Byzantine rank is) or the mean (``"mean"``, RFA's);
    * ``"bgmd"``: per bucket, ``k`` coordinates (int, or fraction: ``k=0.1``) chosen by ``mode``
      (``"topk"``; ``"norm"`` samples them with a generator seeded by ``seed`` on every rank,
      ``power`` as in :func:`median_sgd.select_block`) get the geometric median (the ``"gm"``
      options apply), the others go to a memory: ``memory="median"`` (the coordinate-wise median
      over ranks), ``"mean"`` (the paper's, which one Byzantine rank controls) or ``None``.

    Every rule drops a rank whose bucket holds a NaN or an Inf (weight 0 in that bucket, the same
    on every rank, counted in ``hook.stats["dropped"]``; for ``"bgmd"``, a bucket that overflows
    once the memory is added counts too), and returns 0 when every rank is dropped; the trimmed
    mean still trims ``floor(trim * world_size)`` values at each end of the ranks that remain
    (down to their median). Every rank must register the same rule with the same options: the
    first bucket checks that and raises ``RuntimeError`` on every rank otherwise.

    Returns a :class:`RobustHook`.
    """
    return RobustHook(rule, **options)

