"""A penalty written only here (a test-only weighted L1, "Twice": Ω(w) = 2 Σ|w|) works through
solve, strength_max, path and cross_validate with no edit elsewhere: what those need to know
about a penalty (its prox, whether the prox is coordinatewise, its zero threshold) lives in
the penalty class."""

from __future__ import annotations

from typing import ClassVar

import torch
from sklearn.linear_model import Lasso
from torch import Tensor

import funcreg as fr
from funcreg import prox as P
from funcreg.penalties import Penalty, register_penalty

DT = torch.float64


@register_penalty
class Twice(Penalty):
    """``Ω(w) = 2 Σ|w|``: an L1 at twice the strength, written from scratch."""

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return 2 * d.abs().sum()

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.soft_threshold(d, 2 * t)

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        return float(grad.abs().max()) / 2


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 6, generator=g, dtype=DT)
    y = X[:, 0] * 3 - X[:, 2] * 2 + 0.1 * torch.randn(80, generator=g, dtype=DT)
    return X, y


def loss(p: dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((X @ p["w"] - y) ** 2).mean()


def test_a_penalty_defined_outside_the_package_works_everywhere():
    X, y = _data()
    spec = fr.Spec(t=Twice("w"))
    params = {"w": torch.zeros(6, dtype=DT)}
    # solve: the minimiser of loss + s·2Σ|w| is scikit-learn's Lasso at alpha = 2s
    sol = fr.solve(loss, spec, params, {"t": 0.05}, X, y, tol=1e-10)
    ref = Lasso(alpha=0.1, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(X, y).coef_
    torch.testing.assert_close(sol.params["w"][0], torch.from_numpy(ref), atol=1e-6, rtol=0)
    # strength_max: half of L1's (scikit-learn's alpha_max = max|Xᵀy|/n)
    top = fr.strength_max(loss, spec, "t", params, X, y)
    assert abs(top - float((X.T @ y).abs().max()) / 80 / 2) <= 1e-12 * top
    # path: its top model is exactly zero, the last is dense
    r = fr.path(params, loss, spec, data=(X, y), n=5)
    assert bool((r.stacked["w"][0] == 0).all()) and bool((r.stacked["w"][-1] != 0).all())
    # cross_validate: a grid of strengths, fold scores for each
    cv = fr.cross_validate(params, loss, spec, [0.3, 0.03, 0.003], (X, y), folds=3)
    assert cv.K == 3 and bool(torch.isfinite(cv.mean).all())
    assert cv.strength_min == 0.003  # the least penalised fits this nearly noiseless truth best
