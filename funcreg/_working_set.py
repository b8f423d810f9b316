"""Exact Lasso-type solves on a working set of features, for :func:`funcreg.tune`.

For a least-squares loss ``1/(2n)‖y − Xw − b‖²`` with elementwise penalties (``L1``,
``ElasticNet``, ``L2``, ``NonNegative``, ``Box``; no ``toward=``; ``weight=`` absent or
one factor per feature), a solution is sparse and the coordinates outside its support
decouple: ``w`` (zero off a set ``A``) minimises the full problem if and only if it
minimises the problem restricted to the columns ``X_A`` and every coordinate ``j ∉ A``
passes the optimality test at zero::

    prox_{h_j}(−∇_j f(w)) = 0        (for L1: |x_jᵀ(Xw + b − y)|/n ≤ s c_j)

:class:`WorkingSet` solves the restricted problem with :func:`funcreg.solve` on
``least_squares(X[:, A], y)`` (an ``|A| × |A|`` Gram matrix instead of ``p × p``), tests the
coordinates outside ``A`` with one product ``Xᵀr``, adds the worst violators (at most
``max(grow, |A|)`` per round) and solves again, until none is left: the result solves the
full problem to ``solve``'s tolerance. Between calls (the outer steps of ``tune``) it starts
from the previous support, plus the coordinates that would fail their test at strengths
``slack`` (0.8) times the new ones (a guess in the spirit of the sequential strong rule,
Tibshirani et al. 2012, that saves most second rounds; coordinates that end at zero leave
the set at the next call). The hypergradient of the restricted problem is that of the full
one: the coordinates outside ``A`` stay at zero under small changes of the strengths where
their test holds strictly.

With one ``L1`` term (float64, on the host) the working set is the exact support instead:
:class:`funcreg._homotopy.Homotopy` on the whole problem (``G`` read by columns, centred
with an intercept, rescaled by per-feature factors) walks from the last call's strength to
the new one — a few kinks per outer step; beyond a step of ``JUMP`` in ``log s`` it tries
active-set rounds from the current support first — or starts from a guess
(:meth:`WorkingSet.seed`: another fold's solution, the folds' consensus before the refit).
:func:`funcreg.solve` then starts at the answer and certifies it at its first test, and
the test at zero above still covers the other coordinates (a start that fails either gets
the usual rounds and a cold homotopy next time).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._homotopy import Homotopy
from .losses import LeastSquares, least_squares
from .penalties import L1, L2, Box, ElasticNet, NonNegative
from .solvers import Solution, solve
from .spec import Spec

_KINDS = (L1, L2, ElasticNet, NonNegative, Box)
JUMP = 0.2  # a step in log s beyond which the homotopy tries a jump (Homotopy.jump)


def eligible(loss: Any, spec: Spec) -> bool:
    """Whether :class:`WorkingSet` applies: a one-output ``least_squares`` loss and only the
    elementwise penalties above, without ``toward=`` and with no or per-feature factors."""
    if not isinstance(loss, LeastSquares) or loss.Y.shape[1] != 1:
        return False
    p = loss.X.shape[1]
    for pen in spec.values():
        if type(pen) not in _KINDS or pen.toward is not None:
            return False
        c = pen.weight
        if c is not None and not (isinstance(c, Tensor) and c.numel() in (1, p)):
            return False
        sel = spec.selection(loss.init())
        if any(n != "weight" for names in sel.values() for n in names):
            return False
    return True


def restrict(spec: Spec, cols: Tensor, p: int) -> Spec:
    """The spec on the columns ``cols``: per-feature ``weight=`` factors sliced."""

    def cut(c: Any) -> Any:
        if isinstance(c, Tensor) and c.numel() == p:
            return c.reshape(-1)[cols].reshape(1, -1)
        return c

    return Spec({t: dataclasses.replace(pen, weight=cut(pen.weight)) for t, pen in spec.items()})


class WorkingSet:
    """One fold's least-squares problem ``(X, y)``, solved on a working set (module doc)."""

    def __init__(
        self, X: Tensor, y: Tensor, fit_intercept: bool, grow: int = 10, slack: float = 0.8
    ) -> None:
        self.X, self.y, self.fit_intercept, self.grow, self.slack = X, y, fit_intercept, grow, slack
        self.n, self.p = X.shape
        self.cols = torch.zeros(0, dtype=torch.long, device=X.device)
        self.w = X.new_zeros(0)
        self.bias = X.new_zeros(1) if fit_intercept else None
        self._grad: Tensor | None = None  # ∇f at the current (w, bias), once computed
        # a plain L1 term in float64 on the host: the exact solution by the homotopy, walked
        # from the last call's strength (``None`` until first used; ``False`` once it failed)
        self._path: Homotopy | None | bool = None
        self._path_weight: Tensor | None = None  # the L1 factors the homotopy was built for

    def _violators(self, spec: Spec, s: Mapping[str, Any], w: Tensor, slack: float = 1.0) -> Tensor:
        """Coordinates outside the working set whose test at zero fails (at the strengths
        ``slack · s``), worst first; after a solve (``slack == 1``) at most
        ``max(grow, |A|)`` of them, for the strong-rule guess (``slack < 1``) at most ``n`` (a
        Lasso solution has at most ``n`` non-zeros)."""
        if slack != 1.0:
            s = {t: v * slack for t, v in s.items()}
        g = self._grad
        if g is None:  # else: the gradient at the end of the last call (w unchanged since)
            pred = self.X[:, self.cols] @ w
            if self.bias is not None:
                pred = pred + self.bias
            g = self.X.T @ (pred - self.y) / self.n
            self._grad = g
        z = {"weight": -g.reshape(1, -1)}
        if self.bias is not None:
            z["bias"] = self.bias.clone()
        nonsmooth = spec.nonsmooth()
        step = nonsmooth.prox(z, s, 1.0)["weight"].reshape(-1) if len(nonsmooth) else -g
        bad = step.abs()
        bad[self.cols] = 0.0
        idx = (bad > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            return idx
        keep = self.n if slack < 1.0 else max(self.grow, int(self.cols.numel()))
        return idx[bad[idx].argsort(descending=True)[:keep]]

    def _add(self, new: Tensor) -> None:
        cols = torch.cat([self.cols, new])
        order = cols.argsort()
        self.cols = cols[order]
        self.w = torch.cat([self.w, self.w.new_zeros(new.numel())])[order]

    def seed(self, w: Tensor) -> None:
        """Start the next call from ``w`` ``(p,)`` (e.g. the mean of the folds' solutions
        before the refit on all rows, or another fold's solution): its non-zeros become the
        working set (and, for one ``L1`` term, the guess of :meth:`Homotopy.seed
        <funcreg._homotopy.Homotopy.seed>` before a first walk)."""
        self.cols = w.nonzero().squeeze(1)
        self.w = w[self.cols].clone()
        self._grad = None

    def solve(
        self, spec: Spec, s: Mapping[str, Any], tol: float, max_iter: int
    ) -> tuple[LeastSquares, Spec, Solution, Tensor]:
        """Solve the full problem; returns the restricted loss, spec and solution (K = 1)
        and the columns they cover."""
        # the exact support where the homotopy applies; else, before the first solve, also
        # take in the coordinates that would fail their test at strengths ``slack`` times
        # smaller (a strong-rule guess of the new support)
        exact = self._exact_start(spec, s)
        new = self.cols.new_zeros(0) if exact else self._violators(spec, s, self.w, self.slack)
        if self.cols.numel() == 0 and new.numel() == 0:
            new = self.cols.new_zeros(1)  # zero solves it: keep a column to differentiate
        if new.numel():
            self._add(new)
        while True:
            loss = least_squares(self.X[:, self.cols], self.y, fit_intercept=self.fit_intercept)
            init = {"weight": self.w.reshape(1, -1)}
            if self.bias is not None:
                init["bias"] = self.bias
            sub = restrict(spec, self.cols, self.p)
            # from the exact solution: a bound on the curvature for the step (the solve's own
            # λ_max and homotopy would only find the start again), its first test certifies
            lip = _gershgorin(loss) if exact else None
            sol = solve(loss, sub, init, s, tol=tol, max_iter=max_iter, lipschitz=lip)
            self.w = sol.params["weight"][0].reshape(-1)
            self._grad = None
            if self.bias is not None:
                self.bias = sol.params["bias"][0]
            new = self._violators(spec, s, self.w)
            if exact and (new.numel() or int(sol.iterations.max()) > 1):
                self._path = None  # the start was off (round-off at a tie): rebuild it cold
            if new.numel() == 0:
                break
            self._add(new)
        out = (loss, sub, sol, self.cols)
        support = self.w != 0
        if bool(support.any()):  # the next call starts from the support
            self.cols, self.w = self.cols[support], self.w[support]
        return out

    def _exact_start(self, spec: Spec, s: Mapping[str, Any]) -> bool:
        """For one ``L1`` term (float64, on the host): put the exact solution at ``s`` into
        ``cols``, ``w`` (and ``bias``), by :class:`~funcreg._homotopy.Homotopy` on the
        (centred, rescaled by the term's factors) Gram matrix, read by columns and walked
        from the last call's strength: a few kinks per outer step of ``tune``. ``False``
        (nothing changed) where that does not apply or the walk stopped early (singular
        ``G_AA``): the working-set rounds take over."""
        if self._path is False or len(spec) != 1:
            return False
        ((term, pen),) = spec.items()
        if type(pen) is not L1 or self.X.dtype != torch.float64 or self.X.device.type != "cpu":
            return False
        c: Tensor | None = None
        if pen.weight is not None:
            if not isinstance(pen.weight, Tensor):
                return False
            c = pen.weight.detach().reshape(-1).to(torch.float64).expand(self.p)
            if not bool((c > 0).all()):
                return False
        same = (c is None and self._path_weight is None) or (
            c is not None and self._path_weight is not None and torch.equal(c, self._path_weight)
        )
        if not isinstance(self._path, Homotopy) or not same:
            self._path, self._path_weight = self._homotopy(c), c
        assert isinstance(self._path, Homotopy)
        lam = float(s[term])
        guess = self.w != 0
        if self._path.k == 0 and bool(guess.any()):  # at λ_max: try the guess first (seed)
            self._path.seed(lam, self.cols[guess].numpy(), self.w[guess].sign().numpy())
        elif self._path.k and abs(math.log(lam / self._path.lam)) > JUMP:  # a long step
            self._path.jump(lam)
        w, done = self._path.walk(np.array([lam]))
        if not done[0]:
            self._path = False  # e.g. n < p at a small strength: not again for this problem
            return False
        u = torch.from_numpy(w[0])
        if c is not None:
            u = u / c
        self.cols = u.nonzero().squeeze(1)
        self.w = u[self.cols]
        if self.bias is not None:
            mean = self.X.mean(0)[self.cols]
            self.bias = (self.y.mean() - mean @ self.w).reshape(1)
        self._grad = None
        return True

    def _homotopy(self, c: Tensor | None) -> Homotopy:
        """The homotopy of this problem: ``G = X̃ᵀX̃/n``, ``r = X̃ᵀỹ/n`` (``X̃``, ``ỹ`` centred
        with an intercept), divided by ``c_i c_j`` and ``c_j`` for factors ``c``; ``G`` read
        by columns straight from ``X`` (no copy of it): ``G_·idx = Xᵀ X̃_idx/n`` (centring the
        few columns ``idx`` centres the product)."""
        X = self.X.numpy()
        y = self.y.numpy()
        mu = X.mean(0) if self.fit_intercept else None
        if mu is not None:
            y = y - y.mean()
        cn = None if c is None else c.numpy()
        scale = np.full(self.p, float(self.n)) if cn is None else self.n * cn  # n c_j

        def columns(idx: np.ndarray) -> np.ndarray:
            left = X[:, idx] if mu is None else X[:, idx] - mu[idx]
            out = (left / scale[idx]).T @ X
            return out if cn is None else out / cn

        rank = self.n - 1 if self.fit_intercept else self.n
        return Homotopy(columns, X.T @ y / scale, rank=min(rank, self.p))

    def full(self) -> Tensor:
        """The current coefficients on all ``p`` features."""
        return self.X.new_zeros(self.p).index_copy(0, self.cols, self.w)

    def expand(self, sol: Solution, cols: Tensor) -> dict[str, Tensor]:
        """The full ``{"weight": (1, p)[, "bias"]}`` of a restricted solution."""
        w = self.X.new_zeros(1, self.p)
        w[0, cols] = sol.params["weight"][0].reshape(-1)
        out = {"weight": w}
        if self.fit_intercept:
            out["bias"] = sol.params["bias"][0]
        return out


def _gershgorin(loss: LeastSquares) -> float | None:
    """An upper bound on ``λ_max`` of the loss's Hessian (with an intercept, the bordered
    ``[[G, μ], [μᵀ, 1]]``): the largest absolute row sum; ``None`` where it is 0 (all-zero
    columns: no step to bound, :func:`funcreg.solve` finds its own)."""
    rows = loss.gram.abs().sum(1)
    if loss.fit_intercept:
        mu = loss.x_mean.abs()
        return max(float((rows + mu).max()), 1.0 + float(mu.sum()))
    top = float(rows.max())
    return top if top > 0 else None
