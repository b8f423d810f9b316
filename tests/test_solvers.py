"""funcreg.solvers.solve against scikit-learn and against optimality conditions (float64).

Every reference check solves a whole grid of strengths in one vmapped call and compares
each model to scikit-learn fitted with a tight tolerance: coefficients to 1e-5, objective
to 1e-7 relative. Both code paths are covered: the least-squares Gram fast path
(``least_squares(X, y)``) and the generic ``vmap(grad(loss))`` path (a plain function).
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import ElasticNet, Lasso, LogisticRegression, Ridge

import funcreg as fr
from funcreg.solvers import LeastSquares, Solution, least_squares, solve

COEF_TOL = 1e-5
OBJ_TOL = 1e-7
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def regression(n: int = 80, p: int = 10, m: int = 1, seed: int = 0, rho: float = 0.5):
    """Correlated Gaussian design, sparse truth, noise; numpy arrays."""
    rng = np.random.default_rng(seed)
    cov = rho ** np.abs(np.subtract.outer(np.arange(p), np.arange(p)))
    X = rng.standard_normal((n, p)) @ np.linalg.cholesky(cov).T
    W = np.zeros((p, m))
    W[: max(2, p // 3)] = rng.standard_normal((max(2, p // 3), m))
    Y = X @ W + 0.5 * rng.standard_normal((n, m))
    return X, (Y[:, 0] if m == 1 else Y)


def lasso_grid(X: np.ndarray, y: np.ndarray, k: int = 8, lo: float = 1e-2) -> np.ndarray:
    amax = np.abs(X.T @ y).max() / len(y)
    return amax * np.geomspace(0.9, lo, k)


def enet_objective(X, y, w, alpha, r=1.0):
    resid = y - X @ w
    return resid @ resid / (2 * len(y)) + alpha * (r * np.abs(w).sum() + 0.5 * (1 - r) * w @ w)


def assert_close_fit(ours: np.ndarray, ref: np.ndarray, f_ours: float, f_ref: float) -> None:
    np.testing.assert_allclose(ours, ref, rtol=0, atol=COEF_TOL)
    assert f_ours <= f_ref * (1 + OBJ_TOL), (f_ours, f_ref)
    assert abs(f_ours - f_ref) <= OBJ_TOL * abs(f_ref), (f_ours, f_ref)


def lsq_loss(params, X, y):
    """The generic path's data term: 1/(2n)‖y − Xw‖² on a vector parameter ``w``."""
    return 0.5 * (y - X @ params["w"]).square().mean()


def fit(path: str, spec: fr.Spec, X: np.ndarray, y: np.ndarray, strengths, **kw) -> np.ndarray:
    """Solve on a route: ``gram`` (a least_squares loss), ``generic`` (a plain function,
    ``quadratic=False``) or ``found`` (the plain function, its quadratic found by
    structure); returns (K, p) coefficients."""
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    kw.setdefault("tol", 1e-10)
    kw.setdefault("max_iter", 20_000)
    if path == "gram":
        ls = least_squares(Xt, yt)
        sol = solve(ls, spec, ls.init(), strengths, **kw)
        assert bool(sol.converged.all()), sol.iterations
        return sol.params["weight"][:, 0].numpy()
    if path == "generic":
        kw.setdefault("quadratic", False)
    sol = solve(lsq_loss, spec, {"w": Xt.new_zeros(X.shape[1])}, strengths, Xt, yt, **kw)
    assert bool(sol.converged.all()), sol.iterations
    return sol.params["w"].numpy()


# -- references: scikit-learn ----------------------------------------------------------


