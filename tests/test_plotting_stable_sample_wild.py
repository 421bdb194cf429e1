"""Figures of chapters 4-6 fit the book's column and put one legend outside the data."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from median_sgd.plotting import (  # noqa: E402
    COLUMN_WIDTH,
    plot_convergence,
    plot_final_error,
    plot_gm_passes,
    plot_sample_size,
    plot_sgd_curves,
    plot_sgd_final_error,
    plot_skew_fixed_points,
    plot_stationary_spread,
    plot_sweep,
    plot_training_curves,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def check_column(fig):
    assert fig.get_figwidth() <= COLUMN_WIDTH + 1e-9
    assert fig.get_layout_engine() is not None  # constrained
    assert len(fig.legends) == 1  # one legend, outside the panels
    assert not any(ax.get_legend() for ax in fig.axes)
    fig.canvas.draw()
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert min(sizes) >= 7.5


def test_stable_noise_figures():
    final = [{"inv_alpha": a, "estimator": e, "median": 0.1 * a, "min": 0.05, "max": 0.2 * a}
             for a in (0.5, 1.0) for e in ("momentum", "CClip")]
    ax = plot_final_error(final)
    check_column(ax.figure)
    with pytest.raises(ValueError, match="legend"):
        plot_final_error(final, legend="somewhere")
    curves = [{"inv_alpha": a, "estimator": e, "step": t, "median": 1.0 / (1 + t)}
              for a in (0.5, 1.0) for e in ("VClip", "CClip") for t in (0, 10, 20)]
    axes = plot_convergence(curves, estimators=("VClip", "CClip"))
    assert axes[0].figure.get_figwidth() <= COLUMN_WIDTH


def test_sample_median_sgd_figures():
    stationary = [{"alpha": a, "eta": eta, "estimator": e, "spread": eta, "spread_low": eta / 2,
                   "spread_high": 2 * eta, "scale": eta}
                  for a in (2.0, 1.0) for eta in (0.1, 0.2) for e in ("mean", "coordinate median")]
    axes = plot_stationary_spread(stationary, quantile=lambda a: 1.0)
    check_column(axes[0].figure)
    final = [{"alpha": a, "estimator": e, "median": 0.1, "q10": 0.05, "q90": 0.2}
             for a in (2.0, 1.0) for e in ("mean", "coordinate median")]
    check_column(plot_sgd_final_error(final).figure)
    curves = [{**r, "step": t} for r in final for t in (0, 10, 100)]
    check_column(plot_sgd_curves(curves, alphas=(2.0, 1.0))[0].figure)
    size = [{"n": n, "median": 1.0, "q10": 0.5, "q90": 2.0, "tail_exponent": n / 2} for n in (3, 5, 7)]
    check_column(plot_sample_size(size).figure)
    skew = [{"n": n, "estimator": e, "z": 1.0, "stderr": 0.1}
            for n in (1, 3) for e in ("mean", "coordinate median")]
    check_column(plot_skew_fixed_points(skew, prediction=lambda ns: ns * 0.0, limit=1.0).figure)
    gm = [{"method": m, "passes": p, "median": 1e-3, "q10": 1e-4, "q90": 1e-2}
          for m in ("Weiszfeld", "SPP, tau0/p") for p in (0, 1, 2)]
    check_column(plot_gm_passes(gm).figure)


def test_in_the_wild_figures():
    curves = [{"setting": s, "method": m, "step": t, "test_accuracy": 0.5}
              for s in ("clean", "corrupted batches") for m in ("SGD", "CClip") for t in (0, 10)]
    check_column(plot_training_curves(curves)[0].figure)
    sweeps = [{"setting": s, "method": "CClip", "parameter": "tau_cclip", "value": v,
               "accuracy_mean": 0.9} for s in ("clean", "corrupted batches") for v in (0.1, 1.0)]
    check_column(plot_sweep(sweeps, relative_to={"tau_cclip": 1.0})[0].figure)
