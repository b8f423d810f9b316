"""The exact Lasso path by homotopy (:mod:`funcreg._homotopy`): its points satisfy the
Lasso's optimality conditions to round-off and equal the exact solution on scikit-learn's
support and signs; per-coordinate ``L1`` weights by rescaling; where it stops early
(singular ``G_AA``, ``n < p``) the loop still certifies every answer; and the routes it
starts agree with the plain loop at ``tol=1e-12``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import lasso_path

import funcreg as fr
from funcreg._homotopy import Homotopy, proportional
from funcreg._homotopy import lasso_path as homotopy_path
from funcreg.solvers import least_squares, solve

DT = torch.float64


def _ar1(n: int, p: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, p))
    X = z.copy()
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * z[:, j]
    w = np.zeros(p)
    w[::5] = 1.5
    y = X @ w + rng.standard_normal(n)
    return X - X.mean(0), y - y.mean()


def _designs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    X, y = load_diabetes(return_X_y=True)
    return [
        ("diabetes", X - X.mean(0), y - y.mean()),
        ("ar1", *_ar1(150, 40, 0.9, seed=1)),
        ("gauss", *_ar1(200, 30, 0.0, seed=2)),
    ]


@pytest.mark.parametrize("name", ["diabetes", "ar1", "gauss"])
def test_homotopy_points_are_exact_lasso_solutions(name):
    """Each point meets the optimality conditions to round-off (1e-12 of ``‖r‖∞``) and
    equals, to 1e-10 of the largest coefficient, the closed form on scikit-learn's
    support and signs, ``w_S = G_SS⁻¹ (r_S − λ σ_S)`` (an independent reference)."""
    X, y = next((X, y) for n, X, y in _designs() if n == name)
    n = len(y)
    G, r = X.T @ X / n, X.T @ y / n
    top = np.abs(r).max()
    lam = np.geomspace(top, top * 1e-3, 60)
    w, done = homotopy_path(torch.from_numpy(G), torch.from_numpy(r), torch.from_numpy(lam))
    assert bool(done.all())
    W = w.numpy()
    _, coefs, _ = lasso_path(X, y, alphas=lam, tol=1e-12, max_iter=10**6)
    scale = np.abs(W).max()
    for k in range(len(lam)):
        g = r - G @ W[k]
        on = W[k] != 0
        assert np.abs(g[on] - lam[k] * np.sign(W[k][on])).max(initial=0) <= 1e-12 * top
        assert (np.abs(g[~on]) - lam[k]).max(initial=-1) <= 1e-12 * top
        sk_on = coefs[:, k] != 0
        ref = np.zeros_like(r)
        if sk_on.any():
            sigma = np.sign(coefs[sk_on, k])
            ref[sk_on] = np.linalg.solve(G[np.ix_(sk_on, sk_on)], r[sk_on] - lam[k] * sigma)
        assert np.abs(W[k] - ref).max() <= 1e-10 * scale


def test_homotopy_reads_any_order_and_zero_above_the_top():
    X, y = _designs()[0][1:]
    n = len(y)
    G, r = torch.from_numpy(X.T @ X / n), torch.from_numpy(X.T @ y / n)
    top = float(r.abs().max())
    lam = torch.tensor([0.1 * top, 2 * top, 0.01 * top, top], dtype=DT)
    w, done = homotopy_path(G, r, lam)
    assert bool(done.all()) and bool((w[[1, 3]] == 0).all())
    w2, _ = homotopy_path(G, r, lam.flip(0))
    torch.testing.assert_close(w2.flip(0), w, rtol=0, atol=1e-14 * float(w.abs().max()))


def test_proportional_thresholds():
    c = torch.tensor([1.0, 0.5, 2.0], dtype=DT)
    s = torch.tensor([3.0, 1.0], dtype=DT)
    got = proportional(s[:, None] * c[None])
    assert got is not None
    torch.testing.assert_close(got[0][:, None] * got[1][None], s[:, None] * c[None])
    assert proportional(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)) is None
    assert proportional(torch.tensor([[1.0, 0.0]], dtype=DT)) is None  # a free coordinate


@pytest.mark.parametrize("tol", [1e-8, 1e-12])
def test_weighted_l1_by_rescaling_agrees_with_the_plain_loop(tol):
    """Per-coordinate weights (``L1(weight=c)``): the homotopy on the rescaled problem
    starts the loop; the answer is what the plain loop (``lipschitz=``, no homotopy)
    reaches, and every model is certified at ``tol``."""
    X, y = _ar1(120, 25, 0.6, seed=3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    ls = least_squares(Xt, yt)
    c = torch.linspace(0.5, 2.0, 25, dtype=DT)[None]
    spec = fr.Spec(l1=fr.L1(weight={"weight": c}))
    top = float((ls.xty[0].abs() / c[0]).max())
    s = {"l1": torch.from_numpy(np.geomspace(top, top * 1e-3, 20))}
    fast = solve(ls, spec, ls.init(), s, tol=tol)
    lmax = float(torch.linalg.eigvalsh(ls.gram)[-1])
    slow = solve(ls, spec, ls.init(), s, tol=1e-13, lipschitz=lmax, max_iter=10**5)
    assert bool(fast.converged.all()) and bool((fast.optimality <= tol).all())
    assert bool((fast.iterations <= 1).all())  # started at the answer
    ref = slow.params["weight"]
    err = (fast.params["weight"] - ref).abs().max()
    assert float(err) <= 1e-7 * float(ref.abs().max())


def test_wide_design_singular_gram_is_still_certified():
    """``n < p``: ``G_AA`` turns singular once ``|A|`` reaches ``n``; the homotopy stops
    there and the loop certifies (or reports) every model from the caller's start."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((20, 50))
    X -= X.mean(0)
    y = X[:, :3] @ np.array([2.0, -1.0, 1.0]) + 0.1 * rng.standard_normal(20)
    y -= y.mean()
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(y))
    top = float(ls.xty[0].abs().max())
    s = {"l1": torch.from_numpy(np.geomspace(top, top * 1e-4, 30))}
    sol = solve(ls, fr.Spec(l1=fr.L1()), ls.init(), s, tol=1e-10, max_iter=10**5)
    assert bool(sol.converged.all()) and bool((sol.optimality <= 1e-10).all())
    _, coefs, _ = lasso_path(X, y, alphas=s["l1"].numpy(), tol=1e-14, max_iter=10**6)
    big = s["l1"].numpy() > top * 1e-2  # unique solutions there: compare
    err = np.abs(sol.params["weight"][:, 0].numpy()[big] - coefs.T[big]).max()
    assert err <= 1e-6 * np.abs(coefs).max()