@pytest.mark.parametrize("path", ["gram", "generic", "found"])
def test_lasso_grid_matches_sklearn(path):
    X, y = regression(seed=1)
    alphas = lasso_grid(X, y)
    spec = fr.Spec(l1=fr.L1() if path == "gram" else fr.L1("w"))
    W = fit(path, spec, X, y, {"l1": torch.from_numpy(alphas)})
    for k, a in enumerate(alphas):
        ref = Lasso(alpha=a, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(X, y).coef_
        f = enet_objective(X, y, W[k], a)
        assert_close_fit(W[k], ref, f, enet_objective(X, y, ref, a))


@pytest.mark.parametrize("l1_ratio", [0.1, 0.5, 0.9])
def test_elastic_net_grid_matches_sklearn(l1_ratio):
    X, y = regression(seed=2)
    alphas = lasso_grid(X, y) / l1_ratio
    spec = fr.Spec(en=fr.ElasticNet(l1_ratio=l1_ratio))
    W = fit("gram", spec, X, y, {"en": torch.from_numpy(alphas)})
    for k, a in enumerate(alphas):
        ref = ElasticNet(alpha=a, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-14)
        ref = ref.set_params(max_iter=10**6).fit(X, y).coef_
        f_ref = enet_objective(X, y, ref, a, l1_ratio)
        assert_close_fit(W[k], ref, enet_objective(X, y, W[k], a, l1_ratio), f_ref)


def test_elastic_net_as_l1_plus_smooth_l2_matches_sklearn():
    """L1 (prox) + L2 (gradient) with strengths (α r, α (1 − r)) is ElasticNet(α, r): the
    smooth penalty goes through the gradient, on both paths."""
    X, y = regression(seed=3)
    r = 0.3
    alphas = lasso_grid(X, y, k=6) / r
    s = {"l1": torch.from_numpy(alphas * r), "l2": torch.from_numpy(alphas * (1 - r))}
    W_gram = fit("gram", fr.Spec(l1=fr.L1(), l2=fr.L2()), X, y, s)
    W_gen = fit("generic", fr.Spec(l1=fr.L1("w"), l2=fr.L2("w")), X, y, s)
    for k, a in enumerate(alphas):
        ref = ElasticNet(alpha=a, l1_ratio=r, fit_intercept=False, tol=1e-14, max_iter=10**6)
        ref = ref.fit(X, y).coef_
        f_ref = enet_objective(X, y, ref, a, r)
        for W in (W_gram, W_gen):
            assert_close_fit(W[k], ref, enet_objective(X, y, W[k], a, r), f_ref)


def test_ridge_grid_matches_sklearn():
    """sklearn Ridge(alpha=a) minimises ‖y − Xw‖² + a‖w‖². funcreg's L2 is ½Σw², so

    * on the data term ½‖y − Xw‖² (a sum): 2× that objective is ‖y − Xw‖² + λ‖w‖², so λ = a;
    * on least_squares' 1/(2n)‖y − Xw‖² (a mean): multiply by 2n, λ = a / n.
    """
    X, y = regression(seed=4)
    n = len(y)
    a = np.array([0.01, 0.1, 1.0, 10.0, 100.0])
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def half_sse(params, X, y):
        return 0.5 * (y - X @ params["w"]).square().sum()

    w0 = {"w": Xt.new_zeros(X.shape[1])}
    s = {"l2": torch.from_numpy(a)}
    gen = solve(half_sse, fr.Spec(l2=fr.L2("w")), w0, s, Xt, yt, tol=1e-11, max_iter=20_000)
    ls = least_squares(Xt, yt)
    gram = solve(ls, fr.Spec(l2=fr.L2()), ls.init(), {"l2": torch.from_numpy(a / n)}, tol=1e-11)
    assert bool(gen.converged.all()) and bool(gram.converged.all())
    for k, ak in enumerate(a):
        ref = Ridge(alpha=ak, fit_intercept=False, solver="cholesky").fit(X, y).coef_

        def f(w, ak=ak):
            return ((y - X @ w) ** 2).sum() + ak * w @ w

        for w in (gen.params["w"][k].numpy(), gram.params["weight"][k, 0].numpy()):
            assert_close_fit(w, ref, f(w), f(ref))


@pytest.mark.parametrize("path", ["gram", "generic"])
def test_nonnegative_lasso_matches_sklearn_positive(path):
    X, y = regression(seed=5)
    y = y - 2 * X[:, 1]  # make some unconstrained coefficients negative
    alphas = lasso_grid(X, y)
    sel = None if path == "gram" else "w"
    spec = fr.Spec(l1=fr.L1(sel), pos=fr.NonNegative(sel))  # the constraint needs no strength
    W = fit(path, spec, X, y, {"l1": torch.from_numpy(alphas)})
    assert (W >= 0).all()
    for k, a in enumerate(alphas):
        ref = Lasso(alpha=a, positive=True, fit_intercept=False, tol=1e-14, max_iter=10**6)
        ref = ref.fit(X, y).coef_
        f = enet_objective(X, y, W[k], a)
        assert_close_fit(W[k], ref, f, enet_objective(X, y, ref, a))


def test_l1_logistic_grid_matches_sklearn():
    """sklearn minimises ‖w‖₁ + C Σ_i log(1 + exp(−y_i x_iᵀw)); dividing by nC gives the mean
    log-loss + (1/(nC))‖w‖₁, so the L1 strength is 1/(n C). No intercept on either side
    (liblinear would penalise it)."""
    rng = np.random.default_rng(6)
    n, p = 120, 8
    X = rng.standard_normal((n, p))
    w_true = np.zeros(p)
    w_true[:3] = [2.0, -1.5, 1.0]
    yb = (X @ w_true + 0.5 * rng.standard_normal(n) > 0).astype(float)
    ypm = 2 * yb - 1
    Cs = np.array([0.05, 0.1, 0.3, 1.0, 3.0])

    def logloss(params, X, y):
        return F.softplus(-y * (X @ params["w"])).mean()

    Xt, yt = torch.from_numpy(X), torch.from_numpy(ypm)
    s = {"l1": torch.from_numpy(1 / (n * Cs))}
    sol = solve(logloss, fr.Spec(l1=fr.L1("w")), {"w": Xt.new_zeros(p)}, s, Xt, yt, tol=1e-10)
    assert bool(sol.converged.all())
    for k, C in enumerate(Cs):
        ref = LogisticRegression(
            l1_ratio=1.0, C=C, solver="liblinear", fit_intercept=False, tol=1e-12, max_iter=10**5
        ).fit(X, yb)

        def f(w, C=C):
            return np.abs(w).sum() + C * np.logaddexp(0, -ypm * (X @ w)).sum()

        ours = sol.params["w"][k].numpy()
        assert_close_fit(ours, ref.coef_[0], f(ours), f(ref.coef_[0]))


# -- optimality conditions --------------------------------------------------------------


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_group_lasso_satisfies_kkt(fit_intercept):
    """GroupLasso(dim=0) on W (m, p): one group per input feature (a column, |g| = m).
    At a minimiser, per group j with gradient g_j = ∇_{W[:, j]} f:
    ‖g_j‖ ≤ λ√m where W[:, j] = 0, and g_j = −λ√m W[:, j]/‖W[:, j]‖ elsewhere; ∇_b f = 0."""
    m = 3
    X, Y = regression(n=90, p=12, m=m, seed=7)
    Y = Y + 1.5  # an offset for the intercept to absorb
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(Y), fit_intercept=fit_intercept)
    lam_max = np.linalg.norm(X.T @ (Y - Y.mean(0) * fit_intercept) / len(Y), axis=1).max()
    lams = torch.from_numpy(lam_max / np.sqrt(m) * np.geomspace(0.95, 0.01, 6))
    sol = solve(ls, fr.Spec(g=fr.GroupLasso(dim=0)), ls.init(), {"g": lams}, tol=1e-11)
    assert bool(sol.converged.all())
    zeros = 0
    for k, lam in enumerate(lams.tolist()):
        params = {n: v[k] for n, v in sol.params.items()}
        grads = torch.func.grad(ls)(params)
        W, G = params["weight"], grads["weight"]
        thr = lam * np.sqrt(m)
        for j in range(W.shape[1]):
            norm = torch.linalg.vector_norm(W[:, j])
            if norm == 0:
                zeros += 1
                assert torch.linalg.vector_norm(G[:, j]) <= thr * (1 + 1e-8)
            else:
                torch.testing.assert_close(G[:, j], -thr * W[:, j] / norm, atol=1e-7, rtol=0)
        if fit_intercept:
            torch.testing.assert_close(grads["bias"], torch.zeros(m, dtype=DT), atol=1e-8, rtol=0)
    assert zeros > 0  # the grid reaches sparse solutions


