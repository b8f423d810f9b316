"""The Gram route reached by structure: an ``nn.Linear`` model with an MSE loss and an
unpenalised intercept (the README's recipe) is recognised as a quadratic, solved on its
Gram matrix with the intercept eliminated (centring), and agrees with scikit-learn; float32
inputs are solved in float64; a loss that is not quadratic is refused or re-solved; the L1
threshold of the Gram loop is the prox module's; bad designs give documented results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Lasso, LassoCV, lasso_path
from sklearn.model_selection import KFold

import funcreg as fr
from funcreg._quadratic import extract
from funcreg.solvers import least_squares, solve

DT = torch.float64


def _linear(p: int, dtype: torch.dtype = DT) -> torch.nn.Linear:
    net = torch.nn.Linear(p, 1).to(dtype)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
    return net


def _mse(net: torch.nn.Module):
    def loss(params, X, y, weight=None):
        r = torch.func.functional_call(net, params, (X,))[:, 0] - y
        if weight is None:
            return 0.5 * (r**2).mean()
        return 0.5 * (weight * r**2).sum() / weight.sum()

    return loss


SPEC = fr.Spec(l1=fr.L1("weight"))


def _kkt(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, strength: float) -> float:
    """The largest violation of the Lasso-with-intercept optimality conditions, relative to
    ``‖Xᵀy/n‖∞`` (float64 numpy)."""
    n = len(y)
    r = y - X @ w - b
    g = -X.T @ r / n
    on = w != 0
    viol = np.concatenate([np.abs(g[on] + strength * np.sign(w[on])), [abs(r.mean())]])
    off = np.maximum(np.abs(g[~on]) - strength, 0)
    return float(np.concatenate([viol, off]).max() / np.abs(X.T @ y / n).max())


@pytest.mark.parametrize("tol", [1e-8, 1e-12])
def test_natural_route_matches_sklearn_with_intercept(tol):
    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = _linear(10)
    strengths = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=DT)
    sol = solve(_mse(net), SPEC, fr.params(net), {"l1": strengths}, Xt, yt, tol=tol)
    assert bool(sol.converged.all()) and bool((sol.optimality <= tol).all())
    for k, s in enumerate(strengths.tolist()):
        w = sol.params["weight"][k, 0].numpy()
        b = float(sol.params["bias"][k, 0])
        assert _kkt(X, y, w, b, s) <= 10 * tol
        ref = Lasso(alpha=s, tol=1e-14, max_iter=10**6).fit(X, y)
        if tol <= 1e-12:
            assert np.abs(w - ref.coef_).max() <= 1e-6 * np.abs(ref.coef_).max()
            assert b == pytest.approx(ref.intercept_, rel=1e-8)


def test_natural_path_and_cv_match_sklearn():
    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = _linear(10)
    res = fr.path(net, _mse(net), SPEC, data=(Xt, yt), tol=1e-12)
    grid = res.grid["l1"].numpy()
    _, coefs, _ = lasso_path(X - X.mean(0), y - y.mean(), alphas=grid, tol=1e-13, max_iter=10**6)
    W = res.stacked["weight"][:, 0].numpy()
    assert np.abs(W - coefs.T).max() <= 1e-6 * np.abs(coefs).max()
    assert bool((res.meta["optimality"] <= 1e-12).all())
    split = list(KFold(5).split(X))
    cv = fr.cross_validate(net, _mse(net), SPEC, res.grid["l1"], (Xt, yt), folds=split)
    sk = LassoCV(cv=split, alphas=res.grid["l1"].numpy(), tol=1e-10, max_iter=10**6).fit(X, y)
    assert cv.strength_min == pytest.approx(sk.alpha_, rel=1e-12)
    # scikit-learn's mse_path_ is (alphas descending, folds); our scores are 0.5 * MSE
    np.testing.assert_allclose(2 * cv.scores.numpy().T, sk.mse_path_, rtol=1e-6)


def test_float32_path_agrees_with_float64_sklearn_or_warns():
    """float32 inputs: by default the path is solved in float64 and agrees with sklearn's
    float64 coefficients to 1e-4 of the largest; forced to compute in float32, it warns
    and names the floor it reached (never ``converged=True`` silently)."""
    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X).float(), torch.from_numpy(y).float()
    net = _linear(10, torch.float32)
    res = fr.path(net, _mse(net), SPEC, data=(Xt, yt))
    _, coefs, _ = lasso_path(
        X - X.mean(0), y - y.mean(), alphas=res.grid["l1"].numpy(), tol=1e-12, max_iter=10**6
    )
    W = res.stacked["weight"][:, 0].double().numpy()
    assert res.stacked["weight"].dtype == torch.float32
    assert np.abs(W - coefs.T).max() <= 1e-4 * np.abs(coefs).max()
    with pytest.warns(RuntimeWarning, match=r"below the round-off floor of torch.float32"):
        low = fr.path(net, _mse(net), SPEC, data=(Xt, yt), compute_dtype=torch.float32)
    assert bool((low.meta["optimality"] > 1e-8).any())


def test_a_loss_declared_quadratic_that_is_not_is_refused():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 4, generator=g, dtype=DT)
    y = (torch.rand(50, generator=g, dtype=DT) > 0.5).to(DT)

    def logistic(p, X, y):
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ p["w"], y)

    p0 = {"w": torch.zeros(4, dtype=DT)}
    with pytest.raises(
        fr.solvers.NotQuadratic, match="quadratic=True, but the loss is not a quadratic"
    ):
        solve(logistic, fr.Spec(l1=fr.L1("w")), p0, {"l1": 0.01}, X, y, quadratic=True)
    q, why = extract(logistic, p0, (X, y))
    assert q is None and "Hessian is not constant" in why
    assert "not affine along a random line" in why  # the quick test, without a Hessian


@pytest.mark.parametrize("size", [1e-6, 1.0, 1e6])
def test_a_quadratic_of_any_scale_passes_the_quick_line_test(size):
    """The quick test (three gradients on a line) only rules out clear non-quadratics: a
    badly scaled, ill-conditioned quadratic with a large offset is still found, and equals
    its Hessian and gradient at 0."""
    g = torch.Generator().manual_seed(2)
    X = (
        size
        * torch.randn(40, 6, generator=g, dtype=DT)
        @ torch.diag(torch.logspace(-3, 3, 6, dtype=DT))
    )
    y = 1e3 * size + torch.randn(40, generator=g, dtype=DT)

    def mse(p, X, y):
        return 0.5 * ((X @ p["w"] + p["b"] - y) ** 2).mean()

    p0 = {"w": torch.zeros(6, dtype=DT), "b": torch.zeros((), dtype=DT)}
    q, why = extract(mse, p0, (X, y))
    assert q is not None, why
    A = torch.cat([X, torch.ones(40, 1, dtype=DT)], 1)
    H = A.T @ A / 40
    assert torch.allclose(q.H, H, rtol=1e-10, atol=1e-12 * float(H.abs().max()))


def test_huber_quadratic_near_zero_gets_the_general_answer():
    """A Huber loss is quadratic where every residual is below its threshold: whether the
    probes see that or not, the answer is the general route's (the solution is certified
    with the loss itself and re-solved where the quadratic model is wrong)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(80, 5, generator=g, dtype=DT)
    y = X @ torch.tensor([2.0, -1, 0, 0, 3], dtype=DT) + torch.randn(80, generator=g, dtype=DT)

    def huber(p, X, y):
        return torch.nn.functional.huber_loss(X @ p["w"], y, delta=5.0)

    p0 = {"w": torch.zeros(5, dtype=DT)}
    s = {"l1": torch.tensor([0.5, 0.05], dtype=DT)}
    spec = fr.Spec(l1=fr.L1("w"))
    auto = solve(huber, spec, p0, s, X, y, tol=1e-10)
    general = solve(huber, spec, p0, s, X, y, tol=1e-10, quadratic=False)
    assert bool(auto.converged.all()) and bool(general.converged.all())
    torch.testing.assert_close(auto.params["w"], general.params["w"], atol=1e-7, rtol=0)


