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

The walk is a state (:class:`Homotopy`): the segment at the current ``λ``. It goes on from
there to any other strength, down or *up* (the same segments, the events in reverse: the
next kink is the smallest candidate above ``λ``), so a sequence of nearby strengths — the
outer steps of :func:`funcreg.tune` — pays only for the kinks in between; it reads ``G``
by columns, only for the coordinates that join, so it runs on the full design of a
working-set problem (``p`` in the thousands) without forming ``G``. :meth:`Homotopy.seed`
starts it at a strength from a guessed support and signs (a neighbouring problem's
solution), repaired by active-set rounds until the optimality conditions hold;
:meth:`Homotopy.jump` does the same from the current state, for a long step (a few rounds
instead of every kink in between), and keeps the state where the rounds fail.

Nothing here is trusted: the points are *starting points*; the stopping rule of
:func:`~funcreg.solvers.solve` (computed at the returned point) decides ``converged``, and
where the homotopy stops early — a singular ``G_AA`` (collinear columns, ``n < p``), more
kinks than ``_KINKS_PER_P · p``, or on a large problem the active set outgrowing
``PARTIAL_MAX`` (:func:`exact_start`) — the remaining strengths keep the caller's start,
or start from the exact solution nearest above them where the caller's is all zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from .penalties import L1
from .spec import Spec

HOMOTOPY_MAX = 64  # follow the path exactly for reduced problems up to this many coordinates
HARD_MAX = 256  # ... and up to this many where G is ill-conditioned (FISTA is slow there)
HARD_CONDITION = 100.0  # λ_max(G)/λ_min(G) from which a problem counts as ill-conditioned
PARTIAL_MIN = 512  # from this many coordinates, walk the top of a path exactly ...
PARTIAL_MAX = 128  # ... while |A| stays at most this (below, FISTA's steps are cheaper)
_REFRESH = 32  # recompute G_AA⁻¹ by Cholesky after this many rank-one updates
_KINKS_PER_P = 8  # give up after this many kinks per coordinate (cycling on ties)
_SEED_ROUNDS = 8  # active-set rounds of Homotopy.seed before it gives up
_SEED_GROW = 10  # ... which adds at most max(_SEED_GROW, |A|) coordinates per round
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


def lasso_path(
    G: Tensor, r: Tensor, strengths: Tensor, max_active: int | None = None
) -> tuple[Tensor, Tensor]:
    """The Lasso ``½ wᵀGw − rᵀw + λ‖w‖₁`` at each of ``strengths (K,)`` (any order), by the
    homotopy of the module docstring, in float64 on the host (numpy: a few microseconds per
    small operation, where an eager torch call costs several): ``(w (K, p), done (K,)
    bool)`` as float64 CPU tensors, ``done`` false (and ``w`` zero) for the strengths below
    where the homotopy stopped — also where the active set outgrew ``max_active``."""
    Gn = G.detach().to("cpu", torch.float64).numpy()
    rn = r.detach().to("cpu", torch.float64).numpy()
    lam = strengths.detach().to("cpu", torch.float64).numpy()
    order = np.argsort(-lam, kind="stable")  # walked down from λ_max
    ws, dones = Homotopy(lambda idx: Gn[idx], rn).walk(lam[order], max_active)
    w, done = np.zeros_like(ws), np.zeros_like(dones)
    w[order], done[order] = ws, dones
    return torch.from_numpy(w), torch.from_numpy(done)


