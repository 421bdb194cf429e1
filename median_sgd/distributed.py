"""Robust DDP communication hooks: ``bucket <- agg_r(g_r)`` over ranks ``r`` instead of ``mean_r g_r``.

``DistributedDataParallel`` averages each bucket of gradients across the ranks with one
all-reduce. :func:`robust_hook` returns a communication hook that replaces that mean by a robust
aggregate of the ranks' bucket gradients (chapter "Scaling out"), so that a minority of faulty
or Byzantine ranks cannot drag the update anywhere:

* ``"mean"``: the all-reduce mean (DDP's default, for comparison);
* ``"coordinate_median"``, ``"trimmed_mean"``: each rank receives one shard of every rank's
  vector (``all_to_all``), aggregates it, and the shards are gathered back (``all_gather``):
  about a ring all-reduce's bytes per rank, and no rank ever holds all gradients;
* ``"gm"``: the geometric median by Weiszfeld rounds (RFA, Pillutla et al.): each round
  all-gathers the ranks' distances to the iterate (one number per rank) and all-reduces
  ``sum_r beta_r (g_r - z)`` (one bucket), the iteration of :func:`median_sgd.geometric_median`;
* ``"bgmd"``: block geometric median descent per bucket (Acharya et al.): a block of ``k``
  coordinates chosen from the all-reduced squared column norms gets the rounds above in
  ``R^k``, and the rest goes to a memory.

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
result is 0 (and ``"bgmd"``'s memory stays as it was: no step). Huge but finite values are
outliers like any other: distances are computed scaled (so they overflow only when the work dtype
cannot hold them; such a rank then weighs 0 in the Weiszfeld round, the limit of
``1 / distance``), and sums are divided by their count first.

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

import numbers
from typing import Any, Dict, Hashable, Optional

import torch
import torch.distributed as dist

from ._checks import check_float_tensor, value_checks
from ._masked import finite_rows
from .aggregators import get_rule, place_defaults
from .bgmd import bgmd_step, resolve_block_size
from ._ranks import (CollectiveCounter, ProcessGroupRanks, SimulatedRanks, disagreements, hash56,
                     ranks_coordinatewise, ranks_mean)
from .weiszfeld import ranks_weiszfeld

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
        self.rule, self.options = rule, dict(options)
        #: every option of the hook's rules, the given ones checked, the others their defaults
        self.settings: Dict[str, Any] = {**_DEFAULTS, **self.spec.check(options, "hook")}
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
        values = tuple((o.name, self.settings[o.name]) for o in self.spec.options_in("hook"))
        return hash56(repr((self.spec.name, values)))  # aliases of one rule match

    def _check_same_hook(self, x: torch.Tensor, ranks: ProcessGroupRanks) -> None:
        """All-gather (rule and options, length, dtype) once; raise on every rank if they differ."""
        problems = disagreements(ranks, [("rule or options", self._fingerprint()),
                                         ("tensor length", x.numel()),
                                         ("tensor dtype", hash56(str(x.dtype)))], x.device)
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
            good = finite_rows(y)
            if rule == "mean":
                out, dropped = ranks_mean(y, good, ranks)
            elif rule in ("coordinate_median", "trimmed_mean"):
                out, dropped = ranks_coordinatewise(y, good, ranks, rule, self.settings["trim"])
            else:
                out, dropped = self._geometric_median(y, good, ranks)
        self._count_dropped(ranks.shared(dropped))
        return out.to(x.dtype)

    def _count_dropped(self, dropped: torch.Tensor) -> None:
        total = self._dropped.get(dropped.device)
        self._dropped[dropped.device] = dropped if total is None else total + dropped

    def _geometric_median(self, y, good, ranks):
        """Weiszfeld by all-reduce rounds (:func:`median_sgd.weiszfeld.ranks_weiszfeld`: the
        iteration of :func:`median_sgd.geometric_median`) over the finite ranks. Returns the
        median and the ranks dropped."""
        opts = self.settings
        if opts["init"] == "mean":
            centre, dropped = ranks_mean(y, good, ranks)  # as geometric_median starts
        else:
            # the coordinate-wise median: within the honest ranks' range whatever the others send,
            # so a fixed number of rounds suffices however far they are
            centre, dropped = ranks_coordinatewise(y, good, ranks, "coordinate_median")
        median = ranks_weiszfeld(y, good, centre, ranks, eps=opts["eps"], tol=opts["tol"],
                                 max_iter=opts["max_iter"], fixed_iter=opts["fixed_iter"])
        return median, dropped

    def _bgmd(self, y, ranks, key):
        n, opts = y.shape[-1], self.settings
        k = opts["k"]
        k = resolve_block_size(k, n) if not isinstance(k, numbers.Integral) else min(int(k), n)
        old = self.memory.get(key)
        if old is not None and old.shape != y.shape[-1:]:
            old = None  # the bucket changed (DDP rebuilds its buckets after the first step)
        a = y if old is None else y + ranks.spread(old)
        good = finite_rows(a)
        # squared column norms ||A[:, j]||^2 of the finite ranks, and how many ranks count (in
        # the same all-reduce): with none, the step is no step (bgmd_step's absent)
        buf = a.new_empty(*a.shape[:-1], n + 1)
        torch.mul(a, a, out=buf[..., :n]).masked_fill_(~good.unsqueeze(-1), 0.0)
        buf[..., n] = good
        total = ranks.shared(ranks.all_reduce(buf, inplace=True))
        sq, absent = total[..., :n], total[..., n] == 0
        dropped = []

        def block_median(idx):  # the same on every rank
            u_block, dropped_ranks = self._geometric_median(a[..., idx], good, ranks)
            dropped.append(dropped_ranks)
            return u_block

        def memory_of(idx):
            if opts["memory"] == "mean":
                residual, _ = ranks_mean(a, good, ranks)
            else:
                residual, _ = ranks_coordinatewise(a, good, ranks, "coordinate_median")
            return ranks.shared(residual)

        _, out, memory = bgmd_step(sq, k, opts["mode"], self._generator(sq.device), opts["power"],
                                   block_median, memory_of if opts["memory"] else None,
                                   absent=absent, memory=old)
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
        if self.settings["mode"] != "norm":
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.settings["seed"])
        return self._generators[device]


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

    Every rule drops a rank whose bucket holds a NaN or an Inf (for ``"bgmd"``, also once the
    memory is added), counted in ``hook.stats["dropped"]``, and returns 0 when every rank is
    dropped; the first bucket checks that every rank registered the same rule and options (see
    the module's docstring).

    Returns a :class:`RobustHook`.
    """
    return RobustHook(rule, **options)

