"""Figures of part II (plotting.bgmd): they draw exactly what they are given."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from median_sgd.experiments import bgmd_theory, gm_breakdown  # noqa: E402
from median_sgd.plotting import (  # noqa: E402
    method_style,
    plot_ablation,
    plot_accuracy_vs_time,
    plot_bgmd_cost,
    plot_breakdown_curves,
    plot_contraction,
    plot_cost,
    plot_gap_traces,
    plot_gm_scenes,
    plot_memory_identity,
    plot_residual_training,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_method_style_is_shared():
    assert method_style("GmD")["color"] == method_style("geometric median")["color"]
    assert method_style("SGD")["color"] == method_style("mean")["color"]
    assert method_style("something else")["color"] == "tab:gray"


def test_gm_figures():
    cfg = gm_breakdown.GMBreakdownConfig(n=30, seeds=5, fractions=(0.0, 0.2))
    result = gm_breakdown.run(cfg)
    axes = plot_gm_scenes(result.scenes)
    assert len(axes) == 4 and axes[1].get_title() == "10% corruption"
    ax = plot_breakdown_curves(result.curves, "far")
    lines = lines_by_label(ax)
    assert set(lines) >= {"mean", "geometric median"}
    gm = [r for r in result.curves if r["mode"] == "far" and r["estimator"] == "geometric median"]
    np.testing.assert_allclose(lines["geometric median"].get_ydata(), [r["median"] for r in gm])
    ax = plot_gap_traces({"a": [1.0, 0.1, 0.0, 0.01]})
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [0, 1, 3])  # zero gaps are skipped


def test_cost_figures():
    records = [{"sweep": "d", "n": 4, "d": d, "method": m, "seconds": s * d}
               for d in (10, 100) for m, s in (("mean", 1e-6), ("Weiszfeld iteration", 1e-5))]
    ax = plot_cost(records, "d")
    lines = lines_by_label(ax)
    np.testing.assert_allclose(lines["Weiszfeld iteration"].get_ydata(), [1e-4, 1e-3])
    np.testing.assert_allclose(lines["slope 1 (linear)"].get_ydata(), [1e-5, 1e-4])
    bgmd = [{"k": 1, "beta": b, "method": m, "solver": "K=5", "seconds": b + 0.1}
            for b in (0.1, 1.0) for m in ("BGmD", "block selection", "Gm of the block")]
    bgmd += [{"k": 10, "beta": 1.0, "method": "GmD", "solver": "K=5", "seconds": 1.0},
             {"k": 10, "beta": 1.0, "method": "mean", "solver": "-", "seconds": 0.01}]
    ax = plot_bgmd_cost(bgmd, "K=5")
    assert set(lines_by_label(ax)) >= {"BGmD", "block selection", "Gm of the block",
                                       "GmD (all d coordinates)", "mean (all d coordinates)"}


def test_bgmd_theory_figures():
    cfg = bgmd_theory.BGmDTheoryConfig(n=3, d=40, k_fractions=(0.1, 0.5), draws=20, lemma5_d=20,
                                       lemma5_steps=3)
    contraction = bgmd_theory.contraction_study(cfg)
    ax = plot_contraction(contraction, "uniform")
    lines = lines_by_label(ax)
    assert set(lines) == set(bgmd_theory.SELECTIONS) | {r"bound $1 - k/d$"}
    np.testing.assert_allclose(lines[r"bound $1 - k/d$"].get_ydata(), [0.9, 0.5])
    runs = {"clean": bgmd_theory.memory_identity(cfg, psi=0.0)}
    ax = plot_memory_identity(runs)
    assert len(ax.get_lines()) == 2
    records = [dict(setup="tiny", method=m, iteration=i, relative_residual=(0.5 if "BGmD" in m else None),
                    test_accuracy=0.5, train_loss=1.0)
               for m in ("BGmD beta=0.1", "BGmD beta=0.4", "SGD") for i in (1, 2)]
    axes = plot_residual_training(records, "tiny")
    assert len(axes[0].get_lines()) == 4  # two residual curves, two bound lines
    assert len(axes[1].get_lines()) == 3


def test_training_figures():
    records = []
    for psi, attack in ((0.0, "none"), (0.2, "bit_flip")):
        for m in ("SGD", "GmD"):
            diverged = m == "SGD" and psi > 0
            for i in (1, 2):
                records.append(dict(experiment="table2", seed=0, psi=psi, attack=attack, method=m,
                                    iteration=i, time_s=0.1 * i, test_accuracy=float("nan") if diverged else 0.5,
                                    diverged=diverged and i == 2))
    axes = plot_accuracy_vs_time(records, "bit_flip")
    assert [ax.get_title() for ax in axes] == ["no corruption", "20% corruption"]
    assert "SGD" in lines_by_label(axes[0]) and "GmD" in lines_by_label(axes[1])
    # four fractions: two rows of two panels in the column, one legend below them
    more = [dict(r, psi=p, attack="bit_flip") for p in (0.1, 0.4) for r in records if r["psi"] > 0]
    more += [dict(r, psi=0.3, attack="impulse") for r in records if r["psi"] > 0]  # another attack
    axes = plot_accuracy_vs_time(records + more, "bit_flip")
    fig = axes[0].figure
    assert len(axes) == 4 and fig.get_figwidth() <= 6.6
    assert axes[3].get_title() == "40% corruption"
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in axes)
    fig6 = [dict(experiment="fig6", method=m, iteration=i, test_accuracy=0.1 * i)
            for m in ("BGmD 0.05 M", "BGmD 0.05", "GmD") for i in (1, 2)]
    ax = plot_ablation(fig6)
    assert ax.figure.get_figwidth() <= 6.6 and len(ax.figure.legends) == 1
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles == {r"BGmD $\beta$ = 0.05 with memory": "-", r"BGmD $\beta$ = 0.05, no memory": "--",
                      "GmD": ":"}
    # several seeds: one line per method, the mean over the seeds at each iteration
    seeded = [dict(r, seed=s, test_accuracy=r["test_accuracy"] + 0.2 * s) for s in (0, 1) for r in fig6]
    ax = plot_ablation(seeded)
    gmd = lines_by_label(ax)["GmD"]
    assert list(gmd.get_xdata()) == [1, 2]
    assert list(gmd.get_ydata()) == pytest.approx([100 * (0.1 + 0.1), 100 * (0.2 + 0.1)])
    assert "mean of 2 seeds" in ax.get_ylabel()


def test_zoom_and_theorem_figures():
    from median_sgd.plotting import plot_gm_zoom, plot_theorem_sweeps
    cfg = gm_breakdown.GMBreakdownConfig(n=30, seeds=5, fractions=(0.0, 0.2))
    scenes = gm_breakdown.run(cfg).scenes
    ax = plot_gm_zoom(scenes, zoom=2.0)
    assert ax.get_xlim() == (-2.0, 2.0) and len(ax.texts) == 2 * len(scenes)
    tiny = bgmd_theory.ConvergenceConfig(seeds=2, d=10, steps=20, beta=0.2, noise_levels=(0.5, 1.0),
                                         betas=(0.2, 1.0), psis=(0.2,))
    runs = bgmd_theory.convergence_study(tiny)
    axes = plot_theorem_sweeps(runs)
    assert [a.get_title() for a in axes] == ["noise", "block", "corruption"]
    assert len(axes[0].figure.legends) == 1  # one legend, below the panels
    with pytest.raises(ValueError):
        plot_gap_traces({"a": [1.0]}, legend="inside")