def test_gram_route_thresholds_with_the_prox_module(monkeypatch):
    """One threshold implementation: the Gram loop calls ``funcreg.prox.soft_threshold``,
    so breaking it breaks the Gram route's answer."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(60, 8, generator=g, dtype=DT)
    y = X[:, 0] - 2 * X[:, 3] + 0.1 * torch.randn(60, generator=g, dtype=DT)
    ls = least_squares(X, y)
    spec = fr.Spec(l1=fr.L1())
    good = solve(ls, spec, ls.init(), {"l1": 0.3}).params["weight"]
    assert int((good != 0).sum()) < 8
    monkeypatch.setattr(fr.prox, "soft_threshold", lambda x, t: x)  # no threshold at all
    bad = solve(ls, spec, ls.init(), {"l1": 0.3}, max_iter=50).params["weight"]
    assert int((bad != 0).sum()) == 8


def _lasso_objective(X, y, w, b, s):
    return 0.5 * np.mean((y - X @ w - b) ** 2) + s * np.abs(w).sum()


@pytest.mark.parametrize("case", ["constant_column", "duplicate_column", "wide"])
def test_bad_designs_have_documented_results(case):
    """A constant column (with an intercept) gets coefficient 0 (it has no gradient after
    centring); duplicated columns make the solution non-unique: the objective equals
    sklearn's; n < p: the Lasso solution of sklearn."""
    rng = np.random.default_rng(3)
    n, p = (20, 50) if case == "wide" else (60, 6)
    X = rng.standard_normal((n, p))
    if case == "constant_column":
        X[:, 2] = 4.0
    if case == "duplicate_column":
        X[:, 4] = X[:, 1]
    y = X[:, 0] - 2 * X[:, 1] + 0.3 * rng.standard_normal(n) + 1.0
    s = 0.05
    net = _linear(p)
    sol = solve(
        _mse(net), SPEC, fr.params(net), {"l1": s}, torch.from_numpy(X), torch.from_numpy(y),
        tol=1e-12, max_iter=100_000,
    )  # fmt: skip
    assert bool(sol.converged.all())
    w, b = sol.params["weight"][0, 0].numpy(), float(sol.params["bias"][0, 0])
    ref = Lasso(alpha=s, tol=1e-14, max_iter=10**6).fit(X, y)
    f, f_ref = _lasso_objective(X, y, w, b, s), _lasso_objective(X, y, ref.coef_, ref.intercept_, s)
    assert f <= f_ref * (1 + 1e-10)
    if case == "constant_column":
        assert w[2] == 0
    if case != "duplicate_column":
        assert np.abs(w - ref.coef_).max() <= 1e-6 * np.abs(ref.coef_).max()


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_from_sklearn_logistic_matches_liblinear(penalty):
    """``strength = 1/(n·C)`` with the mean log-loss: the solution of
    ``LogisticRegression(C, penalty, solver="liblinear", fit_intercept=False)``."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    from funcreg.solvers import from_sklearn_logistic

    X, yb = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(yb).to(DT)
    Cs = torch.tensor([0.05, 0.5], dtype=DT)

    def bce(p, X, y):
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ p["w"], y)

    spec, s = from_sklearn_logistic(Cs, len(yb), penalty, select="w")
    assert torch.allclose(s[penalty], 1 / (len(yb) * Cs))
    sol = solve(bce, spec, {"w": torch.zeros(X.shape[1], dtype=DT)}, s, Xt, yt, tol=1e-10)
    assert bool(sol.converged.all())
    for k, C in enumerate(Cs.tolist()):
        ref = LogisticRegression(
            C=C, solver="liblinear", fit_intercept=False, tol=1e-12, max_iter=10**5,
            **({"l1_ratio": 1.0} if penalty == "l1" else {}),
        ).fit(X, yb).coef_[0]  # fmt: skip
        w = sol.params["w"][k].numpy()
        assert np.abs(w - ref).max() <= 1e-4 * np.abs(ref).max()


def test_from_sklearn_logistic_bad_arguments():
    from funcreg.solvers import from_sklearn_logistic

    with pytest.raises(ValueError, match="C must be finite and > 0"):
        from_sklearn_logistic(0.0, 10)
    with pytest.raises(ValueError, match="n must be the number of samples"):
        from_sklearn_logistic(1.0, 0)
    with pytest.raises(ValueError, match="penalty must be 'l1' or 'l2'"):
        from_sklearn_logistic(1.0, 10, penalty="elasticnet")


def test_l1_logistic_takes_proximal_newton_to_tol():
    """A smooth non-quadratic loss with L1 terms takes the proximal Newton route: a few
    Newton steps per model (not FISTA's hundreds), the returned point certified at tol,
    and the same solution as FISTA (``quadratic=False``)."""
    from sklearn.datasets import load_breast_cancer

    X, yb = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(yb).to(DT)

    def bce(p, X, y):
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ p["w"], y)

    s = {"l1": 1 / (len(yb) * torch.tensor([0.02, 0.2, 2.0], dtype=DT))}
    spec = fr.Spec(l1=fr.L1("w"))
    p0 = {"w": torch.zeros(X.shape[1], dtype=DT)}
    for tol in (1e-8, 1e-12):
        newton = solve(bce, spec, p0, s, Xt, yt, tol=tol)
        assert bool(newton.converged.all()) and bool((newton.optimality <= tol).all())
        assert bool((newton.iterations <= 30).all())
    fista = solve(bce, spec, p0, s, Xt, yt, tol=1e-12, quadratic=False, max_iter=200_000)
    torch.testing.assert_close(newton.params["w"], fista.params["w"], atol=1e-6, rtol=0)


def test_newton_with_a_non_psd_hessian_falls_back_with_a_warning():
    """``Σ (w² − 1)²`` is not convex (its Hessian is negative at 0): the Newton route
    refuses it with a warning, and FISTA finds a stationary point."""
    y = torch.tensor([0.3, -0.2], dtype=DT)

    def double_well(p, y):
        return ((p["w"] ** 2 - 1) ** 2).sum() + (p["w"] * y).sum()

    p0 = {"w": torch.zeros(2, dtype=DT)}
    with pytest.warns(RuntimeWarning, match="not positive semidefinite.*falling back to FISTA"):
        sol = solve(double_well, fr.Spec(l1=fr.L1("w")), p0, {"l1": 0.01}, y, tol=1e-10)
    assert bool(sol.converged.all())


@pytest.mark.parametrize("form", ["half", "plain", "column"])
def test_torch_mse_loss_is_found_quadratic(form):
    """The README's loss, built on ``F.mse_loss`` (whose backward has no forward-mode rule,
    so the Hessian comes by reverse over reverse), is recognised: H equals 2·XᵀX/n of the
    design with an intercept column (times ½ for the halved loss), and fr.path takes the
    quadratic route to sklearn's solutions."""
    import torch.nn.functional as F

    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = _linear(10)

    def loss(params, X, y):
        out = torch.func.functional_call(net, params, (X,))
        if form == "column":
            return F.mse_loss(out, y.unsqueeze(1))
        value = F.mse_loss(out.squeeze(-1), y)
        return 0.5 * value if form == "half" else value

    q, why = extract(loss, fr.params(net), (Xt, yt))
    assert q is not None, why
    A = torch.cat([Xt, torch.ones(len(yt), 1, dtype=DT)], 1)
    scale = 1.0 if form == "half" else 2.0
    torch.testing.assert_close(q.H, scale * A.T @ A / len(yt), rtol=1e-12, atol=1e-12)
    if form == "half":
        res = fr.path(net, loss, SPEC, "l1", data=(Xt, yt), strengths=[1.0, 0.1], tol=1e-12)
        for k, s in enumerate([1.0, 0.1]):
            ref = Lasso(alpha=s, tol=1e-14, max_iter=10**6).fit(X, y)
            w = res.stacked["weight"][k, 0].numpy()
            assert np.abs(w - ref.coef_).max() <= 1e-6 * np.abs(ref.coef_).max()


