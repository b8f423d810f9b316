"""The routes of :func:`funcreg.solvers.solve` (which one applies is in its module
docstring): the Lasso on a Gram matrix with free coordinates eliminated
(:mod:`funcreg._quadratic`), the general loop on a quadratic's Hessian product or on a
loss's gradient (:mod:`funcreg._fista`), proximal Newton (:mod:`funcreg._newton`), and
the certificates that check a solution in all coordinates and with the original loss."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _tree
from ._fista import Generic, GramOracle, Smooth, fista, make_prox, zero_loss
from ._newton import NEWTON_MAX, gradient, prox_newton
from ._quadratic import (
    Layout,
    Quadratic,
    gradient_gap,
    l1_thresholds,
    lasso_route,
    lasso_thresholds,
)
from ._tree import Params
from .losses import LeastSquares
from .spec import Spec, penalized

Outcome = tuple[Params, Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Problem:
    """What every route of one :func:`funcreg.solvers.solve` call shares: the loss and its
    data, the spec split into its ``smooth`` terms (in the gradient) and its ``nonsmooth``
    ones (in the prox), one model's params (``single``: names and shapes), and the stopping
    and step options."""

    loss_fn: Callable[..., Tensor]
    smooth: Spec
    nonsmooth: Spec
    single: Params
    data: tuple[Any, ...]
    max_iter: int
    tol: float
    backtrack: bool
    restart: bool


def route(
    problem: Problem,
    q: Quadratic | None,
    x0: Params,
    S: Params,
    L0: Tensor | None,
    newton: bool = False,
) -> Outcome:
    """Solve on the fastest route that applies: the Lasso on the Gram matrix (free
    coordinates eliminated; :mod:`funcreg._quadratic`), the general loop on the quadratic's
    Hessian product, proximal Newton (``newton``: a loss found not quadratic, only ``L1``
    terms, at most ``NEWTON_MAX`` entries; :mod:`funcreg._newton`), or the general loop on
    ``loss_fn``'s gradient."""
    p = problem
    prox = make_prox(p.nonsmooth, p.single)
    if newton and q is None and not isinstance(p.loss_fn, LeastSquares):
        got = _newton_route(p, x0, S)
        if got is not None:
            return got
    if q is not None:
        lean = lasso_thresholds(q, p.smooth, p.nonsmooth, p.single, S)
        if lean is not None:
            x0f = q.layout.flatten(x0)
            routed = lasso_route(q, *lean, x0f, p.max_iter, p.tol, L0, p.restart)
            if routed is not None:
                x, iterations, converged, floors, optimality, L, eliminated = routed
                out = q.layout.unflatten(x)
                if not eliminated:  # the reduced problem was the whole one: certified
                    return out, iterations, converged, floors, optimality
                ok, opt = _certify_gram(q, prox, out, S, L, x0, p.tol)
                return out, iterations, converged & ok, floors, opt
    oracle: Smooth
    if q is not None or isinstance(p.loss_fn, LeastSquares):
        penalty = Generic(penalized(zero_loss, p.smooth), ()) if len(p.smooth) else None
        oracle = GramOracle(p.loss_fn if q is None else q, penalty)  # type: ignore[arg-type]
    else:
        oracle = Generic(penalized(p.loss_fn, p.smooth), p.data)
    return fista(oracle, prox, x0, S, p.max_iter, p.tol, L0, p.backtrack, p.restart)


