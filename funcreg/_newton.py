"""Proximal Newton for smooth, non-quadratic losses with ``L1`` terms (L1 logistic, Poisson,
...) and moderate ``P`` (glmnet's outer loop, with the exact Hessian).

Per model, from its start ``x`` (``F = f + h``, ``h(x) = Σ_j τ_j |x_j|``)::

    repeat
        g = ∇f(x), H = ∇²f(x)                     (torch.func, in the solver's dtype)
        stop when the stopping rule of solve holds at x, with L = λ_max(H)
        w = argmin_w ½ (w − x)ᵀH(w − x) + gᵀ(w − x) + h(w)
            = the Lasso on the Gram matrix H with linear term Hx − g, solved by
              funcreg._lasso.fista_lasso (with its Newton polish: exact on the support)
        d = w − x;  Δ = gᵀd + h(x + d) − h(x)  (< 0 unless x is optimal)
        t = 1, ½, ¼, ... until F(x + t d) ≤ F(x) + ¼ t Δ     (Armijo; t = 1 when Δ is
                                                        round-off: near the solution)
        x ← x + t d

Near the solution ``t = 1`` and the iteration converges quadratically (the active set is
fixed, the Hessian exact). A Hessian that is not positive semidefinite (a non-convex loss)
has no such model: :func:`prox_newton` returns ``None`` and :func:`funcreg.solvers.solve`
falls back to FISTA with a warning that says so. Above ``NEWTON_MAX`` parameter entries the
``P × P`` Hessian is not formed and FISTA runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, hessian

from . import _tree, prox
from ._lasso import fista_lasso

NEWTON_MAX = 256  # form the P × P Hessian up to this many parameter entries
_MAX_NEWTON = 100  # outer iterations per model, at most
_ARMIJO = 0.25


def prox_newton(
    value: Callable[[Tensor, int], Tensor],
    tau: Tensor,
    x0: Tensor,
    tol: float,
    max_iter: int,
    scale0: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """Proximal Newton (module docstring) for each model ``k``: ``value(θ, k)`` is model
    ``k``'s smooth objective on the flat params ``θ (P,)``, ``tau (K, P)`` its L1
    thresholds, ``x0 (K, P)`` its start, ``scale0 (K,)`` ``max(‖∇f(0)‖, ‖∇f(x_0)‖)``.
    Returns ``(x, iterations, converged, floors, optimality)`` (iterations count Newton
    steps), or ``None`` when a Hessian is not positive semidefinite."""
    K, P = x0.shape
    out = x0.clone()
    iterations = torch.zeros(K, dtype=torch.int64, device=x0.device)
    converged = torch.zeros(K, dtype=torch.bool, device=x0.device)
    floors = torch.zeros(K, dtype=x0.dtype, device=x0.device)
    optimality = torch.zeros(K, dtype=x0.dtype, device=x0.device)
    for k in range(K):

        def f(theta: Tensor, k: int = k) -> Tensor:
            return value(theta, k)

        gradient, curvature = grad(f), hessian(f)
        x, t_k = x0[k].clone(), tau[k]

        def total(theta: Tensor, f: Callable[[Tensor], Tensor] = f, t: Tensor = t_k) -> Tensor:
            return f(theta) + (t * theta.abs()).sum()

        stopped = False
        for it in range(1, min(max_iter, _MAX_NEWTON) + 1):
            g, H = gradient(x).detach(), curvature(x).detach()
            H = 0.5 * (H + H.T)
            eig = torch.linalg.eigvalsh(H)
            top = float(eig[-1].clamp(min=torch.finfo(H.dtype).tiny ** 0.5))
            if float(eig[0]) < -1e-8 * top:
                return None
            mapping = top * torch.linalg.vector_norm(
                x - prox.soft_threshold(x - g / top, t_k / top)
            )
            gnorm, xnorm = torch.linalg.vector_norm(g), torch.linalg.vector_norm(x)
            stop, ok = _tree.stopping_rule(mapping, gnorm, scale0[k], top, xnorm, tol)
            iterations[k] = it
            ref = torch.maximum(scale0[k], gnorm)
            floors[k] = _tree.floor_ratio(gnorm, scale0[k], top, xnorm)
            optimality[k] = mapping / ref
            converged[k] = ok
            if bool(stop):
                stopped = True
                break
            b = (x @ H - g)[None]
            inner_tol = max(tol * 1e-2, 1e-15)
            w = fista_lasso(H, b, t_k[None], x[None], 10_000, inner_tol, None, True)[0][0]
            d = w - x
            fx = total(x).detach()
            h_new, h_old = (t_k * (x + d).abs()).sum(), (t_k * x.abs()).sum()
            delta = g @ d + h_new - h_old
            noise = 64 * torch.finfo(x.dtype).eps * ((g @ d).abs() + h_new + h_old)
            if bool(delta > noise):  # not a descent direction: no better model step
                stopped = True
                break
            step = 1.0  # a decrease within round-off of Δ: take the Newton step as it is
            if bool(delta < -noise):
                for _ in range(40):
                    if bool(total(x + step * d).detach() <= fx + _ARMIJO * step * delta):
                        break
                    step *= 0.5
            x = x + step * d
        if not stopped:  # the last step's point is not the one certified above
            converged[k] = False
            iterations[k] = max_iter
        out[k] = x
    return out, iterations, converged, floors, optimality
