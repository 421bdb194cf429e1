"""Figures of chapters 2 and 3 (plotting.prox, plotting.tracking): they draw what they are given."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import median_sgd as ms  # noqa: E402
from median_sgd.experiments import tracking  # noqa: E402
from median_sgd.plotting import (  # noqa: E402
    estimator_style,
    online_style,
    plot_drift_error,
    plot_drift_trace,
    plot_fixed_curves,
    plot_fixed_estimates,
    plot_fixed_paths,
    plot_operator_2d,
    plot_operators_1d,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def result():
    cfg = dataclasses.replace(
        tracking.CONFIGS["ci"], seeds=3, fixed_steps=60, reference_samples=500, curve_points=5,
        drift_dim=3, drift_steps=40, drift_taus=(0.01, 0.1, 1.0),
    )
    return tracking.run(cfg)


def test_operators_1d_draws_each_operator():
    ax = plot_operators_1d({"soft": ms.prox_l1, "clip": ms.clip_l1}, 1.0, points=101)
    lines = ax.get_lines()
    # identity + two operators (the threshold lines are Line2D too, drawn after)
    soft = next(line for line in lines if line.get_label() == "soft")
    x, y = soft.get_data()
    np.testing.assert_allclose(y, np.sign(x) * np.maximum(np.abs(x) - 1.0, 0.0), atol=1e-12)
    clip = next(line for line in lines if line.get_label() == "clip")
    np.testing.assert_allclose(clip.get_data()[1], np.clip(clip.get_data()[0], -1, 1), atol=1e-12)


def test_operator_2d_arrows_end_at_the_images():
    pts = torch.tensor([[3.0, 4.0], [0.1, 0.2], [-2.0, 0.5]], dtype=torch.float64)
    ax = plot_operator_2d(ms.clip_l2, pts, 1.0, ball="l2")
    quiver = next(c for c in ax.collections if isinstance(c, matplotlib.quiver.Quiver))
    # the point inside the disc does not move and gets no arrow
    assert quiver.N == 2
    ends = quiver.XY + np.stack([quiver.U, quiver.V], axis=-1)
    np.testing.assert_allclose(ends, ms.clip_l2(pts[[0, 2]], 1.0).numpy(), atol=1e-12)
    assert len(ax.patches) == 1  # the ball


def test_operator_2d_bad_input():
    with pytest.raises(ValueError, match="shape"):
        plot_operator_2d(ms.clip_l2, torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="ball"):
        plot_operator_2d(ms.clip_l2, torch.zeros(4, 2), 1.0, ball="l3")


def test_online_style_colour_of_the_median_and_dashed_sgd():
    assert online_style("VClip")["color"] == estimator_style("geometric median")["color"]
    assert online_style("CClip")["color"] == estimator_style("coordinate median")["color"]
    assert online_style("momentum")["color"] == estimator_style("mean")["color"]
    for name, (method, _) in tracking.ESTIMATORS.items():
        assert online_style(name)["linestyle"] == ("--" if method == "sgd" else "-")
    assert len({online_style(name)["color"] for name in tracking.ESTIMATORS}) == 6


def test_fixed_figures(result):
    fixed = result.fixed
    ax = plot_fixed_paths(fixed, until=10)
    path = next(line for line in ax.get_lines() if line.get_color() == online_style("CClip")["color"])
    np.testing.assert_allclose(np.stack(path.get_data(), -1), fixed["trace"]["CClip"][:11].numpy())
    ax = plot_fixed_estimates(fixed)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(tracking.ESTIMATORS)
    ax = plot_fixed_curves(fixed["curves"], "geometric median")
    assert len(ax.get_lines()) == len(tracking.ESTIMATORS)
    with pytest.raises(ValueError, match="no curve records"):
        plot_fixed_curves(fixed["curves"], "trimmed mean")


def test_drift_figures(result):
    drift = result.drift
    ax = plot_drift_error(drift["records"], estimators=["VClip"])
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_data()[0], result.config.drift_taus)
    ax = plot_drift_error(drift["records"], field="lag", band=False)
    for line in ax.get_lines():  # non-positive lags are left out, not clipped
        y = np.asarray(line.get_data()[1], dtype=float)
        assert np.all(np.isnan(y) | (y > 0))
    ax = plot_drift_trace(drift, 1, last=10)
    target = ax.get_lines()[-1]
    np.testing.assert_allclose(target.get_data()[1], drift["target_trace"][-10:].numpy())


def test_legends_hide_no_data():
    from median_sgd.experiments import robust_mean
    from median_sgd.plotting import plot_outlier_scene, plot_quantile_curves

    cfg = dataclasses.replace(robust_mean.CONFIGS["ci"], scene_inliers=20)
    scene = robust_mean.outlier_scene(cfg)
    ax = plot_outlier_scene(scene)
    fig = ax.figure
    fig.canvas.draw()
    # Fig. 1's legend lies right of the axes, beside the points, not on them
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    assert plot_outlier_scene(scene, legend=False).get_legend() is None
    rows = [{"estimator": "mean", "n": n, "median": 1.0, "q10": 0.5, "q90": 2.0} for n in (5, 11)]
    assert plot_quantile_curves(rows, "n", legend=False).get_legend() is None
    assert plot_quantile_curves(rows, "n").get_legend() is not None
    ax = plot_operators_1d({"soft": ms.prox_l1}, 1.0, points=11)
    ax.figure.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    assert plot_operators_1d({"soft": ms.prox_l1}, 1.0, points=11, legend=False).get_legend() is None
