"""One lasso strength per feature, tuned by gradient, against ``LassoCV``'s best single one.

The features' scales span 1.5 decades and are not standardised (raw units), so the true
coefficients do too: a feature measured in small units has a large coefficient. One strength
penalises every coefficient alike: it must choose between killing the noise and shrinking
the large coefficients of the small-scale true features. A weighted lasso,
``s Σ_i c_i |w_i|``, can do all three, but ``p`` strengths are far beyond any grid.
``fr.tune`` takes the hypergradient of the 5-fold CV loss with respect to every ``log c_i``
(implicit differentiation of the lasso solution, restricted to its support) and descends it
with Adam. Both models use the same training data (CV and refit); the held-out loss is on
fresh data.

    python examples/tune_weighted_lasso.py            # n = 200, p = 30
    python examples/tune_weighted_lasso.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import funcreg as fr

D = torch.float64


def make_data(n: int, p: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Gaussian features whose scales span 1.5 decades (sd ``10^u``, ``u ∈ [−1, 0.5]``), not
    standardised; 8 informative ones, each contributing a signal of sd 1 to 2 (so the
    coefficient of a small-scale feature is large); noise sd 1. A training set of ``n``
    samples and a test set of ``4n``."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (1.5 * torch.rand(p, dtype=D, generator=g) - 1)
    w = torch.zeros(p, dtype=D)
    w[:8] = torch.tensor([2.0, -1.5, 1.5, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=D) / scale[:8]
    X = torch.randn(5 * n, p, dtype=D, generator=g) * scale
    y = X @ w + torch.randn(5 * n, dtype=D, generator=g)
    return X[:n], y[:n], X[n:], y[n:]


def half_mse(params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """scikit-learn's lasso data term ``1/(2n)‖y − Xw‖²`` (so strength = ``alpha``)."""
    return 0.5 * ((X @ params["w"] - y) ** 2).mean()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--p", type=int, default=30)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="n=100, p=20, 25 outer steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.p, args.steps = 100, 20, 25
    from sklearn.linear_model import LassoCV

    X, y, Xt, yt = make_data(args.n, args.p, args.seed)
    folds = fr.selection.fold_pairs(5, args.n, args.seed)

    t0 = time.perf_counter()
    cv = LassoCV(alphas=100, cv=folds, fit_intercept=False, tol=1e-8).fit(X.numpy(), y.numpy())
    t_cv = time.perf_counter() - t0
    single = float(((Xt.numpy() @ cv.coef_ - yt.numpy()) ** 2).mean() / 2)

    # per-feature factors c_i (start: all 1, at LassoCV's strength), tuned by 5-fold CV
    # (fr.least_squares: each fold's inner solve takes the Gram fast path)
    spec = {"l1": fr.L1(weight=torch.ones(1, args.p, dtype=D))}
    t0 = time.perf_counter()
    r = fr.tune(
        fr.least_squares(X, y),
        spec,
        {"weight": torch.zeros(1, args.p, dtype=D)},
        {"l1": float(cv.alpha_)},
        folds=folds,
        terms=[],
        weights=["l1"],
        optimizer=fr.optim.adam(lr=0.2),
        steps=args.steps,
        patience=args.steps,
    )
    t_tune = time.perf_counter() - t0
    weighted = float(half_mse({"w": r.params["weight"][0]}, Xt, yt))

    c = r.weights["l1"][0]
    print(f"n = {args.n}, p = {args.p}; held-out loss 1/(2n)‖y − Xw‖² on {len(yt)} samples")
    print(f"  LassoCV, one strength (alpha = {cv.alpha_:.4g}):  {single:.4f}  ({t_cv:.2f} s)")
    print(
        f"  fr.tune, {args.p} strengths ({len(r.history['value'])} steps):  "
        f"{weighted:.4f}  ({t_tune:.2f} s)"
    )
    print(
        f"  CV loss: LassoCV grid best {cv.mse_path_.mean(1).min() / 2:.4f}, fr.tune {r.value:.4f}"
    )
    print(f"  tuned factors, true features: {[round(float(v), 2) for v in c[:8]]}")
    print(f"  tuned factors, null features: median {float(c[8:].median()):.2f}")
    print(
        f"  nonzeros: LassoCV {int((cv.coef_ != 0).sum())}, "
        f"weighted {int((r.params['weight'] != 0).sum())} (truth 8)"
    )
    return {
        "single": single,
        "weighted": weighted,
        "cv_single": float(cv.mse_path_.mean(1).min()) / 2,
        "cv_weighted": r.value,
        "result": r,
    }


if __name__ == "__main__":
    main()