def test_group_lasso_generic_path_matches_gram_path():
    """The vmapped prox fallback (GroupLasso is not elementwise) on a plain loss gives the
    same solutions as the Gram path."""
    X, Y = regression(n=70, p=9, m=2, seed=8)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    lams = torch.tensor([0.3, 0.1, 0.02], dtype=DT)
    spec = fr.Spec(g=fr.GroupLasso(dim=0))
    ls = least_squares(Xt, Yt)

    def loss(params, X, Y):
        return 0.5 * (Y - X @ params["weight"].T).square().sum() / X.shape[0]

    a = solve(ls, spec, ls.init(), {"g": lams}, tol=1e-11)
    b = solve(loss, spec, ls.init(), {"g": lams}, Xt, Yt, tol=1e-11)
    torch.testing.assert_close(a.params["weight"], b.params["weight"], atol=1e-7, rtol=0)


# -- behaviour of the iteration ---------------------------------------------------------


def test_converged_models_do_not_change_after_convergence():
    X, y = regression(n=100, p=15, seed=9, rho=0.9)
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(y))
    s = {"l1": torch.from_numpy(lasso_grid(X, y, k=10, lo=1e-3))}
    spec = fr.Spec(l1=fr.L1())
    # the loop itself: lipschitz= (its default, λ_max) turns the homotopy's exact starts off
    lmax = float(torch.linalg.eigvalsh(ls.gram)[-1])
    short = solve(ls, spec, ls.init(), s, tol=1e-9, max_iter=60, lipschitz=lmax)
    long = solve(ls, spec, ls.init(), s, tol=1e-9, max_iter=5000, lipschitz=lmax)
    early = short.converged
    assert 0 < int(early.sum()) < len(early)  # some stopped, some still running at 60
    assert bool(long.converged.all())
    # both runs do the same arithmetic on the same batch up to iteration 150, so a model
    # that stopped is bit-identical whatever the kernels round (nothing touches it later)
    assert torch.equal(short.params["weight"][early], long.params["weight"][early])
    assert torch.equal(short.iterations[early], long.iterations[early])
    assert bool((short.iterations[~early] == 60).all())
    assert bool((long.iterations[~early] > 60).all())


