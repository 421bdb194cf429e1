"""Scaling out: DDP training through a Byzantine rank with robust communication hooks (the chapter "Scaling out").

``run(config)`` starts ``world_size`` processes on this machine (``torch.multiprocessing`` spawn,
``gloo`` on the CPU or ``nccl`` with one GPU per rank), and in them:

1. **checks** every rule of :func:`median_sgd.distributed.robust_hook`: each rank holds one row of
   known matrices (one row Byzantine; in the second matrix the ``nan_ranks`` rows are NaN), calls
   ``hook.aggregate`` through real collectives, and compares with ``hook.simulate`` (the same
   code on all rows in one process) and with the library's estimator of the finite rows
   (``coordinate_median``, a trimmed mean, ``geometric_median``, :class:`median_sgd.BGmD`);
2. **trains** a small classifier with ``DistributedDataParallel`` once per run of
   ``config.runs``: in the attacked runs the Byzantine ranks multiply their loss by
   ``loss_scale`` (``-100``: the "scaled bit flip" of Acharya et al.) and the ``nan_ranks``
   multiply it by NaN (a broken worker: its gradient is NaN at every step); the hook decides what
   the update is. Every rank records the test loss and accuracy, the hook's communication
   counters and dropped contributions, and a fingerprint of its parameters (all ranks must hold
   the same model).

Everything is seeded; with one thread per process the records are identical from run to run.
Nothing is printed (the worker processes write to a log file that the error message quotes if
they fail), and a run that hangs is stopped after ``config.timeout_s`` seconds.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch

from ._common import Result, only_dtype, resolve_config, scales

__all__ = ["ScalingOutConfig", "CONFIGS", "RUNS", "make_data", "make_model", "rank_device", "run",
           "summary"]

#: (label, rule, options, attacked): the training runs of the chapter. The geometric medians run
#: 4 Weiszfeld rounds per bucket and step (RFA uses 3 to 4; the hook's default is 8).
RUNS = (
    ("mean, no attack", "mean", (), False),
    ("mean", "mean", (), True),
    ("coordinate median", "coordinate_median", (), True),
    ("trimmed mean", "trimmed_mean", (("trim", 0.25),), True),
    ("geometric median", "gm", (("max_iter", 4),), True),
    ("BGmD (median memory)", "bgmd", (("k", 0.1), ("memory", "median"), ("max_iter", 4)), True),
    ("BGmD (mean memory)", "bgmd", (("k", 0.1), ("memory", "mean"), ("max_iter", 4)), True),
)


@dataclass(frozen=True)
class ScalingOutConfig:
    """Sizes of the experiment (the ``ci`` and ``paper`` scales differ only here)."""

    world_size: int = 4
    byzantine_ranks: tuple = (0,)
    loss_scale: float = -100.0  # a Byzantine rank's loss is multiplied by this before backward
    nan_ranks: tuple = (1,)  # in the attacked runs these ranks' gradients are NaN at every step
    runs: tuple = RUNS
    steps: int = 30
    batch_size: int = 32  # per rank
    lr: float = 0.2
    n_features: int = 16
    n_classes: int = 4
    hidden: int = 32
    n_train: int = 2048  # split evenly across the ranks
    n_test: int = 1024
    class_separation: float = 2.0
    eval_every: int = 3
    bucket_cap_mb: float = 0.002  # small buckets, so the model is spread over several of them
    check_size: int = 1000  # length of the vectors of the aggregation check
    seed: int = 0
    backend: str = "gloo"  # "nccl" for one GPU per rank
    timeout_s: float = 240.0


CONFIGS: Dict[str, ScalingOutConfig] = scales(
    ci=ScalingOutConfig(),
    paper=ScalingOutConfig(world_size=8, byzantine_ranks=(0, 1), nan_ranks=(2,), steps=300,
                              hidden=128,
                              n_train=16384, n_test=4096, bucket_cap_mb=0.05),
)


def make_data(config: ScalingOutConfig):
    """A Gaussian-mixture classification task: ``(X_train, y_train, X_test, y_test)``, float32.

    Class ``c`` has mean ``class_separation * mu_c`` (``mu_c`` random unit vectors) and identity
    covariance. The training set is split into ``world_size`` equal shards, one per rank.
    """
    gen = torch.Generator().manual_seed(config.seed)
    mu = torch.randn(config.n_classes, config.n_features, generator=gen)
    mu = config.class_separation * mu / torch.linalg.vector_norm(mu, dim=1, keepdim=True)

    def sample(n):
        y = torch.randint(config.n_classes, (n,), generator=gen)
        return mu[y] + torch.randn(n, config.n_features, generator=gen), y

    X_train, y_train = sample(config.n_train)
    X_test, y_test = sample(config.n_test)
    return X_train, y_train, X_test, y_test


def make_model(config: ScalingOutConfig) -> torch.nn.Module:
    """The classifier: ``n_features -> hidden -> hidden -> n_classes`` with tanh, seeded."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed + 1)
    model = torch.nn.Sequential(
        torch.nn.Linear(config.n_features, config.hidden), torch.nn.Tanh(),
        torch.nn.Linear(config.hidden, config.hidden), torch.nn.Tanh(),
        torch.nn.Linear(config.hidden, config.n_classes),
    )
    torch.random.set_rng_state(gen_state)
    return model


