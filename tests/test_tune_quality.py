"""fr.tune's quality on scikit-learn's bundled data beyond load_diabetes (tests/test_tune.py):
one lasso strength by 5-fold CV reaches LassoCV's best grid point on load_breast_cancer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import funcreg as fr


def test_one_lasso_strength_by_5fold_cv_matches_lassocv_grid_on_breast_cancer() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y = datasets.load_breast_cancer(return_X_y=True)
    X, y = (X - X.mean(0)) / X.std(0), y - y.mean()
    n, p = X.shape
    folds = fr.selection.fold_pairs(5, n, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = linear_model.LassoCV(alphas=100, cv=folds, fit_intercept=False, tol=1e-10)
        cv.fit(X, y)
    grid_best = float(cv.mse_path_.mean(axis=1).min()) / 2  # LassoCV's MSE; ours is 1/2 MSE
    r = fr.tune(
        fr.least_squares(torch.tensor(X), torch.tensor(y)),
        {"l1": fr.L1()},
        {"weight": torch.zeros(1, p, dtype=torch.float64)},
        {"l1": float(np.median(cv.alphas_))},  # from the middle of LassoCV's grid
        folds=folds,
        optimizer="secant",
    )
    assert r.value <= 1.01 * grid_best
    # an independent evaluation of the CV loss at the tuned strength agrees
    sk = linear_model.Lasso(
        alpha=r.strengths["l1"], fit_intercept=False, tol=1e-12, max_iter=1_000_000
    )
    losses = []
    for a, b in folds:
        sk.fit(X[a], y[a])
        losses.append(float(((X[b] @ sk.coef_ - y[b]) ** 2).mean()) / 2)
    assert float(np.mean(losses)) == pytest.approx(r.value, rel=1e-6)


def test_fold_pairs_are_fold_masks_as_index_pairs() -> None:
    train, test = fr.selection.fold_masks(5, 23, 3)
    pairs = fr.selection.fold_pairs(5, 23, 3)
    assert len(pairs) == 5
    seen = np.concatenate([b for _, b in pairs])
    assert sorted(seen.tolist()) == list(range(23))  # every sample held out exactly once
    for (a, b), tr, te in zip(pairs, train, test, strict=True):
        assert a.tolist() == tr.nonzero().squeeze(1).tolist()
        assert b.tolist() == te.nonzero().squeeze(1).tolist()
        assert not set(a) & set(b)


# ------------------------------------------------------- edge cases of the exact route


def _tune_ls(X: torch.Tensor, y: torch.Tensor, start: float, fit_intercept: bool, **kw):
    p = X.shape[1]
    init = {"weight": torch.zeros(1, p, dtype=X.dtype)}
    if fit_intercept:
        init["bias"] = torch.zeros(1, dtype=X.dtype)
    loss = fr.least_squares(X, y, fit_intercept=fit_intercept)
    return fr.tune(loss, {"l1": fr.L1()}, init, {"l1": start}, folds=3, **kw)


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_a_zero_column_above_strength_max_tunes(fit_intercept: bool) -> None:
    """A fold whose first column is all zeros, started above strength_max (the support is
    empty, the fallback column has no curvature): tuning runs, as before the exact route."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    X[:, 0] = 0.0
    y = X[:, 1] + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    top = float((X.T @ y / 60).abs().max())
    r = _tune_ls(X, y, 10 * top, fit_intercept, steps=2)
    assert all(np.isfinite(r.history["value"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_duplicated_active_columns_are_named(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 6, generator=g, dtype=dtype)
    X = torch.cat([X, X[:, :1]], 1)  # column 6 duplicates column 0
    y = 2 * X[:, 0] + 0.1 * torch.randn(80, generator=g, dtype=dtype)
    with pytest.raises(ValueError, match="collinear .*duplicated"):
        _tune_ls(X, y, 0.05, False, steps=3)


def test_gram_formed_under_inference_mode_is_a_normal_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 8, generator=g, dtype=torch.float64)
    ls = fr.least_squares(X, X[:, 0])
    with torch.inference_mode():
        fr.solve(ls, fr.Spec(l1=fr.L1()), ls.init(), {"l1": 0.05})
    assert not ls.gram.is_inference()
    W = torch.zeros(1, 8, dtype=torch.float64, requires_grad=True)
    ls.hessian_apply({"weight": W})["weight"].sum().backward()
    assert W.grad is not None


def test_new_user_misuses_are_named() -> None:
    """What a new user tries first: a float for the strengths, torch.optim.Adam as the outer
    optimizer, a start above strength_max, a scikit-learn splitter as folds."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = X[:, 1] + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    ls = fr.least_squares(X, y)
    spec = {"l1": fr.L1()}
    with pytest.raises(TypeError, match="strengths must be a dict"):
        fr.tune(ls, spec, ls.init(), 0.1, folds=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="outer optimizer of the log-strengths"):
        fr.tune(ls, spec, ls.init(), {"l1": 0.1}, folds=5, optimizer=torch.optim.Adam)  # type: ignore[arg-type]
    top = float((X.T @ y / 60).abs().max())
    with pytest.warns(RuntimeWarning, match="hypergradient is exactly 0 at the starting"):
        fr.tune(ls, spec, ls.init(), {"l1": 100 * top}, folds=5, steps=2)
    model_selection = pytest.importorskip("sklearn.model_selection")
    with pytest.raises(TypeError, match=r"folds=list\(cv.split\(X, y\)\)"):
        fr.selection.fold_pairs(model_selection.KFold(5), 60)
    pairs = fr.selection.fold_pairs(model_selection.KFold(5).split(X.numpy()), 60)  # a generator
    assert len(pairs) == 5
    with pytest.raises(TypeError, match="cross-validation holds out folds="):
        fr.cross_validate(ls.init(), lambda p, X, y: ((X @ p["weight"][0] - y) ** 2).mean(),
                          spec, [0.1], (X, y), validation=(X, y))  # fmt: skip


def test_mixed_precision_per_feature_tuning() -> None:
    """float32 params and factors with float64 data (the README's snippet on load_diabetes)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = X[:, 1] + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    r = fr.tune(
        fr.least_squares(X, y),
        {"l1": fr.L1(weight=torch.ones(1, 5))},
        {"weight": torch.zeros(1, 5)},
        {"l1": 0.01},
        folds=3,
        terms=[],
        weights=["l1"],
        steps=2,
    )
    assert np.isfinite(r.value)


def test_hypergrad_at_other_strengths_than_solved_says_so() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = X[:, 1] + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    ls = fr.least_squares(X, y)
    spec = fr.Spec(l1=fr.L1())
    sol = fr.solve(ls, spec, ls.init(), {"l1": 0.05})
    with pytest.warns(RuntimeWarning, match="may solve other strengths"):
        fr.hypergrad(fr.least_squares(X, y), ls, spec, sol, {"l1": 0.5})