def test_warm_start_from_stacked_solution_stops_at_once():
    X, y = regression(seed=10)
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(y))
    spec = fr.Spec(l1=fr.L1())
    s = {"l1": torch.from_numpy(lasso_grid(X, y, k=5))}
    first = solve(ls, spec, ls.init(), s, tol=1e-9)
    again = solve(ls, spec, first.params, s, tol=1e-8, stacked=True)
    assert bool((again.iterations <= 2).all()) and bool(again.converged.all())
    torch.testing.assert_close(again.params["weight"], first.params["weight"], atol=1e-9, rtol=0)


def test_shapes_scalar_strengths_and_plain_fista():
    X, y = regression(seed=11)
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(y), fit_intercept=True)
    spec = fr.Spec(l1=fr.L1())
    sol = solve(ls, spec, ls.init(), {"l1": 0.05, "unused": 3.0})
    assert isinstance(sol, Solution)
    assert sol.params["weight"].shape == (1, 1, X.shape[1]) and sol.params["bias"].shape == (1, 1)
    assert sol.iterations.dtype == torch.int64 and sol.converged.dtype == torch.bool
    # fixed step 1/L with L = λ_max of the Hessian (the intercept-augmented Gram): same answer
    Xa = np.hstack([X, np.ones((len(X), 1))])
    L = float(np.linalg.eigvalsh(Xa.T @ Xa / len(X))[-1])
    plain = solve(
        ls,
        spec,
        ls.init(),
        {"l1": 0.05},
        lipschitz=L,
        backtrack=False,
        restart=False,
        max_iter=20_000,
    )
    for name in sol.params:
        torch.testing.assert_close(plain.params[name], sol.params[name], atol=1e-6, rtol=0)


def test_least_squares_is_an_ordinary_loss():
    X, y = regression(n=30, p=4, seed=12)
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(y), fit_intercept=True)
    assert isinstance(ls, LeastSquares)
    params = {"weight": torch.randn(1, 4, dtype=DT), "bias": torch.randn(1, dtype=DT)}
    w, b = params["weight"][0].numpy(), params["bias"].numpy()
    expected = ((y - X @ w - b) ** 2).sum() / (2 * len(y))
    assert float(ls(params)) == pytest.approx(expected, rel=1e-12)
    g = torch.func.grad(ls)(params)
    Ag = ls.hessian_apply({k: v[None] for k, v in params.items()})
    B = ls.linear_term()
    for k in g:
        torch.testing.assert_close(g[k], Ag[k][0] - B[k], atol=1e-12, rtol=0)


def test_elementwise_prox_fast_path_equals_vmapped_spec_prox():
    """solve applies elementwise penalties to the stacked tensors directly; that must be
    exactly vmap(spec.prox), including weight= factors, toward= references and selection
    resolved on one model's shapes (the bias is not a weight)."""
    from funcreg._fista import make_prox as _make_prox

    K = 5
    single = {"weight": torch.randn(3, 4, dtype=DT), "bias": torch.randn(3, dtype=DT)}
    spec = fr.Spec(
        l1=fr.L1(weight=torch.rand(3, 4, dtype=DT)),
        en=fr.ElasticNet(toward=torch.randn(3, 4, dtype=DT), l1_ratio=0.3),
        box=fr.Box(lo=-0.5, hi=0.7),
        pos=fr.NonNegative(fr.biases()),
    )
    stacked = {k: torch.randn(K, *v.shape, dtype=DT) for k, v in single.items()}
    s = {"l1": torch.rand(K, dtype=DT), "en": torch.rand(K, dtype=DT)}
    t = torch.rand(K, dtype=DT)
    fast = _make_prox(spec, single)(stacked, s, t)
    slow = torch.func.vmap(spec.prox)(stacked, s, t)
    for k in stacked:
        torch.testing.assert_close(fast[k], slow[k], atol=1e-15, rtol=0)
    assert bool((fast["bias"] >= 0).all())


# -- bad input ----------------------------------------------------------------------------


class _Rough(fr.Penalty):
    """A non-smooth penalty without a proximal operator (for the error test)."""

    smooth: ClassVar[bool] = False

    def _value(self, d, c):
        return d.abs().max()


