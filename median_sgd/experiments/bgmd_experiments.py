"""BGmD's robust-training experiments: Tables 2-4, Figs. 1-3 and 6 of Acharya et al. (AISTATS 2022).

Chapter "Robust training experiments". Every experiment is a grid of
:class:`~median_sgd.experiments.bgmd_training.BGmDTrainingConfig` runs (methods x attacks x
corrupted fractions x seeds), trained by :func:`~median_sgd.experiments.bgmd_training.run`:

* ``"table2"``: homogeneous (i.i.d.) training under the five corruptions of Section 7.2 (scaled
  bit flip, gradient noise, feature noise, impulse noise, backdoor); the paper's Fashion-MNIST
  and LeNet. Its runs also give Figs. 1-3 (test accuracy against wall-clock time under impulse
  noise, bit flips and the backdoor).
* ``"table3"``: the gradient attacks in the paper's MNIST setting (10 clients, momentum 0.9,
  cosine learning rate).
* ``"table4"``: the gradient attacks with heterogeneous (label-sorted shard) clients; the
  paper's CIFAR-10 and ResNet-18.
* ``"fig6"``: clean training with BGmD for several ``beta = k/d``, with and without memory.

At the ``ci`` scale every experiment uses scikit-learn's 8x8 digits and the 412-parameter CNN
(seconds per run on a CPU), one seed, 15 epochs, and corrupted fractions 0, 20% and 40% (and 10%
in Table 2, for the figures); at the
``paper`` scale the paper's datasets, models, schedules, fractions 0/10/20/40% and five seeds (a
GPU and torchvision's downloads are needed). :data:`PAPER_TABLES` holds the paper's numbers for
comparison. Nothing here prints or plots.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

from ..data.images import ImageData, load_images
from ._common import Result, only_dtype, records_of, resolve_config, scales
from .bgmd_training import BGmDTrainingConfig, method, train_grid

__all__ = [
    "EXPERIMENTS",
    "ATTACK_NAMES",
    "PAPER_TABLES",
    "BGmDExperimentsConfig",
    "CONFIGS",
    "fig6_methods",
    "experiment_records",
    "run",
    "final_accuracy",
    "comparison_table",
]

EXPERIMENTS = ("table2", "table3", "table4", "fig6")

#: The attacks of median_sgd.attacks, named as in the paper's tables.
ATTACK_NAMES = {
    "none": "clean",
    "bit_flip": "gradient: scaled bit flip",
    "gradient_noise": "gradient: additive noise",
    "feature_noise": "feature: additive noise",
    "impulse": "feature: impulse noise",
    "backdoor": "label: backdoor",
}

_SHORT_NAMES = {  # at most 10 characters: comparison_table's rows fit in 78 columns
    "none": "clean",
    "bit_flip": "bit flip",
    "gradient_noise": "grad noise",
    "feature_noise": "feat noise",
    "impulse": "impulse",
    "backdoor": "backdoor",
}

_Row = Dict[str, Optional[Tuple[float, float]]]


def _row(sgd, cmd, bgmd, gmd) -> _Row:
    return {"SGD": sgd, "CmD": cmd, "BGmD": bgmd, "GmD": gmd}


#: Test accuracy (%) as (mean, confidence interval) over 5 seeds, ``None`` where the paper's
#: table has "-" (the run diverged). Keys ``(attack, psi)``. Table 2 from the paper's table
#: image (its text extraction scrambles two rows); note its impulse-40% BGmD entry duplicates
#: CmD's (likely a typo), and Table 4's GmD bit-flip-20% entry equals Table 2's (suspect).
PAPER_TABLES: Dict[str, Dict[Tuple[str, float], _Row]] = {
    "table2": {  # Fashion-MNIST, LeNet (1.16M), 32 clients x 64, i.i.d.
        ("none", 0.0): _row((89.39, 0.28), (83.82, 0.26), (89.25, 0.19), (88.98, 0.3)),
        ("bit_flip", 0.2): _row(None, (84.20, 0.02), (88.42, 0.16), (88.07, 0.05)),
        ("bit_flip", 0.4): _row(None, (82.33, 1.60), (85.67, 0.09), (85.57, 0.09)),
        ("gradient_noise", 0.2): _row(None, (72.55, 0.16), (87.87, 0.33), (87.24, 0.16)),
        ("gradient_noise", 0.4): _row(None, (41.04, 1.13), (88.29, 0.01), (83.89, 0.08)),
        ("feature_noise", 0.2): _row(None, (82.38, 0.13), (86.76, 0.03), (86.63, 0.04)),
        ("feature_noise", 0.4): _row(None, (78.54, 0.65), (82.27, 0.06), (81.23, 0.03)),
        ("impulse", 0.2): _row((79.18, 6.47), (82.59, 0.60), (86.91, 0.36), (86.23, 0.03)),
        ("impulse", 0.4): _row(None, (78.03, 0.73), (78.03, 0.73), (81.41, 0.12)),
        ("backdoor", 0.2): _row((86.99, 0.02), (76.38, 0.13), (88.97, 0.10), (88.26, 0.04)),
        ("backdoor", 0.4): _row((73.01, 0.68), (60.85, 1.24), (84.69, 0.31), (81.32, 0.16)),
    },
    "table3": {  # MNIST, LeNet, 10 clients x 64, i.i.d.
        ("none", 0.0): _row((99.27, 0.01), (98.83, 0.02), (99.09, 0.05), (99.24, 0.02)),
        ("bit_flip", 0.2): _row((9.51, 1.77), (98.79, 0.01), (99.06, 0.02), (98.98, 0.01)),
        ("bit_flip", 0.4): _row((9.60, 2.04), (93.69, 0.09), (97.89, 0.05), (98.11, 0.12)),
        ("gradient_noise", 0.2): _row((9.68, 0.11), (94.26, 0.03), (98.61, 0.01), (98.69, 0.01)),
        ("gradient_noise", 0.4): _row((9.74, 0.12), (91.86, 0.03), (97.78, 0.27), (92.78, 0.04)),
    },
    "table4": {  # CIFAR-10, ResNet-18, 10 clients x 128, label-sorted shards
        ("none", 0.0): _row((82.29, 1.32), (85.50, 1.43), (84.82, 0.76), (85.65, 0.48)),
        ("bit_flip", 0.2): _row(None, (80.87, 0.21), (84.56, 0.06), (88.07, 0.05)),
        ("bit_flip", 0.4): _row(None, (77.41, 1.04), (82.66, 0.31), (80.81, 0.01)),
        ("gradient_noise", 0.2): _row((20.7, 1.56), (54.75, 0.38), (83.84, 0.12), (82.40, 0.90)),
        ("gradient_noise", 0.4): _row(None, (23.35, 6.13), (82.79, 0.68), (79.46, 0.24)),
    },
}

_ALL_ATTACKS = ("bit_flip", "gradient_noise", "feature_noise", "impulse", "backdoor")
_GRADIENT_ATTACKS = ("bit_flip", "gradient_noise")


def fig6_methods(betas: Iterable[float]) -> tuple:
    """Fig. 6's methods: BGmD for each ``beta`` with the mean memory (label ``"BGmD b M"``) and
    without memory (``"BGmD b"``), and GmD (``beta = 1``) as the reference."""
    out = []
    for beta in betas:
        out.append(method("bgmd", f"BGmD {beta:g} M", k=float(beta)))
        out.append(method("bgmd", f"BGmD {beta:g}", k=float(beta), memory=None))
    return tuple(out) + (method("gmd", "GmD"),)


@dataclass(frozen=True)
class BGmDExperimentsConfig:
    """One training config per experiment (see the module docstring)."""

    table2: BGmDTrainingConfig
    table3: BGmDTrainingConfig
    table4: BGmDTrainingConfig
    fig6: BGmDTrainingConfig

    def experiment(self, name: str) -> BGmDTrainingConfig:
        if name not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
        return getattr(self, name)


def _ci() -> BGmDExperimentsConfig:
    # digits, the 412-parameter CNN, 10 clients of 16 samples (8 steps per epoch), 15 epochs.
    base = BGmDTrainingConfig(dataset="digits", model="tiny_cnn", clients=10, batch_size=16,
                              epochs=15.0, lr=0.3, momentum=0.0, eval_every=16,
                              psis=(0.0, 0.2, 0.4), seeds=(0, 1, 2))
    return BGmDExperimentsConfig(
        # 10% as well: the paper's Figs. 1-3 have a panel for it (its tables do not)
        table2=dataclasses.replace(base, attacks=_ALL_ATTACKS, psis=(0.0, 0.1, 0.2, 0.4)),
        table3=dataclasses.replace(base, attacks=_GRADIENT_ATTACKS, lr=0.05, momentum=0.9,
                                   cosine=True),
        table4=dataclasses.replace(base, attacks=_GRADIENT_ATTACKS, split="shards"),
        fig6=dataclasses.replace(base, methods=fig6_methods((0.05, 0.2)), attacks=(), psis=(0.0,)),
    )


def _paper() -> BGmDExperimentsConfig:
    seeds = (0, 1, 2, 3, 4)
    table2 = BGmDTrainingConfig(  # Section 7.1, homogeneous Fashion-MNIST
        dataset="fashion_mnist", model="lenet", clients=32, batch_size=64, epochs=50.0, lr=0.01,
        lr_decay=0.99, momentum=0.0, psis=(0.0, 0.1, 0.2, 0.4), attacks=_ALL_ATTACKS, seeds=seeds,
        eval_every=100)
    mnist = BGmDTrainingConfig(  # Section 7.1, MNIST: 10 batches of 64, lr 0.001, cosine, momentum
        dataset="mnist", model="lenet", clients=10, batch_size=64, epochs=50.0, lr=0.001,
        cosine=True, momentum=0.9, psis=(0.0, 0.2, 0.4), attacks=_GRADIENT_ATTACKS, seeds=seeds,
        eval_every=100)
    return BGmDExperimentsConfig(
        table2=table2,
        table3=mnist,
        table4=BGmDTrainingConfig(  # heterogeneous CIFAR-10: 10 clients x 128, 200 epochs
            dataset="cifar10", model="resnet18", split="shards", clients=10, batch_size=128,
            epochs=200.0, lr=0.1, cosine=True, momentum=0.0, psis=(0.0, 0.2, 0.4),
            attacks=_GRADIENT_ATTACKS, seeds=seeds, eval_every=100),
        fig6=dataclasses.replace(mnist, epochs=10.0, methods=fig6_methods((0.01, 0.05, 0.1, 0.3)),
                                 attacks=(), psis=(0.0,)),
    )


CONFIGS: Dict[str, BGmDExperimentsConfig] = scales(ci=_ci(), paper=_paper())


def experiment_records(name: str, cfg: BGmDTrainingConfig, data: ImageData, *, device="cpu",
                       progress: bool = False, warmup: bool = True, batched: bool = True,
                       max_runs: Optional[int] = None) -> List[dict]:
    """The training records of one experiment's grid (:func:`~.bgmd_training.train_grid`; by
    default each method's runs trained together, ``batched``, at most ``max_runs`` at once),
    each with the field ``experiment``. ``warmup``: first one untimed training step per method,
    so that one-time costs (lazy imports, first calls of ``torch.func``, memory pools) do not
    land in the wall-clock times of whichever run comes first."""
    if warmup:
        one_step = dataclasses.replace(cfg, epochs=1e-9, seeds=cfg.seeds[:1], psis=(0.0,))
        train_grid(one_step, device=device, data=data, batched=batched)  # one iteration each
    return [{**r, "experiment": name}
            for r in train_grid(cfg, device=device, progress=progress, data=data, batched=batched,
                                max_runs=max_runs)]


def run(config: Union[str, BGmDExperimentsConfig] = "ci", experiments: Iterable[str] = EXPERIMENTS,
        *, device="cpu", dtype=None, progress: bool = False, warmup: bool = True,
        batched: bool = True, max_runs: Optional[int] = None) -> Result:
    """Each experiment in ``experiments`` (:func:`experiment_records`), each dataset loaded once.

    Table ``records`` (field ``experiment``; see
    :func:`~median_sgd.experiments.bgmd_training.train` for the others: ``test_accuracy``,
    ``time_s``, ``diverged``, ...). :func:`final_accuracy` and :func:`comparison_table` take the
    Result itself. ``dtype``: the models' float32 only (the common signature). ``batched``,
    ``max_runs``: see :func:`experiment_records` (run by run with ``batched=False``: the same
    records up to rounding).
    """
    config = resolve_config(config, CONFIGS)
    only_dtype(dtype)
    experiments = list(experiments)
    for name in experiments:
        config.experiment(name)  # validates the name
    cache: Dict[str, ImageData] = {}
    records: List[dict] = []
    for name in experiments:
        cfg = config.experiment(name)
        if cfg.dataset not in cache:
            cache[cfg.dataset] = load_images(cfg.dataset, seed=cfg.data_seed)
        records += experiment_records(name, cfg, cache[cfg.dataset], device=device,
                                      progress=progress, warmup=warmup, batched=batched,
                                      max_runs=max_runs)
    return Result(config, records=records)


#: two-sided 95% quantiles of Student's t distribution, ``T975[df]`` for ``df = 1..10``
#: (``scipy.stats.t.ppf(0.975, df)``, to 4 digits; ``tests/test_experiments_bgmd.py`` checks them)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def mean_interval(values: List[float]) -> Tuple[float, float]:
    """``(mean, half-width)`` of the 95% Student-t confidence interval for the mean of
    ``values`` (independent seeds): ``t_{0.975, n-1} s / sqrt(n)`` with ``s`` the sample standard
    deviation; the half-width is ``nan`` for one value. At most 11 values (the table ``T975``)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    if n - 1 not in T975:
        raise ValueError(f"mean_interval takes at most {max(T975) + 1} values, got {n}")
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T975[n - 1] * s / math.sqrt(n)


