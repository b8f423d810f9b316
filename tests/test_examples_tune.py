"""The weighted-lasso tuning example runs (--quick) and its per-feature strengths fit the
cross-validation loss better than LassoCV's best single strength."""

from __future__ import annotations

import pytest


@pytest.fixture
def example(load_example, one_thread):
    pytest.importorskip("sklearn")
    return load_example("tune_weighted_lasso")


def test_quick_run(example, capsys):
    out = example.main(["--quick"])
    assert out["cv_weighted"] < out["cv_single"]
    assert out["weighted"] > 0 and out["single"] > 0
    text = capsys.readouterr().out
    assert "LassoCV, one strength" in text and "fr.tune, 20 strengths" in text