@pytest.fixture
def problem():
    X, y = regression(n=20, p=3, seed=13)
    return least_squares(torch.from_numpy(X), torch.from_numpy(y))


def test_bad_max_iter_and_tol(problem):
    spec = fr.Spec(l1=fr.L1())
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1, got 0"):
        solve(problem, spec, problem.init(), {"l1": 0.1}, max_iter=0)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        solve(problem, spec, problem.init(), {"l1": 0.1}, tol=float("nan"))


def test_non_finite_data_and_params():
    X = torch.randn(10, 3, dtype=DT)
    y = torch.randn(10, dtype=DT)
    spec = fr.Spec(l1=fr.L1("w"))
    w0 = {"w": torch.zeros(3, dtype=DT)}
    bad = X.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data\[0\] contains NaN or inf"):
        solve(lsq_loss, spec, w0, {"l1": 0.1}, bad, y)
    with pytest.raises(ValueError, match=r"data\[1\] contains NaN or inf"):
        solve(lsq_loss, spec, w0, {"l1": 0.1}, X, y / 0)
    with pytest.raises(ValueError, match=r"params\['w'\] contains NaN or inf"):
        solve(lsq_loss, spec, {"w": torch.full((3,), float("inf"), dtype=DT)}, {"l1": 0.1}, X, y)
    with pytest.raises(ValueError, match="least_squares: X contains NaN or inf"):
        least_squares(bad, y)
    with pytest.raises(ValueError, match="least_squares: y contains NaN or inf"):
        least_squares(X, y / 0)


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_bad_strengths(problem, value):
    spec = fr.Spec(l1=fr.L1())
    with pytest.raises(ValueError, match="strength 'l1' must be finite and >= 0"):
        solve(problem, spec, problem.init(), {"l1": value})
    with pytest.raises(ValueError, match="strength 'l1' must be finite and >= 0"):
        solve(problem, spec, problem.init(), {"l1": torch.tensor([0.1, value], dtype=DT)})


def test_missing_strength_and_mismatched_k(problem):
    spec = fr.Spec(l1=fr.L1(), l2=fr.L2())
    with pytest.raises(ValueError, match="missing strength for term 'l2'"):
        solve(problem, spec, problem.init(), {"l1": 0.1})
    with pytest.raises(ValueError, match="strengths 'l1' and 'l2' have different lengths"):
        solve(problem, spec, problem.init(), {"l1": torch.ones(3), "l2": torch.ones(4)})
    stacked = {"weight": torch.zeros(5, 1, 3, dtype=DT)}
    with pytest.raises(ValueError, match="stacked params hold 5 models but the strengths have K"):
        solve(problem, spec, stacked, {"l1": torch.ones(3), "l2": 0.0}, stacked=True)


def test_nonsmooth_term_without_prox(problem):
    with pytest.raises(ValueError, match="term 'rough' \\(_Rough\\) is non-smooth and has no prox"):
        solve(problem, fr.Spec(rough=_Rough()), problem.init(), {"rough": 0.1})


def test_bad_lipschitz_and_least_squares_misuse(problem):
    spec = fr.Spec(l1=fr.L1())
    with pytest.raises(ValueError, match="lipschitz must be finite and > 0"):
        solve(problem, spec, problem.init(), {"l1": 0.1}, lipschitz=-1.0)
    with pytest.raises(ValueError, match="backtrack=False needs lipschitz="):
        solve(problem, spec, problem.init(), {"l1": 0.1}, backtrack=False)
    with pytest.raises(TypeError, match="least_squares loss holds its data"):
        solve(problem, spec, problem.init(), {"l1": 0.1}, torch.ones(3))
    with pytest.raises(ValueError, match="least_squares loss needs params of shapes"):
        solve(problem, spec, {"weight": torch.zeros(3, dtype=DT)}, {"l1": 0.1})
    with pytest.raises(ValueError, match="least_squares data is torch.float64 but params"):
        solve(problem, spec, {"weight": torch.zeros(1, 3)}, {"l1": 0.1})


def test_lean_lasso_path_matches_general_path_with_weights():
    """A weighted Lasso on least_squares takes the lean fixed-step loop; it must agree with
    the generic vmap(grad) path, and test convergence only at iteration 1 or every 10th."""
    X, y = regression(seed=13, rho=0.8)
    c = torch.linspace(0.5, 2.0, X.shape[1], dtype=DT)
    alphas = torch.from_numpy(lasso_grid(X, y, k=6))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    ls = least_squares(Xt, yt)
    lean = solve(ls, fr.Spec(l1=fr.L1(weight=c[None])), ls.init(), {"l1": alphas}, tol=1e-11)
    gen = solve(
        lsq_loss,
        fr.Spec(l1=fr.L1("w", weight=c)),
        {"w": Xt.new_zeros(X.shape[1])},
        {"l1": alphas},
        Xt,
        yt,
        tol=1e-11,
        max_iter=20_000,
    )
    assert bool(lean.converged.all()) and bool(gen.converged.all())
    assert bool(((lean.iterations == 1) | (lean.iterations % 10 == 0)).all())
    torch.testing.assert_close(lean.params["weight"][:, 0], gen.params["w"], atol=1e-7, rtol=0)


