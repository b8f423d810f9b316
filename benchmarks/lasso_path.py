"""Lasso paths: funcreg's vmapped ``solve`` against ``sklearn.linear_model.lasso_path``.

For each design, 100 strengths on a geometric grid from ``alpha_max`` (all-zero solution)
down to ``1e-3 · alpha_max``, data term ``1/(2n)‖y − Xw‖²``, no intercept (data centred).
Both sides get the same float64 data and one thread (``torch.set_num_threads(1)`` and
``threadpoolctl`` for numpy's BLAS); times are CPU seconds (``time.process_time``), median
of ``--repeats`` runs interleaved across methods, and include building the Gram matrix
(``lasso_path`` builds its own: ``precompute='auto'`` uses it when ``n > p``).

Accuracy is the max over the grid of the relative objective gap ``(F − F*)/F*`` against a
reference ``F*``: per strength, the lower of ``lasso_path(tol=1e-14)`` and funcreg's
``solve(tol=1e-13)``. The summary pairs each sklearn run with the fastest funcreg run that
is at least as accurate.

funcreg takes its lean Lasso loop here (fixed step ``1/λ_max``, convergence tested every
10th iteration; see ``funcreg.solvers``). Measured figures and what was tried: see
``benchmarks/README.md``.

    python benchmarks/lasso_path.py            # n = 2000; p = 200, 200 (AR(1) 0.9), 1000
    python benchmarks/lasso_path.py --quick    # CI size
    python benchmarks/lasso_path.py --real     # scikit-learn's datasets, the user's route
    python benchmarks/lasso_path.py --logistic # only --real's L1 logistic path rows

``--real`` times the route a user takes (an ``nn.Linear`` model, an MSE loss through
``functional_call``, an unpenalized intercept, funcreg's defaults) on ``load_diabetes``:
``fr.path`` vs ``lasso_path`` (same 100 strengths, data centred for sklearn) and 5-fold
``fr.cross_validate`` vs ``LassoCV`` (same folds and strengths); and an L1 logistic path of
10 values of ``C`` on ``load_breast_cancer`` (standardized) by the same route (an
``nn.Linear`` model with an unpenalized intercept, a BCE-with-logits loss, ``fr.path`` over
the strengths ``1/(n·C)`` of ``fr.from_sklearn_logistic``, defaults) vs 10
``LogisticRegression(solver="liblinear")`` fits (which penalize their intercept: each
side's gap is against its own problem), the same ``nn.Linear`` route on the wide generated
design (:func:`wide_route`), then the three generated designs above. Each
row gives the wall-clock median of interleaved runs and the max relative objective gap
against a tight reference, so that ratios are read at equal accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from sklearn.linear_model import lasso_path
from threadpoolctl import threadpool_limits

import funcreg as fr
from funcreg.solvers import least_squares, solve

SPEC = fr.Spec(l1=fr.L1())


def design(n: int, p: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian rows, AR(1) correlation ``rho`` between neighbouring features, a 10%-sparse
    truth and unit noise; centred."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, p))
    X = np.empty_like(Z)
    X[:, 0] = Z[:, 0]
    for j in range(1, p):
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * Z[:, j]
    w = np.zeros(p)
    support = rng.choice(p, max(1, p // 10), replace=False)
    w[support] = rng.standard_normal(support.size)
    y = X @ w + rng.standard_normal(n)
    return X - X.mean(0), y - y.mean()


def objective(X: np.ndarray, y: np.ndarray, W: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Lasso objective per column of ``W`` (p, K)."""
    R = y[:, None] - X @ W
    return (R**2).sum(0) / (2 * len(y)) + alphas * np.abs(W).sum(0)


def run_sklearn(X: np.ndarray, y: np.ndarray, alphas: np.ndarray, tol: float) -> np.ndarray:
    _, coefs, _ = lasso_path(X, y, alphas=alphas, tol=tol, max_iter=100_000)
    return coefs  # (p, K), in the order of alphas


