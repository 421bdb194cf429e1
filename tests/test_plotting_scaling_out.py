"""The figures of the chapter "Scaling out" (plotting.scaling_out), on small synthetic records."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from median_sgd.plotting import (  # noqa: E402
    COLUMN_WIDTH,
    plot_byzantine_training,
    plot_communication,
    run_style,
)

LABELS = ["mean, no attack", "mean", "coordinate median", "trimmed mean", "geometric median",
          "BGmD (median memory)", "BGmD (mean memory)"]


def _curves():
    return [{"run": label, "step": step, "test_loss": 1.0 / (1 + step + i),
             "test_accuracy": 0.1 * i + 0.01 * step}
            for i, label in enumerate(LABELS) for step in (0, 3, 6)]


def _runs():
    return [{"run": label, "attacked": label != "mean, no attack", "traffic_vs_mean": 1.0 + i,
             "collectives": 2.0 * (i + 1)} for i, label in enumerate(LABELS)]


def test_training_figure_fits_the_column_with_one_legend_below():
    axes = plot_byzantine_training(_curves(), title="a title")
    fig = axes[0].figure
    assert fig.get_figwidth() <= COLUMN_WIDTH + 1e-9
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == LABELS
    assert all(len(ax.lines) == len(LABELS) for ax in axes)
    assert axes[0].get_yscale() == "log"
    fig.canvas.draw()
    legend_top = fig.legends[0].get_window_extent().y1
    assert all(legend_top <= ax.get_window_extent().y0 for ax in axes)  # below the panels
    plt.close("all")
    with pytest.raises(ValueError):
        plot_byzantine_training([])


def test_communication_figure_values_match_the_bars():
    axes = plot_communication(_runs())
    fig = axes[0].figure
    assert fig.get_figwidth() <= COLUMN_WIDTH + 1e-9
    attacked = [r for r in _runs() if r["attacked"]]
    assert [p.get_width() for p in axes[0].patches] == [r["traffic_vs_mean"] for r in attacked]
    assert [p.get_width() for p in axes[1].patches] == [r["collectives"] for r in attacked]
    assert [t.get_text() for t in axes[0].texts] == [f"{r['traffic_vs_mean']:.2f}"
                                                      for r in attacked]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == [r["run"] for r in attacked]
    # colours are the runs' styles
    want = [matplotlib.colors.to_rgba(run_style(r["run"])["color"]) for r in attacked]
    assert [p.get_facecolor() for p in axes[0].patches] == want
    plt.close("all")
    with pytest.raises(ValueError):
        plot_communication([])


def test_caller_axes_are_used():
    fig, axes = plt.subplots(1, 2)
    assert plot_byzantine_training(_curves(), axes)[0] is axes[0]
    fig, axes = plt.subplots(1, 2)
    assert plot_communication(_runs(), axes)[1] is axes[1]
    plt.close("all")
