"""Plots contain the expected lines, labels and log axes (not only a file on disk)."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import funcreg as fr  # noqa: E402
from funcreg import path, plot  # noqa: E402
from funcreg.selection import cross_validate  # noqa: E402


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


# ---------------------------------------------------------------------------------------
# plots from results: SweepResult.plot_path / plot_training, CVResult.plot
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = x[:, 0] - 2 * x[:, 1] + 0.5 + torch.randn(60, generator=g, dtype=torch.float64)
    net = nn.Linear(5, 1).double()

    def loss(p, xb, yb):
        return 0.5 * F.mse_loss(functional_call(net, p, (xb,)).squeeze(-1), yb)

    return net, loss, x, y


def test_result_plot_path_kinds_and_untouched_param(linear_setup):
    net, loss, x, y = linear_setup
    r = path(net, loss, fr.Spec(l1=fr.L1("weight")), data=(x, y), n=8)
    ax = r.plot_path("weight")
    assert len(ax.get_lines()) == 5
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "l1" and ax.get_ylabel() == "coefficient"
    lo, hi = ax.get_xlim()
    assert lo > hi
    ax = r.plot_path("weight", kind="nonzero")
    (line,) = ax.get_lines()
    assert list(line.get_ydata())[-1] == 0.0  # drawn by increasing strength: the top is empty
    with pytest.raises(ValueError, match=r"the spec does not touch 'bias'.*selects \['weight'\]"):
        r.plot_path("bias")
    with pytest.raises(ValueError, match="no training steps to plot"):
        r.plot_training()


def test_sweep_plot_path_axis_and_training_curves(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def loss(p, xb, yb):
        return F.mse_loss(functional_call(net, p, (xb,)), yb)

    g = fr.grid(l1=[0.1, 0.01, 0.001], lr=[0.05, 0.1])
    r = fr.sweep(net, loss, fr.Spec(l1=fr.L1("0.weight")), g, train=(x, y), val=(x, y),
                 optimizer=fr.optim.sgd(lr="lr"), steps=5, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"several axes \['l1', 'lr'\]; pass axis="):
        r.plot_path("0.weight")
    ax = r.plot_path("0.weight", kind="norm", axis="l1", save=tmp_path / "p.png")
    assert len(ax.get_lines()) == 3 and ax.get_xlabel() == "l1"  # one per input feature
    assert len(ax.get_lines()[0].get_xdata()) == 3  # lr held at the best model's value
    assert "lr=" in ax.get_title() and (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"does not touch '2.weight'.*\['0.weight'\]"):
        r.plot_path("2.weight")
    ax = r.plot_training(models=[0, 5])
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["l1=0.1, lr=0.05", "l1=0.001, lr=0.1"]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "loss"
    assert len(ax.get_lines()[0].get_xdata()) == 5
    with pytest.raises(ValueError, match="no per-step metric 'nope'"):
        r.plot_training("nope")


def test_cv_plot(linear_setup, tmp_path):
    net, loss, x, y = linear_setup
    cv = cross_validate(net, loss, fr.Spec(l1=fr.L1("weight")), torch.logspace(0, -3, 6), (x, y),
                        folds=3)  # fmt: skip
    ax = cv.plot(save=tmp_path / "cv.png")
    labels = [line.get_label() for line in ax.get_lines()]
    assert "strength_min" in labels and "strength_1se" in labels
    v = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()}
    assert v["strength_min"] == pytest.approx(cv.strength_min)
    assert v["strength_1se"] == pytest.approx(cv.strength_1se)
    assert len(ax.containers) == 1 and ax.get_xscale() == "log" and ax.get_xlabel() == "l1"
    assert ax.get_ylabel() == "CV score (3 folds)"
    tops = [c for c in ax.child_axes if c.get_xlabel() == "non-zero coefficients"]
    assert len(tops) == 1  # the glmnet-style top axis
    assert (tmp_path / "cv.png").stat().st_size > 1000
    ax = cv.plot_path("weight")
    assert len(ax.get_lines()) == 5 + 2  # coefficients + the two vertical lines
