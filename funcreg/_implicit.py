"""The fixed-point machinery behind :func:`funcreg.hypergrad` (the formulas are in that
module's docstring): one model's proximal-gradient map ``T(w, s)`` on flattened params,
its Jacobians by ``torch.func``, the outer gradient, and the three solvers of the adjoint
system (support-restricted conjugate gradient or direct solve, CG on the normal equations,
dense LU)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from .losses import LeastSquares
from .penalties import MCP, SCAD
from .spec import Spec

Params = dict[str, Tensor]


def check_spec(spec: Spec, who: str) -> None:
    """Refuse what implicit differentiation cannot handle, naming the term: non-convex
    terms (MCP, SCAD) and non-smooth terms without a proximal operator."""
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


def flat(tree: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflat(x: Tensor, like: Mapping[str, Tensor]) -> Params:
    out: Params = {}
    i = 0
    for n, t in like.items():
        out[n] = x[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def cg(op: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_iter: int) -> Tensor:
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


class FixedPoint:
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
        self.x = flat(w0)
        self.eta = 1.0
        if scaled:  # the elementwise system does not depend on η: skip the estimate
            self.eta = 1.0 / self._curvature()
        self.z = self.x - self.eta * self.grad_f(self.x, self.s)

    def grad_f(self, xf: Tensor, s: Mapping[str, Tensor]) -> Tensor:
        def f(y: Tensor) -> Tensor:
            return self.objective(unflat(y, self.w0), s, *self.data)

        if self.gram is None:
            return grad(f)(xf)
        w = {n: t.unsqueeze(0) for n, t in unflat(xf, self.w0).items()}
        Aw, B = self.gram.hessian_apply(w), self.gram.linear_term()
        g = torch.cat([(Aw[n][0] - B[n]).reshape(-1) for n in self.w0])
        return g + grad(f)(xf) if self.penalized else g

    def hvp(self, u: Tensor) -> Tensor:
        if not self.penalized:  # least squares alone: H u = A u, no differentiation
            return self.hvp_rows(u.unsqueeze(0))[0]
        return hessian_vector(lambda y: self.grad_f(y, self.s), self.x, u)

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
        return flat(spec.prox(unflat(zf, self.w0), s, self.eta)) if len(spec) else zf

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

    def with_factors(self, factors: Mapping[str, Any]) -> Spec:
        """The non-smooth terms with the ``weight=`` factors ``factors`` (by term) swapped in."""
        return Spec(
            {
                t: dataclasses.replace(pen, weight=factors[t]) if t in factors else pen
                for t, pen in self.nonsmooth.items()
            }
        )

    def strength_vjp(self, v: Tensor, factors: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(∂_s T)ᵀ v`` and ``(∂_c T)ᵀ v`` for the ``weight=`` factors ``c`` given."""

        def Ts(s: Mapping[str, Tensor], c: Mapping[str, Any]) -> Tensor:
            return self.T(self.x, s, self.with_factors(c))

        back = vjp(Ts, dict(self.s), dict(factors))[1]
        ds, dc = back(v.detach())
        return ds, dc


def hessian_vector(grad_fn: Callable[[Tensor], Tensor], x: Tensor, u: Tensor) -> Tensor:
    """``H u`` for ``H`` the Jacobian of ``grad_fn`` at ``x`` (a Hessian: symmetric), by
    reverse over reverse, ``vjp(grad_fn)(u)``: forward mode over a backward would fail on
    losses whose backward has no forward-mode rule (``F.mse_loss``: "ZeroTensors are
    immutable")."""
    return vjp(grad_fn, x)[1](u)[0]


def zero_loss(params: Mapping[str, Tensor]) -> Tensor:
    """The data term left to autograd when a least_squares loss's gradient is exact."""
    return next(iter(params.values())).sum() * 0.0