def test_natural_route_path_is_one_solve_started_at_the_answer():
    """``nn.Linear`` + MSE + intercept on diabetes: the whole grid is one solve, every model
    certified at its first test, equal to scikit-learn's ``lasso_path`` on centred data."""
    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = torch.nn.Linear(10, 1).double()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()

    def mse(params, X, y):
        r = torch.func.functional_call(net, params, (X,))[:, 0] - y
        return 0.5 * (r**2).mean()

    res = fr.path(net, mse, fr.Spec(l1=fr.L1("weight")), data=(Xt, yt), tol=1e-12)
    assert res.meta["chunks"] == [[0, 100]]
    assert bool(res.meta["converged"].all()) and bool((res.meta["iterations"] <= 1).all())
    lam = res.grid["l1"].numpy()
    _, coefs, _ = lasso_path(X - X.mean(0), y - y.mean(), alphas=lam, tol=1e-14, max_iter=10**6)
    W = res.stacked["weight"][:, 0].numpy()
    assert np.abs(W - coefs.T).max() <= 1e-6 * np.abs(coefs).max()  # sklearn's own accuracy
    b = res.stacked["bias"][:, 0].numpy()
    np.testing.assert_allclose(b, y.mean() - W @ X.mean(0), rtol=1e-12, atol=1e-12 * abs(y.mean()))


def test_larger_natural_route_path_is_one_solve_equal_to_sklearn():
    """Above the homotopy's whole-path size (100 features through ``nn.Linear`` + MSE +
    intercept) a plain ``L1`` path is still one batched solve, not warm chunks, and equals
    scikit-learn's ``lasso_path`` on centred data."""
    X, y = _ar1(300, 100, 0.5, seed=5)
    X, y = X + 2.0, y + 1.0
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = torch.nn.Linear(100, 1).double()

    def mse(params, X, y):
        r = torch.func.functional_call(net, params, (X,))[:, 0] - y
        return 0.5 * (r**2).mean()

    res = fr.path(net, mse, fr.Spec(l1=fr.L1("weight")), data=(Xt, yt), n=30, tol=1e-12)
    assert res.meta["chunks"] == [[0, 30]] and bool(res.meta["converged"].all())
    lam = res.grid["l1"].numpy()
    _, coefs, _ = lasso_path(X - X.mean(0), y - y.mean(), alphas=lam, tol=1e-14, max_iter=10**6)
    W = res.stacked["weight"][:, 0].numpy()
    assert np.abs(W - coefs.T).max() <= 1e-8 * np.abs(coefs).max()


