"""Chapter 8's figures (plotting.beyond): they draw what they are given, sized for the column."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from median_sgd.plotting import (  # noqa: E402
    COLUMN_WIDTH,
    plot_batch_size,
    plot_lp_errors,
    plot_lp_tradeoff,
)

PS = (1.0, 1.5, 2.0, math.inf)
NOISES = ("gaussian", "cauchy", "contaminated")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def lp_records():
    rows = []
    for rule in ("fixed", "matched"):
        for k, noise in enumerate(NOISES):
            for i, p in enumerate(PS):
                med = 0.1 * (1 + i) * (1 + k)
                rows.append({"p": p, "rule": rule, "noise": noise, "median": med,
                             "min": med / 2, "max": 2 * med,
                             "steps_to_threshold": None if math.isinf(p) else 100 * (i + 1)})
    return rows


def test_lp_errors_draw_the_medians_and_can_leave_the_legend_out():
    ax = plot_lp_errors(lp_records(), rule="fixed", legend=False)
    assert ax.get_legend() is None
    line = {ln.get_label(): ln for ln in ax.get_lines()}["cauchy"]
    np.testing.assert_allclose(line.get_ydata(), [0.2, 0.4, 0.6, 0.8])
    assert plot_lp_errors(lp_records(), rule="fixed").get_legend() is not None


def test_lp_tradeoff_one_panel_per_noise_one_legend_no_point_labels():
    axes = plot_lp_tradeoff(lp_records(), rule="matched", steps=1000)
    fig = axes[0].figure
    assert [ax.get_title() for ax in axes] == list(NOISES)
    assert fig.get_size_inches()[0] <= COLUMN_WIDTH + 1e-9
    assert all(not ax.texts for ax in axes)           # no annotations to pile up
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["p = 1", "p = 1.5", "p = 2", r"p = $\infty$", "never (drawn at 1000)"]
    # the line through the points of one noise law: never-reached p drawn at `steps`
    (joined,) = axes[1].get_lines()
    np.testing.assert_allclose(joined.get_xdata(), [100, 200, 300, 1000])
    np.testing.assert_allclose(joined.get_ydata(), [0.2, 0.4, 0.6, 0.8])
    with pytest.raises(ValueError, match="axes"):
        plot_lp_tradeoff(lp_records(), rule="matched", axes=axes[:2])


def test_batch_size_panels_span_the_column_with_one_legend_below():
    rows = [{"n": n, "aggregator": agg, "estimator": est, "inv_alpha": ia, "median": 1.0 / n}
            for n in (1, 3) for agg in ("mean", "coordinate median")
            for est in ("momentum", "VClip", "CClip") for ia in (0.5, 1.5)]
    axes = plot_batch_size(rows)
    fig = axes[0].figure
    assert len(axes) == 2 and fig.get_size_inches()[0] <= COLUMN_WIDTH + 1e-9
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert "momentum, median" in [t.get_text() for t in fig.legends[0].get_texts()]
    fig.canvas.draw()  # the constrained layout fits the legend below the panels
    legend_top = fig.legends[0].get_window_extent().y1
    assert all(legend_top <= ax.get_window_extent().y0 + 1 for ax in axes)