@pytest.mark.parametrize("form", ["mse_loss", "written out"])
def test_large_linear_model_is_found_quadratic_either_way(form):
    """From ``_FORWARD_TRIAL_MIN`` entries the forward mode is tried on one tangent first:
    ``F.mse_loss`` (no forward-mode rule) goes straight to reverse over reverse, a loss
    written out keeps the forward-over-reverse pass; both give ``H = 2·AᵀA/n``."""
    import torch.nn.functional as F

    from funcreg._quadratic import _FORWARD_TRIAL_MIN

    n, p = 80, _FORWARD_TRIAL_MIN
    gen = torch.Generator().manual_seed(3)
    Xt = torch.randn(n, p, generator=gen, dtype=DT)
    yt = torch.randn(n, generator=gen, dtype=DT)
    net = _linear(p)

    def loss(params, X, y):
        out = torch.func.functional_call(net, params, (X,)).squeeze(-1)
        return F.mse_loss(out, y) if form == "mse_loss" else ((out - y) ** 2).mean()

    q, why = extract(loss, fr.params(net), (Xt, yt))
    assert q is not None, why
    A = torch.cat([Xt, torch.ones(n, 1, dtype=DT)], 1)
    torch.testing.assert_close(q.H, 2.0 * A.T @ A / n, rtol=1e-12, atol=1e-12)


def test_settle_is_the_free_coordinates_closed_form():
    """``Quadratic.settle``: with the weights held at zero the intercept of a least-squares
    fit is the mean of the targets (independent reference); a free entry the loss does not
    determine (a zero column's weight, the weights left free) gives ``None``."""
    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = _linear(10)

    def mse(params, X, y):
        return 0.5 * ((torch.func.functional_call(net, params, (X,))[:, 0] - y) ** 2).mean()

    q, why = extract(mse, fr.params(net), (Xt, yt))
    assert q is not None, why
    got = q.settle(["weight"])
    assert got is not None
    assert torch.equal(got["weight"], torch.zeros(1, 10, dtype=DT))
    torch.testing.assert_close(got["bias"], yt.mean().reshape(1), rtol=1e-13, atol=0)
    Xz = Xt.clone()
    Xz[:, 3] = 0.0
    qz, _ = extract(mse, fr.params(net), (Xz, yt))
    assert qz is not None and qz.settle(["bias"]) is None
