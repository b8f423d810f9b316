"""The general loop of :func:`funcreg.solvers.solve`: FISTA with backtracking and adaptive
restart on stacked params (the algorithm is in :mod:`funcreg.solvers`), the smooth oracles it
calls (any differentiable loss, or a quadratic with its Hessian product) and the batched prox
of a spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from . import _tree
from ._tree import Params
from .spec import Spec

_GROW = 2.0  # backtracking: L ← 2L
_SHRINK = 0.8  # each iteration first tries L ← max(_SHRINK·L, _MARGIN·curvature met last step)
_MARGIN = 1.3
_COOLDOWN = 3  # ... unless the model backtracked in the last _COOLDOWN iterations
_LANCZOS_STEPS = 16


class HasGram(Protocol):
    """A quadratic loss with gradient ``A θ − B``: ``LeastSquares`` or an extracted
    :class:`~funcreg._quadratic.Quadratic`."""

    def hessian_apply(self, theta: Params) -> Params: ...

    def linear_term(self) -> Params: ...


# ---------------------------------------------------------------------------------------
# The smooth part f, batched over models
# ---------------------------------------------------------------------------------------


class Smooth:
    """``f`` on stacked params. ``feats(x)`` are linear features carried along with the
    iterates (``A x`` for least squares, nothing otherwise): iterates are combined linearly,
    so combining their features the same way keeps the features exact."""

    def feats(self, x: Params) -> Params:
        return {}

    def grad(self, y: Params, fy: Params, s: Params) -> tuple[Params, Any]:
        """``∇f(y)`` and what :meth:`excess` needs from ``y`` (e.g. ``f(y)``)."""
        raise NotImplementedError

    def excess(
        self, x: Params, fx: Params, d: Params, fy: Params, vy: Any, gy: Params, s: Params
    ) -> tuple[Tensor, Tensor]:
        """``f(x) − f(y) − ⟨∇f(y), d⟩`` with ``d = x − y``, and a round-off allowance."""
        raise NotImplementedError

    def curvature(self, x: Params, g: Params, s: Params) -> Tensor:
        """A first estimate of the largest curvature of ``f`` near ``x`` (``g = ∇f(x)``)."""
        raise NotImplementedError

    def grad_norm_at_zero(self, x: Params, s: Params) -> Tensor:
        """``‖∇f(0)‖`` per model (0 where it is not finite): a start-independent scale."""
        raise NotImplementedError


class Generic(Smooth):
    """Any differentiable single-model objective ``fn(params, strengths, *data)``."""

    def __init__(self, fn: Callable[..., Tensor], data: tuple[Any, ...]) -> None:
        dims = (0, 0) + (None,) * len(data)
        self.data = data
        self._value = vmap(fn, in_dims=dims)
        self._vg = vmap(grad_and_value(fn), in_dims=dims)
        self._grad = vmap(grad(fn), in_dims=dims)

    def value(self, x: Params, s: Params) -> Tensor:
        return self._value(x, s, *self.data)

    def grad(self, y: Params, fy: Params, s: Params) -> tuple[Params, Any]:
        g, v = self._vg(y, s, *self.data)
        return g, v

    def gradient(self, x: Params, s: Params) -> Params:
        return self._grad(x, s, *self.data)

    def grad_norm_at_zero(self, x: Params, s: Params) -> Tensor:
        g = self.gradient({k: torch.zeros_like(v) for k, v in x.items()}, s)
        n = _tree.sqnorm(g).sqrt()
        return torch.where(torch.isfinite(n), n, 0.0)

    def excess(
        self, x: Params, fx: Params, d: Params, fy: Params, vy: Any, gy: Params, s: Params
    ) -> tuple[Tensor, Tensor]:
        vx = self.value(x, s)
        lin = _tree.dot(gy, d)
        return vx - vy - lin, _tree.roundoff(vx, vy, lin)

    def curvature(self, x: Params, g: Params, s: Params) -> Tensor:
        # secant along the gradient: ‖∇f(x + δ) − ∇f(x)‖ / ‖δ‖, ‖δ‖ = √eps · max(1, ‖x‖)
        ref = next(iter(x.values()))
        gn = _tree.sqnorm(g).sqrt()
        size = torch.finfo(ref.dtype).eps ** 0.5 * _tree.sqnorm(x).sqrt().clamp(min=1)
        ok = gn > 0
        step = torch.where(ok, size / torch.where(ok, gn, torch.ones_like(gn)), 0.0)
        g2 = self.gradient(_tree.axpy(-step, g, x), s)
        est = _tree.sqnorm(_tree.sub(g2, g)).sqrt() / size
        return torch.where(ok & torch.isfinite(est) & (est > 0), est, torch.ones_like(est))


class GramOracle(Smooth):
    """A quadratic (gradient ``A θ − B``: least squares, or a loss found quadratic), plus
    the smooth penalty terms if any."""

    def __init__(self, ls: HasGram, penalty: Generic | None) -> None:
        self.ls = ls
        self.B = ls.linear_term()
        self.penalty = penalty

    def feats(self, x: Params) -> Params:
        return self.ls.hessian_apply(x)

    def grad(self, y: Params, fy: Params, s: Params) -> tuple[Params, Any]:
        g = {k: fy[k] - self.B[k] for k in fy}
        if self.penalty is None:
            return g, None
        pg, pv = self.penalty.grad(y, {}, s)
        return {k: g[k] + pg[k] for k in g}, (pv, pg)

    def excess(
        self, x: Params, fx: Params, d: Params, fy: Params, vy: Any, gy: Params, s: Params
    ) -> tuple[Tensor, Tensor]:
        # exact for a quadratic, ½⟨d, A d⟩, but from features that round like A x⁺ and A y
        dfx, dfy = _tree.dot(d, fx), _tree.dot(d, fy)
        exc = 0.5 * (dfx - dfy)
        slack = 0.5 * _tree.roundoff(dfx, dfy)
        if self.penalty is None:
            return exc, slack
        pvy, pgy = vy  # the penalty part's value and gradient at y
        pvx = self.penalty.value(x, s)
        lin = _tree.dot(pgy, d)
        return exc + pvx - pvy - lin, slack + _tree.roundoff(pvx, pvy, lin)

    def grad_norm_at_zero(self, x: Params, s: Params) -> Tensor:
        k = next(iter(x.values())).shape[0]
        B = {n: b.expand_as(x[n]) for n, b in self.B.items()}
        if self.penalty is None:
            return _tree.sqnorm(B).sqrt()
        pg = self.penalty.gradient({n: torch.zeros_like(v) for n, v in x.items()}, s)
        n = _tree.sqnorm(_tree.sub(pg, B)).sqrt()
        return torch.where(torch.isfinite(n), n, 0.0).expand(k)

    def curvature(self, x: Params, g: Params, s: Params) -> Tensor:
        # one Hessian for all models: Lanczos on a single (seeded, random) start vector
        k = next(iter(x.values())).shape[0]
        gen = torch.Generator().manual_seed(0)
        v0 = {
            n: torch.randn(v[:1].shape, generator=gen, dtype=v.dtype).to(v.device)
            for n, v in x.items()
        }
        est = _tree.lanczos_max(self.ls.hessian_apply, v0, _LANCZOS_STEPS).expand(k)
        if self.penalty is not None:
            est = est + self.penalty.curvature(x, self.penalty.gradient(x, s), s)
        return est


def zero_loss(params: Params) -> Tensor:
    return next(iter(params.values())).sum() * 0


def make_prox(nonsmooth: Spec, single: Params) -> Callable[[Params, Params, Tensor], Params]:
    """The batched prox ``(stacked params, strengths (k,), steps (k,)) -> stacked params``.

    Elementwise penalties (exact types ``L1``, ``L2``, ``ElasticNet``, ``NonNegative``,
    ``Box``) are applied to the stacked tensors directly with per-model steps broadcast
    along the leading axis (same arithmetic as ``vmap(spec.prox)``, without its per-call
    overhead); any other term goes through ``vmap(spec.prox)``."""
    if not len(nonsmooth):
        return lambda z, s, t: z
    if not all(pen.elementwise for pen in nonsmooth.values()):
        return vmap(nonsmooth.prox)
    selection = nonsmooth.selection(single)  # resolved on one model's shapes

    def prox(z: Params, s: Params, t: Tensor) -> Params:
        out = dict(z)
        for term, names in selection.items():
            pen = nonsmooth[term]
            for n in names:
                v = out[n]
                st = _tree.rows(v, t)
                sk = 1.0 if pen.is_constraint else _tree.rows(v, s[term])
                out[n] = pen.prox_step(v, st, sk, n)
        return out

    return prox


def fista(
    oracle: Smooth,
    prox: Callable[[Params, Params, Tensor], Params],
    x0: Params,
    S: Params,
    max_iter: int,
    tol: float,
    L0: Tensor | None,
    backtrack: bool,
    restart: bool,
) -> tuple[Params, Tensor, Tensor, Tensor, Tensor]:
    """The general loop (module docstring); returns the solutions, ``iterations``,
    ``converged``, the round-off floor of the stopping rule where each model stopped
    (:func:`~funcreg._tree.floor_ratio`) and the optimality reached there, ``‖G(x)‖ / ref``
    (``ref`` the stopping rule's scale)."""
    ref = next(iter(x0.values()))
    K = ref.shape[0]
    out = {k: v.clone() for k, v in x0.items()}
    iterations = torch.full((K,), max_iter, dtype=torch.int64, device=ref.device)
    converged = torch.zeros(K, dtype=torch.bool, device=ref.device)
    floors = torch.full((K, 2), torch.nan, dtype=ref.dtype, device=ref.device)

    idx = torch.arange(K, device=ref.device)  # global index of each model still running
    x = x0
    fx = oracle.feats(x)
    y, fy = x, fx
    theta = torch.ones(K, dtype=ref.dtype, device=ref.device)
    curv = torch.zeros(K, dtype=ref.dtype, device=ref.device)
    L = curv if L0 is None else L0  # set from the first gradient when L0 is None
    # iterations since the model last backtracked
    calm = torch.full((K,), float(_COOLDOWN), dtype=ref.dtype, device=ref.device)
    scale = curv
    L_top = curv  # the largest L each model has used: the stopping rule's step

    def trial(
        y: Params, fy: Params, vy: Any, gy: Params, S: Params, L: Tensor
    ) -> tuple[Params, Params, Params, Tensor, Tensor]:
        """Candidate ``x⁺`` at step ``1/L``: ``(x⁺, feats(x⁺), x⁺ − y, ‖x⁺ − y‖², test)``,
        where ``test > 0`` means the sufficient-decrease test failed."""
        t = 1.0 / L
        xn = prox(_tree.axpy(-t, gy, y), S, t)
        fxn = oracle.feats(xn)
        d = _tree.sub(xn, y)
        dd = _tree.sqnorm(d)
        if not backtrack:
            return xn, fxn, d, dd, dd
        exc, slack = oracle.excess(xn, fxn, d, fy, vy, gy, S)
        return xn, fxn, d, dd, torch.stack([exc, slack])

    def measured(test: Tensor, dd: Tensor, curv: Tensor) -> Tensor:
        """The curvature along ``d``, ``2 test[0]/‖d‖²``, where the excess ``test[0]`` is
        beyond its round-off allowance ``test[1]``; else the last one measured (near a
        minimiser the excess is rounding noise, and noise over a tiny ``‖d‖²`` would send
        ``L`` towards infinity and the step to nothing)."""
        seen = test[0].abs() > test[1]  # never where d = 0: the excess is exactly 0 there
        return torch.where(seen, 2 * test[0] / dd, curv)

    def certify(x: Params, fx: Params, S: Params, L: Tensor, scale: Tensor) -> tuple[Tensor, ...]:
        """The stopping rule at the point returned, ``x``: ``(stop, converged, floor)``."""
        g, _ = oracle.grad(x, fx, S)
        t = 1.0 / L
        mapping = L * _tree.sqnorm(_tree.sub(prox(_tree.axpy(-t, g, x), S, t), x)).sqrt()
        gnorm, xnorm = _tree.sqnorm(g).sqrt(), _tree.sqnorm(x).sqrt()
        stop, ok = _tree.stopping_rule(mapping, gnorm, scale, L, xnorm, tol)
        floor = _tree.floor_ratio(gnorm, scale, L, xnorm)
        return stop, ok, torch.stack([floor, mapping / torch.maximum(scale, gnorm)], 1)

    for it in range(1, max_iter + 1):
        gy, vy = oracle.grad(y, fy, S)
        gnorm = _tree.sqnorm(gy).sqrt()
        if it == 1:
            scale = torch.maximum(gnorm, oracle.grad_norm_at_zero(y, S))
            if L0 is None:
                tiny = torch.finfo(ref.dtype).tiny ** 0.5
                L = oracle.curvature(y, gy, S).clamp(min=tiny)
        elif backtrack:
            shrunk = torch.maximum(_SHRINK * L, _MARGIN * curv)
            L = torch.where(calm >= _COOLDOWN, shrunk, L)
        xn, fxn, d, dd, test = trial(y, fy, vy, gy, S, L)
        L_top = torch.maximum(L_top, L)
        rejected: Tensor | None = None
        if backtrack:
            # test[0] = f(x⁺) − f(y) − ⟨∇f(y), d⟩, test[1] = round-off allowance; the
            # curvature along d, 2 test[0]/‖d‖², is where a failed model's L goes next
            bad = test[0] > 0.5 * L * dd + test[1]
            curv = measured(test, dd, curv)
            calm = torch.where(bad, 0.0, calm + 1)
            while it == 1 and bool(bad.any()):  # first step: retry at once until it holds
                L = torch.where(bad, torch.maximum(_GROW * L, _MARGIN * curv), L)
                sel = bad.nonzero().squeeze(1)
                part = trial(*_tree.take((y, fy, vy, gy, S, L), sel))
                _tree.put((xn, fxn, d, dd), sel, part[:4])
                test.index_copy_(1, sel, part[4])
                bad = test[0] > 0.5 * L * dd + test[1]
                curv = measured(test, dd, curv)
            if bool(bad.any()):
                # later steps: a failed model keeps its point and retries at the next
                # iteration with a larger L (a second batched round costs more than that)
                rejected = bad
                L = torch.where(bad, torch.maximum(_GROW * L, _MARGIN * curv), L)
        # a cheap first test at y (its gradient is at hand); the models that pass it are
        # then tested at the point they would return, x⁺
        passed, _ = _tree.stopping_rule(L * dd.sqrt(), gnorm, scale, L, _tree.sqnorm(y).sqrt(), tol)
        # momentum, restarted after an uphill step: ⟨G(y), x⁺ − x⟩ > 0, i.e. ⟨d, x⁺ − x⟩ < 0
        step = _tree.sub(xn, x)
        theta_next = 0.5 * (1 + torch.sqrt(1 + 4 * theta * theta))
        beta = (theta - 1) / theta_next
        if restart:
            reset = _tree.dot(d, step) < 0
            theta_next = torch.where(reset, 1.0, theta_next)
            beta = torch.where(reset, 0.0, beta)
        y_next = _tree.axpy(beta, step, xn)
        # linear features: A y = A x⁺ + β A(x⁺ − x)
        fy_next = _tree.axpy(beta, _tree.sub(fxn, fx), fxn)
        if rejected is not None:  # usually a few models: copy their old state back in
            passed = passed & ~rejected
            sel = rejected.nonzero().squeeze(1)
            old = _tree.take((x, fx, y, fy, theta), sel)
            _tree.put((xn, fxn, y_next, fy_next, theta_next), sel, old)
        x, fx, y, fy, theta = xn, fxn, y_next, fy_next, theta_next
        last = it == max_iter
        if last or bool(passed.any()):
            sel = torch.arange(len(passed), device=ref.device) if last else passed.nonzero()[:, 0]
            stop, ok, floor = certify(*_tree.take((x, fx, S, L_top, scale), sel))
            done = torch.zeros_like(passed).index_copy_(0, sel, stop | last)
            if bool(done.any()):
                oks = torch.zeros_like(passed).index_copy_(0, sel, ok)
                fls = scale.new_zeros(len(passed), 2).index_copy_(0, sel, floor)
                state = (x, fx, y, fy, S, theta, L, L_top, curv, calm, scale)
                going = _tree.retire(
                    done, oks, it, idx, (x, fls), (out, floors), iterations, converged, state
                )
                if going is None:
                    break
                idx, (x, fx, y, fy, S, theta, L, L_top, curv, calm, scale) = going
    return out, iterations, converged, floors[:, 0], floors[:, 1]
