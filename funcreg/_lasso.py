"""The lean loop of :func:`funcreg.solvers.solve` for a plain (weighted) Lasso on the Gram
path.

A plain (weighted) Lasso on that path — one output, no intercept, no smooth terms, only
exact ``L1`` terms without ``toward=`` — goes through a leaner loop
(:func:`funcreg._lasso.fista_lasso`): a fixed step ``1/L`` shared by every model, with
``L = λ_max(XᵀX/n)`` (``eigvalsh`` for ``p ≤ 512``, else Lanczos with a 2% margin; or the
largest ``lipschitz=``), so no backtracking and ``backtrack`` is ignored; the gradient step
as one ``addmm``; soft-thresholding as ``z − clamp(z, −τ, τ)``; momentum from a table
indexed by the steps since each model's last restart; the same restart and stopping test,
but the test (one host synchronisation) runs only at iteration 1 and every 10th iteration,
so ``iterations`` is 1 or a multiple of 10 (or ``max_iter``). About 10 tensor operations
(one ``(K, p) × (p, p)`` product) per iteration, against ~40 on the general path; the fixed
step needs up to ~2× more iterations than the adaptive one on correlated designs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _tree
from ._tree import Params
from .losses import LeastSquares
from .penalties import L1
from .spec import Spec

_CHECK_EVERY = 10  # the lean path tests for convergence at iteration 1 and every 10th
_EIGVALSH_MAX = 512  # exact λ_max by eigvalsh up to this p; Lanczos (×1.02) above


def lasso_thresholds(
    ls: LeastSquares, smooth: Spec, nonsmooth: Spec, single: Params, S: Params
) -> Tensor | None:
    """``(K, p)`` soft-threshold levels at unit step (``Σ_terms s_k c``) when the problem is
    a plain (weighted) Lasso on the Gram path — one output, no intercept, no smooth terms,
    every non-smooth term an exact ``L1`` without ``toward=`` — else ``None``."""
    if ls.fit_intercept or ls.Y.shape[1] != 1 or len(smooth) or not len(nonsmooth):
        return None
    (name,) = single  # no intercept: the weight (1, p) is the only parameter
    if any(type(pen) is not L1 or pen.toward is not None for pen in nonsmooth.values()):
        return None
    p = ls.X.shape[1]
    K = next(iter(S.values())).shape[0] if S else 1
    tau = ls.X.new_zeros(K, p)
    for term, names in nonsmooth.selection(single).items():
        if name not in names:
            continue
        pen = nonsmooth[term]
        c = pen.factor(name)
        level = S[term][:, None]
        if c is not None:
            level = level * c.to(tau.dtype).expand(1, p).reshape(1, p)
        tau = tau + level
    return tau


def gram_lipschitz(gram: Tensor) -> float:
    """``λ_max(XᵀX/n)``: exact (``eigvalsh``) for ``p ≤ 512``, else 32 Lanczos steps with a
    2% margin (Lanczos approaches ``λ_max`` from below; FISTA's momentum iteration stays
    stable for steps up to ``4/(3 λ_max)``, and the stopping test holds at any step)."""
    if gram.shape[0] <= _EIGVALSH_MAX:
        return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0))
    gen = torch.Generator().manual_seed(0)
    v0 = {"w": torch.randn(1, gram.shape[0], generator=gen, dtype=gram.dtype).to(gram.device)}
    est = _tree.lanczos_max(lambda v: {"w": v["w"] @ gram}, v0, 32)
    return 1.02 * float(est[0])


class Momentum:
    """FISTA's momentum by steps since the last restart, as a growing tensor table:
    ``β[0] = 0`` (a restart) and ``β[c] = (θ_{c−1} − 1)/θ_c`` with ``θ_0 = 1``,
    ``θ_{c+1} = ½ + √(¼ + θ_c²)``. Each growth computes only the new entries."""

    def __init__(self, like: Tensor) -> None:
        self.theta = 1.0
        self.table = like.new_zeros(1)
        self.covering(63)

    def covering(self, c: int) -> Tensor:
        """The table, grown (doubled) until index ``c`` is in it."""
        n = self.table.shape[0]
        if c < n:
            return self.table
        new = []
        for _ in range(max(n, c + 1 - n)):
            nxt = 0.5 + math.sqrt(0.25 + self.theta * self.theta)
            new.append((self.theta - 1.0) / nxt)
            self.theta = nxt
        more = torch.tensor(new, dtype=self.table.dtype).to(self.table.device)
        self.table = torch.cat([self.table, more])
        return self.table


def fista_lasso(
    ls: LeastSquares,
    tau: Tensor,
    w0: Tensor,
    max_iter: int,
    tol: float,
    L0: Tensor | None,
    restart: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FISTA for ``1/(2n)‖y − Xw‖² + Σ_j τ_kj |w_j|`` on the Gram matrix with one fixed step
    ``1/L`` (no backtracking; the largest ``lipschitz=`` when given) and no host
    synchronisation between tests. Per iteration, on ``(K, p)`` tensors::

        z = y − (y G)/L + b/L  (= y − ∇f(y)/L, one addmm);  x⁺ = z − clamp(z, −τ/L, τ/L)
        c ← 0 where ⟨y − x⁺, x⁺ − x⟩ > 0 (restart) else c + 1;  y ← x⁺ + β[c] (x⁺ − x)

    with ``β`` from :class:`Momentum`, starting from ``w0`` ``(K, 1, p)``. The stopping
    rule of :func:`~funcreg.solvers.solve` (:func:`~funcreg._tree.stopping_rule`) is
    evaluated at iteration 1, every ``_CHECK_EVERY``-th iteration and at ``max_iter``: first
    at ``y`` (``‖G(y)‖ = L ‖x⁺ − y‖``, ``∇f(y) = L (y − z)``, at hand), then, when a model
    passes, at the point it returns, ``x⁺`` (one more ``addmm``); models that stop are
    written out and dropped from the batch. Returns the solutions ``(K, p)``,
    ``iterations``, ``converged`` and the round-off floor where each model stopped
    (``(K,)`` each)."""
    K = w0.shape[0]
    G = ls.gram
    floor = torch.finfo(G.dtype).tiny ** 0.5
    L = max(gram_lipschitz(G), floor) if L0 is None else float(L0.max())
    bL = ls.xty / L  # (1, p)
    hi = tau / L
    lo = -hi
    momentum = Momentum(w0)
    out = w0[:, 0].clone()
    iterations = torch.full((K,), max_iter, dtype=torch.int64, device=w0.device)
    converged = torch.zeros(K, dtype=torch.bool, device=w0.device)
    floors = torch.zeros(K, dtype=w0.dtype, device=w0.device)
    idx = torch.arange(K, device=w0.device)
    scale = torch.linalg.vector_norm(ls.xty, dim=1).expand(K)  # ‖∇f(0)‖ = ‖b‖
    x = w0[:, 0].clone()
    y = x
    since = torch.zeros(K, 1, dtype=torch.int64, device=w0.device)  # steps since restart
    for it in range(1, max_iter + 1):
        z = torch.addmm(y, y, G, alpha=-1.0 / L).add_(bL)
        xn = z - torch.clamp(z, lo, hi)
        step = xn - x
        if it == 1 or it % _CHECK_EVERY == 0 or it == max_iter:
            gnorm = L * torch.linalg.vector_norm(y - z, dim=1)
            if it == 1:
                scale = torch.maximum(scale, gnorm)
            ynorm = torch.linalg.vector_norm(y, dim=1)
            mapping = L * torch.linalg.vector_norm(xn - y, dim=1)
            passed, _ = _tree.stopping_rule(mapping, gnorm, scale, L, ynorm, tol)
            last = it == max_iter
            if last or bool(passed.any()):  # test the point returned, x⁺, as well
                z2 = torch.addmm(xn, xn, G, alpha=-1.0 / L).add_(bL)
                gnorm2 = L * torch.linalg.vector_norm(xn - z2, dim=1)
                mapping2 = L * torch.linalg.vector_norm(torch.clamp(z2, lo, hi) - (z2 - xn), dim=1)
                xnorm = torch.linalg.vector_norm(xn, dim=1)
                stop, ok = _tree.stopping_rule(mapping2, gnorm2, scale, L, xnorm, tol)
                done = stop | last
                if bool(done.any()):
                    floor = _tree.floor_ratio(gnorm2, scale, L, xnorm)
                    state = (xn, step, y, since, lo, hi, scale)
                    going = _tree.retire(
                        done, ok, it, idx, (xn, floor), (out, floors), iterations, converged, state
                    )
                    if going is None:
                        break
                    idx, (xn, step, y, since, lo, hi, scale) = going
        beta = momentum.covering(it)  # since <= it: grown on the host, no read of since
        since = since + 1
        if restart:
            since = torch.where(torch.linalg.vecdot(y - xn, step).unsqueeze(1) > 0, 0, since)
        y = torch.addcmul(xn, beta[since], step)
        x = xn
    return out, iterations, converged, floors
