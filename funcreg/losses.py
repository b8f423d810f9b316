"""Losses with structure the exact solvers use.

:class:`LeastSquares` (made by :func:`least_squares`) is the loss of a linear model that
keeps ``XᵀX/n`` and ``XᵀY/n``: :func:`funcreg.solvers.solve` recognises it and takes its
Gram fast path (and, for a plain Lasso, the lean fixed-step loop of :mod:`funcreg._lasso`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import torch
from torch import Tensor

from ._tree import Params

__all__ = ["LeastSquares", "least_squares"]


class LeastSquares:
    """The loss ``1/(2n) ‖Y − X Wᵀ − 1 bᵀ‖²_F`` of a linear model, a pure function of
    ``params = {"weight": W (m, p), "bias": b (m,)}`` — the names and shapes of
    ``nn.Linear(p, m)``, so the default selector :func:`~funcreg.weights` penalises
    ``weight`` and not ``bias``. ``y`` of shape ``(n,)`` means ``m = 1``; without
    ``fit_intercept`` there is no ``bias``.

    Conversions (data term ``1/(2n)‖y − Xw‖²``):

    * ``L1`` at strength ``α`` = ``sklearn.linear_model.Lasso(alpha=α)``;
    * ``ElasticNet(l1_ratio=r)`` at ``α`` = ``sklearn`` ``ElasticNet(alpha=α, l1_ratio=r)``;
    * ``L2`` at ``λ`` = ``Ridge(alpha=n·λ)``: Ridge minimises ``‖y − Xw‖² + a‖w‖²``, which
      is ``2n ×`` ``1/(2n)‖y − Xw‖² + (a/n)·½‖w‖²``. (On the data term ``½‖y − Xw‖²``,
      ``Ridge(alpha=a)`` is ``L2`` at ``a``.)

    Call it like any loss (``obj(params)``; it works under ``grad``/``vmap``). :func:`solve`
    recognises it and uses ``gram = XᵀX/n`` and ``xty = (XᵀY/n)ᵀ`` instead of ``X``.
    """

    def __init__(self, X: Tensor, y: Tensor, fit_intercept: bool = False) -> None:
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                f"least_squares(X, y): X and y must be tensors, got {type(X).__name__} "
                f"and {type(y).__name__}; use torch.as_tensor"
            )
        if X.dim() != 2 or not X.is_floating_point():
            raise ValueError(
                f"least_squares: X must be a floating (n, p) matrix, got {X.dtype} "
                f"of shape {tuple(X.shape)}"
            )
        if y.dim() not in (1, 2) or y.shape[0] != X.shape[0]:
            raise ValueError(
                f"least_squares: y must be (n,) or (n, m) with n = {X.shape[0]} like X, "
                f"got shape {tuple(y.shape)}"
            )
        X = X.detach()
        Y = (y.detach() if y.dim() == 2 else y.detach()[:, None]).to(X.dtype)
        n = X.shape[0]
        self.X, self.Y, self.n = X, Y, n
        self.fit_intercept = bool(fit_intercept)
        self.xty = (X.T @ Y / n).T.contiguous()  # (m, p)
        self.x_mean = X.mean(0)  # (p,)
        self.y_mean = Y.mean(0)  # (m,)
        self.const = 0.5 * Y.square().sum() / n
        # NaN/inf anywhere in X or y shows up in these (one pass less than isfinite(X))
        if not bool(torch.isfinite(X.square().sum(0)).all()):
            raise ValueError("least_squares: X contains NaN or inf; clean the data first")
        if not bool(torch.isfinite(self.const)) or not bool(torch.isfinite(self.xty).all()):
            raise ValueError("least_squares: y contains NaN or inf; clean the data first")

    @cached_property
    def gram(self) -> Tensor:
        """``XᵀX/n`` ``(p, p)``, formed on first use: a route that reads only some columns
        of ``X`` (the working sets of :func:`funcreg.tune`) never pays for it."""
        with torch.inference_mode(False):  # first use under inference_mode: a normal tensor
            X = self.X
            dense = X.is_contiguous() or X.T.is_contiguous()
            if dense and X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64):
                # numpy's BLAS forms XᵀX by its symmetric rank-k update (syrk): half the
                # flops of torch's general product (measured 42 against 63 ms at n = 2000,
                # p = 1000, one thread), and exactly symmetric; a strided X is slower there
                Xn = X.numpy()
                return torch.from_numpy(Xn.T @ Xn).div_(self.n)
            return X.T @ X / self.n

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The parameter shapes: ``weight (m, p)`` and, with an intercept, ``bias (m,)``."""
        m, p = self.Y.shape[1], self.X.shape[1]
        out: dict[str, tuple[int, ...]] = {"weight": (m, p)}
        if self.fit_intercept:
            out["bias"] = (m,)
        return out

    def init(self) -> Params:
        """Zero parameters of the right shapes and dtype, a starting point for :func:`solve`."""
        return {k: self.X.new_zeros(s) for k, s in self.shapes.items()}

    def __call__(self, params: Mapping[str, Tensor]) -> Tensor:
        pred = params["weight"] @ self.X.T  # (m, n)
        if self.fit_intercept:
            pred = pred + params["bias"][:, None]
        return 0.5 * (self.Y.T - pred).square().sum() / self.n

    def hessian_apply(self, theta: Mapping[str, Tensor]) -> Params:
        """``A θ`` on stacked params ``(k, ...)``, where ``∇f(θ) = A θ − B``:
        ``W G + b μᵀ`` and ``W μ + b`` (``G = XᵀX/n``, ``μ`` the column means of ``X``)."""
        W = theta["weight"]
        out = {"weight": W @ self.gram}
        if self.fit_intercept:
            b = theta["bias"]
            out["weight"] = out["weight"] + b[..., None] * self.x_mean
            out["bias"] = W @ self.x_mean + b
        return out

    def linear_term(self) -> Params:
        """``B`` in ``∇f(θ) = A θ − B``: ``(XᵀY/n)ᵀ`` and the mean of ``Y``."""
        out = {"weight": self.xty}
        if self.fit_intercept:
            out["bias"] = self.y_mean
        return out


def least_squares(X: Tensor, y: Tensor, *, fit_intercept: bool = False) -> LeastSquares:
    """The loss ``1/(2n)‖y − X Wᵀ − b‖²`` of ``nn.Linear(p, m)``-shaped params, with a Gram
    fast path in :func:`solve` (see :class:`LeastSquares` for the conventions).

    >>> ls = fr.solvers.least_squares(X, y)
    >>> sol = fr.solvers.solve(ls, fr.Spec(l1=fr.L1()), ls.init(), {"l1": alphas})
    >>> sol.params["weight"][:, 0]     # (K, p): sklearn Lasso(alpha=alphas[k]).coef_
    """
    return LeastSquares(X, y, fit_intercept=fit_intercept)
