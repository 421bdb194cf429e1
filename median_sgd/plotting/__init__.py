"""The figures the chapters draw: the only part of the library that imports matplotlib.

One module per chapter (or experiment); shared colours and markers in ``_style``. Every name is
re-exported here, so chapters write ``from median_sgd.plotting import plot_...``.
"""

from ._style import estimator_style
from .robust_mean import plot_outlier_scene, plot_quantile_curves
