"""fr.hypergrad: implicit hypergradients equal finite differences of re-solved problems."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import funcreg as fr

D = torch.float64
N, P, NV = 60, 15, 40


def _data(seed: int = 0, classify: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, P, dtype=D, generator=g)
    Xv = torch.randn(NV, P, dtype=D, generator=g)
    w = torch.zeros(P, dtype=D)
    w[:6] = torch.tensor([2.0, -1.5, 1.0, 0.5, 0.8, -0.7], dtype=D)
    if classify:
        y = (torch.rand(N, dtype=D, generator=g) < torch.sigmoid(X @ w)).to(D)
        yv = (torch.rand(NV, dtype=D, generator=g) < torch.sigmoid(Xv @ w)).to(D)
    else:
        y = X @ w + 0.3 * torch.randn(N, dtype=D, generator=g)
        yv = Xv @ w + 0.3 * torch.randn(NV, dtype=D, generator=g)
    return X, y, Xv, yv


def _vec(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return p["w"].reshape(-1)


def mse(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((X @ _vec(p) - y) ** 2).mean()


def logistic(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(X @ _vec(p), y)


def _solve(loss: Callable, spec: Any, init: dict, strengths: dict, *data: Any) -> fr.Solution:
    """A tight solve: a fixed step 1/L with L = λ_max(XᵀX/n) + 1, above the curvature of
    every loss and smooth term here (the adaptive step stalls near 1e-10 optimality)."""
    X = data[0]
    L = float(torch.linalg.eigvalsh(X.T @ X / X.shape[0])[-1]) + 1.0
    return fr.solve(
        loss, spec, init, strengths, *data, tol=1e-15, max_iter=50000, lipschitz=L, backtrack=False
    )


def _fd(fn: Callable[[float], float], h: float) -> float:
    """Central differences with one Richardson extrapolation (error O(h⁴))."""
    d1 = (fn(h) - fn(-h)) / (2 * h)
    d2 = (fn(h / 2) - fn(-h / 2)) / h
    return (4 * d2 - d1) / 3


def _check(loss, outer, spec, init, strengths, X, y, Xv, yv, methods, log=True, h=1e-3):
    sol = _solve(loss, spec, init, strengths, X, y)
    for m in methods:
        hg = fr.hypergrad(
            outer, loss, spec, sol, strengths, X, y, outer_data=(Xv, yv), method=m, log=log
        )
        for term, s in strengths.items():

            def E(t: float, term: str = term, s: float = s) -> float:
                st = dict(strengths)
                st[term] = s * math.exp(t) if log else s + t
                w = _solve(loss, spec, init, st, X, y).params
                return float(outer({k: v[0] for k, v in w.items()}, Xv, yv))

            fd = _fd(E, h if log else h * s)
            got = float(hg.strengths[term][0])
            assert got == pytest.approx(fd, rel=1e-6, abs=1e-12), (term, m, got, fd)
    return sol


def _init(shape: tuple[int, ...] = (P,)) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(shape, dtype=D)}


def test_ridge_equals_closed_form_and_finite_differences() -> None:
    X, y, Xv, yv = _data()
    lam = 0.3
    spec = {"l2": fr.L2("w")}
    sol = _check(mse, mse, spec, _init(), {"l2": lam}, X, y, Xv, yv, ["direct", "cg"])
    # closed form: w = (XᵀX/n + λI)⁻¹ Xᵀy/n, dw/dλ = −(XᵀX/n + λI)⁻¹ w
    A = X.T @ X / N + lam * torch.eye(P, dtype=D)
    w = torch.linalg.solve(A, X.T @ y / N)
    torch.testing.assert_close(sol.params["w"][0], w, rtol=1e-10, atol=1e-12)
    gE = Xv.T @ (Xv @ w - yv) / NV
    exact = float(gE @ -torch.linalg.solve(A, w))
    hg = fr.hypergrad(mse, mse, spec, sol, {"l2": lam}, X, y, outer_data=(Xv, yv), log=False)
    assert float(hg.strengths["l2"][0]) == pytest.approx(exact, rel=1e-9)
    hg = fr.hypergrad(mse, mse, spec, sol, {"l2": lam}, X, y, outer_data=(Xv, yv))
    assert float(hg.strengths["l2"][0]) == pytest.approx(lam * exact, rel=1e-9)


def test_lasso() -> None:
    X, y, Xv, yv = _data()
    spec = {"l1": fr.L1("w")}
    sol = _check(mse, mse, spec, _init(), {"l1": 0.05}, X, y, Xv, yv, ["direct", "cg", "cgnr"])
    nz = int((sol.params["w"][0] != 0).sum())
    assert 0 < nz < P
    # w(s) is affine in s on a stable support: raw-strength central differences are exact
    _check(mse, mse, spec, _init(), {"l1": 0.05}, X, y, Xv, yv, ["cg"], log=False)


def test_lasso_plus_ridge_two_strengths() -> None:
    X, y, Xv, yv = _data()
    spec = {"l1": fr.L1("w"), "l2": fr.L2("w")}
    _check(mse, mse, spec, _init(), {"l1": 0.05, "l2": 0.1}, X, y, Xv, yv, ["direct", "cg"])


def test_elastic_net() -> None:
    X, y, Xv, yv = _data()
    spec = {"en": fr.ElasticNet("w", l1_ratio=0.6)}
    _check(mse, mse, spec, _init(), {"en": 0.05}, X, y, Xv, yv, ["direct", "cg"])


def test_group_lasso() -> None:
    X, y, Xv, yv = _data()
    spec = {"gl": fr.GroupLasso("w", dim=1)}  # 5 groups of 3 (rows)
    sol = _check(mse, mse, spec, _init((5, 3)), {"gl": 0.08}, X, y, Xv, yv, ["direct", "cgnr"])
    rows = torch.linalg.vector_norm(sol.params["w"][0], dim=1)
    assert bool((rows == 0).any()) and bool((rows > 0).any())


def test_sparse_group_lasso() -> None:
    X, y, Xv, yv = _data()
    spec = {"sgl": fr.SparseGroupLasso("w", dim=1, l1_ratio=0.5)}
    sol = _check(mse, mse, spec, _init((5, 3)), {"sgl": 0.06}, X, y, Xv, yv, ["direct", "cgnr"])
    assert bool((sol.params["w"][0] == 0).any())


def test_nonnegative_lasso() -> None:
    X, y, Xv, yv = _data()
    spec = {"l1": fr.L1("w"), "pos": fr.NonNegative("w")}
    sol = _check(mse, mse, spec, _init(), {"l1": 0.03}, X, y, Xv, yv, ["direct", "cg"])
    assert bool((sol.params["w"][0] >= 0).all())


def test_l1_logistic_regression() -> None:
    X, y, Xv, yv = _data(1, classify=True)
    spec = {"l1": fr.L1("w")}
    sol = _check(logistic, logistic, spec, _init(), {"l1": 0.02}, X, y, Xv, yv, ["direct", "cg"])
    nz = int((sol.params["w"][0] != 0).sum())
    assert 0 < nz < P


def test_per_coordinate_weight_hypergradients() -> None:
    X, y, Xv, yv = _data()
    c = torch.linspace(0.5, 2.0, P, dtype=D)
    spec = {"l1": fr.L1("w", weight=c)}
    s = {"l1": 0.04}
    sol = _solve(mse, spec, _init(), s, X, y)
    hg = fr.hypergrad(mse, mse, spec, sol, s, X, y, outer_data=(Xv, yv), weights=["l1"])
    hg_cg = fr.hypergrad(
        mse, mse, spec, sol, s, X, y, outer_data=(Xv, yv), weights=["l1"], method="cg"
    )
    g = hg.weights["l1"][0]
    assert g.shape == (P,)
    torch.testing.assert_close(hg_cg.weights["l1"][0], g, rtol=1e-8, atol=1e-14)
    # the strength multiplies every factor: d/dlog s = Σ_i d/dlog c_i
    assert float(hg.strengths["l1"][0]) == pytest.approx(float(g.sum()), rel=1e-9)
    active = sol.params["w"][0] != 0
    assert bool((g[~active] == 0).all())
    for i in [0, 3, int(torch.nonzero(~active)[0])]:

        def E(t: float, i: int = i) -> float:
            ci = c.clone()
            ci[i] = c[i] * math.exp(t)
            sp = {"l1": fr.L1("w", weight=ci)}
            w = _solve(mse, sp, _init(), s, X, y).params["w"][0]
            return float(mse({"w": w}, Xv, yv))

        assert float(g[i]) == pytest.approx(_fd(E, 1e-3), rel=1e-6, abs=1e-12)


def test_dict_weight_hypergradients() -> None:
    X, y, Xv, yv = _data()
    c = torch.linspace(0.5, 2.0, P, dtype=D)
    spec = {"l1": fr.L1("w", weight={"w": c})}
    s = {"l1": 0.04}
    sol = _solve(mse, spec, _init(), s, X, y)
    hg = fr.hypergrad(mse, mse, spec, sol, s, X, y, outer_data=(Xv, yv), weights=["l1"])
    plain = fr.hypergrad(
        mse, mse, {"l1": fr.L1("w", weight=c)}, sol, s, X, y, outer_data=(Xv, yv), weights=["l1"]
    )
    torch.testing.assert_close(hg.weights["l1"]["w"], plain.weights["l1"])


def test_stacked_settings_equal_a_loop() -> None:
    X, y, Xv, yv = _data()
    spec = {"l1": fr.L1("w"), "l2": fr.L2("w")}
    s = {"l1": torch.tensor([0.02, 0.05, 0.1], dtype=D), "l2": torch.tensor([0.1, 0.2, 0.05])}
    sol = _solve(mse, spec, _init(), s, X, y)
    hg = fr.hypergrad(mse, mse, spec, sol, s, X, y, outer_data=(Xv, yv))
    assert hg.strengths["l1"].shape == (3,) and hg.value.shape == (3,)
    for k in range(3):
        one = {n: v[k] for n, v in s.items()}
        w = {n: v[k] for n, v in sol.params.items()}
        hk = fr.hypergrad(mse, mse, spec, w, one, X, y, outer_data=(Xv, yv))
        for t in s:
            torch.testing.assert_close(hg.strengths[t][k], hk.strengths[t][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(hg.value[k], hk.value[0])
    # a path's stacked solutions, passed as a dict with stacked=True
    hs = fr.hypergrad(mse, mse, spec, sol.params, s, X, y, outer_data=(Xv, yv), stacked=True)
    torch.testing.assert_close(hs.strengths["l1"], hg.strengths["l1"])


# -- errors -------------------------------------------------------------------------------


def _lasso_setup() -> tuple[Any, ...]:
    X, y, Xv, yv = _data()
    spec = {"l1": fr.L1("w")}
    sol = _solve(mse, spec, _init(), {"l1": 0.05}, X, y)
    return X, y, Xv, yv, spec, sol


def test_zero_strength_in_log_space_is_an_error() -> None:
    X, y, Xv, yv, spec, sol = _lasso_setup()
    with pytest.raises(ValueError, match="'l1' is 0.*log=False"):
        fr.hypergrad(mse, mse, spec, sol, {"l1": 0.0}, X, y, outer_data=(Xv, yv))


def test_unknown_terms_are_named() -> None:
    X, y, Xv, yv, spec, sol = _lasso_setup()
    with pytest.raises(ValueError, match="'l2' names no term"):
        fr.hypergrad(mse, mse, spec, sol, {"l1": 0.05, "l2": 1.0}, X, y, outer_data=(Xv, yv))
    with pytest.raises(ValueError, match="weights= names 'l2'"):
        fr.hypergrad(mse, mse, spec, sol, {"l1": 0.05}, X, y, outer_data=(Xv, yv), weights=["l2"])
    with pytest.raises(ValueError, match="'l1' has no weight= tensor"):
        fr.hypergrad(mse, mse, spec, sol, {"l1": 0.05}, X, y, outer_data=(Xv, yv), weights=["l1"])


def test_nonconvex_terms_are_refused() -> None:
    X, y, Xv, yv, _, sol = _lasso_setup()
    for pen in (fr.MCP("w"), fr.SCAD("w")):
        with pytest.raises(ValueError, match=f"'nc' \\({type(pen).__name__}\\) is non-convex"):
            fr.hypergrad(mse, mse, {"nc": pen}, sol, {"nc": 0.05}, X, y, outer_data=(Xv, yv))


def test_outer_loss_blind_to_params_is_an_error() -> None:
    X, y, Xv, yv, spec, sol = _lasso_setup()

    def blind(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y**2).mean()

    with pytest.raises(ValueError, match="outer_fn does not depend on the params"):
        fr.hypergrad(blind, mse, spec, sol, {"l1": 0.05}, X, y, outer_data=(Xv, yv))
    with pytest.raises(TypeError, match=r"with 0 outer_data tensors .*outer_data=\(X_val, y_val\)"):
        fr.hypergrad(mse, mse, spec, sol, {"l1": 0.05}, X, y)  # outer_data forgotten


def test_unconverged_solution_warns_with_its_optimality() -> None:
    X, y, Xv, yv, spec, _ = _lasso_setup()
    rough = fr.solve(mse, spec, _init(), {"l1": 0.05}, X, y, max_iter=3, quadratic=False)
    with pytest.warns(RuntimeWarning, match=r"not converged \(relative optimality \d"):
        fr.hypergrad(mse, mse, spec, rough, {"l1": 0.05}, X, y, outer_data=(Xv, yv))


def test_cg_needs_an_elementwise_prox() -> None:
    X, y, Xv, yv = _data()
    spec = {"gl": fr.GroupLasso("w", dim=1)}
    sol = _solve(mse, spec, _init((5, 3)), {"gl": 0.08}, X, y)
    with pytest.raises(ValueError, match="'gl' \\(GroupLasso\\) is not"):
        fr.hypergrad(mse, mse, spec, sol, {"gl": 0.08}, X, y, outer_data=(Xv, yv), method="cg")


@pytest.mark.parametrize(
    "spec,strength",
    [
        ({"t": fr.L1("w")}, 0.05),
        ({"t": fr.ElasticNet("w", l1_ratio=0.6)}, 0.05),
        ({"t": fr.L1("w"), "pos": fr.NonNegative("w")}, 0.03),
    ],
)
def test_support_cg_iterations_equal_the_direct_solve(spec: dict, strength: float) -> None:
    """direct_max=0: the support system goes through conjugate gradient, not a dense solve."""
    X, y, Xv, yv = _data()
    sol = _solve(mse, spec, _init(), {"t": strength}, X, y)
    kw: dict[str, Any] = dict(outer_data=(Xv, yv))
    cg = fr.hypergrad(mse, mse, spec, sol, {"t": strength}, X, y, method="cg", direct_max=0, **kw)
    ref = fr.hypergrad(mse, mse, spec, sol, {"t": strength}, X, y, method="direct", **kw)
    torch.testing.assert_close(cg.strengths["t"], ref.strengths["t"], rtol=1e-8, atol=1e-14)


def test_a_path_is_differentiated_at_every_strength() -> None:
    X, y, Xv, yv = _data()
    spec = {"l1": fr.L1("w")}
    grid = torch.tensor([0.1, 0.05, 0.03], dtype=D)
    res = fr.path(_init(), mse, spec, data=(X, y), strengths=grid, tol=1e-12)
    s = {"l1": res.grid["l1"]}
    hg = fr.hypergrad(mse, mse, spec, res.stacked, s, X, y, outer_data=(Xv, yv), stacked=True)
    for k in range(3):
        w = {"w": res.stacked["w"][k]}
        one = fr.hypergrad(mse, mse, spec, w, {"l1": s["l1"][k]}, X, y, outer_data=(Xv, yv))
        torch.testing.assert_close(hg.strengths["l1"][k], one.strengths["l1"][0])


def test_per_group_weight_hypergradients() -> None:
    X, y, Xv, yv = _data()
    c = torch.tensor([[0.5], [1.0], [1.5], [2.0], [1.0]], dtype=D)  # one factor per row group
    s = {"gl": 0.05}
    sol = _solve(mse, {"gl": fr.GroupLasso("w", dim=1, weight=c)}, _init((5, 3)), s, X, y)
    spec = {"gl": fr.GroupLasso("w", dim=1, weight=c)}
    hg = fr.hypergrad(mse, mse, spec, sol, s, X, y, outer_data=(Xv, yv), weights=["gl"])
    g = hg.weights["gl"][0]
    assert g.shape == (5, 1)
    assert float(hg.strengths["gl"][0]) == pytest.approx(float(g.sum()), rel=1e-9)
    for i in range(5):

        def E(t: float, i: int = i) -> float:
            ci = c.clone()
            ci[i] = c[i] * math.exp(t)
            sp = {"gl": fr.GroupLasso("w", dim=1, weight=ci)}
            w = _solve(mse, sp, _init((5, 3)), s, X, y).params["w"][0]
            return float(mse({"w": w}, Xv, yv))

        assert float(g[i, 0]) == pytest.approx(_fd(E, 1e-3), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("direct_max", [200, 0])  # batched LU solve / batched CG
@pytest.mark.parametrize(
    "case", ["lasso+ridge", "elastic-net factors", "logistic", "least_squares", "nonneg"]
)
def test_vmapped_settings_equal_the_loop(case: str, direct_max: int) -> None:
    X, y, Xv, yv = _data(classify=case == "logistic")
    K = 4
    s: dict[str, torch.Tensor]
    loss: Any = mse
    outer: Any = mse
    init = _init()
    weights: list[str] = []
    data: tuple = (X, y)
    if case == "lasso+ridge":
        spec: dict = {"l1": fr.L1("w"), "l2": fr.L2("w")}
        s = {"l1": torch.tensor([0.02, 0.05, 0.1, 0.2], dtype=D), "l2": torch.full((K,), 0.1)}
    elif case == "elastic-net factors":
        c = torch.linspace(0.5, 2.0, P, dtype=D)
        spec = {"en": fr.ElasticNet("w", l1_ratio=0.6, weight=c)}
        s = {"en": torch.tensor([0.02, 0.05, 0.1, 0.2], dtype=D)}
        weights = ["en"]
    elif case == "logistic":
        loss = outer = logistic
        spec = {"l1": fr.L1("w")}
        s = {"l1": torch.tensor([0.005, 0.01, 0.02, 0.04], dtype=D)}
    elif case == "least_squares":
        loss = fr.least_squares(X, y)
        outer = fr.least_squares(Xv, yv)
        init = loss.init()
        spec = {"l1": fr.L1()}
        s = {"l1": torch.tensor([0.02, 0.05, 0.1, 0.2], dtype=D)}
        data = ()
    else:
        spec = {"l1": fr.L1("w"), "nn": fr.NonNegative("w")}
        s = {"l1": torch.tensor([0.02, 0.05, 0.1, 0.2], dtype=D)}
    if data:
        sol = _solve(loss, spec, init, s, *data)
    else:
        sol = fr.solve(loss, spec, init, s, tol=1e-13, max_iter=50000)
    outer_data = () if isinstance(outer, fr.LeastSquares) else (Xv, yv)
    kw = dict(outer_data=outer_data, weights=weights, direct_max=direct_max, tol=1e-13)
    vec = fr.hypergrad(outer, loss, spec, sol, s, *data, **kw)
    loop = fr.hypergrad(outer, loss, spec, sol, s, *data, vectorize=False, **kw)
    assert vec.strengths[next(iter(s))].shape == (K,)
    for t in s:
        torch.testing.assert_close(vec.strengths[t], loop.strengths[t], rtol=1e-8, atol=1e-13)
    for t in weights:
        torch.testing.assert_close(vec.weights[t], loop.weights[t], rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(vec.value, loop.value)
    torch.testing.assert_close(vec.optimality, loop.optimality, rtol=1e-6, atol=1e-14)


def test_a_loss_built_on_torch_mse_loss_is_differentiated() -> None:
    """``F.mse_loss``'s backward has no forward-mode rule; the Hessian-vector products are
    reverse over reverse, so the README's loss works with every method and matches finite
    differences."""

    def torch_mse(p: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.mse_loss(X @ _vec(p), y)

    X, y, Xv, yv = _data()
    spec = {"l1": fr.L1("w"), "l2": fr.L2("w")}
    _check(torch_mse, torch_mse, spec, _init(), {"l1": 0.05, "l2": 0.1}, X, y, Xv, yv,
           ["direct", "cg", "cgnr"])  # fmt: skip
