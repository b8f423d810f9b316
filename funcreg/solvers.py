"""Full-batch accelerated proximal gradient for convex regularized problems, vmapped over
a grid of strengths.

:func:`solve` minimises, for every model ``k`` of a grid of strengths ``s_k`` at once,

    ``F_k(w) = f_k(w) + h_k(w)``,
    ``f_k(w) = loss(w, *data) + Σ_{smooth terms j} s_kj Ω_j(w)``      (through the gradient)
    ``h_k(w) = Σ_{non-smooth terms j} s_kj Ω_j(w)``                   (through its prox)

by FISTA (Beck & Teboulle 2009) with the gradient-based adaptive restart of O'Donoghue &
Candès (2015) and an adaptive step. Per model, with all state a tensor with a leading
model axis::

    x = y = start;  θ = 1;  L = an estimate of the largest curvature of f at the start
    repeat
        unless this model failed the test below in the last 3 iterations:
            L ← max(0.8 L, 1.3 c)          # try a longer step; c = curvature met last step
        x⁺ = prox_{h/L}(y − ∇f(y)/L);  d = x⁺ − y
        e = f(x⁺) − f(y) − ⟨∇f(y), d⟩;  c = 2e / ‖d‖²     # curvature of f along d
            (c keeps its last value where |e| is within its round-off allowance)
        if c > L (beyond a round-off allowance):           # sufficient decrease fails
            L ← max(2L, 1.3 c); keep x, y, θ and try again next iteration
            (on the first iteration: try again at once, until the test holds)
            continue
        if the stopping rule holds at y, with G(y) = L (y − x⁺) (at hand),
           and then at x⁺, with G(x⁺) and L̂ = the largest L this model has used:
            stop; the answer is x⁺
        θ⁺ = (1 + √(1 + 4θ²)) / 2;  β = (θ − 1)/θ⁺
        if ⟨G(y), x⁺ − x⟩ > 0: θ⁺ = 1, β = 0   # restart: the last step went uphill
        y ← x⁺ + β (x⁺ − x);  x ← x⁺;  θ ← θ⁺

The stopping rule at a point ``x`` (:func:`funcreg._tree.stopping_rule`) is

    ``‖G(x)‖ ≤ tol · max(‖∇f(0)‖, ‖∇f(x_0)‖, ‖∇f(x)‖)``,
    ``G(x) = L (x − prox_{h/L}(x − ∇f(x)/L))``   (the prox-gradient mapping).

``G`` is zero exactly at a minimiser (it is ``∇F`` when ``h = 0``), so the rule is a
relative optimality test, the same for every penalty; ``‖G‖`` grows with ``L``, so testing
at the largest ``L`` used is the strictest of the model's steps. Only the point returned is
certified, with one more gradient when the test at ``y`` passes. Below a **round-off floor**
the rule cannot certify anything: a ``G`` computed in floating point carries an error of
about ``eps · (max(‖∇f(0)‖, ‖∇f(x)‖) + L ‖x‖)`` (``x − ∇f(x)/L`` is rounded to ``eps·|x|``,
``∇f`` to about ``eps`` times the gradient scale), so ``converged`` is reported only where
``tol ·`` scale is at least 4 times that; a model whose ``‖G‖`` reaches the floor first
stops there with ``converged`` false, and :func:`solve` warns, naming the floor. In float64
the floor is near ``1e-15`` relative on well-scaled problems; in float32 near ``1e-6``, above
the default ``tol``: solve in float64 where the answer must meet ``tol``.

Letting ``L`` fall back towards the curvature actually met (rather than keeping a global
Lipschitz constant) matters for sparse models: the curvature on a small support is often
several times below ``‖∇²f‖``. The first ``L`` is a Lanczos estimate of ``‖XᵀX/n‖`` for least
squares, else a secant estimate along ``∇f(x_0)``; ``lipschitz=`` replaces it.

Gradients come from ``vmap(grad(f))`` of the single-model objective and the prox from
``vmap(spec.nonsmooth().prox)`` (elementwise penalties — ``L1``, ``L2``, ``ElasticNet``,
``NonNegative``, ``Box`` — are applied to the stacked tensors directly, with the per-model
step broadcast, which is the same arithmetic without vmap's per-call cost). The outer loop
is eager Python; models that stop are written to the result and dropped from the batch, so
they never change again and cost nothing more. A model that fails the decrease test waits
for the next batched iteration instead of costing the batch a second round.

Least squares has a fast path, :func:`least_squares`: the loss keeps ``XᵀX/n`` and
``XᵀY/n``. Its gradient is affine, so ``∇f(y)`` is combined from the Gram products of the
iterates (one ``(K·m, p) × (p, p)`` product per iteration, never touching ``X``), and the
backtracking test uses the exact curvature ``⟨d, XᵀX d⟩/n``.

A plain (weighted) Lasso on that path — one output, no intercept, no smooth terms, only
exact ``L1`` terms without ``toward=`` — goes through a leaner loop with one fixed step
``1/λ_max(XᵀX/n)`` (:mod:`funcreg._lasso`): ``backtrack`` is ignored, and the stopping rule
runs only at iteration 1 and every 10th, so ``iterations`` is 1 or a multiple of 10 (or
``max_iter``).

For a non-convex ``f`` the iteration finds a stationary point at best.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from . import _checks, _tree
from ._lasso import fista_lasso, lasso_thresholds
from ._tree import Params
from .losses import LeastSquares, least_squares
from .penalties import Penalty
from .spec import Spec, as_spec, penalized

__all__ = ["LeastSquares", "Solution", "least_squares", "solve"]
_GROW = 2.0  # backtracking: L ← 2L
_SHRINK = 0.8  # each iteration first tries L ← max(_SHRINK·L, _MARGIN·curvature met last step)
_MARGIN = 1.3
_COOLDOWN = 3  # ... unless the model backtracked in the last _COOLDOWN iterations
_LANCZOS_STEPS = 16


class Solution(NamedTuple):
    """What :func:`solve` returns; every entry has the model axis K first.

    Attributes:
        params: ``{name: (K, *shape)}`` the solutions (detached).
        iterations: ``(K,)`` int64, the iterations each model ran (one batched gradient
            each; a step rejected by the decrease test counts); ``max_iter`` for the models
            that did not stop earlier.
        converged: ``(K,)`` bool, whether the point returned meets the stopping rule (see
            ``tol`` of :func:`solve`) within ``max_iter``. False with ``iterations <
            max_iter``: the model stopped at the round-off floor of its dtype, above
            ``tol`` (:func:`solve` warns).
    """

    params: Params
    iterations: Tensor
    converged: Tensor


# ---------------------------------------------------------------------------------------
# The smooth part f, batched over models
# ---------------------------------------------------------------------------------------


class _Smooth:
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


class _Generic(_Smooth):
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


class _Quadratic(_Smooth):
    """Least squares (gradient ``A θ − B``), plus the smooth penalty terms if any."""

    def __init__(self, ls: LeastSquares, penalty: _Generic | None) -> None:
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


def _zero_loss(params: Params) -> Tensor:
    return next(iter(params.values())).sum() * 0


# ---------------------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------------------


def _check_solve_args(max_iter: Any, tol: Any) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"solve: max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < float("inf"):
        raise ValueError(f"solve: tol must be a finite number >= 0, got {tol!r}")


def _sweep_size(strengths: Mapping[str, Any]) -> int | None:
    K: int | None = None
    first = ""
    for name, v in strengths.items():
        if isinstance(v, Tensor) and v.dim() == 1:
            if K is None:
                K, first = v.shape[0], name
            elif v.shape[0] != K:
                raise ValueError(
                    f"solve: strengths {first!r} and {name!r} have different lengths "
                    f"({K} and {v.shape[0]}); every (K,) strength needs the same K"
                )
    return K


def solve(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    params: Mapping[str, Tensor],
    strengths: Mapping[str, Any],
    *data: Any,
    max_iter: int = 10_000,
    tol: float = 1e-8,
    stacked: bool = False,
    lipschitz: float | Tensor | None = None,
    backtrack: bool = True,
    restart: bool = True,
) -> Solution:
    """Minimise ``loss_fn(params, *data) + Σ_j s_j Ω_j(params)`` for every strength of a grid.

    Accelerated proximal gradient (FISTA with adaptive restart and a per-model adaptive
    step; the algorithm is in the module docstring), one batched gradient per iteration for
    all models that have not stopped yet.

    Args:
        loss_fn: ``loss_fn(params, *data) -> 0-dim tensor``, differentiable (convex for the
            guarantees). A :func:`least_squares` loss takes the Gram fast path (pass no data).
        spec: the penalty terms. Smooth terms enter the gradient; the non-smooth ones are
            applied through their prox and must have one.
        params: the starting point: one model, replicated to K, or with ``stacked=True``
            ``{name: (K, *shape)}`` (e.g. warm starts along a path).
        strengths: ``{term: number or (K,) tensor}``, one entry per term that needs a
            strength (constraints need none; entries that name no such term are ignored).
            K is the length of the ``(K,)`` entries, else the leading size of stacked params,
            else 1.
        *data: passed to ``loss_fn`` unchanged (shared by all models).
        max_iter: the most iterations per model (``>= 1``); 10 000 by default, as in
            :func:`~funcreg.path` and :func:`~funcreg.cross_validate`.
        tol: model k stops at the first iteration whose point ``x`` (the one returned) has
            ``‖G(x)‖ ≤ tol · max(‖∇f(0)‖, ‖∇f(x_0)‖, ‖∇f(x)‖)``, where ``G(x) = L (x −
            prox_{h/L}(x − ∇f(x)/L))`` is the prox-gradient mapping (``∇F`` when ``h = 0``;
            zero exactly at a minimiser) at the largest ``L`` the model used. The scale
            includes ``∇f(0)`` so that a warm start does not tighten the test. A ``tol``
            below the round-off floor of the dtype (module docstring; about ``1e-6`` in
            float32) cannot be certified: such models stop at the floor, report
            ``converged=False``, and a ``RuntimeWarning`` names the floor.
        stacked: whether ``params`` already carry the leading K axis.
        lipschitz: a Lipschitz constant of ``∇f`` (number or ``(K,)``) to start from instead
            of the built-in estimate; with ``backtrack=False`` the step stays
            ``1/lipschitz`` (plain FISTA). The lean Lasso path (see the module docstring)
            uses the largest given value for every model: they share one Gram matrix.
        backtrack: adapt ``L`` per model (grow it until the sufficient-decrease test holds,
            and try shrinking it between iterations). Ignored on the lean Lasso path, whose
            step is fixed at ``1/λ_max(XᵀX/n)`` (or ``1/max(lipschitz)``).
        restart: gradient-based adaptive restart of the momentum.

    Returns:
        :class:`Solution` ``(params, iterations, converged)``, each with K first.

    Warns:
        RuntimeWarning: models that stopped at the round-off floor, above ``tol``.

    Raises:
        ValueError: bad ``max_iter``, ``tol`` or ``lipschitz``; NaN or inf in the data or
            the starting params; negative, non-finite or missing strengths; K mismatches;
            a non-smooth term without a proximal operator.
        TypeError: params or strengths that are not dicts of (floating) tensors.
    """
    _check_solve_args(max_iter, tol)
    spec = as_spec(spec)
    if not isinstance(params, Mapping) or not params:
        raise TypeError(
            "solve: params must be a non-empty dict {name: tensor}, e.g. fr.params(model) "
            "or least_squares(X, y).init()"
        )
    _checks.check_float_params(params)
    for name, p in params.items():
        if not p.is_floating_point():
            raise TypeError(f"solve: params[{name!r}] must be floating point, got {p.dtype}")
        _checks.check_finite("solve", f"params[{name!r}]", p)
    for i, d in enumerate(data):
        if isinstance(d, Tensor):
            _checks.check_finite("solve", f"data[{i}]", d)
    if isinstance(loss_fn, LeastSquares) and data:
        raise TypeError("solve: a least_squares loss holds its data; pass no *data")
    smooth, nonsmooth = spec.smooth(), spec.nonsmooth()
    for term, pen in nonsmooth.items():
        if not pen.has_prox:
            raise ValueError(
                f"solve: term {term!r} ({type(pen).__name__}) is non-smooth and has no "
                "proximal operator; drop it from the spec or use a smooth penalty"
            )
    if not isinstance(strengths, Mapping):
        raise TypeError(
            f"solve: strengths must be a dict {{term: strength}}, got {type(strengths).__name__}"
        )
    names = spec.strength_names
    needed = {k: v for k, v in strengths.items() if k in names}
    _checks.check_strengths(spec, needed, needs=names)

    # -- K and the starting point ---------------------------------------------------------
    K = _sweep_size(needed)
    first = next(iter(params.values()))
    dtype, device = first.dtype, first.device
    if stacked:
        sizes = {p.shape[0] if p.dim() else -1 for p in params.values()}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError(
                "solve: stacked=True needs every param to have the same leading size K, got "
                f"shapes { {n: tuple(p.shape) for n, p in params.items()} }"
            )
        Kp = sizes.pop()
        if K is not None and Kp != K:
            raise ValueError(
                f"solve: the stacked params hold {Kp} models but the strengths have K = {K}"
            )
        K = Kp
        x0 = {n: p.detach().clone() for n, p in params.items()}
    else:
        K = 1 if K is None else K
        x0 = {n: p.detach().expand(K, *p.shape).clone() for n, p in params.items()}
    single = {n: p[0] for n, p in x0.items()}
    if isinstance(loss_fn, LeastSquares):
        shapes = {n: tuple(p.shape) for n, p in single.items()}
        if shapes != loss_fn.shapes:
            raise ValueError(
                f"solve: a least_squares loss needs params of shapes {loss_fn.shapes}, got "
                f"{shapes}; start from loss.init()"
            )
        if loss_fn.X.dtype != dtype:
            raise ValueError(
                f"solve: the least_squares data is {loss_fn.X.dtype} but params are {dtype}; "
                "start from loss.init() or convert X and y"
            )
    spec.validate(single, needed)
    S = {
        n: torch.as_tensor(v, dtype=dtype, device=device).expand(K).clone()
        for n, v in needed.items()
    }
    L0: Tensor | None = None
    if lipschitz is not None:
        L0 = torch.as_tensor(lipschitz, dtype=dtype, device=device)
        if L0.dim() > 1 or not bool((torch.isfinite(L0) & (L0 > 0)).all()):
            raise ValueError(f"solve: lipschitz must be finite and > 0, got {lipschitz!r}")
        L0 = L0.expand(K).clone()
    elif not backtrack:
        raise ValueError("solve: backtrack=False needs lipschitz= (the fixed step is 1/lipschitz)")

    # -- the smooth part and the prox -----------------------------------------------------
    oracle: _Smooth
    if isinstance(loss_fn, LeastSquares):
        penalty = _Generic(penalized(_zero_loss, smooth), ()) if len(smooth) else None
        oracle = _Quadratic(loss_fn, penalty)
    else:
        oracle = _Generic(penalized(loss_fn, smooth), data)
    prox = _make_prox(nonsmooth, single)

    with torch.no_grad():
        lasso = None
        if isinstance(loss_fn, LeastSquares):
            lasso = lasso_thresholds(loss_fn, smooth, nonsmooth, single, S)
        if lasso is not None:
            assert isinstance(loss_fn, LeastSquares)
            ((name, w0),) = x0.items()  # (K, 1, p)
            w, iterations, converged, floors = fista_lasso(
                loss_fn, lasso, w0, max_iter, tol, L0, restart
            )
            out = {name: w[:, None]}
        else:
            out, iterations, converged, floors = _fista(
                oracle, prox, x0, S, max_iter, tol, L0, backtrack, restart
            )
    _warn_floor(iterations, converged, floors, tol, max_iter, dtype)
    return Solution(out, iterations, converged)


def _warn_floor(
    iterations: Tensor, converged: Tensor, floors: Tensor, tol: float, max_iter: int, dtype: Any
) -> None:
    """Warn about the models that stopped at the round-off floor of the stopping rule (before
    ``max_iter`` and not converged): ``tol`` is below what ``dtype`` can certify there."""
    floored = ~converged & (iterations < max_iter)
    if not bool(floored.any()):
        return
    n, k = int(floored.sum()), floored.numel()
    worst = float(floors[floored].max())
    warnings.warn(
        f"solve: tol={tol:g} is below the round-off floor of {dtype} for {n} of {k} models: "
        f"they stopped where their prox-gradient mapping is rounding noise (floor up to "
        f"{worst:.1e} relative to the gradient scale) and report converged=False; use "
        f"float64 params and data, or tol >= {worst:.1e}",
        RuntimeWarning,
        stacklevel=3,
    )


def _make_prox(nonsmooth: Spec, single: Params) -> Callable[[Params, Params, Tensor], Params]:
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


def _fista(
    oracle: _Smooth,
    prox: Callable[[Params, Params, Tensor], Params],
    x0: Params,
    S: Params,
    max_iter: int,
    tol: float,
    L0: Tensor | None,
    backtrack: bool,
    restart: bool,
) -> tuple[Params, Tensor, Tensor, Tensor]:
    """The general loop (module docstring); returns the solutions, ``iterations``,
    ``converged`` and the round-off floor of the stopping rule where each model stopped
    (:func:`~funcreg._tree.floor_ratio`)."""
    ref = next(iter(x0.values()))
    K = ref.shape[0]
    out = {k: v.clone() for k, v in x0.items()}
    iterations = torch.full((K,), max_iter, dtype=torch.int64, device=ref.device)
    converged = torch.zeros(K, dtype=torch.bool, device=ref.device)
    floors = torch.zeros(K, dtype=ref.dtype, device=ref.device)

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
        return stop, ok, _tree.floor_ratio(gnorm, scale, L, xnorm)

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
                fls = torch.zeros_like(scale).index_copy_(0, sel, floor)
                state = (x, fx, y, fy, S, theta, L, L_top, curv, calm, scale)
                going = _tree.retire(
                    done, oks, it, idx, (x, fls), (out, floors), iterations, converged, state
                )
                if going is None:
                    break
                idx, (x, fx, y, fy, S, theta, L, L_top, curv, calm, scale) = going
    return out, iterations, converged, floors