class _Counting(Homotopy):
    """A homotopy that counts its kinks (joins and leaves)."""

    kinks = 0

    def _apply(self, kind: int, j: int) -> bool:
        self.kinks += 1
        return super()._apply(kind, j)


def test_walk_down_and_up_from_the_last_strength_equals_cold_walks_and_sklearn():
    """A warm walk from the previous strength, down or up — across kinks where a coordinate
    leaves the active set (at about 0.30, 0.24, 0.015 and 0.002 of ``λ_max`` on this
    design: checked below on scikit-learn's path) and above ``λ_max`` and back — gives the
    cold walk's solution from ``λ_max`` and scikit-learn's, for only the kinks in between;
    ``G`` is read by columns, only where a coordinate joins."""
    X, y = _ar1(150, 40, 0.9, seed=1)
    n = len(y)
    G, r = X.T @ X / n, X.T @ y / n
    top = np.abs(r).max()
    fine = np.geomspace(top, top * 1e-3, 400)
    _, path, _ = lasso_path(X, y, alphas=fine, tol=1e-13, max_iter=10**6)
    on = path != 0
    left = [fine[k] / top for k in range(1, len(fine)) if (on[:, k - 1] & ~on[:, k]).any()]
    assert len(left) >= 3  # the design has leaving kinks to cross
    read: list[int] = []

    def columns(idx: np.ndarray) -> np.ndarray:
        read.extend(idx.tolist())
        return G[idx]

    warm = _Counting(columns, r)
    steps = [0.5, 0.25, 0.35, 0.2, 0.01, 0.02, 0.001, 0.3, 2.0, 0.002, 0.0025]
    crossed, prev, prev_cold = 0, 1.0, 0
    for frac in steps:
        lam = frac * top
        before = warm.kinks
        w, done = warm.walk(np.array([lam]))
        cold = _Counting(lambda idx: G[idx], r)
        wc, dc = cold.walk(np.array([lam]))
        # the kinks between the two strengths, no more: those of one cold walk but not the
        # other (above λ_max: none, the state goes back to λ_max)
        assert warm.kinks - before == (0 if frac >= 1 else abs(cold.kinks - prev_cold))
        assert bool(done[0]) and bool(dc[0])
        scale = max(np.abs(wc).max(), 1e-300)
        np.testing.assert_allclose(w[0], wc[0], rtol=0, atol=1e-10 * scale)
        _, ref, _ = lasso_path(X, y, alphas=[lam], tol=1e-14, max_iter=10**6)
        np.testing.assert_allclose(w[0], ref[:, 0], rtol=0, atol=1e-6 * max(scale, 1.0))
        g = r - G @ w[0]  # the optimality conditions, to round-off
        act = w[0] != 0
        assert np.abs(g[act] - lam * np.sign(w[0][act])).max(initial=0) <= 1e-12 * top
        assert (np.abs(g[~act]) - lam).max(initial=-1) <= 1e-12 * top
        lo, hi = sorted((frac, min(prev, 1.0)))
        crossed += sum(lo < x < hi for x in left)
        prev, prev_cold = frac, cold.kinks
    assert crossed >= 4  # walked across leaving kinks, down and up
    assert len(read) < 3 * len(steps) * 40  # columns read only where a coordinate joins