def _newton_route(problem: Problem, x0: Params, S: Params) -> Outcome | None:
    """:func:`funcreg._newton.prox_newton` on flat params, or ``None`` where it does not
    apply (too many entries, a non-smooth term other than a plain ``L1``) or a Hessian is
    not positive semidefinite (then with a warning)."""
    single, nonsmooth, data = problem.single, problem.nonsmooth, problem.data
    layout = Layout(single)
    ref = next(iter(x0.values()))
    if layout.P > NEWTON_MAX:
        return None
    found = l1_thresholds(layout, ref, nonsmooth, single, S)
    if found is None:
        return None
    objective = penalized(problem.loss_fn, problem.smooth)
    # the smooth objective is the same for every model where only the L1 strengths vary
    shared = all(bool((v == v[:1]).all()) for n, v in S.items() if n not in nonsmooth)
    scale = _gradient_scale(objective, x0, S, data, shared)

    def value(theta: Tensor, k: int) -> Tensor:
        return objective(layout.single(theta), {n: v[k] for n, v in S.items()}, *data)

    with torch.enable_grad():
        got = prox_newton(
            value, found[0], layout.flatten(x0), problem.tol, problem.max_iter, scale, shared
        )
    if got is None:
        warnings.warn(
            "solve: the loss's Hessian is not positive semidefinite at a point of the "
            "proximal Newton route (the problem is not convex there); falling back to FISTA. "
            "A network? fr.tune trains one with training=fr.Training(...), fr.path and "
            "fr.cross_validate with optimizer= and steps=",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    x, iterations, converged, floors, optimality = got
    return layout.unflatten(x), iterations, converged, floors, optimality


def _gradient_scale(
    objective: Callable[..., Tensor], x0: Params, S: Params, data: tuple[Any, ...], shared: bool
) -> Tensor:
    """``max(‖∇f(0)‖, ‖∇f(x0)‖)`` per model, the stopping rule's scale (``‖∇f(0)‖`` taken as
    0 where it is not finite). Where every model has the same smooth objective and start (a
    path's first solve), one model's two gradients by plain autograd
    (:func:`funcreg._newton.gradient`) serve all of them (a vmapped gradient costs several
    times more for one small model)."""
    layout = Layout({n: v[0] for n, v in x0.items()})
    x0f = layout.flatten(x0)
    if not (shared and bool((x0f == x0f[:1]).all())):
        gen = Generic(objective, data)
        return torch.maximum(gen.grad_norm_at_zero(x0, S), _tree.sqnorm(gen.gradient(x0, S)).sqrt())
    s0 = {n: v[0] for n, v in S.items()}

    def f(theta: Tensor) -> Tensor:
        return objective(layout.single(theta), s0, *data)

    at_zero, at_start = (gradient(f, t).norm() for t in (torch.zeros_like(x0f[0]), x0f[0]))
    at_zero = torch.where(torch.isfinite(at_zero), at_zero, 0.0)
    return torch.maximum(at_zero, at_start).expand(x0f.shape[0]).clone()


def _certify_gram(
    q: Quadratic,
    prox: Callable[[Params, Params, Tensor], Params],
    x: Params,
    S: Params,
    L: float,
    x0: Params,
    tol: float,
) -> tuple[Tensor, Tensor]:
    """The stopping rule of :func:`solve` at ``x`` in all coordinates (the reduced problem
    certified the penalised ones): ``(converged, ‖G(x)‖ / ref)``."""
    flat, x0f = q.layout.flatten(x), q.layout.flatten(x0)
    g = flat @ q.H - q.b
    t = torch.full((flat.shape[0],), 1.0 / L, dtype=flat.dtype, device=flat.device)
    moved = q.layout.flatten(prox(q.layout.unflatten(flat - g / L), S, t))
    mapping = L * torch.linalg.vector_norm(moved - flat, dim=1)
    gnorm = torch.linalg.vector_norm(g, dim=1)
    scale = torch.maximum(q.b.norm(), torch.linalg.vector_norm(x0f @ q.H - q.b, dim=1))
    xnorm = torch.linalg.vector_norm(flat, dim=1)
    _, ok = _tree.stopping_rule(mapping, gnorm, scale, L, xnorm, tol)
    return ok, mapping / torch.maximum(scale, gnorm)


def recheck(problem: Problem, q: Quadratic, S: Params, L0: Tensor | None, got: Outcome) -> Outcome:
    """Certify a solution found on a quadratic *extracted* from ``loss_fn`` with
    ``loss_fn`` itself: the gap ``δ = ‖∇f(x) − (Hx − b)‖ / ref`` bounds how much the
    prox-gradient mapping of the true loss can differ (the prox is 1-Lipschitz), so a model
    stays converged when ``optimality + δ ≤ tol``; models with ``δ > max(tol, 1e-9)`` (the
    probes missed a non-quadratic region) are solved again on the general route, from
    where they are."""
    out, iterations, converged, floors, optimality = got
    tol = problem.tol
    delta = gradient_gap(problem.loss_fn, q, out, problem.data)
    optimality = optimality + delta
    converged = converged & (optimality <= tol)
    redo = ~(delta <= max(tol, 1e-9))
    if bool(redo.any()):
        sel = redo.nonzero().squeeze(1)
        L0_redo = None if L0 is None else L0[sel]
        part = route(problem, None, _tree.take(out, sel), _tree.take(S, sel), L0_redo)
        _tree.put((out, iterations, converged, floors, optimality), sel, part)
    return out, iterations, converged, floors, optimality