def _plain_fista(G, b, tau, L, iters, restart=True):
    """Textbook FISTA with gradient restart on ``½wᵀGw − bᵀw + Σ τ|w|``, one model per row.

    Returns the last iterate and, over all iterations, the smallest move ``‖x⁺ − y‖/‖x⁺‖``,
    the smallest restart margin ``|⟨y − x⁺, x⁺ − x⟩| / (‖y − x⁺‖ ‖x⁺ − x‖)`` and the longest
    run of steps without a restart."""
    x = torch.zeros_like(tau)
    y, theta = x, torch.ones(tau.shape[0], 1, dtype=tau.dtype)
    move, margin = math.inf, math.inf
    since = longest = torch.zeros(tau.shape[0], dtype=torch.int64)
    for i in range(iters):
        z = y - (y @ G - b) / L
        xn = torch.sign(z) * torch.clamp(z.abs() - tau / L, min=0)
        move = min(move, float(((xn - y).norm(dim=1) / xn.norm(dim=1)).min()))
        theta_next = 0.5 + torch.sqrt(0.25 + theta**2)
        beta = (theta - 1) / theta_next
        inner = ((y - xn) * (xn - x)).sum(1, keepdim=True)
        if i > 0:  # x⁺ − x is the first step itself at i = 0
            size = (y - xn).norm(dim=1, keepdim=True) * (xn - x).norm(dim=1, keepdim=True)
            margin = min(margin, float((inner.abs() / size).min()))
        up = (inner > 0) & restart
        since = torch.where(up[:, 0], 0, since + 1)
        longest = torch.maximum(longest, since)
        theta_next, beta = torch.where(up, 1.0, theta_next), torch.where(up, 0.0, beta)
        y, x, theta = xn + beta * (xn - x), xn, theta_next
    return x, move, margin, int(longest.max())


@pytest.mark.parametrize("restart", [True, False])
def test_lean_lasso_loop_is_textbook_fista_past_its_momentum_table(restart):
    """The lean loop's gradient step and its momentum table (grown well past its first 64
    entries, up to 2048) follow plain FISTA with restart: the same iterate after 1, 2, 3,
    40, 150 and 1500 iterations. A per-model ``lipschitz=`` becomes the largest one, since
    every model shares the Gram matrix.

    The step ``1/L`` is 10⁴ times shorter than ``1/λ_max``, so that no model comes near its
    minimiser within 1500 iterations: every iterate still moves by more than 10⁻⁹ of its
    size (10⁶ ulps), so with ``tol=0`` no model can stop at a floating-point fixed point on
    any machine, and every restart decision has a margin far above round-off, so it is the
    same in both loops whatever the BLAS kernels round."""
    X, y = regression(n=60, p=12, seed=21, rho=0.95)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    ls = least_squares(Xt, yt)
    alphas = torch.from_numpy(lasso_grid(X, y, k=3))
    L = float(torch.linalg.eigvalsh(ls.gram)[-1]) * 1e4  # a slow step: far from converged
    tau = alphas[:, None].expand(3, X.shape[1])
    for iters in (1, 2, 3, 40, 150, 1500):
        sol = solve(
            ls, fr.Spec(l1=fr.L1()), ls.init(), {"l1": alphas}, tol=0.0, max_iter=iters,
            lipschitz=torch.tensor([L / 2, L, L / 3], dtype=DT), restart=restart,
        )  # fmt: skip
        ref, move, margin, longest = _plain_fista(ls.gram, ls.xty, tau, L, iters, restart)
        size = float(ref.abs().max())
        torch.testing.assert_close(sol.params["weight"][:, 0], ref, atol=1e-9 * size, rtol=0)
        assert move > 1e-9 and margin > 1e-4  # far from any fixed point or tie
        assert bool((sol.iterations == iters).all()) and not bool(sol.converged.any())
    assert longest > 1024  # some model used the table past 1024 steps without a restart