def test_walk_visits_several_strengths_in_order_and_stops_on_a_singular_gram():
    """Several strengths in one walk equal :func:`lasso_path`'s; where ``G_AA`` turns
    singular the walk reports the strengths from there on as not done (``w`` zero) and goes
    back to ``λ_max``, so the next walk starts cold."""
    X, y = _ar1(150, 40, 0.9, seed=1)
    G, r = X.T @ X / 150, X.T @ y / 150
    top = np.abs(r).max()
    lam = np.geomspace(top * 0.9, top * 1e-3, 25)
    w, done = Homotopy(lambda idx: G[idx], r).walk(lam)
    ref, rdone = homotopy_path(torch.from_numpy(G), torch.from_numpy(r), torch.from_numpy(lam))
    assert bool(done.all()) and bool(rdone.all())
    np.testing.assert_allclose(w, ref.numpy(), rtol=0, atol=1e-12 * np.abs(w).max())
    # the 5th coordinate to join comes with a column that makes G_AA singular
    joined: list[int] = []

    def columns(idx: np.ndarray) -> np.ndarray:
        joined.extend(idx.tolist())
        if len(joined) == 5:
            return G[joined[:1]]  # the first column again: its Schur complement is <= 0
        return G[idx]

    h = Homotopy(columns, r)
    w, done = h.walk(lam)
    assert bool(done[0]) and not bool(done[-1]) and not bool(w[~done].any())
    np.testing.assert_allclose(w[done], ref.numpy()[done], rtol=0, atol=1e-12 * np.abs(w).max())
    assert h.lam == h.top and not h.active  # back at λ_max
    w2, done2 = h.walk(lam[-1:])
    assert bool(done2[0])
    np.testing.assert_allclose(w2[0], ref.numpy()[-1], rtol=0, atol=1e-12 * np.abs(w).max())


