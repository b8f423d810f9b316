"""strength_max against scikit-learn's alpha_max and the KKT conditions; geometric grids."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet, Lasso

import funcreg as fr
from funcreg import geometric_grid, path, strength_max

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


# ---------------------------------------------------------------------------------------
# fr.path: warm-started paths
# ---------------------------------------------------------------------------------------


def correlated(n: int, p: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, p, generator=g, dtype=DT)
    X = z.clone()
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + (1 - rho**2) ** 0.5 * z[:, j]
    w = torch.zeros(p, dtype=DT)
    w[::7] = 2.0
    y = X @ w + torch.randn(n, generator=g, dtype=DT)
    return X - X.mean(0), y - y.mean()


def test_path_matches_lasso_path_and_warm_starts_need_fewer_iterations(one_thread):
    from sklearn.linear_model import lasso_path

    X, y = correlated(200, 40, 0.9, seed=0)
    ls = fr.least_squares(X, y)
    spec = fr.Spec(l1=fr.L1())
    warm = path(ls.init(), ls, spec, n=40, chunk_size=4, tol=1e-10)
    cold = path(ls.init(), ls, spec, n=40, chunk_size=4, tol=1e-10, warm_start=False)
    s = warm.grid["l1"]
    assert bool((s[1:] < s[:-1]).all()) and float(s[0]) == pytest.approx(sk_alpha_max(X, y))
    _, coefs, _ = lasso_path(X.numpy(), y.numpy(), alphas=s.numpy(), tol=1e-14, max_iter=10**6)
    for r in (warm, cold):
        assert bool(r.meta["converged"].all())
        err = (r.stacked["weight"][:, 0] - torch.as_tensor(coefs.T)).abs().max()
        assert float(err) < 1e-6  # reached: ~1e-8
    assert bool((warm.stacked["weight"][0] == 0).all())  # strength_max: all zero
    w_it, c_it = int(warm.meta["iterations"].sum()), int(cold.meta["iterations"].sum())
    assert w_it < 0.9 * c_it  # measured: ~0.8x
    assert warm.meta["warm_start"] and not cold.meta["warm_start"]


def test_path_default_grid_settles_the_intercept(one_thread):
    X, y = correlated(80, 6, 0.3, seed=1)
    X, y = X + 1.0, y + 3.0  # not centred: the intercept matters
    net = torch.nn.Linear(6, 1).double()

    def loss(p, X, y):
        return 0.5 * ((torch.func.functional_call(net, p, (X,)).squeeze(-1) - y) ** 2).mean()

    r = path(net, loss, fr.Spec(l1=fr.L1("weight")), data=(X, y), n=6, eps=1e-2, tol=1e-10)
    # exact up to the solve of the intercept (FISTA's generic path stops ~4e-9 from ȳ here)
    assert float(r.grid["l1"][0]) == pytest.approx(sk_alpha_max(X, y), rel=1e-7)
    assert bool((r.stacked["weight"][0] == 0).all()) and bool((r.stacked["weight"][1] != 0).any())
    assert float(r.stacked["bias"][0, 0]) == pytest.approx(float(y.mean()), abs=1e-7)
    assert r.K == 6 and r.meta["iterations"].shape == (6,)
    assert r.module(3).weight.shape == (1, 6)
    # given strengths are run largest first, whatever their order
    r2 = path(net, loss, fr.Spec(l1=fr.L1("weight")), data=(X, y), strengths=[0.01, 0.1, 0.05])
    assert r2.grid["l1"].tolist() == [0.1, 0.05, 0.01]


def test_network_path_chains_warm_starts_through_the_sweep_engine(one_thread):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 3, generator=g, dtype=DT)
    y = torch.sin(X[:, :1]) + 0.1 * torch.randn(40, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    net = net.double()

    def loss(p, X, y):
        return ((torch.func.functional_call(net, p, (X,)) - y) ** 2).mean()

    spec = fr.Spec(l1=fr.L1("0.weight"))
    kw = {"optimizer": fr.optim.sgd(0.1), "steps": 8, "progress": False}
    r = path(net, loss, spec, data=(X, y), strengths=[0.05, 0.001], chunk_size=1, **kw)
    assert r.grid["l1"].tolist() == [0.05, 0.001] and r.meta["run_order"] == "ascending"
    first = fr.sweep(net, loss, spec, fr.grid(l1=[0.001], dtype=DT), train=(X, y), **kw)
    second = fr.sweep(
        net, loss, spec, fr.grid(l1=[0.05], dtype=DT), train=(X, y), init=first.stacked, **kw
    )
    for name in first.stacked:
        torch.testing.assert_close(r.stacked[name][1], first.stacked[name][0], rtol=0, atol=0)
        torch.testing.assert_close(r.stacked[name][0], second.stacked[name][0], rtol=0, atol=0)
    assert r.history["loss"].shape == (8, 2)
    torch.testing.assert_close(r.history["loss"][:, 0], second.history["loss"][:, 0])


def test_path_bad_input(linear):
    X, y, loss = linear
    p = {"w": torch.zeros(10, dtype=DT), "b": y.mean()}
    spec = fr.Spec(l1=fr.L1("w"))
    with pytest.raises(ValueError, match="grid of strengths is empty"):
        path(p, loss, spec, data=(X, y), strengths=[])
    with pytest.raises(ValueError, match="strengths must be finite and >= 0"):
        path(p, loss, spec, data=(X, y), strengths=[0.1, -1.0])
    with pytest.raises(ValueError, match="term 'l2' is not a spec term"):
        path(p, loss, spec, "l2", data=(X, y))
    two = fr.Spec(l1=fr.L1("w"), l2=fr.L2("w"))
    with pytest.raises(ValueError, match=r"say which one the grid varies with term="):
        path(p, loss, two, data=(X, y))
    with pytest.raises(ValueError, match="give optimizer= and steps= together"):
        path(p, loss, spec, data=(X, y), steps=10)
    with pytest.raises(ValueError, match=r"term 'l2' is L2, which induces no exact sparsity"):
        path(p, loss, two, "l2", data=(X, y), fixed={"l1": 0.0})
    with pytest.raises(TypeError, match="pass the nn.Module itself"):
        path(p, loss, spec, data=(X, y), strengths=[0.1], optimizer=fr.optim.sgd(0.1), steps=2)


def test_example_lasso_path_runs_small(tmp_path, capsys, one_thread, load_example):
    out = tmp_path / "lasso.png"
    res = load_example("lasso_path").main(
        ["--n", "120", "--p", "20", "--grid", "30", "--out", str(out)]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["warm"]["iterations"] < res["cold"]["iterations"]
    assert res["warm"]["max_diff"] < 1e-5 and res["cold"]["max_diff"] < 1e-5
    left, right = res["axes"]
    assert len(left.get_lines()) == 20 and len(right.get_lines()) == 20
    assert left.get_xscale() == "log" == right.get_xscale()
    assert "fewer FISTA iterations" in capsys.readouterr().out


def test_example_feature_selection_runs_small(tmp_path, capsys, one_thread, load_example):
    out = tmp_path / "fs.png"
    res = load_example("feature_selection").main(
        ["--n", "200", "--grid", "4", "--steps", "60", "--p", "6", "--out", str(out)]
    )
    assert out.stat().st_size > 1000
    ax = res["ax"]
    assert len(ax.get_lines()) == 6 and ax.get_ylabel() == "group norm ‖w_j‖₂"
    assert [line.get_label() for line in ax.get_lines()][:2] == ["feature 0 *", "feature 1 *"]
    assert len(res["survivors"]) == 4 and len(res["survivors"][0]) <= len(res["survivors"][-1])
    assert "surviving features" in capsys.readouterr().out


def test_scalar_params_solve_path_and_cross_validate(linear):
    """A 0-dim intercept is a parameter like any other (stacked, it is (K,))."""
    X, y, loss = linear
    p = {"w": torch.zeros(10, dtype=DT), "b": torch.zeros((), dtype=DT)}
    spec = fr.Spec(l1=fr.L1("w"))
    r = path(p, loss, spec, data=(X, y), n=5)
    lasso = Lasso(alpha=float(r.grid["l1"][-1]), tol=1e-12).fit(X.numpy(), y.numpy())
    assert float(r.stacked["b"][-1]) == pytest.approx(float(lasso.intercept_), abs=1e-6)
    cv = fr.cross_validate(p, loss, spec, r.grid["l1"], (X, y), folds=3)
    assert math.isfinite(cv.strength_min)


def test_default_grid_top_is_exact_and_its_model_exactly_zero(linear):
    """The grid's ends are strength_max and eps·strength_max to the bit (numpy.geomspace),
    and the path's first model, started from the settled intercept, is exactly zero."""
    _, _, loss = linear
    g = geometric_grid(3.3, 1e-3, 7)
    assert float(g[0]) == 3.3 and float(g[-1]) == 3.3 * 1e-3
    for seed in range(5):  # from a zero intercept, seeds 1, 3 and 4 stopped at ~1e-7
        gen = torch.Generator().manual_seed(seed)
        X = torch.randn(60, 10, generator=gen, dtype=DT)
        y = X[:, 0] * 2 - X[:, 3] + torch.randn(60, generator=gen, dtype=DT) + 3.0
        p = {"w": torch.zeros(10, dtype=DT), "b": torch.zeros((), dtype=DT)}
        r = path(p, loss, fr.Spec(l1=fr.L1("w")), data=(X, y), n=4, tol=1e-6)
        assert bool((r.stacked["w"][0] == 0).all()), seed
        assert float(r.stacked["b"][0]) == pytest.approx(float(y.mean()), rel=1e-6)