def outer_grad(
    outer_fn: Callable[..., Tensor], w0: Params, outer_data: tuple[Any, ...], who: str
) -> tuple[Tensor, Tensor]:
    """``E(w0)`` and ``∇E(w0)`` (flattened); an error when ``E`` ignores the params."""
    probe = {n: t.detach().clone().requires_grad_() for n, t in w0.items()}
    try:
        inspect.signature(outer_fn).bind(probe, *outer_data)
    except TypeError as e:
        raise TypeError(
            f"{who}: outer_fn cannot be called as outer_fn(params, *outer_data) with "
            f"{len(outer_data)} outer_data tensors ({e}); pass its data by keyword, e.g. "
            "outer_data=(X_val, y_val) (the positional data after the strengths is the "
            "inner loss's)"
        ) from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
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


def adjoint(
    fp: FixedPoint, gE: Tensor, method: str, tol: float, iters: int, direct_max: int
) -> Tensor:
    """Solve ``(I − (I − ηH) J) v = ∇E`` (see the module docstring for the three methods;
    ``"cg"`` with a support of at most ``direct_max`` coordinates forms ``H_DD`` by one
    batched Hessian-vector product and solves it directly)."""
    eta = fp.eta
    if method == "direct":
        Jw = jacrev(lambda y: fp.T(y, fp.s))(fp.x)  # reverse mode: see hessian_vector
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
            q[idx] = solve_on_support(A, gE[idx] / eta)
            return gE + q - eta * fp.hvp(q)

        def op(q: Tensor) -> Tensor:
            return mask * (fp.hvp(mask * q) + extra * q)

        q = cg(op, mask * gE / eta, tol, iters)
        return gE + q - eta * fp.hvp(q)

    def Mt(y: Tensor) -> Tensor:  # (I − (I − ηH) J) y
        jy = fp.J(y)
        return y - jy + eta * fp.hvp(jy)

    def Mv(y: Tensor) -> Tensor:  # (I − J (I − ηH)) y
        return y - fp.J(y - eta * fp.hvp(y))

    return cg(lambda y: Mv(Mt(y)), Mv(gE), tol, iters)


