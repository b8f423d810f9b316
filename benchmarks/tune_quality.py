"""Tuning quality of ``fr.tune`` on data nobody here made (no timing: see ``tune.py``).

Three lasso problems: scikit-learn's ``load_diabetes`` and ``load_breast_cancer`` (the 0/1
label as the target), each split 70/30 into training and held-out rows (seeded permutation;
features standardised and the target centred with the training rows' statistics), and a
generated problem (``n = 200`` training and 2000 held-out rows, ``p = 1000`` Gaussian
features, 10 nonzero coefficients, unit noise). The 5 folds are ``fr.tune``'s (seed 0), given
to ``LassoCV`` as index pairs. Losses are scikit-learn's ``1/(2n)‖y − Xw‖²``.

For each problem:

- ``LassoCV(alphas=100)``: its grid's best mean CV loss and its held-out loss;
- ``fr.tune`` of the one strength by 5-fold CV (``optimizer="secant"``, started at the
  grid's median strength): its CV loss relative to the grid's best (target: within 1%)
  and its held-out loss;
- ``fr.tune`` of one strength per feature (``weights=["l1"]``, started at ``LassoCV``'s
  strength, ``adam(lr)`` for ``steps`` outer steps): its CV loss and held-out loss
  relative to ``LassoCV``'s (target: lower held-out loss than the single best strength).

Usage: ``python benchmarks/tune_quality.py`` (about a minute on one core).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

import funcreg as fr

D = torch.float64
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def real(name: str, seed: int = 0, held_out: float = 0.3) -> Split:
    from sklearn import datasets

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - held_out))
    tr, te = idx[:cut], idx[cut:]
    mu, sd, ym = X[tr].mean(0), X[tr].std(0), y[tr].mean()
    X, y = (X - mu) / sd, y - ym
    return X[tr], y[tr], X[te], y[te]


def generated(seed: int = 0, n: int = 200, p: int = 1000, n_test: int = 2000) -> Split:
    g = np.random.default_rng(seed)
    w = np.zeros(p)
    w[:10] = 2 * g.normal(size=10)
    X = g.normal(size=(n + n_test, p))
    y = X @ w + g.normal(size=n + n_test)
    return X[:n], y[:n], X[n:], y[n:]


def half_mse(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    return float(((X @ w - y) ** 2).mean() / 2)


def evaluate(name: str, data: Split, steps: int, lr: float) -> dict[str, float]:
    from sklearn.linear_model import LassoCV

    X, y, Xt, yt = data
    n, p = X.shape
    folds = fr.selection.fold_pairs(5, n, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LassoCV's convergence warnings at tiny alphas
        cv = LassoCV(alphas=100, cv=folds, fit_intercept=False, tol=1e-10).fit(X, y)
    grid_best = float(cv.mse_path_.mean(1).min()) / 2
    loss = fr.least_squares(torch.tensor(X), torch.tensor(y))
    init = {"weight": torch.zeros(1, p, dtype=D)}
    one = fr.tune(
        loss,
        {"l1": fr.L1()},
        init,
        {"l1": float(np.median(cv.alphas_))},
        folds=folds,
        optimizer="secant",
    )
    per_feature = fr.tune(
        loss,
        {"l1": fr.L1(weight=torch.ones(1, p, dtype=D))},
        init,
        {"l1": float(cv.alpha_)},
        folds=folds,
        terms=[],
        weights=["l1"],
        optimizer=fr.optim.adam(lr=lr),
        steps=steps,
        patience=steps,
    )
    single = half_mse(Xt, yt, cv.coef_)
    return {
        "name": name,
        "n": n,
        "p": p,
        "grid_best_cv": grid_best,
        "tune_cv_ratio": one.value / grid_best,
        "lassocv_held_out": single,
        "tune_held_out_ratio": half_mse(Xt, yt, one.params["weight"][0].numpy()) / single,
        "weighted_cv_ratio": per_feature.value / grid_best,
        "weighted_held_out_ratio": half_mse(Xt, yt, per_feature.params["weight"][0].numpy())
        / single,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    problems = {
        "diabetes": real("diabetes"),
        "breast_cancer": real("breast_cancer"),
        "generated p=1000": generated(),
    }
    print(
        "| problem | n × p | one strength: CV / grid best | held-out / LassoCV's "
        "| per-feature steps | CV / grid best | held-out / LassoCV's |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, data in problems.items():
        for steps in args.steps:
            r = evaluate(name, data, steps, args.lr)
            rows.append(r)
            print(
                f"| {name} | {r['n']} × {r['p']} | {r['tune_cv_ratio']:.4f} "
                f"| {r['tune_held_out_ratio']:.4f} | {steps} | {r['weighted_cv_ratio']:.4f} "
                f"| {r['weighted_held_out_ratio']:.4f} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
