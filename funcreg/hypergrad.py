"""Hypergradients: the derivative of a validation objective with respect to the strengths
(and ``weight=`` factors) of a convex regularized problem, by implicit differentiation of
its solution.

Problem and fixed point. :func:`funcreg.solve` minimises
``F(w, s) = f(w, s) + h(w, s)`` with the smooth part ``f = loss(w, *data) + Σ_smooth s_j Ω_j``
and the non-smooth part ``h = Σ_nonsmooth s_j Ω_j`` (applied through its prox). A minimiser
is a fixed point of the proximal-gradient map, for any step ``η > 0``::

    w = T(w, s) = prox_{η h_s}(z),    z = w − η ∇_w f(w, s).

Implicit differentiation (Bertrand et al. 2020, "Implicit differentiation of Lasso-type
models for hyperparameter optimization"; Pedregosa 2016). Where ``T`` is differentiable
(the support is stable: no coordinate sits exactly on a threshold), differentiating the
fixed point gives ``(I − ∂_w T) dw = ∂_s T ds``, with ``∂_w T = J (I − η H)``, ``J`` the
Jacobian of the prox at ``z`` and ``H = ∇²_w f``. For an outer objective ``E(w)``, the
hypergradient is::

    dE/ds = (∂_s T)ᵀ v,    (I − (I − η H) J) v = ∇E(w)           (the adjoint system)

``J`` comes from ``torch.func.jvp``/``vjp`` through :meth:`Penalty.prox` itself, so no
penalty needs its own derivative: soft-thresholding's Jacobian is the 0/1 mask of the
support, the elastic net's ``mask / (1 + η s (1 − r) c)``, the projections' the mask of the
free coordinates, block soft-thresholding's ``α I + (1 − α) z_g z_gᵀ/‖z_g‖²`` on active
groups. ``∂_s T`` is a ``vjp`` through the same map with respect to the strengths (and the
factors).

Solving the adjoint system:

* ``method="cg"`` (elementwise prox: ``L1``, ``ElasticNet``, ``NonNegative``, ``Box``, or
  no non-smooth term). ``J = diag(d)``. With ``q = J v`` and ``D = {i: d_i > 0}`` (the
  support) the system becomes the symmetric positive definite system restricted to ``D``
  (Bertrand et al.)::

      (diag((1/d_D − 1)/η) + H_DD) q_D = ∇E(w)_D / η,    v = ∇E(w) + q − η H q,

  solved matrix-free by conjugate gradient on Hessian-vector products (``H_DD`` for a
  Lasso; ``H_DD + s(1 − r) diag(c)`` for an elastic net). Never forms a ``p × p`` matrix;
  a support of at most ``direct_max`` coordinates gets its ``|D| × |D|`` matrix from one
  batched (vmapped) Hessian-vector product and a direct solve. This system does not
  depend on ``η``, so no curvature estimate is made.
* ``method="cgnr"`` (any prox, e.g. group lasso): conjugate gradient on the normal
  equations ``M Mᵀ v = M ∇E`` with ``Mᵀ = I − (I − η H) J``, matrix-free.
* ``method="direct"``: ``∂_w T`` as a dense ``p × p`` Jacobian (``jacrev``) and one LU solve;
  the default (``"auto"``) for a non-elementwise prox on at most ``direct_max`` coordinates
  (an elementwise one takes ``"cg"``, which is direct on a small support anyway).

``η`` does not change the answer (every ``η > 0`` has the same fixed point and the same
derivative); it is set to about ``1/‖H‖`` (a few power iterations) for conditioning.

Log strengths. Strengths are positive and span decades, so by default (``log=True``) the
gradient is with respect to ``log s``: ``dE/d log s = s · dE/ds`` (likewise for factors:
``c · dE/dc``). A strength at 0 has no logarithm: that is an error in log space
(``log=False`` differentiates ``s`` itself).

The K settings of a stacked solution (``fr.solve(..., stacked=True)``, a
:class:`~funcreg.Solution`, a path) are differentiated in one call, the result with the
model axis K first. With an elementwise prox (``method="cg"``) the K settings go through
one vmapped pass: the map, its prox-Jacobian diagonals and Hessian-vector products are
``vmap``-ped over K and the K support-restricted systems are solved by one batched
conjugate gradient (``vectorize=False``: one after the other, as for the other methods).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._implicit import (
    FixedPoint,
    adjoint,
    batched_elementwise,
    batched_strength_vjp,
    check_spec,
    flat,
    outer_grad,
    zero_loss,
)
from .losses import LeastSquares
from .penalties import Penalty
from .solvers import Solution
from .spec import Spec, as_spec, penalized

__all__ = ["Hypergradient", "hypergrad"]

Params = dict[str, Tensor]


class Hypergradient(NamedTuple):
    """What :func:`hypergrad` returns; every entry has the model axis K first.

    Attributes:
        value: ``(K,)`` the outer objective ``E(w_k)`` at each solution.
        strengths: ``{term: (K,)}`` ``dE/d log s`` (``dE/ds`` with ``log=False``).
        weights: ``{term: (K, *factor shape)}`` or ``{term: {name: (K, *shape)}}`` (dict
            factors) for the terms named in ``weights=``: ``dE/d log c`` (``dE/dc``).
        optimality: ``(K,)`` the relative optimality of each inner solution,
            ``‖w − T(w)‖/η`` over ``max(‖∇f(0)‖, ‖∇f(w)‖)``, as in :func:`funcreg.solve`.
    """

    value: Tensor
    strengths: dict[str, Tensor]
    weights: dict[str, Any]
    optimality: Tensor


def _as_stacked(params: Any, stacked: bool, who: str) -> tuple[Params, Tensor | None]:
    if isinstance(params, Solution):
        return dict(params.params), params.converged
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"{who}: params must be a Solution or a non-empty dict {{name: tensor}}")
    if stacked:
        return {n: p.detach() for n, p in params.items()}, None
    return {n: p.detach().unsqueeze(0) for n, p in params.items()}, None


def _strength_rows(
    strengths: Mapping[str, Any], names: tuple[str, ...], K: int, like: Tensor, log: bool, who: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for n in names:
        if n not in strengths:
            raise ValueError(f"{who}: no strength for term {n!r}; strengths has {list(strengths)}")
        v = torch.as_tensor(strengths[n], dtype=like.dtype, device=like.device)
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != K):
            raise ValueError(
                f"{who}: strength {n!r} must be a number or a ({K},) tensor, got {tuple(v.shape)}"
            )
        v = v.expand(K).clone()
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise ValueError(f"{who}: strength {n!r} must be finite and >= 0")
        if log and bool((v == 0).any()):
            raise ValueError(
                f"{who}: strength {n!r} is 0, which has no logarithm; hypergradients are "
                "taken with respect to log-strengths: use a positive strength or log=False"
            )
        out[n] = v
    return out


def _weight_tree(spec: Spec, term: str, log: bool, like: Tensor, who: str) -> Any:
    pen = spec[term]
    w = pen.weight
    if w is None or isinstance(w, (int, float)):
        raise ValueError(
            f"{who}: term {term!r} has no weight= tensor to differentiate; give it explicit "
            "factors, e.g. L1(weight=torch.ones(p)), then name it in weights="
        )
    tree: Any
    if isinstance(w, Mapping):
        tree = {n: torch.as_tensor(v).to(like) for n, v in w.items()}
        leaves = list(tree.values())
    else:
        tree = torch.as_tensor(w).to(like)
        leaves = [tree]
    if log and any(bool((t == 0).any()) for t in leaves):
        raise ValueError(
            f"{who}: term {term!r} has weight= factors equal to 0, which have no logarithm; "
            "use positive factors or log=False"
        )
    return tree


def _row(tree: Any, k: int) -> Any:
    if isinstance(tree, Mapping):
        return {n: _row(v, k) for n, v in tree.items()}
    return tree[k]


def _collect(
    gs: dict[str, list[Tensor]],
    gw: dict[str, list[Any]],
    ds: Mapping[str, Tensor],
    dw: Mapping[str, Any],
    S: Mapping[str, Tensor],
    W: Mapping[str, Any],
    k: int,
    log: bool,
) -> None:
    """Append model k's gradients, times the strength (factor) in log space."""
    for t in S:
        gs[t].append(ds[t] * S[t][k] if log else ds[t])
    for t, f in W.items():
        if isinstance(f, Mapping):
            gw[t].append({n: dw[t][n] * f[n] if log else dw[t][n] for n in f})
        else:
            gw[t].append(dw[t] * f if log else dw[t])