def run_funcreg(
    X: np.ndarray, y: np.ndarray, alphas: np.ndarray, tol: float, chunks: int = 1
) -> np.ndarray:
    """All strengths in one vmapped call (``chunks=1``), or in ``chunks`` consecutive
    calls down the grid, each warm-started from the previous chunk's last solution."""
    ls = least_squares(torch.from_numpy(X), torch.from_numpy(y))
    grid = torch.from_numpy(alphas)
    start = ls.init()
    parts = []
    for block in torch.tensor_split(grid, chunks):
        K = block.shape[0]
        stacked = {k: v.expand(K, *v.shape[-2:]).clone() for k, v in start.items()}
        sol = solve(ls, SPEC, stacked, {"l1": block}, tol=tol, max_iter=100_000, stacked=True)
        parts.append(sol.params["weight"][:, 0])
        start = {"weight": sol.params["weight"][-1:]}
    return torch.cat(parts).numpy().T


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def main(quick: bool = False, repeats: int = 5, seed: int = 0) -> list[dict]:
    torch.set_num_threads(1)
    if quick:
        cases = [("gaussian", 300, 30, 0.0), ("ar1-0.9", 300, 30, 0.9), ("wide", 300, 100, 0.0)]
        repeats = min(repeats, 2)
    else:
        cases = [
            ("gaussian", 2000, 200, 0.0),
            ("ar1-0.9", 2000, 200, 0.9),
            ("wide", 2000, 1000, 0.0),
        ]
    methods: list[tuple[str, float, Callable]] = []
    for tol in (1e-4, 1e-6):
        methods.append((f"sklearn tol={tol:g}", tol, run_sklearn))
    # half-decade tolerances: the summary pairs each sklearn run with the fastest funcreg run
    # at least as accurate, so a coarse list would overstate the time equal accuracy needs
    full_tols = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
    for tol in (1e-4, 1e-6) if quick else full_tols:
        methods.append((f"funcreg tol={tol:g}", tol, run_funcreg))
    for tol in () if quick else (1e-5, 1e-6):
        methods.append((f"funcreg 4 warm chunks tol={tol:g}", tol, _chunked(4)))
    rows = []
    with threadpool_limits(1):
        for name, n, p, rho in cases:
            X, y = design(n, p, rho, seed)
            amax = np.abs(X.T @ y).max() / n
            alphas = amax * np.geomspace(1, 1e-3, 100)
            ref = np.minimum(
                objective(X, y, run_sklearn(X, y, alphas, 1e-14), alphas),
                objective(X, y, run_funcreg(X, y, alphas, 1e-13), alphas),
            )
            times: dict[str, list[float]] = {m[0]: [] for m in methods}
            gaps: dict[str, float] = {}
            for _ in range(repeats):  # interleaved: one run of each method per round
                for label, tol, fn in methods:
                    dt, W = timed(partial(fn, X, y, alphas, tol))
                    times[label].append(dt)
                    gaps[label] = float(((objective(X, y, W, alphas) - ref) / ref).max())
            for label, _, _ in methods:
                rows.append(
                    {
                        "design": f"{name} n={n} p={p}",
                        "method": label,
                        "seconds": statistics.median(times[label]),
                        "gap": max(gaps[label], 0.0),
                    }
                )
    print_table(rows)
    return rows


def _chunked(chunks: int) -> Callable:
    def run(X: np.ndarray, y: np.ndarray, alphas: np.ndarray, tol: float) -> np.ndarray:
        return run_funcreg(X, y, alphas, tol, chunks=chunks)

    return run


def print_table(rows: list[dict]) -> None:
    print(f"threads: torch {torch.get_num_threads()}, BLAS 1 (threadpoolctl); CPU seconds")
    print(f"{'design':<22} {'method':<34} {'seconds':>8} {'max rel gap':>12}")
    for r in rows:
        print(f"{r['design']:<22} {r['method']:<34} {r['seconds']:8.4f} {r['gap']:12.1e}")
    print("\nsummary: fastest funcreg run at least as accurate as each sklearn run")
    for d in dict.fromkeys(r["design"] for r in rows):
        mine = [r for r in rows if r["design"] == d]
        for sk in (r for r in mine if r["method"].startswith("sklearn")):
            ok = [
                r
                for r in mine
                if r["method"].startswith("funcreg") and r["gap"] <= max(sk["gap"], 1e-15)
            ]
            if not ok:
                print(f"{d:<22} vs {sk['method']:<18} no funcreg run reached {sk['gap']:.1e}")
                continue
            best = min(ok, key=lambda r: r["seconds"])
            print(
                f"{d:<22} vs {sk['method']:<18} (gap {sk['gap']:.1e}): {best['method']} "
                f"gap {best['gap']:.1e}, time ratio funcreg/sklearn "
                f"{best['seconds'] / sk['seconds']:.2f}"
            )


# ------------------------------------------------------------------------------ --real


