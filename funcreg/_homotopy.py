"""The exact Lasso path by homotopy (LARS-lasso) on a small Gram matrix: starting points
for :func:`funcreg._lasso.fista_lasso` that are the solutions themselves.

For ``min_w ½ wᵀGw − rᵀw + λ Σ_j c_j |w_j|`` (``c_j > 0``; rescaling ``u_j = c_j w_j``
turns it into the plain Lasso on ``G' = D⁻¹GD⁻¹``, ``r' = D⁻¹r``, ``D = diag(c)``), the
solution is piecewise linear in ``λ`` (Efron et al. 2004; Osborne et al. 2000). On an
active set ``A`` with signs ``σ`` the optimality conditions ``G_AA w_A = r_A − λ σ_A``
give

    ``w_A(λ) = a − λ d``,  ``a = G_AA⁻¹ r_A``,  ``d = G_AA⁻¹ σ_A``,

and the correlations of the other coordinates ``ρ_j(λ) = r_j − G_jA w_A(λ) = e_j + λ f_j``
(``e = r − G_·A a``, ``f = G_·A d``) stay within ``[−λ, λ]``. Going down from
``λ_max = max_j |r_j|`` (where ``w = 0`` and ``A`` is the argmax), the segment ends at the
largest ``λ`` below the current one where a coordinate joins (``|ρ_j(λ)| = λ``:
``λ = e_j/(1 − f_j)`` with sign ``+``, or ``−e_j/(1 + f_j)`` with ``−``) or leaves
(``w_j(λ) = 0``: ``λ = a_j/d_j``); then ``A`` changes by that coordinate, and the next
segment starts. Each requested strength is read off its segment, ``a − λ d``: exact, no
interpolation error. ``G_AA⁻¹`` is kept up to date by the bordered-inverse formulas when
a coordinate joins or leaves (``O(|A|²)``), recomputed by Cholesky every ``_REFRESH``
updates, and each solve gets one step of iterative refinement; ``O(p)`` kinks in practice.

Nothing here is trusted: the points are *starting points*; the stopping rule of
:func:`~funcreg.solvers.solve` (computed at the returned point) decides ``converged``, and
where the homotopy stops early — a singular ``G_AA`` (collinear columns, ``n < p``), more
kinks than ``_KINKS_PER_P · p`` — the remaining strengths keep the caller's start.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .penalties import L1
from .spec import Spec

HOMOTOPY_MAX = 64  # follow the path exactly for reduced problems up to this many coordinates
HARD_MAX = 256  # ... and up to this many where G is ill-conditioned (FISTA is slow there)
HARD_CONDITION = 100.0  # λ_max(G)/λ_min(G) from which a problem counts as ill-conditioned
_REFRESH = 32  # recompute G_AA⁻¹ by Cholesky after this many rank-one updates
_KINKS_PER_P = 8  # give up after this many kinks per coordinate (cycling on ties)
_RTOL = 1e-12  # relative tolerance of the proportionality test of the thresholds


def proportional(tau: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(s (K,), c (p,))`` with ``τ = s cᵀ``, ``max c = 1`` and every ``c_j > 0``, when the
    thresholds ``τ (K, p)`` are one pattern scaled per model (a path of one ``L1`` term);
    else ``None``."""
    s = tau.amax(1)
    top = int(torch.argmax(s))
    if not float(s[top]) > 0:
        return None
    c = tau[top] / s[top]
    if not bool((c > 0).all()):
        return None
    if not bool(((tau - s[:, None] * c).abs() <= _RTOL * tau.abs().amax()).all()):
        return None
    return s, c


