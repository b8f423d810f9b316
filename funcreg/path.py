"""Regularization paths: the largest useful strength and geometric grids below it.

``strength_max`` is the smallest strength at which zero is stationary for the selected
parameters: above it, (proximal) training leaves them exactly at zero. From the gradient
``g`` of the data loss at ``w_selected = 0``:

* ``L1``: ``max_i |g_i| / c_i``;  ``ElasticNet(r)``: ``max_i |g_i| / (r c_i)``
* ``GroupLasso``: ``max_g ‖g_g‖₂ / (√|g| c_g)``
* ``SparseGroupLasso(r)``: the smallest ``λ`` with ``‖soft(g_g, λ r c)‖₂ ≤ λ (1 − r) √|g| c_g``
  for every group (found by bisection)

This is exact for convex losses that are linear in the selected parameters' effect (lasso,
elastic net, group lasso on linear and generalised linear models) when the *other*
parameters (e.g. an intercept) are at their optimum given ``w_selected = 0`` — pass them so
(for least squares with an intercept: ``b = mean(y)``), as scikit-learn does by centring.
For networks it is the standard heuristic (LassoNet, glmnet-style grids): zero is a
stationary point of the first-order conditions at the given other parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from .penalties import L1, ElasticNet, GroupLasso, Penalty, SparseGroupLasso, _as_dims
from .spec import Spec, as_spec


def _sgl_group_max(gg: Tensor, r: float, root: float, c: float) -> float:
    """Smallest λ with ‖soft(g, λ r c)‖ ≤ λ (1 − r) root c, by bisection on λ."""
    if r >= 1.0:
        return float(gg.abs().max()) / c
    if r <= 0.0:
        return float(gg.norm()) / (root * c)
    hi = float(gg.abs().max()) / (r * c) + float(gg.norm()) / ((1 - r) * root * c) + 1e-300
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lhs = float(torch.clamp(gg.abs() - mid * r * c, min=0).norm())
        if lhs <= mid * (1 - r) * root * c:
            hi = mid
        else:
            lo = mid
    return hi


def _term_max(pen: Penalty, name: str, g: Tensor) -> float:
    c = pen.factor(name)
    if isinstance(pen, SparseGroupLasso):
        dims = _as_dims(pen.dim, g.dim())
        size = math.prod(g.shape[d] for d in dims)
        cg = torch.ones(()) if c is None else c.to(g.dtype)
        groups = g.movedim(dims, tuple(range(len(dims)))).reshape(size, -1)
        cflat = torch.broadcast_to(cg, pen._factor_shape(g)).reshape(-1)
        best = 0.0
        for j in range(groups.shape[1]):
            if float(cflat[j]) == 0.0:
                continue
            gmax = _sgl_group_max(groups[:, j], pen.l1_ratio, math.sqrt(size), float(cflat[j]))
            best = max(best, gmax)
        return best
    if isinstance(pen, GroupLasso):
        dims = _as_dims(pen.dim, g.dim())
        size = math.prod(g.shape[d] for d in dims)
        norms = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        scale = math.sqrt(size) * (1.0 if c is None else c.to(g.dtype))
        return float(_safe_div(norms, scale).max())
    if isinstance(pen, (L1, ElasticNet)):
        r = pen.l1_ratio if isinstance(pen, ElasticNet) else 1.0
        if r == 0:
            raise ValueError("strength_max: ElasticNet with l1_ratio=0 is ridge: no sparsity")
        scale = r * (1.0 if c is None else c.to(g.dtype))
        return float(_safe_div(g.abs(), scale).max())
    raise AssertionError(type(pen))  # unreachable: strength_max checks the type


def _safe_div(num: Tensor, den: Tensor | float) -> Tensor:
    den_t = torch.as_tensor(den, dtype=num.dtype)
    return torch.where(den_t > 0, num / torch.where(den_t > 0, den_t, 1.0), 0.0)


def strength_max(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    term: str,
    params: Mapping[str, Tensor],
    *data: Any,
) -> float:
    """The smallest strength of ``term`` at which its selected parameters are all zero at a
    stationary point (see the module docstring for the formula and when it is exact).

    The other terms of ``spec`` are not included (glmnet's convention: the path's top is
    set by the data loss alone). ``toward=`` references shift the zero point to ``w_ref``.
    """
    spec = as_spec(spec)
    if term not in spec:
        raise ValueError(f"strength_max: no term {term!r} in the spec; it has {list(spec)}")
    pen = spec[term]
    if not isinstance(pen, (L1, ElasticNet, GroupLasso)):
        raise ValueError(
            f"strength_max: term {term!r} is {type(pen).__name__}, which induces no exact "
            "sparsity; it is defined for L1, ElasticNet (l1_ratio > 0), GroupLasso and "
            "SparseGroupLasso"
        )
    names = spec.selection(params)[term]
    at_zero = dict(params)
    for n in names:
        ref = pen.reference(n)
        at_zero[n] = torch.zeros_like(params[n]) if ref is None else ref.to(params[n].dtype)
    g = grad(loss_fn)(at_zero, *data)
    return max(_term_max(pen, n, g[n].detach()) for n in names)


def geometric_grid(strength_max: float, eps: float = 1e-3, n: int = 100) -> Tensor:
    """``n`` strengths from ``strength_max`` down to ``eps · strength_max``, equally spaced
    in log scale, descending (scikit-learn's ``lasso_path`` defaults), float64."""
    if not (math.isfinite(strength_max) and strength_max > 0):
        raise ValueError(f"geometric_grid: strength_max must be finite and > 0, got {strength_max}")
    if not 0 < eps < 1:
        raise ValueError(f"geometric_grid: eps must be in (0, 1), got {eps}")
    if n < 1:
        raise ValueError(f"geometric_grid: n must be >= 1, got {n}")
    top = math.log10(strength_max)
    return torch.logspace(top, top + math.log10(eps), n, dtype=torch.float64)