class Homotopy:
    """The Lasso ``½ wᵀGw − rᵀw + λ‖w‖₁`` followed along ``λ`` from its current strength to
    any other, down *or up*: the state is the segment at the current ``λ`` (the active set
    ``A``, its signs ``σ`` and ``G_AA⁻¹``), so a solution at one strength starts the walk to
    the next and only the kinks in between are paid for (the outer steps of
    :func:`funcreg.tune` move the strength by a few percent: a handful of kinks, where a
    walk from ``λ_max`` meets every kink above the strength).

    Going up, the segment formulas of the module docstring hold unchanged; the next event is
    the *smallest* ``λ`` above the current one where a coordinate joins (``|ρ_j(λ)| = λ``)
    or leaves (``w_j(λ) = 0``), the events of the way down in reverse. ``G`` is read by
    columns (``columns(idx) → G[:, idx]ᵀ``, float64 ``(len(idx), p)``), only for the
    coordinates that join,
    so ``p`` may be large (``G`` never formed): a kink costs ``O(p |A|)``. The state lives in
    buffers grown by doubling (``G_·A``, ``G_AA``, ``G_AA⁻¹``, ``[r_A, σ_A]``), updated in
    place when a coordinate joins or leaves."""

    def __init__(
        self, columns: Callable[[np.ndarray], np.ndarray], r: np.ndarray, rank: int | None = None
    ) -> None:
        self.columns, self.r = columns, np.asarray(r, dtype=np.float64)
        self.p = int(self.r.shape[0])
        self.rank = self.p if rank is None else rank  # a bound on the rank of G (|A| <= it)
        self.top = float(np.abs(self.r).max()) if self.p else 0.0  # λ_max: zero above
        self._cold()

    def _cold(self, cap: int = 16) -> None:
        """The state at ``λ_max``: no active coordinate."""
        self.lam = self.top
        self.k = 0  # |A|
        self._A = np.empty(cap, dtype=np.intp)  # A, in the order the coordinates joined
        self._rows = np.empty((cap, self.p))  # G_·Aᵀ
        self._G = np.empty((cap, cap))  # G_AA
        self._M = np.empty((cap, cap))  # G_AA⁻¹
        self._rhs = np.empty((cap, 2))  # [r_A, σ_A]
        self.updates = 0  # rank-one updates since M was last recomputed
        self.last = -1  # the coordinate that joined or left at the last kink

    @property
    def active(self) -> list[int]:
        """The active coordinates (in the order they joined)."""
        return self._A[: self.k].tolist()

    def _grow(self) -> None:
        cap = 2 * self._A.shape[0]
        k = self.k
        for name in ("_A", "_rows", "_rhs"):
            old = getattr(self, name)
            new = np.empty((cap, *old.shape[1:]), dtype=old.dtype)
            new[:k] = old[:k]
            setattr(self, name, new)
        for name in ("_G", "_M"):
            old = getattr(self, name)
            new = np.empty((cap, cap))
            new[:k, :k] = old[:k, :k]
            setattr(self, name, new)

    def _segment(self) -> tuple[np.ndarray, ...] | None:
        """``(A, a, d, e, f)`` of the current segment (module docstring); ``None`` where
        ``G_AA`` turned singular."""
        k = self.k
        A, GAA, rhs = self._A[:k], self._G[:k, :k], self._rhs[:k]
        if self.updates >= _REFRESH and k:  # bound the drift of the rank-one updates
            try:
                chol = np.linalg.cholesky(GAA)
            except np.linalg.LinAlgError:
                return None
            inv_l = np.linalg.solve(chol, np.eye(k))
            np.matmul(inv_l.T, inv_l, out=self._M[:k, :k])
            self.updates = 0
        M = self._M[:k, :k]
        sol = M @ rhs
        sol += M @ (rhs - GAA @ sol)  # one step of iterative refinement
        if not np.isfinite(sol).all():
            return None
        E = sol.T @ self._rows[:k]  # (2, p): G_·A a and G_·A d
        e = np.subtract(self.r, E[0], out=E[0])
        e[A] = np.nan  # no join candidates in A
        return A, sol[:, 0], sol[:, 1], e, E[1]

    def _event(self, seg: tuple[np.ndarray, ...], up: bool) -> tuple[float, int, int]:
        """The next kink from the current ``λ`` in the direction of the walk: ``(λ, kind,
        j)``, kind 0/1: ``j`` joins with sign +/−, 2: ``j`` leaves; ``λ = ∓inf`` if none."""
        A, a, d, e, f = seg
        lam, j, k = self.lam, self.last, self.k
        cand = [
            e / (1.0 - f),  # j joins with sign +
            e / np.subtract(-1.0, f),  # j joins with sign −
            a / d,  # A[i] leaves
        ]
        # the coordinate that changed at λ only changes back clearly away from λ (not by
        # round-off at the same kink); having joined, it is the last of A
        at = (j, j, k - 1 if k and A[k - 1] == j else -1) if j >= 0 else (-1, -1, -1)
        if up:  # the smallest candidate >= λ (NaN, those below: +inf)
            far, none = lam * (1.0 + 1e-9), np.inf
            for c, i in zip(cand, at, strict=True):
                if i >= 0 and not c[i] > far:
                    c[i] = none
            best = [np.where(c >= lam, c, none) for c in cand]
            pick = [int(np.argmin(c)) if c.size else -1 for c in best]
        else:  # the largest candidate in (0, λ] (NaN, those above: -1)
            far, none = lam * (1.0 - 1e-9), -1.0
            for c, i in zip(cand, at, strict=True):
                if i >= 0 and not c[i] < far:
                    c[i] = none
            best = [np.where(c <= lam, c, none) for c in cand]
            pick = [int(np.argmax(c)) if c.size else -1 for c in best]
        vals = [float(c[i]) if i >= 0 else none for c, i in zip(best, pick, strict=True)]
        kind = int(np.argmin(vals) if up else np.argmax(vals))
        t = vals[kind]
        if not up and not t > 0.0:
            t = -np.inf
        return t, kind, int(A[pick[kind]]) if kind == 2 else pick[kind]

    def _apply(self, kind: int, j: int) -> bool:
        """Change the active set by the event; ``False`` where ``G_AA`` turns singular."""
        k = self.k
        if kind == 2:  # j leaves the active set: G_AA⁻¹ without row and column ``at``
            at = int(np.flatnonzero(self._A[:k] == j)[0])
            M = self._M[:k, :k]
            col = M[:, at].copy()
            M -= np.multiply.outer(col, col / col[at])
            for buf in (self._A, self._rows, self._rhs):
                buf[at : k - 1] = buf[at + 1 : k]
            for buf in (self._G, self._M):
                buf[at : k - 1, :k] = buf[at + 1 : k, :k]
                buf[: k - 1, at : k - 1] = buf[: k - 1, at + 1 : k]
            self.k = k - 1
        else:  # j joins: the bordered inverse (Schur complement ``g − uᵀ G_AA⁻¹ u``)
            col = self.columns(np.array([j]))[0]
            u, g = col[self._A[:k]], float(col[j])
            v = self._M[:k, :k] @ u
            schur = g - float(u @ v)
            if not schur > 1e-12 * abs(g):
                return False
            if k == self._A.shape[0]:
                self._grow()
            self._M[:k, :k] += np.multiply.outer(v, v / schur)
            self._M[:k, k] = self._M[k, :k] = -v / schur
            self._M[k, k] = 1.0 / schur
            self._G[:k, k] = self._G[k, :k] = u
            self._G[k, k] = g
            self._rows[k] = col
            self._A[k] = j
            self._rhs[k] = (self.r[j], 1.0 if kind == 0 else -1.0)
            self.k = k + 1
        self.updates += 1
        self.last = j
        return True

    def seed(
        self, lam: float, coords: np.ndarray, signs: np.ndarray, known: np.ndarray | None = None
    ) -> bool:
        """Start at ``lam`` from a guess of its active set and signs (e.g. a neighbouring
        problem's solution) instead of walking there from ``λ_max``: the segment on the
        guess, then rounds of an active-set method (coordinates whose coefficient has the
        wrong sign leave, those whose correlation exceeds ``lam`` join with its sign) until
        the optimality conditions hold — then the state is exact at ``lam`` — or
        ``_SEED_ROUNDS`` rounds have passed or the set outgrew ``rank`` (then it is reset to
        ``λ_max``: ``False``). Each round adds at most ``max(_SEED_GROW, |A|)`` coordinates,
        the largest violations first: a poor guess (a wide design, ``p ≫ n``, where another
        fold's support is far off) then fails in a few cheap rounds instead of solving on
        thousands of coordinates. ``known``: the columns of ``coords`` already at hand
        (``G_·coordsᵀ``)."""
        A = np.asarray(coords, dtype=np.intp).reshape(-1)
        sig = np.asarray(signs, dtype=np.float64).reshape(-1)
        if not 0.0 < lam < self.top:
            return False
        pos: dict[int, int] = {}  # coordinate -> its row of ``cols``
        cols = np.empty((0, self.p))
        if known is not None:
            pos.update((j, i) for i, j in enumerate(A.tolist()))
            cols = known
        with np.errstate(divide="ignore", invalid="ignore"):
            for _ in range(_SEED_ROUNDS):
                k = A.shape[0]
                if k == 0 or k > self.rank:
                    break
                new = [j for j in A.tolist() if j not in pos]
                if new:  # read together: one matrix product
                    pos.update((j, cols.shape[0] + i) for i, j in enumerate(new))
                    cols = np.concatenate([cols, self.columns(np.array(new))])
                rows = cols[[pos[j] for j in A.tolist()]]  # G_·Aᵀ
                GAA = rows[:, A]
                rhs = np.stack([self.r[A], sig], 1)
                try:
                    sol = np.linalg.solve(GAA, rhs)
                except np.linalg.LinAlgError:
                    break
                if not np.isfinite(sol).all():
                    break
                E = sol.T @ rows
                rho = self.r - E[0] + lam * E[1]  # the correlations at lam
                rho[A] = 0.0
                keep = (sol[:, 0] - lam * sol[:, 1]) * sig > 0.0
                over = np.abs(rho) - lam * (1.0 + 1e-9)
                join = np.flatnonzero(over > 0.0)
                if keep.all() and not join.size:  # exact at lam: the state from here
                    self._cold(max(16, k))
                    self.k, self.lam = k, lam
                    self._A[:k], self._rows[:k], self._G[:k, :k], self._rhs[:k] = A, rows, GAA, rhs
                    self.updates = _REFRESH  # G_AA⁻¹ by Cholesky at the first segment
                    return True
                if join.size > max(_SEED_GROW, k):  # the worst violators first
                    join = join[np.argsort(-over[join])[: max(_SEED_GROW, k)]]
                A = np.concatenate([A[keep], join])
                sig = np.concatenate([sig[keep], np.sign(rho[join])])
        self._cold()
        return False

    def jump(self, lam: float) -> bool:
        """:meth:`seed` at ``lam`` from the current active set and signs (a long step: a few
        active-set rounds instead of every kink in between); where it fails the state is
        left as it was (``False``)."""
        if not self.k:
            return False
        saved = dict(vars(self))  # seed replaces the buffers, never writes to them
        k = self.k
        if self.seed(lam, self._A[:k].copy(), self._rhs[:k, 1].copy(), self._rows[:k]):
            return True
        vars(self).update(saved)
        return False

    def walk(
        self, strengths: np.ndarray, max_active: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The solutions at ``strengths (K,)``, visited in that order from the current state
        (one direction is cheapest: descending from a cold state); returns ``(w (K, p),
        done (K,))``, ``done`` false (``w`` zero) from where the walk stopped: a singular
        ``G_AA`` (the state is then reset to ``λ_max``), more than ``_KINKS_PER_P · p`` kinks,
        a strength ``≤ 0``, a kink of this walk where the active set grows beyond
        ``max_active`` (the state is then that kink's, below the last strength reached).
        Otherwise the state ends at the last strength reached."""
        lams = np.asarray(strengths, dtype=np.float64).reshape(-1)
        K = lams.shape[0]
        w, done = np.zeros((K, self.p)), np.zeros(K, dtype=bool)
        if self.top <= 0.0:  # r = 0: zero solves every strength
            done[:] = True
            return w, done
        budget = _KINKS_PER_P * self.p + 2
        seg: tuple[np.ndarray, ...] | None = None
        ev: tuple[float, int, int] | None = None  # the segment's next kink that way
        direction = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(K):
                target = float(lams[i])
                if not target > 0.0:
                    break
                if target >= self.top:  # zero solves it; the next walk starts from λ_max
                    if self.k:
                        self._cold(self._A.shape[0])
                        seg = ev = None
                    done[i] = True
                    continue
                while True:
                    if not self.k:
                        self.lam = self.top
                    up = target > self.lam
                    if (1 if up else -1) != direction:  # round-off guard of the other way
                        self.last, direction, ev = -1, 1 if up else -1, None
                    if seg is None:
                        seg = self._segment()
                        if seg is None:
                            self._cold()
                            return w, done
                    if ev is None:  # the same until a kink or a turn
                        ev = self._event(seg, up)
                    lam, kind, j = ev
                    if (lam >= target) if up else (lam <= target):  # no kink before it
                        w[i, seg[0]] = seg[1] - target * seg[2]
                        done[i] = True
                        self.lam = target
                        break
                    budget -= 1
                    if budget < 0 or not self._apply(kind, j):
                        self._cold()
                        return w, done
                    seg, ev, self.lam = None, None, lam
                    if max_active is not None and self.k > max_active:
                        return w, done
        return w, done


def exact_start(G: Tensor, r: Tensor, tau: Tensor, w0: Tensor, condition: float | None) -> Tensor:
    """``w0 (K, p)`` with its rows replaced by the exact solutions of ``½ wᵀGw − rᵀw +
    Σ_j τ_kj |w_j|`` where the homotopy reached the row's strength, for thresholds that are
    :func:`proportional` (the rescaling of the module docstring):

    * the whole path where ``p ≤ HOMOTOPY_MAX``, or ``p ≤ HARD_MAX`` with ``condition``
      (``λ_max/λ_min`` of ``G``; ``None``: not known) at least ``HARD_CONDITION`` — there the
      ``O(p³)`` homotopy beats FISTA's iterations;
    * for ``p ≥ PARTIAL_MIN``, its top, down to the kink where the active set outgrows
      ``PARTIAL_MAX``: the strengths with sparse solutions, where a kink costs ``O(p |A|)``
      and FISTA would spend tens of ``O(p²)`` iterations on each. There the rows below that
      kink which start cold (all zero) start instead from the exact solution at the nearest
      strength above. The walk is skipped where more than ``PARTIAL_MAX`` coordinates have
      ``|r_j| > s_max``, the largest requested strength (the active set there if the
      columns were orthogonal): it would likely reach none of the strengths.
      (Measured on Gaussian designs, n = 2000, 100 strengths: at p = 1000 the walk's 12 ms
      replaces about 80 ms of FISTA; at p = 200 it costs 9 ms against 3.)"""
    p = G.shape[0]
    hard = condition is not None and condition >= HARD_CONDITION
    whole = p <= HOMOTOPY_MAX or (p <= HARD_MAX and hard)
    if p == 0 or (not whole and p < PARTIAL_MIN):
        return w0
    found = proportional(tau)
    if found is None:
        return w0
    s, c = found
    if not bool((c == 1).all()):  # a weighted L1: the plain Lasso of the rescaled problem
        G, r = G / (c[:, None] * c[None, :]), r / c
    if not whole and int((r.abs() > s.amax()).sum()) > PARTIAL_MAX:
        return w0  # the walk would likely reach none of the strengths
    w, done = lasso_path(G, r, s, None if whole else PARTIAL_MAX)  # on the host
    if not bool(done.any()):
        return w0
    w = w.to(w0) / c[None, :]
    if not whole:  # a cold row below the walk: the exact solution nearest above it
        order = torch.argsort(s.cpu(), descending=True, stable=True)
        reached = done[order]
        last = int(reached.nonzero()[-1])
        below = order[last + 1 :][~reached[last + 1 :]]
        cold = below[(w0[below.to(w0.device)] == 0).all(1).cpu()]
        w[cold.to(w.device)] = w[int(order[last])].clone()
        done = done.clone()
        done[cold] = True
    return torch.where(done.to(w0.device)[:, None], w, w0)


def whole_path(spec: Spec, term: str, single: Mapping[str, Tensor]) -> bool:
    """Whether a path of ``term`` on a quadratic loss runs as one solve of the whole grid:
    ``term`` is the only term, an ``L1`` without ``toward=`` and with positive factors.
    There :func:`exact_start` starts every strength at its solution (up to ``HOMOTOPY_MAX``
    entries, or ``HARD_MAX`` on an ill-conditioned problem) or the sparse top of the path
    (from ``PARTIAL_MIN``), and the rest run batched in the lean Lasso loop: measured on
    Gaussian designs through ``nn.Linear`` with an intercept (n = 2000, 100 strengths), one
    solve takes 0.15 s against 0.20 s in warm-started chunks of 10 at p = 200, 0.83 s
    against 1.10 s at p = 600."""
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
    return sum(int(single[n].numel()) for n in names) > 0