def test_momentum_table_is_the_theta_recursion():
    """``Momentum``'s table, grown in doublings, is ``β[0] = 0`` (a restart) and
    ``β[c] = (θ_{c−1} − 1)/θ_c`` with ``θ_0 = 1``, ``θ_c = (1 + √(1 + 4θ²_{c−1}))/2``, the
    recursion computed here in 40-digit decimal arithmetic."""
    from funcreg._lasso import Momentum

    with localcontext() as ctx:
        ctx.prec = 40
        theta, expected = Decimal(1), [Decimal(0)]
        for _ in range(3000):
            nxt = (1 + (1 + 4 * theta * theta).sqrt()) / 2
            expected.append((theta - 1) / nxt)
            theta = nxt
    once = Momentum(torch.zeros(1, dtype=DT))
    assert once.table.shape == (64,)
    table = once.covering(3000)
    assert table.shape[0] > 3000 and table.dtype == DT
    ref = torch.tensor([float(b) for b in expected], dtype=DT)
    torch.testing.assert_close(table[:3001], ref, rtol=1e-12, atol=0)
    stepwise = Momentum(torch.zeros(1, dtype=DT))
    for c in (63, 64, 100, 1023, 1024, 3000):  # each growth computes only the new entries
        grown = stepwise.covering(c)
        assert grown.shape[0] > c
    assert torch.equal(grown[: table.shape[0]], table)  # host arithmetic: same everywhere


# -- tol is honoured at the point returned ------------------------------------------------


