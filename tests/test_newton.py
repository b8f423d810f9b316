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
