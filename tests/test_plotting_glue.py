"""``median_sgd.plotting.glue``: the value reaches myst-nb as a number its format specs accept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

IPython = pytest.importorskip("IPython")

from median_sgd.plotting import glue  # noqa: E402


@pytest.fixture
def shown(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()  # get_ipython() is not None from here on
    calls = []
    monkeypatch.setattr("IPython.display.display", lambda data, **kw: calls.append((data, kw)))
    yield calls
    InteractiveShell.clear_instance()  # later tests see no IPython again


@pytest.mark.parametrize("value,text", [
    (0.5, "0.5"), (np.float64(0.0690803), "0.0690803"), (np.int64(7), "7"),
    (torch.tensor(0.25, dtype=torch.float64), "0.25"), (torch.tensor([3]), "3"),
])
def test_scalars_are_glued_as_python_numbers(shown, value, text):
    assert glue("key", value) is value  # returned unchanged
    (data, kw), = shown
    assert data == {"application/papermill.record/text/plain": text}
    assert kw["metadata"]["scrapbook"] == {"name": "key", "mime_prefix": "application/papermill.record/"}
    assert float(text) == pytest.approx(float(value))  # what `{glue:text}`key:.2f`` parses


def test_display_true_shows_the_value(shown):
    glue("shown", 1.5, display=True)
    (data, kw), = shown
    assert data == {"text/plain": "1.5"} and kw["metadata"]["scrapbook"]["mime_prefix"] == ""


def test_bad_name_is_an_error():
    with pytest.raises(ValueError, match="non-empty string"):
        glue("", 1.0)
