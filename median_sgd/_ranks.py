"""The collectives of the ranks of a process group, real or simulated in one process.

:class:`ProcessGroupRanks` runs ``torch.distributed`` collectives for one rank (its tensors have
no rank dimension); :class:`SimulatedRanks` holds every rank in one tensor (a leading rank
dimension) and computes the same collectives as sums, stacks and transposes along it. Code
written against their common methods runs on both: the rules over ranks here
(:func:`ranks_mean`, :func:`ranks_coordinatewise`), the Weiszfeld rounds of
:class:`median_sgd.weiszfeld.RankRows`, and so the DDP hook (:class:`median_sgd.distributed.RobustHook`;
chapter "Scaling out"). Each counts its collective
calls and the elements one rank sends (ring / pairwise algorithms) in a :class:`CollectiveCounter`.
"""

from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._masked import masked_coordinate_median, masked_trimmed_mean

__all__ = ["CollectiveCounter", "ProcessGroupRanks", "SimulatedRanks", "ranks_mean",
           "ranks_coordinatewise", "disagreements", "hash56"]




class CollectiveCounter:
    """Collective calls and elements sent per rank (ring / pairwise algorithms)."""

    def __init__(self) -> None:
        self.collectives = 0
        self.elements = 0.0

    def add(self, elements: float) -> None:
        self.collectives += 1
        self.elements += elements


def _all_gather_into(out: torch.Tensor, t: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None)  # torch >= 2.13; older: the deprecated name
    if gather is None:
        gather = dist.all_gather_into_tensor
    gather(out, t, group=group)


class ProcessGroupRanks:
    """The collectives of one rank in a ``torch.distributed`` process group.

    Local tensors have no rank dimension: a bucket is ``(n,)``, a per-rank number ``()``.
    """

    def __init__(self, group, counter: CollectiveCounter) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.counter = counter

    def all_reduce(self, t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``sum_r t_r`` on every rank (into ``t`` itself with ``inplace=True``)."""
        out = t if inplace else t.clone()
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
    dimension, so the aggregation code of :class:`median_sgd.distributed.RobustHook` runs
    unchanged and every rank's result comes out as a row.
    """

    def __init__(self, world: int, counter: Optional[CollectiveCounter] = None) -> None:
        self.world = world
        self.counter = counter or CollectiveCounter()

    def all_reduce(self, t, inplace=False):
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


def ranks_mean(y: torch.Tensor, good: torch.Tensor, ranks) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean of the finite ranks' ``y``, by one all-reduce of ``[y / W, 1]`` (``[0, 0]`` from
    a dropped rank): the sum and the number of ranks in it; dividing by ``W`` first (as DDP's own
    hook does) keeps the sum from overflowing. ``good`` is each rank's flag "my ``y`` is
    finite". Returns the mean and the number of ranks dropped."""
    world, n = ranks.world, y.shape[-1]
    buf = y.new_empty(*y.shape[:-1], n + 1)
    torch.div(y, world, out=buf[..., :n])
    buf[..., :n].masked_fill_(~good.unsqueeze(-1), 0.0)
    buf[..., n] = good
    total = ranks.all_reduce(buf, inplace=True)
    count = total[..., n:]  # (..., 1), a whole number; with count 0 the sum is 0 too
    mean = total[..., :n] * (world / count.clamp_min(1.0))
    return mean, (world - count.squeeze(-1)).round().long()


def ranks_coordinatewise(y: torch.Tensor, good: torch.Tensor, ranks, rule: str,
                         trim: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, ``rule`` (``"coordinate_median"`` or ``"trimmed_mean"`` with ``trim``) of
    the finite ranks' ``y``, sharded. Returns the result and the number of ranks dropped.

    One ``all_to_all``: rank ``s`` receives shard ``s`` of every rank's ``y`` (padded to
    ``world * c``, ``c = ceil(n / world)``) with the sender's flag appended (``c + 1``
    elements), so every rank learns which ranks to leave out; it aggregates its shard, and one
    ``all_gather`` of the shards gives every rank the whole result.
    """
    world, n = ranks.world, y.shape[-1]
    c = -(-n // world)
    lead = y.shape[:-1]
    padded = torch.nn.functional.pad(y, (0, world * c - n)).view(*lead, world, c)
    flag = good.to(y.dtype)[..., None, None].expand(*lead, world, 1)
    chunks = torch.cat([padded, flag], dim=-1).view(*lead, world * (c + 1))
    received = ranks.all_to_all(chunks)  # (..., world, c + 1): every rank's copy of my shard
    shards, ok = received[..., :c], received[..., c] > 0.5
    if rule == "coordinate_median":
        mine = masked_coordinate_median(shards, ok)
    else:
        mine = masked_trimmed_mean(shards, ok, int(math.floor(trim * world)))
    return ranks.gather_shards(mine)[..., :n], (~ok).sum(-1)


def hash56(text: str) -> int:
    """A 56-bit integer hash of ``text`` (fits an int64 exactly; the same in every process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def disagreements(ranks: ProcessGroupRanks, values: Sequence[Tuple[str, int]],
                  device: torch.device) -> List[str]:
    """All-gather ``values`` (named int64s) once (a host read): for each that some rank holds
    differently, ``"<name> differ(s) from rank(s) [...]"``; ``[]`` when all ranks agree."""
    mine = torch.tensor([v for _, v in values], dtype=torch.int64, device=device)
    table = ranks.gather_shards(mine).view(ranks.world, len(values)).tolist()
    me = table[ranks.rank]
    problems = []
    for column, (what, _) in enumerate(values):
        other = [r for r, row in enumerate(table) if row[column] != me[column]]
        if other:
            problems.append(f"{what} differ(s) from rank(s) {other}")
    return problems
