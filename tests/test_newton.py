"""Proximal Newton (funcreg._newton): the exact inner Lasso, the derivatives, and warm
starts along the strengths, each against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import Lasso, LogisticRegression
from torch.func import grad, hessian

import funcreg as fr
from funcreg._newton import derivatives, feature_sign
from funcreg.solvers import solve

DT = torch.float64


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rho", [0.0, 0.95])
def test_feature_sign_equals_sklearn_lasso(seed: int, rho: float) -> None:
    """``½ wᵀGw − bᵀw + α‖w‖₁`` with ``G = XᵀX/n``, ``b = Xᵀy/n`` is scikit-learn's Lasso;
    from a cold start and from a wrong warm start, also on correlated columns."""
    rng = np.random.default_rng(seed)
    n, p = 80, 12
    Z = rng.standard_normal((n, p))
    X = np.sqrt(1 - rho**2) * Z + rho * Z[:, :1]
    y = X[:, :3] @ np.array([1.5, -2.0, 0.7]) + rng.standard_normal(n)
    G, b = X.T @ X / n, X.T @ y / n
    alpha = 0.2 * np.abs(b).max()
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(X, y).coef_
    for start in (np.zeros(p), rng.standard_normal(p)):
        w = feature_sign(G, b, np.full(p, alpha), start)
        assert w is not None
        np.testing.assert_allclose(w, ref, atol=1e-9, rtol=0)


def test_feature_sign_leaves_free_coordinates_unpenalised() -> None:
    """A coordinate with ``τ = 0`` is free: the answer is the minimiser, checked by its
    optimality conditions, with equality on the free coordinate."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 6))
    G, b = A.T @ A / 40 + 1e-3 * np.eye(6), rng.standard_normal(6)
    tau = np.array([0.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    w = feature_sign(G, b, tau, np.zeros(6))
    assert w is not None
    r = b - G @ w
    assert abs(r[0]) <= 1e-12
    on = w != 0
    on[0] = False
    np.testing.assert_allclose(r[on], tau[on] * np.sign(w[on]), atol=1e-12)
    assert bool((np.abs(r[w == 0]) <= tau[w == 0] + 1e-12).all())


def test_derivatives_equal_torch_func() -> None:
    X = torch.randn(50, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).to(DT)

    def f(theta: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ theta, y)

    x = torch.linspace(-0.3, 0.4, 5, dtype=DT)
    v, g, H = derivatives(f, x)
    torch.testing.assert_close(v, f(x), atol=1e-15, rtol=0)
    torch.testing.assert_close(g, grad(f)(x), atol=1e-14, rtol=0)
    torch.testing.assert_close(H, hessian(f)(x), atol=1e-14, rtol=0)


def _cancer() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return torch.from_numpy(X), torch.from_numpy(y).to(DT), X, y


def _linear_bce(p: int):  # noqa: ANN202
    net = torch.nn.Linear(p, 1).double()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()

    def bce(params: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(net, params, (X,))[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y)

    return net, bce


def test_warm_started_batch_equals_a_loop_of_cold_solves() -> None:
    """One solve of 10 strengths (run largest first, each from the previous solution)
    gives the solutions of 10 separate cold-started solves, to 1e-10, all certified."""
    Xt, yt, _, _ = _cancer()
    net, bce = _linear_bce(Xt.shape[1])
    Cs = torch.from_numpy(np.geomspace(0.01, 1.0, 10))
    spec, s = fr.from_sklearn_logistic(Cs, len(yt), "l1", "weight")
    params = {k: v.detach() for k, v in net.named_parameters()}
    both = solve(bce, spec, params, s, Xt, yt, tol=1e-12)
    assert bool(both.converged.all()) and bool((both.optimality <= 1e-12).all())
    for k in range(10):
        one = solve(bce, spec, params, {"l1": float(s["l1"][k])}, Xt, yt, tol=1e-12)
        assert bool(one.converged.all())
        for name in ("weight", "bias"):
            torch.testing.assert_close(
                both.params[name][k], one.params[name][0], atol=1e-10, rtol=0
            )


def test_l1_logistic_path_with_intercept_matches_sklearn() -> None:
    """The user's route (an ``nn.Linear`` with an unpenalized intercept, ``fr.path``) equals
    ``LogisticRegression(penalty='l1')`` (saga leaves the intercept unpenalized)."""
    Xt, yt, X, y = _cancer()
    net, bce = _linear_bce(Xt.shape[1])
    Cs = np.array([0.02, 0.2])
    spec, s = fr.from_sklearn_logistic(torch.from_numpy(Cs), len(y), "l1", "weight")
    res = fr.path(net, bce, spec, data=(Xt, yt), strengths=s["l1"], tol=1e-12)
    assert bool(torch.as_tensor(res.meta["optimality"] <= 1e-12).all())
    W, b = res.stacked["weight"][:, 0].numpy(), res.stacked["bias"][:, 0].numpy()  # C ascending
    for k, C in enumerate(Cs):
        sk = LogisticRegression(C=C, l1_ratio=1.0, solver="saga", tol=1e-12, max_iter=200_000).fit(
            X, y
        )
        np.testing.assert_allclose(W[k], sk.coef_[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(b[k], sk.intercept_[0], atol=1e-5, rtol=0)


def test_path_looks_for_a_quadratic_once_and_still_takes_newton(monkeypatch) -> None:
    """``fr.path`` examines the loss once (``extract``); its solves, the top of the path's
    included, get the loss marked as examined and still take proximal Newton."""
    import funcreg._path as path_module
    import funcreg._routes as routes
    import funcreg.solvers as solvers

    Xt, yt, _, y = _cancer()
    net, bce = _linear_bce(Xt.shape[1])
    looks = {"path": 0, "solve": 0}
    newton = {"calls": 0}

    def counting(where, fn):  # noqa: ANN001, ANN202
        def run(*a, **k):  # noqa: ANN002, ANN003, ANN202
            looks[where] += 1
            return fn(*a, **k)

        return run

    def counted_newton(*a, **k):  # noqa: ANN002, ANN003, ANN202
        newton["calls"] += 1
        return real_newton(*a, **k)

    real_newton = routes.prox_newton
    monkeypatch.setattr(path_module, "extract", counting("path", path_module.extract))
    monkeypatch.setattr(solvers, "extract", counting("solve", solvers.extract))
    monkeypatch.setattr(routes, "prox_newton", counted_newton)
    res = fr.path(net, bce, fr.Spec(l1=fr.L1("weight")), data=(Xt, yt), n=4, tol=1e-10)
    assert looks == {"path": 1, "solve": 0}
    assert newton["calls"] >= 2  # the top of the path and the grid
    assert bool(res.meta["converged"].all())


def _bce_value(net: torch.nn.Module, bce, X: torch.Tensor, y: torch.Tensor):  # noqa: ANN001, ANN202
    """The route's flat objective ``f(θ)`` of an ``nn.Linear`` (weight then bias)."""
    from funcreg._quadratic import Layout

    layout = Layout({k: v.detach() for k, v in net.named_parameters()})

    def f(theta: torch.Tensor) -> torch.Tensor:
        return bce(layout.single(theta), X, y)

    return f, layout.P


def test_separable_hessian_equals_torch_func_hessian() -> None:
    """The user's ``nn.Linear`` + BCE loss is found to be ``F(u)`` of the linear outputs
    ``u = Aθ + c`` (``A = [X, 1]``), and ``Aᵀ diag(F'') A`` and ``Aᵀ∇F`` equal
    ``torch.func.hessian`` and ``grad`` at points away from the one it was found at."""
    from funcreg._newton import Separable

    Xt, yt, _, _ = _cancer()
    net, bce = _linear_bce(Xt.shape[1])
    f, P = _bce_value(net, bce, Xt, yt)
    found = Separable.find(f, torch.zeros(P, dtype=DT))
    assert found is not None
    ones = torch.ones(len(yt), 1, dtype=DT)
    np.testing.assert_allclose(found.A, torch.cat([Xt, ones], 1).numpy(), rtol=0, atol=1e-15)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = 0.3 * torch.randn(P, generator=gen, dtype=DT)
        got = found.derivatives(f, x)
        assert got is not None
        fx, g, d = got
        H = (found.A.T * d) @ found.A
        np.testing.assert_allclose(fx, float(f(x)), rtol=1e-15, atol=0)
        np.testing.assert_allclose(g, grad(f)(x).numpy(), rtol=0, atol=1e-14)
        np.testing.assert_allclose(H, hessian(f)(x).numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["pairwise", "mlp"])
def test_separable_refused_where_the_structure_does_not_hold(kind: str) -> None:
    """A loss that couples the outputs (a log-sum-exp over the samples) or whose outputs are
    not affine in the params (a two-layer network) has no such structure."""
    from funcreg._newton import Separable

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=gen, dtype=DT)
    if kind == "pairwise":

        def f(theta: torch.Tensor) -> torch.Tensor:
            return torch.logsumexp(X @ theta, 0)

        P = 4
    else:

        def f(theta: torch.Tensor) -> torch.Tensor:
            W, v = theta[:12].reshape(4, 3), theta[12:]
            return torch.nn.functional.softplus(torch.tanh(X @ W) @ v).mean()

        P = 15
    assert Separable.find(f, 0.1 * torch.randn(P, generator=gen, dtype=DT)) is None


def test_a_wrong_structure_still_gives_the_certified_solution() -> None:
    """The solver's stop is certified with autograd's gradient: a structure whose ``A`` is
    off by a factor (a wrong Hessian and gradient) is dropped at the first stop it claims,
    and the model still ends at the solution, certified."""
    from funcreg._newton import Separable, _one_model, _Point

    Xt, yt, _, _ = _cancer()
    net, bce = _linear_bce(Xt.shape[1])
    f, P = _bce_value(net, bce, Xt, yt)
    found = Separable.find(f, torch.zeros(P, dtype=DT))
    assert found is not None
    tau = np.full(P, 0.02)
    tau[-1] = 0.0
    scale = float(np.linalg.norm(grad(f)(torch.zeros(P, dtype=DT)).numpy()))
    good = _one_model(f, tau, _Point(torch.zeros(P, dtype=DT)), 1e-10, 100, scale, found)
    assert good is not None and good[2][0] == 1.0
    found.A = 1.5 * found.A
    bad = _one_model(f, tau, _Point(torch.zeros(P, dtype=DT)), 1e-10, 100, scale, found)
    assert bad is not None and bad[2][0] == 1.0
    np.testing.assert_allclose(bad[0].xn, good[0].xn, rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numpy_stopping_rule_equals_the_torch_one(dtype: torch.dtype) -> None:
    from funcreg import _tree
    from funcreg._newton import _rule

    rng = np.random.default_rng(1)
    for _ in range(200):
        mapping, gnorm, scale, xnorm = 10.0 ** rng.uniform(-14, 1, 4)
        top, tol = float(10.0 ** rng.uniform(-2, 3)), float(10.0 ** rng.uniform(-12, -3))
        stop, report = _rule(mapping, gnorm, scale, xnorm, top, tol, dtype)
        m, g, s, x = torch.tensor([mapping, gnorm, scale, xnorm], dtype=dtype).unbind()
        t_stop, t_ok = _tree.stopping_rule(m, g, s, top, x, tol)
        assert stop == bool(t_stop) and report[0] == float(t_ok)
        np.testing.assert_allclose(report[1], float(_tree.floor_ratio(g, s, top, x)), rtol=1e-6)
        np.testing.assert_allclose(report[2], float(m / torch.maximum(s, g)), rtol=1e-6)


def test_separable_loss_with_negative_curvature_still_falls_back_with_the_warning() -> None:
    """``mean cos(Xw)`` has the separable structure, with ``F'' = −cos(u) < 0`` at 0: the
    structure's Hessian is not taken as PSD; the general one is checked and refused, and
    solve falls back to FISTA with the warning."""
    from funcreg._newton import Separable

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=gen, dtype=DT)

    def loss(p: dict, X: torch.Tensor) -> torch.Tensor:
        return torch.cos(X @ p["w"]).mean()

    assert Separable.find(lambda t: loss({"w": t}, X), torch.zeros(3, dtype=DT)) is not None
    p0 = {"w": torch.zeros(3, dtype=DT)}
    with pytest.warns(RuntimeWarning, match="not positive semidefinite.*falling back to FISTA"):
        solve(loss, fr.Spec(l1=fr.L1("w")), p0, {"l1": 0.01}, X, tol=1e-6, max_iter=2000)


def test_gradient_scale_of_a_shared_start_equals_the_vmapped_one() -> None:
    """The Newton route's stopping scale max(‖∇f(0)‖, ‖∇f(x0)‖): one model's plain-autograd
    gradients, used when every model shares its smooth objective and start, equal the
    vmapped per-model ones."""
    from funcreg._fista import Generic
    from funcreg._routes import _gradient_scale
    from funcreg._tree import sqnorm

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64, generator=g)
    y = (torch.rand(40, generator=g) > 0.5).double()

    def f(p: dict, s: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = X @ p["w"] + p["b"]
        return (
            torch.nn.functional.binary_cross_entropy_with_logits(out, y)
            + 0.1 * s["l2"] * (p["w"] ** 2).sum()
        )

    k = 3
    x0 = {"w": torch.randn(5, dtype=torch.float64, generator=g).expand(k, 5).clone(),
          "b": torch.full((k,), 0.3, dtype=torch.float64)}  # fmt: skip
    S = {"l2": torch.full((k,), 0.5, dtype=torch.float64)}
    gen = Generic(f, (X, y))
    want = torch.maximum(gen.grad_norm_at_zero(x0, S), sqnorm(gen.gradient(x0, S)).sqrt())
    got = _gradient_scale(f, x0, S, (X, y), shared=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    x0["w"][1] += 1.0  # different starts: the vmapped route, per model
    got = _gradient_scale(f, x0, S, (X, y), shared=True)
    want = torch.maximum(gen.grad_norm_at_zero(x0, S), sqnorm(gen.gradient(x0, S)).sqrt())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert not torch.allclose(got[0], got[1])