def _linear(p: int) -> torch.nn.Linear:
    net = torch.nn.Linear(p, 1).double()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
    return net


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def real(repeats: int = 7) -> list[dict]:
    """The ``--real`` rows (module docstring)."""
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LassoCV
    from sklearn.model_selection import KFold

    torch.set_num_threads(1)
    rows: list[tuple] = []
    X, y = load_diabetes(return_X_y=True)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = _linear(X.shape[1])

    def mse(params: dict, X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None):
        r = torch.func.functional_call(net, params, (X,))[:, 0] - y
        if weight is None:
            return 0.5 * (r**2).mean()
        return 0.5 * (weight * r**2).sum() / weight.sum()

    spec = fr.Spec(l1=fr.L1("weight"))
    grid = fr.path(net, mse, spec, data=(Xt, yt)).grid["l1"].numpy()
    Xc, yc = X - X.mean(0), y - y.mean()
    ref = objective(Xc, yc, run_sklearn(Xc, yc, grid, 1e-14), grid)
    split = list(KFold(5).split(X))
    with threadpool_limits(1):
        for _ in range(2):  # interleaved rounds, the first one warms up
            t_fr, res = _median_time(lambda: fr.path(net, mse, spec, data=(Xt, yt)), repeats)
            t_sk, coefs = _median_time(lambda: run_sklearn(Xc, yc, grid, 1e-4), repeats)
            t_cv, cv = _median_time(
                lambda: fr.cross_validate(net, mse, spec, grid, (Xt, yt), folds=split), repeats
            )
            t_skcv, skcv = _median_time(lambda: LassoCV(cv=split, alphas=grid).fit(X, y), repeats)
    W = res.stacked["weight"][:, 0].numpy().T  # type: ignore[attr-defined]
    gap_fr = float(((objective(Xc, yc, W, grid) - ref) / ref).max())
    gap_sk = float(((objective(Xc, yc, coefs, grid) - ref) / ref).max())  # type: ignore[arg-type]
    rows.append(("diabetes fr.path vs lasso_path", t_fr, t_sk, gap_fr, gap_sk))
    same = cv.strength_min == skcv.alpha_  # type: ignore[attr-defined]
    rows.append(("diabetes 5-fold cross_validate vs LassoCV", t_cv, t_skcv, float(same), 1.0))

    rows += logistic(repeats)
    rows.append(wide_route(min(repeats, 3)))
    _print_rows(rows)
    return [
        dict(zip(("task", "funcreg_s", "sklearn_s", "gap_fr", "gap_sk"), r, strict=False))
        for r in rows
    ]


