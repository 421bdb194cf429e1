"""The figures the chapters draw: the only part of the library that imports matplotlib.

One module per chapter (or experiment); shared colours, markers and drawing steps (rows and grids
of panels, median lines with their bands, one legend per figure) in ``_style``. Every figure and
style is re-exported here, so chapters write ``from median_sgd.plotting import plot_...``.
"""

from ._glue import glue
from ._style import COLUMN_WIDTH, ROW_HEIGHT, book_style, estimator_style
from .robust_mean import plot_outlier_scene, plot_quantile_curves
from .stable_noise import plot_convergence, plot_final_error
from .beyond import (
    noise_style,
    plot_batch_size,
    plot_centered_clipping,
    plot_clip21,
    plot_lp_errors,
    plot_lp_tradeoff,
)
from .prox import plot_operator_2d, plot_operators_1d
from .tracking import (
    online_style,
    plot_drift_error,
    plot_drift_trace,
    plot_fixed_curves,
    plot_fixed_estimates,
    plot_fixed_paths,
)
from .bgmd import (
    method_style,
    plot_bgmd_cost,
    plot_breakdown_curves,
    plot_contraction,
    plot_cost,
    plot_gap_traces,
    plot_gm_scenes,
    plot_gm_zoom,
    plot_ablation,
    plot_accuracy_vs_time,
    plot_memory_identity,
    plot_residual_training,
    plot_theorem_sweeps,
)
from .sample_median_sgd import (
    plot_gm_passes,
    plot_sample_size,
    plot_sgd_curves,
    plot_sgd_final_error,
    plot_skew_fixed_points,
    plot_stationary_spread,
)
from .scaling_out import plot_byzantine_training, plot_communication, run_style
from .transformer import (
    plot_estimation_error,
    plot_noise_kurtosis,
    plot_tau_sweep,
    plot_zipf,
    summarize_curves,
)
from .benchmarks import (
    benchmark_rows,
    load_benchmark_results,
    machine_label,
    plot_bgmd_map,
    plot_hardware_floor,
    plot_solver_times,
    plot_targets,
    target_factor,
)
from .bgmd_memory import memory_style, plot_memory_curves, plot_memory_errors, plot_memory_training
from .in_the_wild import plot_sweep, plot_training_curves, training_style
