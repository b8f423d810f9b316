"""strength_max against scikit-learn's alpha_max and the KKT conditions; geometric grids."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet, Lasso

import funcreg as fr
from funcreg.path import geometric_grid, strength_max

DT = torch.float64


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 10, generator=g, dtype=DT)
    y = X[:, 0] * 2 - X[:, 3] + torch.randn(60, generator=g, dtype=DT) + 3.0

    def loss(p, X, y):
        r = y - X @ p["w"] - p["b"]
        return 0.5 * (r**2).mean()

    return X, y, loss


def sk_alpha_max(X, y, l1_ratio=1.0):
    Xc = X - X.mean(0)
    return float((Xc.T @ (y - y.mean())).abs().max()) / (len(y) * l1_ratio)


@pytest.mark.parametrize("r", [1.0, 0.5, 0.2])
def test_strength_max_equals_sklearn_alpha_max(linear, r):
    X, y, loss = linear
    p = {"w": torch.zeros(10, dtype=DT), "b": y.mean()}  # intercept at its optimum
    pen = fr.L1("w") if r == 1.0 else fr.ElasticNet("w", l1_ratio=r)
    amax = strength_max(loss, {"t": pen}, "t", p, X, y)
    assert amax == pytest.approx(sk_alpha_max(X, y, r), rel=1e-12)
    Model = Lasso if r == 1.0 else ElasticNet
    kw = {} if r == 1.0 else {"l1_ratio": r}
    above = Model(alpha=amax * 1.001, tol=1e-12, **kw).fit(X.numpy(), y.numpy()).coef_
    below = Model(alpha=amax * 0.98, tol=1e-12, **kw).fit(X.numpy(), y.numpy()).coef_
    assert np.all(above == 0) and np.any(below != 0)


def test_group_strength_max_is_kkt_boundary():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g, dtype=DT)
    Y = torch.randn(40, 3, generator=g, dtype=DT)

    def loss(p, X, Y):
        return 0.5 * ((Y - X @ p["W"].T) ** 2).mean()

    p = {"W": torch.zeros(3, 6, dtype=DT)}
    grad0 = torch.func.grad(loss)(p, X, Y)["W"]
    gl = strength_max(loss, {"g": fr.GroupLasso("W", dim=0)}, "g", p, X, Y)
    assert gl == pytest.approx(float(grad0.norm(dim=0).max()) / math.sqrt(3), rel=1e-12)
    # sparse group lasso: at λmax the worst group satisfies its KKT condition with equality
    r = 0.3
    sgl = strength_max(loss, {"g": fr.SparseGroupLasso("W", dim=0, l1_ratio=r)}, "g", p, X, Y)
    lhs = (grad0.abs() - sgl * r).clamp(min=0).norm(dim=0)
    assert float((lhs - sgl * (1 - r) * math.sqrt(3)).max()) == pytest.approx(0.0, abs=1e-9)


def test_penalty_factor_and_toward(linear):
    X, y, loss = linear
    p = {"w": torch.zeros(10, dtype=DT), "b": y.mean()}
    c = torch.ones(10, dtype=DT)
    c[0] = 0.0  # unpenalised coordinate does not set the top of the path
    grad0 = torch.func.grad(loss)(p, X, y)["w"].abs()
    got = strength_max(loss, {"t": fr.L1("w", weight=c)}, "t", p, X, y)
    assert got == pytest.approx(float(grad0[1:].max()))
    ref = torch.full((10,), 0.5, dtype=DT)
    p_ref = {"w": ref, "b": y.mean()}
    g_ref = torch.func.grad(loss)(p_ref, X, y)["w"].abs().max()
    assert strength_max(loss, {"t": fr.L1("w", toward=ref)}, "t", p, X, y) == pytest.approx(
        float(g_ref)
    )


def test_strength_max_refuses_penalties_without_sparsity(linear):
    X, y, loss = linear
    p = {"w": torch.zeros(10, dtype=DT), "b": y.mean()}
    with pytest.raises(ValueError, match=r"term 't' is L2, which induces no exact sparsity"):
        strength_max(loss, {"t": fr.L2("w")}, "t", p, X, y)
    with pytest.raises(ValueError, match=r"no term 'x'"):
        strength_max(loss, {"t": fr.L1("w")}, "x", p, X, y)


def test_geometric_grid():
    g = geometric_grid(2.0, eps=1e-3, n=4)
    torch.testing.assert_close(g, torch.tensor([2.0, 0.2, 0.02, 0.002], dtype=DT))
    with pytest.raises(ValueError, match="strength_max must be finite and > 0"):
        geometric_grid(0.0)
    with pytest.raises(ValueError, match="eps must be in"):
        geometric_grid(1.0, eps=2.0)
