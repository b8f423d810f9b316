"""fr.tune: hypergradient tuning of strengths against a validation split or K-fold CV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import funcreg as fr

D = torch.float64


def mse_half(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((X @ p["w"] - y) ** 2).mean()


def mse(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((X @ p["w"] - y) ** 2).mean()


def _diabetes() -> tuple[torch.Tensor, torch.Tensor]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    X, y = sklearn_datasets.load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    return torch.tensor(X), torch.tensor(y)


def _fold_pairs(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """fr.tune's 5 folds (seed 0) as scikit-learn's (train, test) index pairs."""
    return fr.selection.fold_pairs(5, n, 0)


def test_one_lasso_strength_by_5fold_cv_matches_lassocv_grid_on_diabetes() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y = _diabetes()
    n, p = X.shape
    pairs = _fold_pairs(n)
    cv = linear_model.LassoCV(alphas=100, cv=pairs, fit_intercept=False, tol=1e-10)
    cv.fit(X.numpy(), y.numpy())
    grid_best = float(cv.mse_path_.mean(axis=1).min())
    r = fr.tune(
        fr.least_squares(X, y),
        {"l1": fr.L1()},
        {"weight": torch.zeros(1, p, dtype=D)},
        {"l1": 0.05},
        folds=pairs,
        optimizer=fr.optim.adam(lr=0.2),
        steps=30,
    )
    # fr.tune's CV loss is the mean held-out 1/(2n)‖y − Xw‖² over the same folds
    assert 2 * r.value <= 1.01 * grid_best
    # ... which an independent evaluation at the tuned strength confirms
    sk = linear_model.Lasso(alpha=r.strengths["l1"], fit_intercept=False, tol=1e-12)
    losses = []
    for a, b in pairs:
        sk.fit(X.numpy()[a], y.numpy()[a])
        losses.append(float(((X.numpy()[b] @ sk.coef_ - y.numpy()[b]) ** 2).mean()))
    assert float(np.mean(losses)) == pytest.approx(2 * r.value, rel=1e-6)
    assert r.best().value == pytest.approx(r.value)
    assert r.best().strengths == r.history["strengths"][r.best().index]


def _scaled_problem(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n, p = 80, 20
    w = torch.zeros(p, dtype=D)
    w[:3] = torch.tensor([5.0, 0.5, 0.05], dtype=D)
    X = torch.randn(3 * n, p, dtype=D, generator=g)
    y = X @ w + 0.5 * torch.randn(3 * n, dtype=D, generator=g)
    return X[:n], y[:n], X[n : 2 * n], y[n : 2 * n]


def test_validation_split_history_and_stopping() -> None:
    X, y, Xv, yv = _scaled_problem()
    r = fr.tune(
        mse_half,
        {"l1": fr.L1("w")},
        {"w": torch.zeros(X.shape[1], dtype=D)},
        {"l1": 0.5},
        (X, y),
        validation=(Xv, yv),
        steps=40,
        patience=3,
    )
    h = r.history
    assert set(h) == {"step", "strengths", "value", "grad_norm", "inner_iterations", "solve_tol"}
    assert len(h["value"]) <= 40 and h["step"] == list(range(len(h["value"])))
    assert r.value == min(h["value"]) and r.value < h["value"][0]
    assert r.stopped in ("steps", "patience", "gradient")
    # the returned params solve the problem at the best strength
    sol = fr.solve(
        mse_half, {"l1": fr.L1("w")}, {"w": torch.zeros(20, dtype=D)}, r.strengths, X, y, tol=1e-10
    )
    torch.testing.assert_close(r.params["w"], sol.params["w"][0], atol=1e-6, rtol=0)
    assert float(mse_half(r.params, Xv, yv)) == pytest.approx(r.value, rel=1e-5)


def test_per_feature_weights_beat_one_strength_on_validation() -> None:
    X, y, Xv, yv = _scaled_problem()
    p = X.shape[1]
    kw = dict(validation=(Xv, yv), steps=40, patience=40)
    one = fr.tune(
        mse_half, {"l1": fr.L1("w")}, {"w": torch.zeros(p, dtype=D)}, {"l1": 0.1}, (X, y), **kw
    )
    spec = {"l1": fr.L1("w", weight=torch.ones(p, dtype=D))}
    many = fr.tune(
        mse_half,
        spec,
        {"w": torch.zeros(p, dtype=D)},
        {"l1": one.strengths["l1"]},
        (X, y),
        terms=[],
        weights=["l1"],
        **kw,
    )
    assert many.weights["l1"].shape == (p,)
    assert many.value < one.value
    assert isinstance(many.spec["l1"].weight, torch.Tensor)


def test_bad_input_is_named() -> None:
    X, y, Xv, yv = _scaled_problem()
    init = {"w": torch.zeros(X.shape[1], dtype=D)}
    spec = {"l1": fr.L1("w")}
    with pytest.raises(ValueError, match="cannot tune 'l2'"):
        fr.tune(mse_half, spec, init, {"l1": 0.1}, (X, y), validation=(Xv, yv), terms=["l2"])
    with pytest.raises(ValueError, match="strength of 'l1' must be > 0"):
        fr.tune(mse_half, spec, init, {"l1": 0.0}, (X, y), validation=(Xv, yv))
    with pytest.raises(ValueError, match="validation= or folds=, not both"):
        fr.tune(mse_half, spec, init, {"l1": 0.1}, (X, y), validation=(Xv, yv), folds=3)
    with pytest.raises(ValueError, match="'l1' needs a weight= tensor"):
        fr.tune(mse_half, spec, init, {"l1": 0.1}, (X, y), validation=(Xv, yv), weights=["l1"])


def test_least_squares_loss_gives_the_generic_path_per_fold() -> None:
    X, y, _, _ = _scaled_problem()
    p = X.shape[1]
    kw: dict = dict(folds=4, steps=5, patience=5, solve_tol=1e-12)
    ls = fr.tune(
        fr.least_squares(X, y),
        {"l1": fr.L1()},
        {"weight": torch.zeros(1, p, dtype=D)},
        {"l1": 0.2},
        **kw,
    )
    gen = fr.tune(
        mse_half, {"l1": fr.L1("w")}, {"w": torch.zeros(p, dtype=D)}, {"l1": 0.2}, (X, y), **kw
    )
    np.testing.assert_allclose(ls.history["value"], gen.history["value"], rtol=1e-7)
    torch.testing.assert_close(ls.params["weight"][0], gen.params["w"], atol=1e-7, rtol=0)


def test_progress_bar_runs() -> None:
    X, y, Xv, yv = _scaled_problem()
    r = fr.tune(
        mse_half,
        {"l1": fr.L1("w")},
        {"w": torch.zeros(X.shape[1], dtype=D)},
        {"l1": 0.5},
        (X, y),
        validation=(Xv, yv),
        steps=2,
        progress=True,
    )
    assert len(r.history["value"]) == 2


def test_working_set_path_equals_the_generic_path_with_intercept_and_factors() -> None:
    # least_squares + elementwise penalties go through the working set of features; a plain
    # loss function of the same model goes through full solves: same values and gradients
    X, y, _, _ = _scaled_problem(1)
    p = X.shape[1]

    def linear(q: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ q["weight"][0] + q["bias"][0] - y) ** 2).mean()

    init = {"weight": torch.zeros(1, p, dtype=D), "bias": torch.zeros(1, dtype=D)}
    spec = {"en": fr.ElasticNet(l1_ratio=0.7, weight=torch.ones(p, dtype=D)), "l2": fr.L2()}
    kw: dict = dict(folds=3, steps=4, patience=4, solve_tol=1e-12, weights=["en"])
    st = {"en": 0.3, "l2": 0.05}
    ws = fr.tune(fr.least_squares(X, y + 3.0, fit_intercept=True), spec, init, st, **kw)
    gen = fr.tune(linear, spec, init, st, (X, y + 3.0), **kw)
    np.testing.assert_allclose(ws.history["value"], gen.history["value"], rtol=1e-7)
    np.testing.assert_allclose(ws.history["grad_norm"], gen.history["grad_norm"], rtol=1e-6)
    torch.testing.assert_close(ws.weights["en"], gen.weights["en"], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(ws.params["weight"], gen.params["weight"], atol=1e-7, rtol=0)
    torch.testing.assert_close(ws.params["bias"], gen.params["bias"], atol=1e-7, rtol=0)


def test_l1_working_set_walks_the_homotopy_and_equals_the_generic_path() -> None:
    # one L1 term on least squares: each fold's solve starts at the exact solution, walked
    # from its previous strength (down and up) by the homotopy on the centred, rescaled Gram
    # matrix, so every solve is certified at its first test; with an intercept, per-feature
    # factors, tuned factors (the homotopy rebuilt when they change) and a wide design
    g = torch.Generator().manual_seed(3)
    n, p = 60, 150
    w = torch.zeros(p, dtype=D)
    w[:6] = torch.tensor([2.0, -1.5, 1.0, 0.7, -0.5, 0.3], dtype=D)
    X = torch.randn(n, p, dtype=D, generator=g)
    y = X @ w + 0.3 * torch.randn(n, dtype=D, generator=g) + 1.0
    c = torch.linspace(0.5, 1.5, p, dtype=D)

    def linear(q: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ q["weight"][0] + q["bias"][0] - y) ** 2).mean()

    init = {"weight": torch.zeros(1, p, dtype=D), "bias": torch.zeros(1, dtype=D)}
    for weights in ([], ["l1"]):
        spec = {"l1": fr.L1(weight=c)}
        kw: dict = dict(folds=3, steps=6, patience=6, solve_tol=1e-12, weights=weights)
        kw["optimizer"] = fr.optim.adam(lr=0.8)  # large steps, up then down
        ws = fr.tune(fr.least_squares(X, y, fit_intercept=True), spec, init, {"l1": 0.02}, **kw)
        gen = fr.tune(linear, spec, init, {"l1": 0.02}, (X, y), **kw)
        s = [h["l1"] for h in ws.history["strengths"]]
        if not weights:
            assert any(b > a for a, b in zip(s, s[1:], strict=False))  # walked up too
            assert any(b < a for a, b in zip(s, s[1:], strict=False))
            assert ws.history["inner_iterations"] == [3] * len(s)  # started at the answer
        np.testing.assert_allclose(ws.history["value"], gen.history["value"], rtol=1e-8)
        np.testing.assert_allclose(ws.history["grad_norm"], gen.history["grad_norm"], rtol=1e-6)
        torch.testing.assert_close(ws.params["weight"], gen.params["weight"], atol=1e-8, rtol=0)
        torch.testing.assert_close(ws.params["bias"], gen.params["bias"], atol=1e-8, rtol=0)
        if weights:
            torch.testing.assert_close(ws.weights["l1"], gen.weights["l1"], atol=1e-9, rtol=1e-7)


def test_closed_form_lasso_hypergradient_equals_hypergrad() -> None:
    # the one-L1-term shortcut of the working-set step (an |S|×|S| solve on the support)
    # gives fr.hypergrad's value and gradients in log s and log c, with and without intercept
    from funcreg.tune import _lasso_hypergrad

    g = torch.Generator().manual_seed(5)
    n, p = 50, 30
    X = torch.randn(2 * n, p, dtype=D, generator=g)
    y = X[:, :4] @ torch.tensor([1.5, -1.0, 0.5, 0.25], dtype=D) + 0.5
    y = y + 0.3 * torch.randn(2 * n, dtype=D, generator=g)
    c = torch.linspace(0.5, 1.5, p, dtype=D)
    for fit_intercept in (False, True):
        loss = fr.least_squares(X[:n], y[:n], fit_intercept=fit_intercept)
        spec = fr.Spec(l1=fr.L1(weight=c))
        s = {"l1": 0.05}
        sol = fr.solve(loss, spec, loss.init(), s, tol=1e-13)
        assert 3 < int((sol.params["weight"] != 0).sum()) < p
        closed = _lasso_hypergrad(loss, spec, sol, s, X[n:], y[n:], ("l1",))
        assert closed is not None
        val, grads = closed
        outer = fr.least_squares(X[n:], y[n:], fit_intercept=fit_intercept)
        hg = fr.hypergrad(outer, loss, spec, sol, s, weights=["l1"], tol=1e-14)
        assert val == pytest.approx(float(hg.value[0]), rel=1e-12)
        assert float(grads["l1"]) == pytest.approx(float(hg.strengths["l1"][0]), rel=1e-9)
        torch.testing.assert_close(
            grads["l1.weight"], hg.weights["l1"][0].reshape(-1), rtol=1e-9, atol=1e-12
        )


def test_inexact_early_steps_tighten_to_solve_tol() -> None:
    X, y, Xv, yv = _scaled_problem()
    r = fr.tune(
        mse_half,
        {"l1": fr.L1("w")},
        {"w": torch.zeros(X.shape[1], dtype=D)},
        {"l1": 0.5},
        (X, y),
        validation=(Xv, yv),
        steps=6,
        patience=6,
        solve_tol=1e-10,
        solve_tol_start=1e-4,
    )
    assert r.history["solve_tol"] == pytest.approx([1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9])


def test_tune_refuses_nonconvex_terms_and_blind_scores_by_name() -> None:
    X, y, Xv, yv = _scaled_problem()
    init = {"w": torch.zeros(X.shape[1], dtype=D)}
    for pen in (fr.MCP("w"), fr.SCAD("w")):
        with pytest.raises(ValueError, match=f"tune: term 'nc' \\({type(pen).__name__}\\)"):
            fr.tune(mse_half, {"nc": pen}, init, {"nc": 0.1}, (X, y), validation=(Xv, yv))

    def blind(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y**2).mean()

    with pytest.raises(ValueError, match="outer_fn does not depend on the params"):
        fr.tune(
            mse_half,
            {"l1": fr.L1("w")},
            init,
            {"l1": 0.1},
            (X, y),
            validation=(Xv, yv),
            score_fn=blind,
        )
    with pytest.raises(ValueError, match="no starting strength for term 'l2'"):
        fr.tune(mse_half, {"l1": fr.L1("w"), "l2": fr.L2("w")}, init, {"l1": 0.1}, (X, y), folds=3)


def test_several_starting_points_keep_the_best_and_record_each() -> None:
    X, y, Xv, yv = _scaled_problem()
    init = {"w": torch.zeros(X.shape[1], dtype=D)}
    spec = {"l1": fr.L1("w"), "l2": fr.L2("w")}
    kw: dict = dict(validation=(Xv, yv), steps=6, patience=6)
    r = fr.tune(mse_half, spec, init, {"l1": [0.01, 1.0, 0.1], "l2": 0.05}, (X, y), **kw)
    assert len(r.starts) == 3
    one = fr.tune(mse_half, spec, init, {"l1": 1.0, "l2": 0.05}, (X, y), **kw)
    assert r.starts[1].history["value"] == one.history["value"]
    assert r.value == min(s.value for s in r.starts)
    assert r.history["start"] == [i for i, s in enumerate(r.starts) for _ in s.history["value"]]
    assert r.best().value == r.value
    assert r.history["strengths"][0] == pytest.approx({"l1": 0.01, "l2": 0.05})
    with pytest.raises(ValueError, match="strength lists of one length"):
        fr.tune(mse_half, spec, init, {"l1": [0.1, 0.2], "l2": [0.1]}, (X, y), **kw)


def test_secant_search_matches_a_fine_grid_in_few_steps_on_diabetes() -> None:
    """optimizer="secant" lands within the grid's best CV loss in few outer steps, and
    stops by itself (its next step below xtol, or no progress for patience steps)."""
    X, y = _diabetes()
    n, p = X.shape
    pairs = _fold_pairs(n)
    args = (fr.least_squares(X, y), {"l1": fr.L1()}, {"weight": torch.zeros(1, p, dtype=D)})
    sec = fr.tune(*args, {"l1": 0.05}, folds=pairs, optimizer="secant", steps=30, patience=5)
    # an independent reference: the CV loss of sklearn's Lasso on a fine log grid
    linear_model = pytest.importorskip("sklearn.linear_model")
    grid = np.geomspace(0.005, 0.2, 60)
    cv = []
    for alpha in grid:
        sk = linear_model.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
        losses = []
        for a, b in pairs:
            sk.fit(X.numpy()[a], y.numpy()[a])
            losses.append(float(((X.numpy()[b] @ sk.coef_ - y.numpy()[b]) ** 2).mean()) / 2)
        cv.append(float(np.mean(losses)))
    assert sec.value <= min(cv) * (1 + 1e-3)
    assert sec.stopped in ("xtol", "patience")
    assert len(sec.history["value"]) <= 10
    assert sec.best().value == pytest.approx(sec.value)


def test_secant_search_with_several_strengths_and_bad_name() -> None:
    X, y, Xv, yv = _scaled_problem()
    init = {"w": torch.zeros(X.shape[1], dtype=D)}
    spec = {"l1": fr.L1("w"), "l2": fr.L2("w")}
    kw: dict = dict(validation=(Xv, yv), steps=25, patience=25)
    start = {"l1": 0.5, "l2": 0.5}
    sec = fr.tune(mse_half, spec, init, start, (X, y), optimizer="secant", **kw)
    assert sec.value < sec.history["value"][0]
    # every step after the first is a descent or an interpolation back from an overshoot:
    # the best value never gets worse and ends below adam's after as many steps
    ada = fr.tune(mse_half, spec, init, start, (X, y), steps=len(sec.history["value"]))
    assert sec.value <= ada.value * (1 + 1e-6)
    with pytest.raises(ValueError, match="optimizer must be a funcreg.optim optimizer or 'secant'"):
        fr.tune(mse_half, spec, init, start, (X, y), optimizer="newton", **kw)