def batched_cg(
    op: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, int]:
    """Conjugate gradient on K independent systems at once (rows of ``b`` ``(K, p)``; ``op``
    maps ``(K, p) → (K, p)`` row by row). A row stops updating once ``‖r‖ ≤ tol ‖b‖``; the
    loop stops when every row has. Returns the solutions and the iterations run."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    stop = (tol * torch.linalg.vector_norm(b, dim=1)) ** 2
    it = 0
    while it < max_iter:
        going = rr > stop
        if not bool(going.any()):
            break
        it += 1
        Ap = op(p)
        pAp = (p * Ap).sum(1)
        going = going & (pAp > 0)
        a = torch.where(going, rr / torch.where(going, pAp, 1.0), 0.0)
        x = x + a[:, None] * p
        r = r - a[:, None] * Ap
        rr_new = (r * r).sum(1)
        beta = torch.where(going, rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
        p = torch.where(going[:, None], r + beta[:, None] * p, p)
        rr = torch.where(going, rr_new, torch.zeros_like(rr))
    return x, it


def batched_elementwise(
    fp: FixedPoint,
    X: Tensor,
    S: Mapping[str, Tensor],
    gE: Tensor,
    tol: float,
    iters: int,
    direct_max: int,
) -> tuple[Tensor, Tensor]:
    """The support-restricted system of ``method="cg"`` for K models at once: ``fp`` gives
    the map (one model's shapes, data and spec; ``η = 1``), ``X`` ``(K, p)`` the solutions,
    ``S`` ``{term: (K,)}`` their strengths and ``gE`` ``(K, p)`` the outer gradients. Every
    step is vmapped over K (gradients, prox Jacobian diagonals, Hessian-vector products) and
    the K systems are solved by one batched conjugate gradient (one batched LU solve of
    each model's support system, padded to the largest, when no support has more than
    ``direct_max`` coordinates). Returns the adjoint vectors
    ``v`` ``(K, p)`` and the relative optimality of each solution ``(K,)``."""

    def point(x: Tensor, s: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        g = fp.grad_f(x, s)
        z = x - g
        d = jvp(lambda zz: fp.prox(zz, s), (z,), (torch.ones_like(z),))[1]
        res = torch.linalg.vector_norm(x - fp.prox(z, s))
        g0 = torch.linalg.vector_norm(fp.grad_f(torch.zeros_like(x), s))
        scale = torch.maximum(g0, torch.linalg.vector_norm(g)).clamp(min=1e-300)
        return z, d, res / scale

    _, d, opt = vmap(point)(X, dict(S))
    if fp.penalized:

        def hvp(U: Tensor) -> Tensor:
            return vmap(lambda x, s, u: hessian_vector(lambda y: fp.grad_f(y, s), x, u))(
                X, dict(S), U
            )
    else:
        hvp = fp.hvp_rows  # least squares: one Hessian for all K
    act = d > 0
    extra = torch.where(act, 1.0 / torch.where(act, d, 1.0) - 1.0, 0.0)
    mask = act.to(X.dtype)
    K, p = X.shape
    m = int(act.sum(1).max())  # the largest support
    if m <= direct_max:  # each model's support, padded to m: one batched m × m LU solve
        idx = torch.argsort((~act).to(torch.int8), dim=1, stable=True)[:, :m]  # (K, m)
        keep = torch.gather(mask, 1, idx)  # 1 on the support, 0 on the padding
        rows = torch.arange(K, device=X.device)

        def column(j: Tensor) -> Tensor:  # H_k e_{idx[k, j]} for every k: (K, p)
            return hvp(torch.zeros_like(X).index_put((rows, j), torch.ones_like(X[:, 0])))

        if fp.penalized:
            HE = vmap(column)(idx.T)  # (m, K, p)
            H = torch.gather(HE.permute(1, 2, 0), 1, idx[:, :, None].expand(K, m, m))
        else:  # one Hessian for all K: its rows on the union of the supports, once
            union = act.any(0).nonzero().squeeze(1)
            E = torch.zeros(union.numel(), p, dtype=X.dtype, device=X.device)
            E[torch.arange(union.numel()), union] = 1.0
            pos = torch.zeros(p, dtype=torch.long, device=X.device)
            pos[union] = torch.arange(union.numel(), device=X.device)
            Hu = fp.hvp_rows(E)[:, union]
            at = pos[idx]
            H = Hu[at[:, :, None], at[:, None, :]]
        ex = torch.gather(extra, 1, idx)
        A = keep[:, :, None] * H * keep[:, None, :] + torch.diag_embed(ex + (1.0 - keep))
        b = keep * torch.gather(gE, 1, idx)
        q = torch.zeros_like(gE).scatter(1, idx, torch.linalg.solve(A, b.unsqueeze(2))[..., 0])
    else:
        q, _ = batched_cg(lambda Q: mask * (hvp(mask * Q) + extra * Q), mask * gE, tol, iters)
    return gE + q - hvp(q), opt


def batched_strength_vjp(
    fp: FixedPoint, X: Tensor, S: Mapping[str, Tensor], V: Tensor, factors: Mapping[str, Any]
) -> tuple[Any, Any]:
    """``(∂_s T)ᵀ v`` and ``(∂_c T)ᵀ v`` for K models at once (vmapped; the factors ``c``
    are shared, their gradients come back per model)."""

    def one(x: Tensor, s: Mapping[str, Tensor], v: Tensor) -> tuple[Any, Any]:
        def Ts(s: Mapping[str, Tensor], c: Mapping[str, Any]) -> Tensor:
            return fp.T(x, s, fp.with_factors(c))

        return vjp(Ts, s, dict(factors))[1](v)

    return vmap(one)(X, dict(S), V)


def solve_on_support(A: Tensor, rhs: Tensor) -> Tensor:
    """``A⁻¹ rhs`` for the linear system of a hypergradient on a solution's support; a
    singular one (active columns that are collinear, e.g. duplicated) is a ``ValueError``
    that says so, not a ``LinAlgError``."""
    try:
        return torch.linalg.solve(A, rhs)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"hypergrad: the linear system on the solution's {A.shape[0]} nonzero coordinates "
            "is singular: some of their columns are collinear (e.g. duplicated features), so "
            "the solution and its derivative in the strengths are not unique there; drop the "
            "duplicated columns of X or add a smooth term (ElasticNet, L2); for a non-convex "
            "loss (a network), fr.tune needs training=fr.Training(...)"
        ) from e
