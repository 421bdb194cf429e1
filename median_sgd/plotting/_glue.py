"""``glue``: hand a computed value to the chapter's prose (myst-nb's ``{glue:text}`` role).

A number the book's text states is glued where it is computed and referenced in the markdown as
``{glue:text}`name:.2f```, so the sentence and the output cannot drift apart when a chapter is
re-run. This is myst-nb's ``glue`` (same output, same metadata), written here so a chapter runs
where myst-nb is not installed (Colab): the book's build reads the output either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["glue"]

# myst_nb.ext.glue.GLUE_PREFIX: the mime-type prefix of a value glued without being displayed.
_GLUE_PREFIX = "application/papermill.record/"


def glue(name: str, value: Any, display: bool = False) -> Any:
    """Record ``value`` under ``name`` for ``{glue:text}`name``` in the chapter; return ``value``.

    Outside an IPython kernel it only returns ``value``. ``display=True`` also shows it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"glue: name must be a non-empty string, got {name!r}")
    try:
        from IPython import get_ipython
        from IPython.core.formatters import format_display_data
        from IPython.display import display as ipy_display
    except ImportError:
        return value
    if get_ipython() is None:
        return value
    # A numpy or one-element torch scalar is glued as the Python number it holds: its repr
    # ("np.float64(0.5)", "tensor(0.5)") is not a number myst-nb's `{glue:text}`k:.2f`` can format.
    scalar = isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    shown = value.item() if scalar else value
    mimebundle, metadata = format_display_data(shown)
    mime_prefix = "" if display else _GLUE_PREFIX
    metadata["scrapbook"] = dict(name=name, mime_prefix=mime_prefix)
    ipy_display({mime_prefix + k: v for k, v in mimebundle.items()}, raw=True, metadata=metadata)
    return value