def lasso_path(G: Tensor, r: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    """The Lasso ``½ wᵀGw − rᵀw + λ‖w‖₁`` at each of ``strengths (K,)`` (any order), by the
    homotopy of the module docstring, in float64 on the host (numpy: a few microseconds per
    small operation, where an eager torch call costs several): ``(w (K, p), done (K,)
    bool)`` as float64 CPU tensors, ``done`` false (and ``w`` zero) for the strengths below
    where the homotopy stopped."""
    Gn = G.detach().to("cpu", torch.float64).numpy()
    rn = r.detach().to("cpu", torch.float64).numpy()
    lam = strengths.detach().to("cpu", torch.float64).numpy()
    p, K = rn.shape[0], lam.shape[0]
    w = np.zeros((K, p))
    done = lam >= np.abs(rn).max()  # zero is the solution there
    lam_hi = float(np.abs(rn).max())
    if lam_hi <= 0.0 or done.all():
        return torch.from_numpy(w), torch.from_numpy(done)
    lam_lo = float(lam.min())
    j0 = int(np.argmax(np.abs(rn)))
    active: list[int] = [j0]
    signs: list[float] = [1.0 if rn[j0] > 0 else -1.0]
    last = j0  # the coordinate that joined or left at the last kink
    cand = np.empty((3, p))
    M = np.array([[1.0 / Gn[j0, j0]]]) if Gn[j0, j0] > 0 else None  # G_AA⁻¹
    updates = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_KINKS_PER_P * p + 2):
            if M is None:
                break  # a singular G_AA: the path is not unique from here
            A = np.array(active)
            GA = Gn[:, A]
            if updates >= _REFRESH:  # bound the drift of the rank-one updates
                try:
                    chol = np.linalg.cholesky(GA[A])
                except np.linalg.LinAlgError:
                    break
                inv_l = np.linalg.solve(chol, np.eye(len(active)))
                M, updates = inv_l.T @ inv_l, 0
            rhs = np.stack([rn[A], np.array(signs)], 1)
            sol = M @ rhs
            sol += M @ (rhs - GA[A] @ sol)  # one step of iterative refinement
            a, d = sol[:, 0], sol[:, 1]
            if not np.isfinite(sol).all():
                break
            e = rn - GA @ a
            f = GA @ d
            cand[0] = e / (1.0 - f)  # j joins with sign +
            cand[1] = -e / (1.0 + f)  # j joins with sign −
            cand[2] = -1.0
            cand[:2, A] = -1.0
            cand[2, A] = a / d  # j ∈ A leaves
            # the next kink: the largest λ in (0, lam_hi]; the coordinate that changed at
            # lam_hi only changes back clearly below it (not by round-off at the same kink)
            cand[:, last] = np.where(cand[:, last] < lam_hi * (1.0 - 1e-9), cand[:, last], -1.0)
            cand[~((cand > 0) & (cand <= lam_hi))] = -1.0
            kind, j = divmod(int(np.argmax(cand)), p)
            lam_next = max(float(cand[kind, j]), 0.0)
            seg = (lam <= lam_hi) & (lam >= lam_next) & ~done
            if seg.any():
                rows = np.nonzero(seg)[0]
                w[rows[:, None], A[None, :]] = a[None] - lam[rows][:, None] * d[None]
                done |= seg
            if lam_next <= lam_lo or lam_next <= 0.0 or done.all():
                break
            if kind == 2:  # j leaves the active set
                at = active.index(j)
                active.pop(at)
                signs.pop(at)
                if not active:  # every coordinate left: stop (the caller's start stays)
                    break
                M = _inverse_without(M, at)
            else:
                M = _inverse_with(M, Gn[A, j], Gn[j, j])
                active.append(j)
                signs.append(1.0 if kind == 0 else -1.0)
            updates += 1
            last = j
            lam_hi = lam_next
    return torch.from_numpy(w), torch.from_numpy(done)


def _inverse_with(M: np.ndarray, u: np.ndarray, g: float) -> np.ndarray | None:
    """``[[G_AA, u], [uᵀ, g]]⁻¹`` from ``M = G_AA⁻¹`` (the bordered inverse, Schur
    complement ``σ = g − uᵀMu``); ``None`` when ``σ ≤ 1e-12 g`` (a singular ``G_AA``)."""
    v = M @ u
    schur = g - u @ v
    if not schur > 1e-12 * abs(g):
        return None
    s = len(u)
    out = np.empty((s + 1, s + 1))
    out[:s, :s] = M + np.outer(v, v) / schur
    out[:s, s] = out[s, :s] = -v / schur
    out[s, s] = 1.0 / schur
    return out


def _inverse_without(M: np.ndarray, at: int) -> np.ndarray:
    """``G_AA⁻¹`` with the row and column ``at`` removed from ``G_AA``, from ``M = G_AA⁻¹``:
    ``M_rr − M_r,at M_at,r / M_at,at`` (``r`` the other indices)."""
    keep = np.delete(np.arange(M.shape[0]), at)
    col = M[keep, at]
    return M[np.ix_(keep, keep)] - np.outer(col, col) / M[at, at]


def exact_start(G: Tensor, r: Tensor, tau: Tensor, w0: Tensor, condition: float) -> Tensor:
    """``w0 (K, p)`` with its rows replaced by the exact solutions of ``½ wᵀGw − rᵀw +
    Σ_j τ_kj |w_j|`` where the homotopy applies and reached the row's strength: thresholds
    that are :func:`proportional` (the rescaling of the module docstring), and ``p ≤
    HOMOTOPY_MAX``, or ``p ≤ HARD_MAX`` with ``condition`` (``λ_max/λ_min`` of ``G``) at
    least ``HARD_CONDITION`` — there the ``O(p³)`` homotopy beats FISTA's iterations; on a
    well-conditioned ``G`` of that size FISTA is the faster."""
    p = G.shape[0]
    if p == 0 or p > HARD_MAX or (p > HOMOTOPY_MAX and condition < HARD_CONDITION):
        return w0
    found = proportional(tau)
    if found is None:
        return w0
    s, c = found
    w, done = lasso_path(G / (c[:, None] * c[None, :]), r / c, s)
    if not bool(done.any()):
        return w0
    w = w.to(w0) / c[None, :]
    return torch.where(done.to(w0.device)[:, None], w, w0)


def whole_path(spec: Spec, term: str, single: Mapping[str, Tensor]) -> bool:
    """Whether a path of ``term`` on a quadratic loss is followed exactly by the homotopy in
    one solve of the whole grid: ``term`` is the only term, an ``L1`` without ``toward=``
    and with positive factors, on at most ``HOMOTOPY_MAX`` entries."""
    if set(spec) != {term}:
        return False
    pen = spec[term]
    if type(pen) is not L1 or pen.toward is not None:
        return False
    names = spec.selection(dict(single))[term]
    for n in names:
        c = pen.factor(n)
        if c is not None and not bool((c > 0).all()):
            return False
    return 0 < sum(int(single[n].numel()) for n in names) <= HOMOTOPY_MAX