def test_path_bad_input_is_named(linear):
    X, y, loss = linear
    p = {"w": torch.zeros(10, dtype=DT), "b": torch.zeros((), dtype=DT)}
    two = fr.Spec(l1=fr.L1("w"), l2=fr.L2("w"))
    with pytest.raises(ValueError, match=r"need a strength; pass fixed=\{'l2'"):
        path(p, loss, two, "l1", data=(X, y), n=3)
    with pytest.raises(ValueError, match="not finite|NaN or inf"):
        path(p, loss, fr.Spec(l1=fr.L1("w")), data=(X * math.nan, y), n=3)
    with pytest.raises(ValueError, match=r"n must be an integer"):
        geometric_grid(1.0, 1e-3, 2.5)
    with pytest.raises(TypeError, match=r"'chunk_sise' \(did you mean chunk_size=\?\)"):
        path(p, loss, fr.Spec(l1=fr.L1("w")), data=(X, y), n=3, chunk_sise=3)
    with pytest.raises(ValueError, match=r"set by path itself"):
        path(
            torch.nn.Linear(3, 1), lambda p, x: x.sum(), fr.Spec(l1=fr.L1("weight")),
            data=(X,), strengths=[0.1], optimizer=fr.optim.sgd(0.1), steps=1, train=X,
        )  # fmt: skip


def test_path_with_an_optimizer_checkpoints_each_chunk_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(32, 4, generator=g)
    y = X[:, :1] * 2 + 0.1 * torch.randn(32, 1, generator=g)
    net = torch.nn.Linear(4, 1)

    def loss(p, x, t):
        return ((torch.func.functional_call(net, p, (x,)) - t) ** 2).mean()

    kw = dict(data=(X, y), strengths=[0.1, 0.01, 0.001, 1e-4], chunk_size=2,
              optimizer=fr.optim.sgd(0.1), steps=6)  # fmt: skip
    spec = fr.Spec(l1=fr.L1("weight"))
    ckpt = tmp_path / "p.pt"
    first = path(net, loss, spec, checkpoint=ckpt, **kw)
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == ["p.chunk0.pt", "p.chunk1.pt"]
    again = path(net, loss, spec, checkpoint=ckpt, **kw)  # resumes both: same numbers
    assert torch.equal(first.stacked["weight"], again.stacked["weight"])
