"""The lean loop of :func:`funcreg.solvers.solve` for a plain (weighted) Lasso on a Gram
matrix: ``min_w ½ wᵀGw − bᵀw + Σ_j τ_kj |w_j|`` for K threshold rows at once.

:mod:`funcreg._quadratic` brings every quadratic loss with exact ``L1`` terms (no smooth
terms, no ``toward=``) to this form, unpenalised coordinates eliminated. The loop
(:func:`fista_lasso`): a fixed step ``1/L`` shared by every model, with ``L = λ_max(G)``
(``eigvalsh`` for ``p ≤ 512``, else Lanczos with a 2% margin; or the largest
``lipschitz=``), so no backtracking and ``backtrack`` is ignored; the gradient step as one
``addmm``; the L1 prox by :func:`funcreg.prox.soft_threshold` (the one implementation of
the threshold); momentum from a table indexed by the steps since each model's last restart;
the same restart and stopping test, but the test (one host synchronisation) runs only at
iteration 1 and every 10th iteration, so ``iterations`` is 1 or a multiple of 10 (or
``max_iter``).

**Newton polish.** At each test, a model whose sign pattern has not changed since the last
test, and was not tried on that pattern yet (for ``p ≤ 64``: every model), with a support
small enough that the solve costs about 10 iterations or less (``s³ ≤ 10 p²``), gets a
candidate (for ``p ≤ 64`` up to 3 more, each on the sign pattern of a prox-gradient step
from the previous candidate — an active-set iteration): the exact minimiser on that
support with those signs,
``w_S = G_SS⁻¹ (b_S − τ_S sign(w_S))``, ``0`` elsewhere (one batched solve on the
supports, padded to the largest). The candidate is returned only when it passes the same
stopping rule (a wrong support or sign fails it, as does a singular ``G_SS``), so the
polish changes when a model stops, never what the rule certifies; once FISTA has found the
support, the answer is exact to round-off instead of FISTA's linear rate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _tree, prox

_CHECK_EVERY = 10  # the lean path tests for convergence at iteration 1 and every 10th
_EIGVALSH_MAX = 512  # exact λ_max by eigvalsh up to this p; Lanczos (×1.02) above
_ALWAYS_POLISH = 64  # up to this p, polish at every test (else when the signs held)
_ACTIVE_SET_ROUNDS = 3  # for p <= _ALWAYS_POLISH: more candidates after a failed one
_POLISH_COST = 10  # polish supports of size s with s³ <= 10 p² (about 10 iterations' work)


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


def polish(G: Tensor, b: Tensor, tau: Tensor, x: Tensor) -> Tensor:
    """The Newton candidate of each row of ``x`` ``(k, p)``: on its support ``S`` with its
    signs ``σ``, ``w_S = G_SS⁻¹ (b_S − τ_S σ_S)``, zero elsewhere. The supports are packed
    first (``(k, s, s)`` systems, ``s`` the largest support, padded with the identity);
    rows whose system is singular come back non-finite and fail any stopping test."""
    m = x != 0
    k = x.shape[0]
    s = int(m.sum(1).max())
    if s == 0:
        return torch.zeros_like(x)
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :s]  # support first
    valid = m.gather(1, order)
    both = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(s, dtype=x.dtype, device=x.device).expand(k, s, s)
    sys = torch.where(both, G[order[:, :, None], order[:, None, :]], eye * ~valid[:, None, :])
    rhs = torch.where(valid, (b - tau * torch.sign(x)).gather(1, order), 0.0)
    w, _ = torch.linalg.solve_ex(sys, rhs)
    return torch.zeros_like(x).scatter(1, order, torch.where(valid, w, 0.0))


def fista_lasso(
    G: Tensor,
    b: Tensor,
    tau: Tensor,
    w0: Tensor,
    max_iter: int,
    tol: float,
    L0: Tensor | None,
    restart: bool,
    newton: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """FISTA for ``½ wᵀGw − bᵀw + Σ_j τ_kj |w_j|`` (``G (p, p)``, ``b (1, p)``, ``τ (K, p)``)
    with one fixed step ``1/L`` (no backtracking; the largest ``lipschitz=`` when given) and
    no host synchronisation between tests. Per iteration, on ``(K, p)`` tensors::

        z = y − (y G)/L + b/L  (= y − ∇f(y)/L, one addmm);  x⁺ = soft_threshold(z, τ/L)
        c ← 0 where ⟨y − x⁺, x⁺ − x⟩ > 0 (restart) else c + 1;  y ← x⁺ + β[c] (x⁺ − x)

    with ``β`` from :class:`Momentum`, starting from ``w0`` ``(K, p)``. The stopping rule
    of :func:`~funcreg.solvers.solve` (:func:`~funcreg._tree.stopping_rule`) is evaluated
    at iteration 1, every ``_CHECK_EVERY``-th iteration and at ``max_iter``: first at ``y``
    (``‖G(y)‖ = L ‖x⁺ − y‖``, ``∇f(y) = L (y − z)``, at hand), then, when a model passes,
    at the point it returns, ``x⁺`` (one more ``addmm``); with ``newton``, models whose sign
    pattern held since the last test also try their :func:`polish` candidate. Models that
    stop are written out and dropped from the batch. Returns the solutions ``(K, p)``,
    ``iterations``, ``converged``, the round-off floor and the optimality ``‖G(x)‖/ref``
    where each model stopped (``(K,)`` each)."""
    K = w0.shape[0]
    floor = torch.finfo(G.dtype).tiny ** 0.5
    L = max(gram_lipschitz(G), floor) if L0 is None else float(L0.max())
    bL = b / L  # (1, p)
    thr = tau / L
    momentum = Momentum(w0)
    out = w0.clone()
    iterations = torch.full((K,), max_iter, dtype=torch.int64, device=w0.device)
    converged = torch.zeros(K, dtype=torch.bool, device=w0.device)
    report = torch.full((K, 2), torch.nan, dtype=w0.dtype, device=w0.device)
    idx = torch.arange(K, device=w0.device)
    scale = torch.linalg.vector_norm(b, dim=1).expand(K)  # ‖∇f(0)‖ = ‖b‖
    x = w0.clone()
    y = x
    since = torch.zeros(K, 1, dtype=torch.int64, device=w0.device)  # steps since restart
    signs = torch.zeros_like(x)  # the sign pattern at the last test
    tried = torch.zeros(K, dtype=torch.bool, device=w0.device)  # polished on this pattern

    def certify(w: Tensor, thr: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(stop, converged, [floor, optimality])`` of the stopping rule at ``w``."""
        z = torch.addmm(w, w, G, alpha=-1.0 / L).add_(bL)
        gnorm = L * torch.linalg.vector_norm(w - z, dim=1)
        mapping = L * torch.linalg.vector_norm(prox.soft_threshold(z, thr) - w, dim=1)
        wnorm = torch.linalg.vector_norm(w, dim=1)
        stop, ok = _tree.stopping_rule(mapping, gnorm, scale, L, wnorm, tol)
        ratio = mapping / torch.maximum(scale, gnorm)
        return stop, ok, torch.stack([_tree.floor_ratio(gnorm, scale, L, wnorm), ratio], 1)

    for it in range(1, max_iter + 1):
        z = torch.addmm(y, y, G, alpha=-1.0 / L).add_(bL)
        xn = prox.soft_threshold(z, thr)
        step = xn - x
        if it == 1 or it % _CHECK_EVERY == 0 or it == max_iter:
            gnorm = L * torch.linalg.vector_norm(y - z, dim=1)
            if it == 1:
                scale = torch.maximum(scale, gnorm)
            ynorm = torch.linalg.vector_norm(y, dim=1)
            mapping = L * torch.linalg.vector_norm(xn - y, dim=1)
            passed, _ = _tree.stopping_rule(mapping, gnorm, scale, L, ynorm, tol)
            last = it == max_iter
            done = torch.zeros_like(passed)
            ok = torch.zeros_like(passed)
            rep = report.new_zeros(len(passed), 2)
            ret = xn
            if last or bool(passed.any()):  # test the point returned, x⁺, as well
                stop, ok, rep = certify(xn, thr, scale)
                done = stop | last
            sign_now = torch.sign(xn)
            if newton:
                same = (sign_now == signs).all(1)
                tried = tried & same  # a new pattern may be tried again
                steady = (same & ~tried) | (G.shape[0] <= _ALWAYS_POLISH)
                # a solve on s coordinates costs ~s³/p² iterations: only where that is small
                small = (sign_now != 0).sum(1) ** 3 <= _POLISH_COST * G.shape[0] ** 2
                steady = steady & ~ok & small
                if bool(steady.any()):
                    sel = steady.nonzero().squeeze(1)
                    t_sel, thr_sel = tau.index_select(0, sel), thr.index_select(0, sel)
                    cand = polish(G, b, t_sel, xn.index_select(0, sel))
                    c_stop, c_ok, c_rep = certify(cand, thr_sel, scale[sel])
                    c_good = c_ok & torch.isfinite(c_rep[:, 1])
                    tried[sel] = True
                    # small p: up to _ACTIVE_SET_ROUNDS more candidates, each on the pattern
                    # of a prox-gradient step from the last (signs corrected, violators in)
                    rounds = _ACTIVE_SET_ROUNDS if G.shape[0] <= _ALWAYS_POLISH else 0
                    for _ in range(rounds):
                        bad_rows = ~c_good & torch.isfinite(cand).all(1)
                        if not bool(bad_rows.any()):
                            break
                        z2 = torch.addmm(cand, cand, G, alpha=-1.0 / L).add_(bL)
                        nxt = polish(G, b, t_sel, prox.soft_threshold(z2, thr_sel))
                        n_stop, n_ok, n_rep = certify(nxt, thr_sel, scale[sel])
                        use = bad_rows[:, None]
                        cand = torch.where(use, nxt, cand)
                        c_rep = torch.where(use, n_rep, c_rep)
                        c_good = torch.where(bad_rows, n_ok & torch.isfinite(n_rep[:, 1]), c_good)
                    if bool(c_good.any()):
                        good = sel[c_good]
                        ret = xn.clone()
                        ret[good] = cand[c_good]
                        done[good], ok[good] = True, True
                        rep[good] = c_rep[c_good]
            signs = sign_now
            if bool(done.any()):
                state = (xn, step, y, since, thr, tau, scale, signs, tried)
                going = _tree.retire(
                    done, ok, it, idx, (ret, rep), (out, report), iterations, converged, state
                )
                if going is None:
                    break
                idx, (xn, step, y, since, thr, tau, scale, signs, tried) = going
        beta = momentum.covering(it)  # since <= it: grown on the host, no read of since
        since = since + 1
        if restart:
            since = torch.where(torch.linalg.vecdot(y - xn, step).unsqueeze(1) > 0, 0, since)
        y = torch.addcmul(xn, beta[since], step)
        x = xn
    return out, iterations, converged, report[:, 0], report[:, 1]