def hypergrad(
    outer_fn: Callable[..., Tensor],
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    params: Solution | Mapping[str, Tensor],
    strengths: Mapping[str, Any],
    *data: Any,
    outer_data: tuple[Any, ...] = (),
    weights: Iterable[str] = (),
    log: bool = True,
    stacked: bool = False,
    method: str = "auto",
    direct_max: int = 200,
    tol: float = 1e-10,
    max_iter: int | None = None,
    check: float = 1e-5,
    vectorize: bool = True,
) -> Hypergradient:
    """Gradient of ``outer_fn(w(s), *outer_data)`` with respect to the strengths ``s``, where
    ``w(s)`` minimises ``loss_fn(w, *data) + Σ_j s_j Ω_j(w)`` (implicit differentiation of
    the proximal-gradient fixed point; formulas in the module docstring).

    Args:
        outer_fn: ``outer_fn(params, *outer_data) -> 0-dim tensor``, e.g. a validation loss.
            It must depend on the params.
        loss_fn, spec, *data: the inner problem, exactly as given to :func:`funcreg.solve`
            (convex; MCP and SCAD are refused).
        params: the solution(s): a :class:`~funcreg.Solution`, one model's ``{name: tensor}``,
            or with ``stacked=True`` ``{name: (K, *shape)}``.
        strengths: the strengths the solutions were computed at: ``{term: number or (K,)}``.
        outer_data: passed to ``outer_fn``.
        weights: terms whose ``weight=`` factors are hyperparameters too (the term must
            have explicit factors, a tensor or a ``{name: tensor}`` dict).
        log: gradients with respect to ``log s`` and ``log c`` (default) instead of ``s``, ``c``.
        method: ``"auto"`` (``"cg"`` for elementwise proxes, which solves directly on a
            support of at most ``direct_max`` coordinates; otherwise ``"direct"`` up to
            ``direct_max`` coordinates, else ``"cgnr"``), ``"direct"``, ``"cg"``, ``"cgnr"``.
        tol: relative residual at which conjugate gradient stops.
        max_iter: the most conjugate-gradient iterations (default ``10 · p``).
        check: warn when an inner solution's relative optimality exceeds this.
        vectorize: with K > 1 settings and ``method="cg"``, differentiate all K in one
            vmapped pass (one batched conjugate gradient on the K support-restricted
            systems) instead of one after the other; the results agree to the CG tolerance.

    Returns:
        :class:`Hypergradient` ``(value, strengths, weights, optimality)``, K first.

    Raises:
        ValueError: a term in ``weights=`` or ``strengths`` missing from the spec, a strength
            (or factor, in log space) at 0, MCP/SCAD terms, an outer objective that does not
            depend on the params, an unknown method.
        TypeError: params that are not a Solution or a dict of tensors.

    Warns:
        RuntimeWarning: a solution whose optimality exceeds ``check`` (the gradient is then
            the derivative of the fixed point equation at a point that is not one).
    """
    who = "hypergrad"
    spec = as_spec(spec)
    check_spec(spec, who)
    if method not in ("auto", "direct", "cg", "cgnr"):
        raise ValueError(f"{who}: method must be 'auto', 'direct', 'cg' or 'cgnr', got {method!r}")
    if not isinstance(strengths, Mapping):
        raise TypeError(f"{who}: strengths must be a dict {{term: strength}}")
    for key in strengths:
        if key not in spec:
            raise ValueError(f"{who}: strength {key!r} names no term of the spec {list(spec)}")
    weights = tuple(weights)
    for term in weights:
        if term not in spec:
            raise ValueError(f"{who}: weights= names {term!r}, not a term of the spec {list(spec)}")
        if spec[term].is_constraint:
            raise ValueError(f"{who}: term {term!r} is a constraint; it has no weight= factors")
    P, converged = _as_stacked(params, stacked, who)
    first = next(iter(P.values()))
    K = first.shape[0]
    S = _strength_rows(strengths, spec.strength_names, K, first, log, who)
    W = {t: _weight_tree(spec, t, log, first, who) for t in weights}

    smooth, nonsmooth = spec.smooth(), spec.nonsmooth()
    # a least_squares loss has its gradient in closed form (A w − B, on its Gram matrix):
    # only the smooth penalty terms (if any) go through autograd
    gram = loss_fn if isinstance(loss_fn, LeastSquares) and not data else None
    objective = penalized(zero_loss if gram is not None else loss_fn, smooth)
    single = {n: p[0] for n, p in P.items()}
    p_total = sum(t.numel() for t in single.values())
    elementwise = all(pen.elementwise for pen in nonsmooth.values())
    if method == "auto":
        method = "cg" if elementwise else ("direct" if p_total <= direct_max else "cgnr")
    if method == "cg" and not elementwise:
        bad = [t for t, pen in nonsmooth.items() if not pen.elementwise]
        raise ValueError(
            f"{who}: method='cg' needs an elementwise prox, but term {bad[0]!r} "
            f"({type(nonsmooth[bad[0]]).__name__}) is not; use method='cgnr' or 'direct'"
        )
    if any(t in smooth for t in W):
        raise ValueError(
            f"{who}: weights= of smooth terms are not supported yet "
            f"({[t for t in W if t in smooth]}); name non-smooth terms only"
        )
    iters = 10 * p_total if max_iter is None else max_iter

    def fixed_point(k: int) -> FixedPoint:
        w0 = {n: p[k] for n, p in P.items()}
        sk = {t: v[k] for t, v in S.items()}
        return FixedPoint(
            objective,
            nonsmooth,
            w0,
            sk,
            data,
            scaled=method != "cg",
            gram=gram,
            smooth_terms=bool(len(smooth)),
        )

    def warn(k: int, opt: float) -> None:
        if opt > check:  # measured at the point itself (a solve stopped at its round-off
            # floor reports converged=False yet may be optimal to the last digits)
            far = (
                "; so far from optimal that these params may solve other strengths: pass the "
                "strengths they were solved at (one per model for a path)"
                if opt > 1e-2
                else ""
            )
            warnings.warn(
                f"{who}: inner solution {k} is not converged (relative optimality {opt:.2e} > "
                f"{check:.0e}); solve to a tighter tol (or more max_iter) before trusting its "
                f"hypergradient{far}",
                RuntimeWarning,
                stacklevel=3,
            )

    values, opts = [], []
    gs: dict[str, list[Tensor]] = {t: [] for t in S}
    gw: dict[str, list[Any]] = {t: [] for t in W}
    if vectorize and method == "cg" and K > 1:
        # all K at once: vmapped map and Jacobians, one batched conjugate gradient
        fp = fixed_point(0)
        X = torch.stack([flat({n: p[k] for n, p in P.items()}) for k in range(K)])
        gE = []
        for k in range(K):
            val, g = outer_grad(outer_fn, {n: p[k] for n, p in P.items()}, outer_data, who)
            values.append(val)
            gE.append(g)
        V, opt_k = batched_elementwise(fp, X, S, torch.stack(gE), tol, iters, direct_max)
        for k in range(K):
            opts.append(float(opt_k[k]))
            warn(k, opts[-1])
        ds_all, dw_all = batched_strength_vjp(fp, X, S, V, W)
        for k in range(K):
            _collect(gs, gw, {t: d[k] for t, d in ds_all.items()}, _row(dw_all, k), S, W, k, log)
    else:
        for k in range(K):
            fp = fixed_point(k)
            opts.append(fp.optimality())
            warn(k, opts[-1])
            val, gE_k = outer_grad(outer_fn, fp.w0, outer_data, who)
            values.append(val)
            v = adjoint(fp, gE_k, method, tol, iters, direct_max)
            ds, dw = fp.strength_vjp(v, W)
            _collect(gs, gw, ds, dw, S, W, k, log)

    out_w: dict[str, Any] = {}
    for t, rows in gw.items():
        if rows and isinstance(rows[0], Mapping):
            out_w[t] = {n: torch.stack([r[n] for r in rows]) for n in rows[0]}
        else:
            out_w[t] = torch.stack(rows)
    return Hypergradient(
        value=torch.stack(values),
        strengths={t: torch.stack(r) for t, r in gs.items()},
        weights=out_w,
        optimality=torch.tensor(opts, dtype=first.dtype),
    )
