"""fr.cross_validate: against scikit-learn's LassoCV, the fold specifications, the weighting
of an ordinary loss, the sweep engine, refits, bad input and the L2-SP example."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LassoCV
from sklearn.model_selection import KFold
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg import geometric_grid
from funcreg._folds import fold_masks
from funcreg.result import one_se_index
from funcreg.selection import cross_validate
from funcreg.solvers import solve

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
SPEC = fr.Spec(l1=fr.L1("weight"))


def linear(seed: int, n: int = 100, p: int = 10, rho: float = 0.0) -> tuple[Any, ...]:
    """A sparse linear problem with an intercept; ``nn.Linear`` at zero, ``½ MSE`` loss."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, p, generator=g, dtype=DT)
    x = z.clone()
    for j in range(1, p):
        x[:, j] = rho * x[:, j - 1] + (1 - rho**2) ** 0.5 * z[:, j]
    w = torch.zeros(p, dtype=DT)
    w[:3] = torch.tensor([2.0, -1.5, 1.0], dtype=DT)[: min(p, 3)]
    y = x @ w + 2.0 + torch.randn(n, generator=g, dtype=DT)
    net = nn.Linear(p, 1).double()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return 0.5 * F.mse_loss(functional_call(net, params, (xb,)).squeeze(-1), yb)

    def mse(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (xb,)).squeeze(-1), yb)

    return net, x, y, loss, mse


def alpha_max(x: Tensor, y: Tensor) -> float:
    return float(((x - x.mean(0)).T @ (y - y.mean())).abs().max()) / len(y)


@pytest.mark.parametrize(("seed", "rho"), [(0, 0.0), (1, 0.7)])
def test_matches_lasso_cv(seed: int, rho: float) -> None:
    net, x, y, loss, mse = linear(seed, rho=rho)
    splits = list(KFold(5, shuffle=True, random_state=seed).split(x.numpy()))
    alphas = geometric_grid(alpha_max(x, y), 1e-3, 30)
    sk = LassoCV(alphas=alphas.numpy(), cv=splits, tol=1e-12, max_iter=100_000)
    sk.fit(x.numpy(), y.numpy())
    assert np.allclose(sk.alphas_, alphas.numpy())
    cv = cross_validate(net, loss, SPEC, alphas, (x, y), folds=splits, score_fn=mse, tol=1e-10)
    sk_mean = torch.as_tensor(sk.mse_path_.mean(1))
    torch.testing.assert_close(cv.mean, sk_mean, rtol=1e-4, atol=0)  # reached: ~1e-8
    torch.testing.assert_close(cv.scores, torch.as_tensor(sk.mse_path_.T), rtol=1e-4, atol=0)
    i_sk = int(np.argmin(np.abs(alphas.numpy() - sk.alpha_)))
    i = cv.best("min").index
    # the same strength, or its neighbour when the curve is flat there
    assert i == i_sk or (abs(i - i_sk) == 1 and float(cv.mean[i]) <= float(sk_mean[i_sk]) * 1.0001)
    if i == i_sk:
        assert cv.strength_min == pytest.approx(sk.alpha_, rel=1e-12)
    # the 1se rule on scikit-learn's curve picks the same model
    sk_se = torch.as_tensor(sk.mse_path_.std(1, ddof=1) / np.sqrt(5))
    assert cv.best("1se").index == one_se_index(sk_mean, sk_se, alphas)
    assert cv.strength_1se >= cv.strength_min


def test_weight_keyword_equals_per_sample_evaluation() -> None:
    net, x, y, loss, mse = linear(2, n=40, p=5)
    seen: list[bool] = []

    def loss_w(params: dict[str, Tensor], xb: Tensor, yb: Tensor, weight: Tensor) -> Tensor:
        seen.append(True)
        r = (functional_call(net, params, (xb,)).squeeze(-1) - yb) ** 2
        return 0.5 * (weight * r).sum() / weight.sum()

    grid = [0.5, 0.1, 0.01]
    a = cross_validate(net, loss, SPEC, grid, (x, y), folds=4, score_fn=mse, tol=1e-11)
    b = cross_validate(net, loss_w, SPEC, grid, (x, y), folds=4, score_fn=mse, tol=1e-11)
    assert seen
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-8, atol=0)
    torch.testing.assert_close(a.path.stacked["weight"], b.path.stacked["weight"])


def test_fold_specifications_agree() -> None:
    train, test = fold_masks(5, 23, seed=3)
    assert test.sum(1).tolist() == [5, 5, 5, 4, 4]  # KFold's sizes
    assert bool((test.sum(0) == 1).all()) and bool((train == ~test).all())
    assert fold_masks(5, 23, seed=3)[1].equal(test)  # seeded
    assert not fold_masks(5, 23, seed=4)[1].equal(test)

    net, x, y, loss, mse = linear(3, n=30, p=4)
    ids = test.float().argmax(0)[:23]
    x, y = x[:23], y[:23]
    pairs = [
        (tr.nonzero().flatten(), te.nonzero().flatten()) for tr, te in zip(train, test, strict=True)
    ]
    grid = [0.3, 0.03]
    by_int = cross_validate(net, loss, SPEC, grid, (x, y), folds=5, seed=3, tol=1e-10)
    by_ids = cross_validate(net, loss, SPEC, grid, (x, y), folds=ids, tol=1e-10)
    by_pairs = cross_validate(net, loss, SPEC, grid, (x, y), folds=pairs, tol=1e-10)
    torch.testing.assert_close(by_int.scores, by_ids.scores)
    torch.testing.assert_close(by_int.scores, by_pairs.scores)
    assert [te.tolist() for _, te in by_int.folds] == [te.tolist() for _, te in pairs]