def run(config="ci", *, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
        progress: bool = False) -> Result:
    """Start the processes, wait for them, return the records of rank 0 (checked against the rest).

    Returns a :class:`Result` with tables ``checks``, ``curves``, ``runs`` (also readable as
    ``result["runs"]``; ``dtype`` is the model's float32 only and ``progress`` is accepted for the
    common signature: the workers print nothing):

    * ``checks``: one record per rule: ``max_diff_simulated`` (real collectives against
      :meth:`RobustHook.simulate`, over all ranks) and ``max_diff_library`` (against the
      library's estimator of the finite rows), ``finite`` (every result was finite),
      ``dropped`` (the contributions the hook dropped), ``ranks_identical`` (every rank got the
      same vectors and dropped the same);
    * ``curves``: per run and evaluation step: ``test_loss`` and ``test_accuracy`` (the same on
      every rank);
    * ``runs``: per run: final loss and accuracy, ``ranks_identical`` (every rank ends with the
      same parameters and counted the same drops), ``buckets``, and per step and rank
      ``collectives``, ``elements_sent`` (also relative to the mean rule, ``traffic_vs_mean``)
      and ``dropped`` (contributions dropped as non-finite, over all buckets).

    ``device`` (``"cpu"`` or any CUDA device: ``"cuda"``, ``"cuda:0"``, a ``torch.device``)
    defaults to the backend's: gloo on the CPU, nccl on the GPUs; on CUDA rank ``r`` runs on
    ``cuda:r`` (:func:`rank_device`).
    """
    import torch.multiprocessing as mp

    config = resolve_config(config, CONFIGS)
    only_dtype(dtype)
    if config.backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {config.backend!r}")
    if device is None:
        device = "cuda" if config.backend == "nccl" else "cpu"
    on_cuda = rank_device(device, 0).type == "cuda"  # also validates the device
    if config.backend == "nccl" and not on_cuda:
        raise ValueError(f"the nccl backend needs a CUDA device, got {device!r}")
    bad = tuple(config.byzantine_ranks) + tuple(config.nan_ranks)
    if config.world_size < 2 or any(not 0 <= r < config.world_size for r in bad):
        raise ValueError("world_size must be >= 2 and the Byzantine and NaN ranks must be ranks")
    if len(set(bad)) != len(bad):
        raise ValueError("a rank cannot be both Byzantine and a NaN rank (nor listed twice)")
    with tempfile.TemporaryDirectory(prefix="median_sgd_scaling_out_") as tmp:
        store = os.path.join(tmp, "store")
        log = os.path.join(tmp, "workers.log")
        ctx = mp.start_processes(_worker, args=(config, device, store, tmp, log),
                                 nprocs=config.world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + config.timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the {config.world_size} worker processes did not finish within "
                        f"{config.timeout_s} s{_log_tail(log)}"
                    )
        except Exception as err:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            if isinstance(err, TimeoutError):
                raise
            raise RuntimeError(f"a worker process failed: {err}{_log_tail(log)}") from err
        results = []
        for rank in range(config.world_size):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return Result(config, **_merge(results))