def final_accuracy(records: Union[Result, List[dict]], experiment: str) -> Dict[Tuple[str, float, str], dict]:
    """Per ``(attack, psi, method)`` of one experiment: the final test accuracy in % over the
    seeds: ``accuracies`` (one per seed that did not diverge, in seed order), ``accuracy`` (their
    mean; ``nan`` if any seed diverged) and ``interval`` (the half-width of its 95% confidence
    interval, :func:`mean_interval`; ``nan`` with one seed or if any diverged), ``diverged``
    (how many seeds did), ``seeds``, and the training time ``time_s`` (mean over seeds,
    machine-dependent)."""
    runs: Dict[Tuple[str, float, str, int], dict] = {}
    for r in records_of(records):
        if r.get("experiment") != experiment:
            continue
        key = (r["attack"], r["psi"], r["method"], r["seed"])
        if key not in runs or r["iteration"] > runs[key]["iteration"]:
            runs[key] = r
    out: Dict[Tuple[str, float, str], dict] = {}
    for (attack, psi, name, _), r in sorted(runs.items(), key=lambda item: item[0][3]):
        entry = out.setdefault((attack, psi, name), {"accuracies": [], "diverged": 0, "times": [],
                                                      "seeds": 0})
        entry["seeds"] += 1
        entry["diverged"] += bool(r["diverged"])
        if not r["diverged"]:
            entry["accuracies"].append(100 * r["test_accuracy"])
        entry["times"].append(r["time_s"])
    for entry in out.values():
        times = entry.pop("times")
        mean, half = (math.nan, math.nan) if entry["diverged"] else mean_interval(entry["accuracies"])
        entry["accuracy"], entry["interval"] = mean, half
        entry["time_s"] = sum(times) / len(times)
    return out


