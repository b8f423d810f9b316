"""Plots contain the expected lines, labels and log axes (not only a file on disk)."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from funcreg import plot  # noqa: E402


def test_coef_norm_nonzero_paths(tmp_path):
    s = torch.logspace(-3, 0, 7)
    W = torch.randn(7, 4, 3)  # 7 models of a (4, 3) weight
    W[-1] = 0
    ax = plot.path(s, W, "coef", name="w", save=tmp_path / "coef.png")
    assert len(ax.get_lines()) == 12
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "strength"
    lo, hi = ax.get_xlim()
    assert lo > hi  # largest strength on the left
    assert (tmp_path / "coef.png").stat().st_size > 1000
    ax = plot.path(s, W, "norm", name="w")
    assert len(ax.get_lines()) == 3  # one per input feature
    y = ax.get_lines()[0].get_ydata()
    order = torch.argsort(s)
    torch.testing.assert_close(torch.as_tensor(y), W[order][:, :, 0].double().norm(dim=1))
    ax = plot.path(s, W, "nonzero", name="w")
    (line,) = ax.get_lines()
    assert list(line.get_ydata())[-1] == 0.0  # the model with W = 0 has the largest strength
    assert ax.get_ylabel() == "non-zero coefficients"


def test_cv_curve_has_error_bars_and_vertical_lines():
    s = torch.logspace(-3, 0, 5)
    mean = torch.tensor([1.0, 0.8, 0.7, 0.75, 0.9])
    se = torch.full((5,), 0.05)
    ax = plot.cv_curve(s, mean, se, strength_min=float(s[2]), strength_1se=float(s[3]))
    labels = [line.get_label() for line in ax.get_lines()]
    assert "strength_min" in labels and "strength_1se" in labels
    assert len(ax.containers) == 1  # the errorbar container
    assert ax.get_xscale() == "log"


def test_training_curves_and_errors():
    h = torch.rand(20, 3) + 0.1
    ax = plot.training_curves(h, labels=["a", "b", "c"])
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b", "c"]
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="kind must be one of"):
        plot.path(torch.ones(2), torch.ones(2, 3), "bars")
    with pytest.raises(ValueError, match="strengths must be > 0"):
        plot.path(torch.tensor([0.0, 1.0]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="3 strengths but values have 2 models"):
        plot.path(torch.ones(3), torch.ones(2, 3))