def rank_device(device, rank: int) -> torch.device:
    """The device of rank ``rank`` for the ``device`` given to :func:`run`.

    Any CUDA device (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda", 1)``) means one GPU per
    rank: rank ``r`` runs on ``cuda:r``. Anything else of type ``"cpu"`` is the CPU; other
    device types are an error (the experiment runs on ``gloo``/CPU or ``nccl``/CUDA only).
    """
    kind = torch.device(device).type  # a string comparison would miss "cuda:0"
    if kind == "cuda":
        return torch.device("cuda", rank)
    if kind == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")


def summary(records: Mapping[str, List[dict]]) -> List[dict]:
    """One row per run: its label, whether it was attacked, final test loss and accuracy, and the
    contributions dropped per step."""
    keys = ("run", "rule", "attacked", "final_loss", "final_accuracy", "dropped")
    return [{k: r[k] for k in keys} for r in records["runs"]]


# --------------------------------------------------------------------------------------------
# The worker processes


def _worker(rank: int, config: ScalingOutConfig, device: str, store: str, out_dir: str,
            log: str) -> None:
    # The workers print nothing: their output goes to a log file (quoted if they fail).
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)  # identical, reproducible CPU reductions
    import torch.distributed as dist

    dev = rank_device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(config.backend, init_method=f"file://{store}", rank=rank,
                            world_size=config.world_size,
                            timeout=datetime.timedelta(seconds=config.timeout_s))
    try:
        out = {"checks": _check_rules(config, rank, dev), "curves": [], "runs": []}
        for run_spec in config.runs:
            curves, summary_row = _train(config, rank, dev, run_spec)
            out["curves"] += curves
            out["runs"].append(summary_row)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def _check_rules(config: ScalingOutConfig, rank: int, dev: torch.device) -> List[dict]:
    """Real collectives against the one-process simulation and the library, for every rule.

    Three matrices in turn (the ``"bgmd"`` memory carries over): the Byzantine rows scaled by
    ``loss_scale``; the same with the ``nan_ranks`` rows NaN; the first kind again (a memory that a
    NaN had poisoned would show). The library gets the finite rows only, which is what the hook
    must aggregate.
    """
    from .. import BGmD, coordinate_median, geometric_median
    from ..distributed import robust_hook

    W, n = config.world_size, config.check_size
    gen = torch.Generator().manual_seed(config.seed + 7)
    mats = [torch.randn(W, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    for G in mats:
        for r in config.byzantine_ranks:
            G[r] *= config.loss_scale
    for r in config.nan_ranks:
        mats[1][r] = float("nan")
    mats = [G.to(dev) for G in mats]

    def trimmed(G):  # the hook's rule: floor(trim W) values off each end of the m finite ones
        m = G.shape[0]
        t = min(int(0.25 * W), (m - 1) // 2)
        return torch.sort(G, dim=0).values[t:m - t].mean(0)

    library = {
        "mean": lambda G: G.mean(0),
        "coordinate_median": coordinate_median,
        "trimmed_mean": trimmed,
        "gm": lambda G: geometric_median(G, max_iter=8, fixed_iter=True).median,
    }
    records = []
    for rule in ("mean", "coordinate_median", "trimmed_mean", "gm", "bgmd"):
        # the geometric medians start at the mean here, exactly as the library's iteration does
        options = {"init": "mean"} if rule in ("gm", "bgmd") else {}
        real, simulated = robust_hook(rule, **options), robust_hook(rule, **options)
        reference = BGmD(0.1, mode="topk", memory="median", max_iter=8, fixed_iter=True)
        diff_sim = diff_lib = 0.0
        finite = True
        mine = []
        for G in mats:  # in turn: the "bgmd" memory carries over
            ours = real.aggregate(G[rank].clone())
            sim = simulated.simulate(G)[rank]
            rows = G[torch.isfinite(G).all(1)]
            lib = reference(rows) if rule == "bgmd" else library[rule](rows)
            diff_sim = max(diff_sim, float((ours - sim).abs().max()))
            diff_lib = max(diff_lib, float((ours - lib).abs().max()))
            finite = finite and bool(torch.isfinite(ours).all())
            mine.append(ours)
        records.append({"rule": rule, "max_diff_simulated": diff_sim, "max_diff_library": diff_lib,
                        "finite": finite, "dropped": real.stats["dropped"],
                        "fingerprint": _fingerprint(mine) + [real.stats["dropped"]]})
    return records


def _train(config: ScalingOutConfig, rank: int, dev: torch.device, run_spec) -> tuple:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ..distributed import robust_hook

    label, rule, options, attacked = run_spec
    X, y, X_test, y_test = make_data(config)
    shard = config.n_train // config.world_size
    X, y = X[rank * shard:(rank + 1) * shard].to(dev), y[rank * shard:(rank + 1) * shard].to(dev)
    X_test, y_test = X_test.to(dev), y_test.to(dev)
    model = make_model(config).to(dev)
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                  bucket_cap_mb=config.bucket_cap_mb)
    hook = robust_hook(rule, **dict(options))
    ddp.register_comm_hook(None, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=config.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(config.seed + 1000 * (rank + 1))  # the same batches in every run
    byzantine = attacked and rank in config.byzantine_ranks
    broken = attacked and rank in config.nan_ranks
    curves = []

    def evaluate(step):
        with torch.no_grad():
            logits = model(X_test)
            loss = float(loss_fn(logits, y_test))
            acc = float((logits.argmax(1) == y_test).float().mean())
        curves.append({"run": label, "rule": rule, "attacked": attacked, "step": step,
                       "test_loss": loss if math.isfinite(loss) else float("inf"),
                       "test_accuracy": acc})

    evaluate(0)
    for step in range(1, config.steps + 1):
        idx = torch.randint(shard, (config.batch_size,), generator=gen).to(dev)
        opt.zero_grad()
        loss = loss_fn(ddp(X[idx]), y[idx])
        if byzantine:
            loss = config.loss_scale * loss
        if broken:
            loss = loss * float("nan")  # every gradient of this rank is NaN
        loss.backward()
        opt.step()
        if step % config.eval_every == 0 or step == config.steps:
            evaluate(step)
        if step == 1:
            hook.reset_stats()  # count the steady state (DDP rebuilds its buckets after step 1)
    stats = hook.stats
    steady = config.steps - 1
    dist.barrier()
    row = {
        "run": label,
        "rule": rule,
        "options": dict(options),
        "attacked": attacked,
        "final_loss": curves[-1]["test_loss"],
        "final_accuracy": curves[-1]["test_accuracy"],
        "buckets": stats["buckets"] // max(steady, 1),
        "collectives": stats["collectives"] / max(steady, 1),
        "elements_sent": stats["elements_sent"] / max(steady, 1),
        "dropped": stats["dropped"] / max(steady, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "fingerprint": _fingerprint(list(model.parameters())) + [stats["dropped"]],
    }
    del ddp
    return curves, row


def _fingerprint(tensors) -> List[float]:
    """Exact values that identify a set of tensors (compared across ranks)."""
    flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
    return [float(flat.sum()), float((flat * torch.arange(1, flat.numel() + 1,
                                                          dtype=torch.float64)).sum())]


def _merge(results: List[dict]) -> Dict[str, List[dict]]:
    """Rank 0's records, with ``ranks_identical`` from comparing every rank's fingerprints."""
    first = results[0]
    checks = []
    for i, rec in enumerate(first["checks"]):
        rec = dict(rec)
        rec["max_diff_simulated"] = max(r["checks"][i]["max_diff_simulated"] for r in results)
        rec["max_diff_library"] = max(r["checks"][i]["max_diff_library"] for r in results)
        rec["finite"] = all(r["checks"][i]["finite"] for r in results)
        rec["ranks_identical"] = all(r["checks"][i]["fingerprint"] == rec["fingerprint"]
                                     for r in results)
        del rec["fingerprint"]
        checks.append(rec)
    runs = []
    mean_traffic = next((r["elements_sent"] for r in first["runs"] if r["rule"] == "mean"), None)
    for i, rec in enumerate(first["runs"]):
        rec = dict(rec)
        rec["ranks_identical"] = all(r["runs"][i]["fingerprint"] == rec["fingerprint"]
                                     for r in results)
        if mean_traffic:
            rec["traffic_vs_mean"] = rec["elements_sent"] / mean_traffic
        del rec["fingerprint"]
        runs.append(rec)
    curves_identical = all(r["curves"] == first["curves"] for r in results)
    for rec in runs:
        rec["ranks_identical"] = rec["ranks_identical"] and curves_identical
    return {"checks": checks, "curves": first["curves"], "runs": runs}


def _log_tail(path: str, lines: int = 30) -> str:
    try:
        with open(path) as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return ""
    return "\nlast lines of the workers' log:\n" + "".join(tail) if tail else ""