def test_refit_is_the_fit_on_all_data() -> None:
    net, x, y, loss, mse = linear(4, n=50, p=6)
    cv = cross_validate(net, loss, SPEC, [1.0, 0.3, 0.1, 0.03], (x, y), folds=3, tol=1e-12)
    model = cv.refit("min")
    assert model is not net and isinstance(model, nn.Linear)
    ref = solve(loss, SPEC, fr.params(net), {"l1": cv.strength_min}, x, y, tol=1e-12)
    torch.testing.assert_close(model.weight.detach(), ref.params["weight"][0], atol=1e-8, rtol=0)
    torch.testing.assert_close(model.bias.detach(), ref.params["bias"][0], atol=1e-8, rtol=0)
    nonzero = (cv.path.stacked["weight"] != 0).flatten(1).sum(1)
    assert cv.nonzero.tolist() == nonzero.tolist()
    assert cv.nonzero[0] < cv.nonzero[-1]
    assert cv.path.best(rule="1se").index == cv.best("1se").index
    # a params dict in, a params dict out
    cv2 = cross_validate(fr.params(net), loss_of(net), SPEC, [0.3, 0.1], (x, y), folds=3)
    assert set(cv2.refit()) == {"weight", "bias"}
    assert "min" in str(cv) and "cv_mean" in str(cv)


def loss_of(net: nn.Module) -> Any:
    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return 0.5 * F.mse_loss(functional_call(net, params, (xb,)).squeeze(-1), yb)

    return loss


def test_group_nonzero_counts() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g, dtype=DT)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 0] + x[:, 2]], 1)
    net = nn.Linear(6, 2, bias=False).double()

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return 0.5 * F.mse_loss(functional_call(net, params, (xb,)), yb)

    spec = fr.Spec(g=fr.GroupLasso("weight", dim=0))
    cv = cross_validate(net, loss, spec, [10.0, 0.1, 0.001], (x, y), folds=4)
    groups = (cv.path.stacked["weight"].norm(dim=1) != 0).sum(1)
    assert cv.nonzero_groups is not None
    assert cv.nonzero_groups.tolist() == groups.tolist() and groups[0] == 0 and groups[-1] == 3


def test_sweep_engine_fold_fit_equals_a_sweep_on_the_fold() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 3, generator=g, dtype=DT)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(30, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (xb,)), yb)

    spec = fr.Spec(l1=fr.L1("0.weight"))
    opt = fr.optim.sgd(0.2)
    cv = cross_validate(
        net, loss, spec, [0.1, 0.01], (x, y), folds=3, optimizer=opt, steps=15, seed=1
    )
    assert cv.fits is not None and cv.fits.K == 6 and cv.scores.shape == (3, 2)
    tr, te = cv.folds[1]
    grid = fr.grid(l1=[0.1, 0.01], dtype=DT)
    kw: dict[str, Any] = {"optimizer": opt, "steps": 15, "progress": False}
    r = fr.sweep(net, loss, spec, grid, train=(x[tr], y[tr]), **kw)
    for name, v in r.stacked.items():
        torch.testing.assert_close(cv.fits.stacked[name][2:4], v, rtol=1e-10, atol=1e-12)
    for j in range(2):
        with torch.no_grad():
            expect = loss(r.params(j), x[te], y[te])
        assert float(cv.scores[1, j]) == pytest.approx(float(expect), rel=1e-10)
    full = fr.sweep(net, loss, spec, grid, train=(x, y), **kw)
    torch.testing.assert_close(
        cv.refit("min")[0].weight.detach(), full.params(cv.best().index)["0.weight"]
    )


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"folds": 1}, ValueError, r"folds must be >= 2"),
        ({"folds": 21}, ValueError, r"more folds \(21\) than samples \(20\)"),
        ({"folds": torch.zeros(20)}, ValueError, r"folds must be >= 2 .* 1 distinct"),
        ({"folds": [(list(range(10)), list(range(10, 20)))]}, ValueError, r"folds must be >= 2"),
        ({"folds": torch.zeros(7)}, ValueError, r"7 fold ids for 20 samples"),
        ({"grid": []}, ValueError, r"grid of strengths is empty"),
        ({"grid": {}}, ValueError, r"the grid is empty"),
        ({"grid": {"l1": []}}, ValueError, r"grid axis 'l1' is empty"),
        ({"grid": {"l1": [0.1], "lr": [0.1]}}, ValueError, r"\['lr'\] name no spec term"),
        ({"steps": 10}, ValueError, r"give optimizer= and steps= together"),
        ({"data": (torch.ones(20, 2), torch.ones(19))}, ValueError, r"share their first"),
        ({"data": (torch.ones(20, 2) * torch.nan, torch.ones(20))}, ValueError, r"data\[0\]"),
        ({"data": (torch.ones(0, 2), torch.ones(0))}, ValueError, r"no samples"),
        ({"bogus_kwarg": 1}, TypeError, r"unexpected keyword argument 'bogus_kwarg'"),
        ({"batch_size": 4}, TypeError, r"'batch_size'.*no keyword goes on to fr.sweep"),
        (
            {"optimizer": fr.optim.sgd(0.1), "steps": 2, "activity": {"a": None}},
            ValueError,
            r"activity= terms are not supported.*val=",
        ),
    ],
)
def test_bad_input(kwargs: dict[str, Any], err: type, match: str) -> None:
    net, x, y, loss, _ = linear(7, n=20, p=2)
    args: dict[str, Any] = {"grid": [0.1, 0.01], "data": (x, y), "folds": 4}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        cross_validate(net, loss, SPEC, args.pop("grid"), args.pop("data"), **args)