def wide_route(repeats: int = 3) -> tuple:
    """The user's route on the wide generated design (n = 2000, p = 1000, not centred): an
    ``nn.Linear`` with an intercept and ``F.mse_loss`` through ``functional_call``,
    ``fr.path`` on ``lasso_path``'s 100 strengths (doubled: ``mse_loss`` is twice the
    ``1/(2n)`` data term) vs ``lasso_path`` on the centred data at its default ``tol``."""
    X, y = design(2000, 1000, 0.0, 0)
    X, y = X + 3.0, y + 1.0
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    net = _linear(X.shape[1])

    def mse(params: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(net, params, (X,))[:, 0]
        return torch.nn.functional.mse_loss(out, y)

    spec = fr.Spec(l1=fr.L1("weight"))
    Xc, yc = X - X.mean(0), y - y.mean()
    grid = np.abs(Xc.T @ yc).max() / len(y) * np.geomspace(1, 1e-3, 100)
    ref = objective(Xc, yc, run_sklearn(Xc, yc, grid, 1e-14), grid)
    strengths = torch.from_numpy(2 * grid)
    with threadpool_limits(1):
        for _ in range(2):  # interleaved rounds, the first one warms up
            t_fr, res = _median_time(
                lambda: fr.path(net, mse, spec, data=(Xt, yt), strengths=strengths), repeats
            )
            t_sk, coefs = _median_time(lambda: run_sklearn(Xc, yc, grid, 1e-4), repeats)
    W = res.stacked["weight"][:, 0].numpy().T  # type: ignore[attr-defined]
    gap_fr = float(((objective(Xc, yc, W, grid) - ref) / ref).max())
    gap_sk = float(((objective(Xc, yc, coefs, grid) - ref) / ref).max())  # type: ignore[arg-type]
    return ("wide p=1000 nn.Linear fr.path vs lasso_path", t_fr, t_sk, gap_fr, gap_sk)


def logistic(repeats: int = 7) -> list[tuple]:
    """The L1 logistic rows of ``--real`` (module docstring); ``--logistic`` runs them alone."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(1)
    rows: list[tuple] = []
    Xb, yb = load_breast_cancer(return_X_y=True)
    Xb = (Xb - Xb.mean(0)) / Xb.std(0)
    n = len(yb)
    Cs = np.geomspace(1.0, 0.01, 10)
    Xbt, ybt = torch.from_numpy(Xb), torch.from_numpy(yb).double()
    logit_net = _linear(Xb.shape[1])

    def bce(params: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(logit_net, params, (X,))[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y)

    spec_b, s = fr.solvers.from_sklearn_logistic(torch.from_numpy(Cs.copy()), n, "l1", "weight")

    def ours(tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
        res = fr.path(logit_net, bce, spec_b, data=(Xbt, ybt), strengths=s["l1"], tol=tol)
        # the path is ordered by strength, largest first: the order of Cs reversed
        return res.stacked["weight"][:, 0].numpy()[::-1], res.stacked["bias"][:, 0].numpy()[::-1]

    def liblinear(tol: float = 1e-4, scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        fits = [
            LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", tol=tol, max_iter=10**5,
                               intercept_scaling=scaling).fit(Xb, yb)
            for C in Cs
        ]  # fmt: skip
        return np.stack([m.coef_[0] for m in fits]), np.array([m.intercept_[0] for m in fits])

    def logobj(wb: tuple[np.ndarray, np.ndarray], intercept_penalty: float = 0.0) -> np.ndarray:
        W, b = wb
        ypm = 2 * yb - 1
        data = np.logaddexp(0, -ypm[None] * (W @ Xb.T + b[:, None])).mean(1)
        return data + (np.abs(W).sum(1) + intercept_penalty * np.abs(b)) / (n * Cs)

    # funcreg's problem leaves the intercept unpenalised; liblinear's penalises it (its
    # intercept_scaling=1 default): each side's gap is against a tight solution of its own
    # problem (funcreg's: the lower of a tol=1e-13 path and liblinear with the intercept's
    # penalty scaled down 1e4 times, tol=1e-12)
    ref_fr = np.minimum(logobj(liblinear(1e-12, 1e4)), logobj(ours(1e-13)))
    ref_sk = logobj(liblinear(1e-12), 1.0)
    looser = (1e-4, 3e-4, 1e-3)  # for the fastest funcreg run at least as accurate
    with threadpool_limits(1):
        for _ in range(2):
            t_fr, Wf = _median_time(ours, repeats)
            t_sk, Ws = _median_time(liblinear, repeats)
            ladder = [_median_time(partial(ours, t), repeats) for t in looser]
    gap_fr = float(((logobj(Wf) - ref_fr) / ref_fr).max())  # type: ignore[arg-type]
    gap_sk = float(((logobj(Ws, 1.0) - ref_sk) / ref_sk).max())  # type: ignore[arg-type]
    rows.append(("breast cancer L1 logistic path, 10 C vs liblinear", t_fr, t_sk, gap_fr, gap_sk))
    for tol, (t_lo, Wl) in zip(looser, ladder, strict=True):
        gap_lo = float(((logobj(Wl) - ref_fr) / ref_fr).max())  # type: ignore[arg-type]
        rows.append((f"  the same, funcreg at tol={tol:g}", t_lo, t_sk, gap_lo, gap_sk))
    return rows


def _print_rows(rows: list[tuple]) -> None:
    print(f"threads: torch {torch.get_num_threads()}, BLAS 1 (threadpoolctl); wall seconds")
    print(f"{'task':<46} {'funcreg':>9} {'sklearn':>9} {'ratio':>6} {'gap fr':>8} {'gap sk':>8}")
    for task, a, b, ga, gb in rows:
        extra = (
            f"{ga:8.1e} {gb:8.1e}"
            if "cross" not in task
            else f"{'same choice' if ga else 'DIFFERENT'}"
        )
        print(f"{task:<46} {a:9.4f} {b:9.4f} {a / b:6.2f} {extra}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CI-size problems")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="sklearn datasets, the user's route")
    parser.add_argument("--logistic", action="store_true", help="only --real's L1 logistic rows")
    args = parser.parse_args()
    if args.logistic:
        _print_rows(logistic(repeats=args.repeats))
        raise SystemExit
    if args.real:
        real(repeats=args.repeats)
    main(quick=args.quick, repeats=args.repeats, seed=args.seed)