def _cell(mean: float, half: float) -> str:
    return f"{mean:.1f}" if math.isnan(half) else f"{mean:.1f}±{half:.1f}"


def comparison_table(records: Union[Result, List[dict]], experiment: str, *, paper: Optional[str] = None,
                     methods: Tuple[str, ...] = ("SGD", "CmD", "BGmD", "GmD"),
                     skip_missing: bool = False) -> str:
    """A text table (78 columns for four methods) of our final test accuracies (%) next to the
    paper's (``paper``: a key of :data:`PAPER_TABLES`, default ``experiment``), one row per
    (attack, psi) of the paper's table. Ours: the mean over seeds ± the half-width of its 95%
    confidence interval (:func:`mean_interval`); the paper's: its mean over 5 seeds (its
    intervals are in :data:`PAPER_TABLES`). ``div.`` marks a setting in which every seed of
    ours diverged, ``div.k/n`` one in which ``k`` of ``n`` did, ``-`` the paper's diverged
    entries, and ``n/a`` a setting we did not run (``skip_missing``: rows we did not run at all
    are left out). Rows: ``bit flip`` and ``grad noise`` corrupt gradients, ``feat noise``,
    ``impulse`` and ``backdoor`` samples."""
    ours = final_accuracy(records, experiment)
    theirs = PAPER_TABLES[paper or experiment]
    lines = [f"{'':15s}{'ours: mean ± 95% interval':^{10 * len(methods)}s} | "
             f"{'paper':^{5 * len(methods)}s}",
             f"{'corruption':10s}{'psi':>5s}" + "".join(f"{m:>10s}" for m in methods) + " | "
             + "".join(f"{m:>5s}" for m in methods)]
    for (attack, psi), row in theirs.items():
        cells = []
        for m in methods:
            entry = ours.get((attack, psi, m))
            if entry is None:
                cells.append("n/a")
            elif entry["diverged"] == entry["seeds"]:
                cells.append("div.")
            elif entry["diverged"]:
                cells.append(f"div.{entry['diverged']}/{entry['seeds']}")
            else:
                cells.append(_cell(entry["accuracy"], entry["interval"]))
        if skip_missing and all(c == "n/a" for c in cells):
            continue
        ref = ["-" if (paper_cell := row[m]) is None else f"{paper_cell[0]:.1f}" for m in methods]
        label = "-" if psi == 0 else f"{psi:.0%}"
        lines.append(f"{_SHORT_NAMES[attack]:10s}{label:>5s}" + "".join(f"{c:>10s}" for c in cells)
                     + " | " + "".join(f"{c:>5s}" for c in ref))
    return "\n".join(lines)