def test_seed_from_a_guess_is_exact_or_goes_back_to_the_top():
    """:meth:`Homotopy.seed`: from a neighbouring problem's support and signs (another
    subsample of the rows) the active-set rounds reach the exact solution, and the walk
    goes on from there as from a cold walk (the wrong sign everywhere at a tiny strength is
    repaired too); where the rounds fail (here ``G_AA`` is not positive definite) the state
    goes back to ``λ_max``."""
    X, y = _ar1(150, 40, 0.9, seed=1)
    G, r = X.T @ X / 150, X.T @ y / 150
    top = np.abs(r).max()
    Xs, ys = X[:120], y[:120]
    Gs, rs = Xs.T @ Xs / 120, Xs.T @ ys / 120
    lam = 0.05 * top
    (guess,), _ = Homotopy(lambda idx: Gs[idx], rs).walk(np.array([lam]))
    (ref,), _ = Homotopy(lambda idx: G[idx], r).walk(np.array([lam]))
    assert set(np.flatnonzero(guess)) != set(np.flatnonzero(ref))  # a guess to repair
    h = _Counting(lambda idx: G[idx], r)
    on = np.flatnonzero(guess)
    assert h.seed(lam, on, np.sign(guess[on]))
    assert h.kinks == 0 and h.lam == lam
    (w,), done = h.walk(np.array([lam]))
    assert bool(done[0])
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    (w2,), _ = h.walk(np.array([0.02 * top]))  # and on from there
    (ref2,), _ = Homotopy(lambda idx: G[idx], r).walk(np.array([0.02 * top]))
    np.testing.assert_allclose(w2, ref2, rtol=0, atol=1e-12 * np.abs(ref2).max())
    wrong = Homotopy(lambda idx: G[idx], r)  # the wrong sign everywhere: repaired
    assert wrong.seed(1e-4 * top, np.arange(40), -np.sign(r))
    (w3,), _ = wrong.walk(np.array([lam]))
    np.testing.assert_allclose(w3, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    G2 = G.copy()
    G2[5, 5] = -1.0
    bad = Homotopy(lambda idx: G2[idx], r)
    assert not bad.seed(lam, np.array([0, 5]), np.sign(r[[0, 5]]))
    assert bad.lam == bad.top and not bad.active


def test_jump_is_a_seed_from_the_current_state_or_leaves_it_as_it_was(monkeypatch):
    """:meth:`Homotopy.jump`: a long step by active-set rounds from the current support
    lands on the cold walk's solution; where the rounds fail (here: one round allowed for a
    step that needs more) the state is the one before, and walks go on from it."""
    X, y = _ar1(150, 40, 0.9, seed=1)
    G, r = X.T @ X / 150, X.T @ y / 150
    top = np.abs(r).max()
    h = _Counting(lambda idx: G[idx], r)
    h.walk(np.array([0.3 * top]))
    kinks = h.kinks
    assert h.jump(0.05 * top)
    assert h.kinks == kinks and h.lam == 0.05 * top  # no kink walked
    for lam in (0.05 * top, 0.02 * top):
        (w,), _ = h.walk(np.array([lam]))
        (ref,), _ = Homotopy(lambda idx: G[idx], r).walk(np.array([lam]))
        np.testing.assert_allclose(w, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    monkeypatch.setattr("funcreg._homotopy._SEED_ROUNDS", 1)
    before = (h.lam, h.active, h.k)
    assert not h.jump(0.001 * top)
    assert (h.lam, h.active, h.k) == before
    (w,), _ = h.walk(np.array([0.01 * top]))
    (ref,), _ = Homotopy(lambda idx: G[idx], r).walk(np.array([0.01 * top]))
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_seed_on_a_wide_design_stays_small_and_walks_on():
    """``p ≫ n``: another subsample's support is a poor guess, with thousands of violated
    coordinates after the first round; each round adds at most ``max(10, |A|)`` of them
    (the worst first) and the set never outgrows the rank bound, so a failed seed reads a
    few hundred columns, not thousands; the walk from ``λ_max`` then gives the solution."""
    rng = np.random.default_rng(7)
    n, p = 40, 2000
    X = rng.standard_normal((n, p))
    y = X[:, :5] @ rng.standard_normal(5) + 0.5 * rng.standard_normal(n)
    G, r = X.T @ X / n, X.T @ y / n
    top = np.abs(r).max()
    Xs, ys = X[:30], y[:30]
    Gs, rs = Xs.T @ Xs / 30, Xs.T @ ys / 30
    lam = 0.2 * top
    (guess,), _ = Homotopy(lambda idx: Gs[idx], rs).walk(np.array([lam]))
    on = np.flatnonzero(guess)
    read: list[int] = []

    def columns(idx: np.ndarray) -> np.ndarray:
        read.extend(idx.tolist())
        return G[idx]

    h = Homotopy(columns, r, rank=n)
    assert not h.seed(lam, on, np.sign(guess[on]))  # too far off here
    assert len(read) <= len(on) + 8 * n
    (w,), done = h.walk(np.array([lam]))
    (ref,), _ = Homotopy(lambda idx: G[idx], r).walk(np.array([lam]))
    assert bool(done[0])
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_walk_stops_where_the_active_set_outgrows_max_active():
    """``walk(max_active=m)``: every strength reached is the same exact point as the
    uncapped walk's, and the walk stops (``done`` false, ``w`` zero) at the kink where
    ``|A|`` would exceed ``m``."""
    X, y = _ar1(300, 60, 0.0, seed=3)
    n = len(y)
    G, r = X.T @ X / n, X.T @ y / n
    top = np.abs(r).max()
    lam = np.geomspace(top, top * 1e-3, 40)
    w_all, done_all = Homotopy(lambda idx: G[idx], r).walk(lam)
    h = Homotopy(lambda idx: G[idx], r)
    w, done = h.walk(lam, max_active=8)
    assert done_all.all() and done[0] and not done.all()
    stop = int(np.flatnonzero(~done)[0])
    assert not done[stop:].any() and (w[stop:] == 0).all()
    np.testing.assert_array_equal(w[:stop], w_all[:stop])
    assert h.k == 9 and (w[:stop] != 0).sum(1).max() <= 8


def test_large_path_starts_its_sparse_top_at_the_answer():
    """From ``PARTIAL_MIN`` coordinates a path's top is walked exactly up to ``PARTIAL_MAX``
    active coordinates: those strengths stop at the first test (iteration 1), the cold rows
    below start from the nearest exact solution, and every point equals scikit-learn's
    ``lasso_path`` (tol 1e-14) to 1e-8 of the largest coefficient."""
    from funcreg._homotopy import PARTIAL_MAX, PARTIAL_MIN

    X, y = _ar1(1100, PARTIAL_MIN + 8, 0.0, seed=4)
    n, p = X.shape
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(y))
    top = float(np.abs(X.T @ y).max() / n)
    lam = np.geomspace(top, top * 1e-3, 100)
    x0 = {"weight": torch.zeros(100, 1, p, dtype=DT)}
    sol = solve(ls, fr.Spec(l1=fr.L1()), x0, {"l1": torch.from_numpy(lam)}, tol=1e-12,
                max_iter=100_000, stacked=True)  # fmt: skip
    W = sol.params["weight"][:, 0].numpy()
    _, coefs, _ = lasso_path(X, y, alphas=lam, tol=1e-14, max_iter=10**6)
    assert bool(sol.converged.all())
    np.testing.assert_allclose(W, coefs.T, rtol=0, atol=1e-8 * np.abs(coefs).max())
    sparse = (coefs != 0).sum(0) < PARTIAL_MAX // 2  # well inside the walked top
    assert sparse.sum() >= 5 and bool((sol.iterations[torch.from_numpy(sparse)] == 1).all())
    assert int(sol.iterations.max()) > 1  # the rest was solved by the loop
