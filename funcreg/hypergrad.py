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
* ``method="direct"``: ``∂_w T`` as a dense ``p × p`` Jacobian (``jacfwd``) and one LU solve;
  the default (``"auto"``) for a non-elementwise prox on at most ``direct_max`` coordinates
  (an elementwise one takes ``"cg"``, which is direct on a small support anyway).

``η`` does not change the answer (every ``η > 0`` has the same fixed point and the same
derivative); it is set to about ``1/‖H‖`` (a few power iterations) for conditioning.

Log strengths. Strengths are positive and span decades, so by default (``log=True``) the
gradient is with respect to ``log s``: ``dE/d log s = s · dE/ds`` (likewise for factors:
``c · dE/dc``). A strength at 0 has no logarithm: that is an error in log space
(``log=False`` differentiates ``s`` itself).

The K settings of a stacked solution (``fr.solve(..., stacked=True)``, a
:class:`~funcreg.Solution`, a path) are differentiated one after the other in one call; the
result has the model axis K first.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, jacfwd, jvp, vjp, vmap

from .losses import LeastSquares
from .penalties import MCP, SCAD, Penalty
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


def _flat(tree: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def _unflat(x: Tensor, like: Mapping[str, Tensor]) -> Params:
    out: Params = {}
    i = 0
    for n, t in like.items():
        out[n] = x[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def _cg(op: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_iter: int) -> Tensor:
    """Conjugate gradient for a symmetric positive (semi)definite ``op``; stops at
    ``‖r‖ ≤ tol ‖b‖``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    stop = (tol * torch.linalg.vector_norm(b)) ** 2
    for _ in range(max_iter):
        if rr <= stop:
            break
        Ap = op(p)
        pAp = p @ Ap
        if pAp <= 0:
            break
        a = rr / pAp
        x = x + a * p
        r = r - a * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def _check_spec(spec: Spec, who: str) -> None:
    for term, pen in spec.items():
        if isinstance(pen, (MCP, SCAD)):
            raise ValueError(
                f"{who}: term {term!r} ({type(pen).__name__}) is non-convex; implicit "
                "hypergradients need a convex problem (its solution need not be unique or "
                "differentiable in the strength): use L1, ElasticNet or a group lasso"
            )
        if not pen.smooth and not pen.has_prox:
            raise ValueError(
                f"{who}: term {term!r} ({type(pen).__name__}) is non-smooth and has no "
                "proximal operator; implicit differentiation needs one"
            )


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
    _check_spec(spec, who)
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
    objective = penalized(_zero_loss if gram is not None else loss_fn, smooth)
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

    values, opts = [], []
    gs: dict[str, list[Tensor]] = {t: [] for t in S}
    gw: dict[str, list[Any]] = {t: [] for t in W}
    for k in range(K):
        sk = {t: v[k] for t, v in S.items()}
        w0 = {n: p[k] for n, p in P.items()}
        fp = _FixedPoint(
            objective,
            nonsmooth,
            w0,
            sk,
            data,
            scaled=method != "cg",
            gram=gram,
            smooth_terms=bool(len(smooth)),
        )
        opt = fp.optimality()
        opts.append(opt)
        if opt > check:  # measured at the point itself (a solve stopped at its round-off
            # floor reports converged=False yet may be optimal to the last digits)
            warnings.warn(
                f"{who}: inner solution {k} is not converged (relative optimality {opt:.2e} > "
                f"{check:.0e}); solve to a tighter tol (or more max_iter) before trusting its "
                "hypergradient",
                RuntimeWarning,
                stacklevel=2,
            )
        val, gE = _outer_grad(outer_fn, fp.w0, outer_data, who)
        values.append(val)
        v = _adjoint(fp, gE, method, tol, iters, direct_max)
        ds, dw = fp.strength_vjp(v, W)
        for t in S:
            gs[t].append(ds[t] * sk[t] if log else ds[t])
        for t, f in W.items():
            if isinstance(f, Mapping):
                gw[t].append({n: dw[t][n] * f[n] if log else dw[t][n] for n in f})
            else:
                gw[t].append(dw[t] * f if log else dw[t])

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


class _FixedPoint:
    """One model's proximal-gradient map ``T(w, s) = prox_{η h_s}(w − η ∇f(w, s))`` on the
    flattened params, at a solution ``w0`` and strengths ``s``."""

    def __init__(
        self,
        objective: Callable[..., Tensor],
        nonsmooth: Spec,
        w0: Params,
        strengths: Mapping[str, Tensor],
        data: tuple[Any, ...],
        scaled: bool = True,
        gram: LeastSquares | None = None,
        smooth_terms: bool = True,
    ) -> None:
        self.objective, self.nonsmooth, self.w0 = objective, nonsmooth, w0
        self.gram, self.penalized = gram, gram is None or smooth_terms
        self.s, self.data = dict(strengths), data
        self.x = _flat(w0)
        self.eta = 1.0
        if scaled:  # the elementwise system does not depend on η: skip the estimate
            self.eta = 1.0 / self._curvature()
        self.z = self.x - self.eta * self.grad_f(self.x, self.s)

    def grad_f(self, xf: Tensor, s: Mapping[str, Tensor]) -> Tensor:
        def f(y: Tensor) -> Tensor:
            return self.objective(_unflat(y, self.w0), s, *self.data)

        if self.gram is None:
            return grad(f)(xf)
        w = {n: t.unsqueeze(0) for n, t in _unflat(xf, self.w0).items()}
        Aw, B = self.gram.hessian_apply(w), self.gram.linear_term()
        g = torch.cat([(Aw[n][0] - B[n]).reshape(-1) for n in self.w0])
        return g + grad(f)(xf) if self.penalized else g

    def hvp(self, u: Tensor) -> Tensor:
        if not self.penalized:  # least squares alone: H u = A u, no differentiation
            return self.hvp_rows(u.unsqueeze(0))[0]
        return jvp(lambda y: self.grad_f(y, self.s), (self.x,), (u,))[1]

    def hvp_rows(self, U: Tensor) -> Tensor:
        """``H`` times each row of ``U`` ``(k, p)``."""
        if self.penalized:
            return vmap(self.hvp)(U)
        assert self.gram is not None
        rows: Params = {}
        i = 0
        for n, t in self.w0.items():
            rows[n] = U[:, i : i + t.numel()].reshape(U.shape[0], *t.shape)
            i += t.numel()
        HU = self.gram.hessian_apply(rows)
        return torch.cat([HU[n].reshape(U.shape[0], -1) for n in self.w0], dim=1)

    def _curvature(self) -> float:
        """``‖H‖`` roughly, by 6 power iterations (1 when H = 0); only conditioning needs it."""
        g = torch.Generator().manual_seed(0)
        u = torch.randn(self.x.shape, dtype=self.x.dtype, generator=g).to(self.x.device)
        lam = 0.0
        for _ in range(6):
            hu = self.hvp(u / torch.linalg.vector_norm(u))
            lam = float(torch.linalg.vector_norm(hu))
            if lam == 0:
                return 1.0
            u = hu
        return lam

    def prox(self, zf: Tensor, s: Mapping[str, Tensor], spec: Spec | None = None) -> Tensor:
        spec = self.nonsmooth if spec is None else spec
        return _flat(spec.prox(_unflat(zf, self.w0), s, self.eta)) if len(spec) else zf

    def T(self, xf: Tensor, s: Mapping[str, Tensor], spec: Spec | None = None) -> Tensor:
        return self.prox(xf - self.eta * self.grad_f(xf, s), s, spec)

    def optimality(self) -> float:
        """``‖w − T(w)‖/η`` over ``max(‖∇f(0)‖, ‖∇f(w)‖)`` (solve's relative test)."""
        with torch.no_grad():
            g0 = self.grad_f(torch.zeros_like(self.x), self.s)
            gx = (self.x - self.z) / self.eta
            scale = max(float(torch.linalg.vector_norm(g0)), float(torch.linalg.vector_norm(gx)))
            res = float(torch.linalg.vector_norm(self.x - self.prox(self.z, self.s)))
        return res / self.eta / max(scale, 1e-300)

    def J(self, u: Tensor) -> Tensor:
        """The prox Jacobian at ``z`` times ``u`` (symmetric: the prox is a gradient)."""
        return jvp(lambda zz: self.prox(zz, self.s), (self.z,), (u,))[1]

    def diagonal(self) -> Tensor:
        """The diagonal of an elementwise prox's (diagonal) Jacobian at ``z``, by one
        reverse pass (``1ᵀ J`` is the diagonal when ``J`` is diagonal)."""
        z = self.z.detach().requires_grad_()
        with torch.enable_grad():
            out = self.prox(z, self.s)
            if not out.requires_grad:  # a prox that is constant near z
                return torch.zeros_like(z)
            return torch.autograd.grad(out.sum(), z)[0]

    def strength_vjp(self, v: Tensor, factors: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(∂_s T)ᵀ v`` and ``(∂_c T)ᵀ v`` for the ``weight=`` factors ``c`` given."""

        def Ts(s: Mapping[str, Tensor], c: Mapping[str, Any]) -> Tensor:
            spec = self.nonsmooth
            if c:
                spec = Spec(
                    {
                        t: dataclasses.replace(pen, weight=c[t]) if t in c else pen
                        for t, pen in spec.items()
                    }
                )
            return self.T(self.x, s, spec)

        back = vjp(Ts, dict(self.s), dict(factors))[1]
        ds, dc = back(v.detach())
        return ds, dc


def _zero_loss(params: Mapping[str, Tensor]) -> Tensor:
    """The data term left to autograd when a least_squares loss's gradient is exact."""
    return next(iter(params.values())).sum() * 0.0


def _outer_grad(
    outer_fn: Callable[..., Tensor], w0: Params, outer_data: tuple[Any, ...], who: str
) -> tuple[Tensor, Tensor]:
    """``E(w0)`` and ``∇E(w0)`` (flattened); an error when ``E`` ignores the params."""
    probe = {n: t.detach().clone().requires_grad_() for n, t in w0.items()}
    with torch.enable_grad():
        val = outer_fn(probe, *outer_data)
    if not isinstance(val, Tensor) or val.dim() != 0:
        raise ValueError(f"{who}: outer_fn must return a 0-dim tensor, got {val!r}")
    if not val.requires_grad:
        raise ValueError(
            f"{who}: outer_fn does not depend on the params (its value has no gradient); it "
            "must be computed from the params it is given"
        )
    grads = torch.autograd.grad(val, list(probe.values()), allow_unused=True)
    gE = torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(probe.values(), grads, strict=True)
        ]
    )
    return val.detach(), gE


def _adjoint(
    fp: _FixedPoint, gE: Tensor, method: str, tol: float, iters: int, direct_max: int
) -> Tensor:
    """Solve ``(I − (I − ηH) J) v = ∇E`` (see the module docstring for the three methods;
    ``"cg"`` with a support of at most ``direct_max`` coordinates forms ``H_DD`` by one
    batched Hessian-vector product and solves it directly)."""
    eta = fp.eta
    if method == "direct":
        Jw = jacfwd(lambda y: fp.T(y, fp.s))(fp.x)
        M = torch.eye(fp.x.numel(), dtype=fp.x.dtype, device=fp.x.device) - Jw
        return torch.linalg.solve(M.T, gE)
    if method == "cg":
        d = fp.diagonal()
        act = d > 0
        extra = torch.where(act, (1.0 / torch.where(act, d, 1.0) - 1.0) / eta, 0.0)
        mask = act.to(fp.x.dtype)
        idx = act.nonzero().squeeze(1)
        if idx.numel() <= direct_max:
            if idx.numel() == 0:
                return gE
            E = torch.zeros(idx.numel(), fp.x.numel(), dtype=fp.x.dtype, device=fp.x.device)
            E[torch.arange(idx.numel()), idx] = 1.0
            A = fp.hvp_rows(E)[:, idx] + torch.diag(extra[idx])
            q = torch.zeros_like(gE)
            q[idx] = torch.linalg.solve(A, gE[idx] / eta)
            return gE + q - eta * fp.hvp(q)

        def op(q: Tensor) -> Tensor:
            return mask * (fp.hvp(mask * q) + extra * q)

        q = _cg(op, mask * gE / eta, tol, iters)
        return gE + q - eta * fp.hvp(q)

    def Mt(y: Tensor) -> Tensor:  # (I − (I − ηH) J) y
        jy = fp.J(y)
        return y - jy + eta * fp.hvp(jy)

    def Mv(y: Tensor) -> Tensor:  # (I − J (I − ηH)) y
        return y - fp.J(y - eta * fp.hvp(y))

    return _cg(lambda y: Mv(Mt(y)), Mv(gE), tol, iters)