def test_bad_loss_and_1se_axis() -> None:
    net, x, y, loss, _ = linear(8, n=20, p=2)
    ls = fr.least_squares(x, y)
    with pytest.raises(TypeError, match="least_squares loss holds its data"):
        cross_validate(ls.init(), ls, SPEC, [0.1], (x, y))
    spec = fr.Spec(l1=fr.L1("weight"), l2=fr.L2("weight"))
    grid = fr.grid(l1=[0.1, 0.01], l2=[0.1, 0.01])
    cv = cross_validate(net, loss, spec, grid, (x, y), folds=3)
    assert cv.axis is None
    with pytest.raises(ValueError, match="pass axis="):
        cv.best("1se")
    with pytest.raises(ValueError, match=r"use cv.best\(rule\).strengths"):
        _ = cv.strength_min
    assert cv.best("1se", axis="l1").strengths["l1"] >= cv.best("min").strengths["l1"]
    with pytest.raises(ValueError, match=r"axis 'bogus' is not a grid axis"):
        cv.best("1se", axis="bogus")


def test_fold_ids_as_a_plain_list_equal_a_tensor() -> None:
    ids = [i % 3 for i in range(12)]
    for a, b in zip(fold_masks(ids, 12), fold_masks(torch.tensor(ids), 12), strict=True):
        assert torch.equal(a, b)


def test_tied_minimum_picks_the_most_regularised_strength() -> None:
    """On pure noise every strength above strength_max fits the same intercept-only model;
    among those tied minima the largest strength wins (glmnet's lambda.min), whatever the
    grid's order."""
    net, x, _, loss, _ = linear(2, n=60, p=4)
    y = torch.randn(60, generator=torch.Generator().manual_seed(2), dtype=DT)
    top = alpha_max(x, y)
    grid = torch.tensor([20 * top, 10 * top, 5 * top, 0.5 * top, 0.05 * top], dtype=DT)
    picks = set()
    for g in (grid, grid.flip(0)):
        cv = cross_validate(net, loss, SPEC, g, (x, y), folds=4)
        tied = cv.mean == cv.mean.min()
        assert int(tied.sum()) == 3  # the three strengths above strength_max
        assert cv.strength_min == float(g[tied].max()) == float(grid[0])
        picks.add(cv.strength_min)
    assert len(picks) == 1


def test_weight_keyword_loss_on_batches_without_fold_samples() -> None:
    """With minibatches, a batch may hold none of a fold's training samples: a ``weight=``
    loss then contributes 0 (as the per-sample route does), not 0/0."""
    net, x, y, _, _ = linear(4, n=20, p=3)
    x, y = x.float(), y.float()
    net = net.float()

    def loss_w(p: dict[str, Tensor], xb: Tensor, yb: Tensor, weight: Tensor) -> Tensor:
        r = (functional_call(net, p, (xb,)).squeeze(-1) - yb) ** 2
        return 0.5 * (weight * r).sum() / weight.sum()

    cv = cross_validate(
        net, loss_w, SPEC, [0.01, 0.001], (x, y), folds=4, optimizer=fr.optim.sgd(0.05),
        steps=40, batch_size=2,
    )  # fmt: skip
    assert bool(torch.isfinite(cv.scores).all())
    assert cv.fits is not None and not bool(cv.fits.diverged.any())


def test_example_finetune_l2sp_runs_small(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], load_example: Any
) -> None:
    main = load_example("finetune_l2sp").main
    out = tmp_path / "l2sp.png"
    res = main(["--n-source", "300", "--pretrain-steps", "100", "--steps", "40", "--grid", "4",
                "--folds", "3", "--out", str(out)])  # fmt: skip
    assert out.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "strength_min" in text and "test MSE" in text
    labels = [line.get_label() for line in res["ax"].get_lines()]
    assert "strength_min" in labels and "strength_1se" in labels
    assert res["cv"].scores.shape == (3, 4)