def _diabetes():
    """scikit-learn's diabetes data, standardized features and centred target (float64)."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    return (X - X.mean(0)) / X.std(0), y - y.mean()


def _mapping(X, y, w, strength, l1_ratio):
    """``(‖G(w)‖, scale, round-off)`` for ``1/(2n)‖y − Xw‖² + s(r‖w‖₁ + (1 − r)/2 ‖w‖²)``,
    in float64 numpy: ``G(w) = L (w − prox_{h/L}(w − ∇f(w)/L))`` at ``L = λ_max(XᵀX/n)``,
    ``scale = max(‖∇f(0)‖, ‖∇f(w)‖)`` (the start is 0), and the round-off of computing
    ``G`` itself (``x − ∇f/L`` rounds to ``eps·|x|``, ``∇f`` to about ``eps·scale``)."""
    n = len(y)
    w = np.asarray(w, dtype=np.float64)
    gram, b = X.T @ X / n, X.T @ y / n
    L = np.linalg.eigvalsh(gram)[-1]
    g = gram @ w - b
    z = w - g / L
    t = 1 / L
    prox = np.sign(z) * np.maximum(np.abs(z) - strength * l1_ratio * t, 0)
    prox = prox / (1 + strength * (1 - l1_ratio) * t)
    scale = max(np.linalg.norm(b), np.linalg.norm(g))
    eps = np.finfo(np.float64).eps
    return L * np.linalg.norm(w - prox), scale, 8 * eps * (scale + L * np.linalg.norm(w))


@pytest.mark.parametrize("tol", [1e-8, 1e-12])
@pytest.mark.parametrize("route", ["generic", "gram", "lean", "found"])
def test_tol_is_honoured_at_the_point_returned(route, tol):
    """With ``converged``, the point returned satisfies the documented rule ``‖G(w)‖ ≤ tol ·
    max(‖∇f(0)‖, ‖∇f(w)‖)``, checked here in numpy at ``L = λ_max`` (``‖G_L‖`` grows with
    ``L``, and every route's rule uses a step no longer: the lean loop ``1/λ_max``, the
    others the largest ``L`` they used, which starts at ``λ_max`` here — the Gram route's
    Lanczos estimate, the generic route's ``lipschitz=``). Until the rule was tested at the
    point returned and the curvature met was read only above round-off, the generic route
    stopped after 173 iterations at ``‖G‖ = 2.7e-7`` (relative 3e-9) whatever ``tol``."""
    X, y = _diabetes()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    strength, r = 0.03, 0.7 if route not in ("lean", "found") else 1.0
    if route in ("generic", "found"):
        L = float(np.linalg.eigvalsh(X.T @ X / len(y))[-1])
        spec = fr.Spec(en=fr.ElasticNet("w", l1_ratio=r) if route == "generic" else fr.L1("w"))
        w0 = {"w": Xt.new_zeros(X.shape[1])}

        def loss(params, X, y):
            return 0.5 * ((X @ params["w"] - y) ** 2).mean()

        kw = {"lipschitz": L, "quadratic": False} if route == "generic" else {}
        sol = solve(loss, spec, w0, {"en": strength}, Xt, yt, tol=tol, **kw)
        assert bool(sol.optimality <= tol)
        w = sol.params["w"][0].numpy()
    else:
        ls = least_squares(Xt, yt)
        spec = fr.Spec(en=fr.ElasticNet(l1_ratio=r) if route == "gram" else fr.L1())
        sol = solve(ls, spec, ls.init(), {"en": strength}, tol=tol)
        w = sol.params["weight"][0, 0].numpy()
        if route == "lean":
            it = int(sol.iterations[0])
            assert it == 1 or it % 10 == 0  # the lean loop's test schedule
    assert bool(sol.converged.all())
    mapping, scale, roundoff = _mapping(X, y, w, strength, r)
    assert mapping <= tol * scale + roundoff, (mapping, tol * scale)


def test_tol_below_the_float32_floor_warns_and_never_claims_convergence():
    """In float32 (an ``nn.Linear`` model's dtype) a prox-gradient mapping below about
    1e-6 of the gradient scale is rounding noise on this problem. By default the solver
    accumulates in float64 (``Solution.dtype``), so float32 inputs converge to ``tol=1e-8``
    and the answer is the float64 one rounded to float32. Computing in float32
    (``compute_dtype=torch.float32``), at the default ``tol=1e-8`` every model stops at
    that floor with ``converged=False`` and a warning naming the floor (it used to report
    ``converged=True`` for a point off by 2.85); at a ``tol`` above the floor it
    converges, and the point returned then meets the rule."""
    X, y = _diabetes()
    Xt, yt = torch.from_numpy(X).float(), torch.from_numpy(y).float()
    strengths = torch.tensor([0.03, 0.3, 3.0])

    def loss(params, X, y):
        return 0.5 * ((X @ params["weight"].T + params["bias"] - y[:, None]) ** 2).mean()

    p0 = {"weight": torch.zeros(1, X.shape[1]), "bias": torch.zeros(1)}
    spec = fr.Spec(l1=fr.L1())
    f32 = torch.float32
    for quadratic in (None, False):  # the Gram route found by structure, the general loop
        default = solve(loss, spec, p0, {"l1": strengths}, Xt, yt, quadratic=quadratic, tol=1e-12)
        assert default.dtype == torch.float64 and bool(default.converged.all())
        assert default.params["weight"].dtype == f32
        assert bool((default.optimality <= 1e-12).all())
        for k, s in enumerate(strengths.tolist()):
            w = default.params["weight"][k, 0].double().numpy()
            # vs sklearn on the same (float32-rounded) data: only the final rounding differs
            same = Lasso(alpha=s, tol=1e-14, max_iter=100_000)
            ref = same.fit(Xt.double().numpy(), yt.double().numpy()).coef_
            assert np.abs(w - ref).max() <= 1e-6 * np.abs(ref).max()
            # vs the float64 data: the data's own rounding moves the answer (issue's 1e-4)
            ref = Lasso(alpha=s, tol=1e-14, max_iter=100_000).fit(X, y).coef_
            assert np.abs(w - ref).max() <= 1e-4 * np.abs(ref).max()
        with pytest.warns(RuntimeWarning, match=r"tol=1e-08 is below the round-off floor of "):
            low = solve(
                loss, spec, p0, {"l1": strengths}, Xt, yt, compute_dtype=f32, quadratic=quadratic
            )
        assert not bool(low.converged.any()) and bool((low.iterations < 10_000).all())
        assert low.dtype == f32 and bool((low.optimality > 1e-8).all())
        sol = solve(
            loss, spec, p0, {"l1": strengths}, Xt, yt, tol=1e-4, compute_dtype=f32,
            quadratic=quadratic,
        )  # fmt: skip
        assert bool(sol.converged.all())
        for k, s in enumerate(strengths.tolist()):
            w = sol.params["weight"][k, 0].double().numpy()
            mapping, scale, _ = _mapping(X, y, w, s, 1.0)
            # the float32 test's own rounding (its floor, ~1e-6 of the scale) on top of tol
            assert mapping <= 1e-4 * scale * 1.1, (k, mapping / scale)


def test_stopping_rule_claims_convergence_only_above_its_round_off_floor():
    """``(stop, converged)``: converged needs ``‖G‖ ≤ tol·ref`` and ``tol·ref`` above the
    floor ``4 eps (ref + L‖x‖)``; a model at the floor stops without converging."""
    from funcreg._tree import stopping_rule

    eps = torch.finfo(DT).eps
    one = torch.ones(4, dtype=DT)
    scale, gnorm, xnorm, L = 100 * one, 0 * one, 0 * one, 1.0
    floor = 4 * eps * 100
    mapping = torch.tensor([0.5e-8 * 100, 2e-8 * 100, 0.5 * floor, 0.0], dtype=DT)
    stop, ok = stopping_rule(mapping, gnorm, scale, L, xnorm, 1e-8)
    assert ok.tolist() == [True, False, True, True] and stop.tolist() == ok.tolist()
    stop, ok = stopping_rule(mapping, gnorm, scale, L, xnorm, 1e-16)  # below the floor
    assert ok.tolist() == [False] * 4 and stop.tolist() == [False, False, True, True]
