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

**Route by structure.** Any loss that is a quadratic in the params (up to
``_quadratic.DETECT_MAX`` entries; ``quadratic=`` to force or skip) is found by its
Hessian at 0 and two random probes (:mod:`funcreg._quadratic`) and takes the same Gram route
with ``H θ − b`` as its gradient. A plain (weighted) Lasso there — no smooth terms, only exact
``L1`` terms without ``toward=`` — has its unpenalised coordinates (an intercept) eliminated
in closed form (the Schur complement: centring, for least squares) and goes through a leaner
loop with one fixed step ``1/λ_max`` and a Newton polish on the support
(:mod:`funcreg._lasso`): ``backtrack`` is ignored, and the stopping rule runs only at
iteration 1 and every 10th, so ``iterations`` is 1 or a multiple of 10 (or ``max_iter``);
the rule is then checked again in all coordinates. A solution found on an *extracted*
quadratic is certified with the loss itself: where ``‖∇f(x) − (Hx − b)‖`` exceeds
``max(tol, 1e-9)`` of the scale, the model is solved again on the general loop from there.

**Proximal Newton.** A loss found *not* quadratic (``quadratic=None``), with only exact
``L1`` non-smooth terms and at most ``_newton.NEWTON_MAX`` entries, takes proximal Newton
(:mod:`funcreg._newton`): exact Hessian, each step an exact Lasso on it, Armijo line
search, the same stopping rule at ``L = λ_max(∇²f(x))``; ``iterations`` counts Newton steps.
A Hessian that is not positive semidefinite falls back to FISTA with a warning.

**Precision.** The solver accumulates in float64 for float32/float16/bfloat16 params by
default (params, strengths and floating data cast up; the answer cast back), so
``converged`` and :attr:`Solution.optimality` are measured in float64; ``compute_dtype=``
chooses otherwise (then the round-off floor of that dtype applies). A loss that cannot run
in float64 (e.g. a buffer it mixes in stays float32) runs in its own dtype, with a warning.

For a non-convex ``f`` the iteration finds a stationary point at best.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _checks
from ._quadratic import (
    DETECT_MAX,
    NotQuadraticLoss,
    Quadratic,
    extract,
    from_least_squares,
)
from ._routes import Problem, recheck, route
from ._tree import Params
from .losses import LeastSquares, least_squares
from .penalties import Penalty
from .spec import Spec, as_spec

__all__ = [
    "LeastSquares",
    "NotQuadratic",
    "Solution",
    "from_sklearn_logistic",
    "least_squares",
    "solve",
]


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
        optimality: ``(K,)`` float64, ``‖G(x)‖ / max(‖∇f(0)‖, ‖∇f(x_0)‖, ‖∇f(x)‖)`` at the
            point returned, measured in ``dtype`` (on an extracted quadratic, plus the gap
            between the loss's gradient and the quadratic's there).
        dtype: the dtype the solver accumulated in (float64 for float32 params by default).
    """

    params: Params
    iterations: Tensor
    converged: Tensor
    optimality: Tensor | None = None
    dtype: torch.dtype | None = None


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


class NotQuadratic(ValueError):
    """:func:`solve` with ``quadratic=True`` on a loss that is not a quadratic in the params
    (a ``ValueError``; its own type so that callers that try the Gram route can fall back)."""


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
    quadratic: bool | None = None,
    compute_dtype: torch.dtype | None = None,
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

        quadratic: ``None`` (default): look for a quadratic loss (the Gram route) when the
            params have at most 1024 entries; ``True``: the loss is declared quadratic (it
            is still checked, and refused with :class:`NotQuadratic`, a ``ValueError``, if
            it is not); ``False``:
            the general loop on ``loss_fn``'s gradient.
        compute_dtype: the dtype the solver accumulates in; default float64 for
            lower-precision floating params, else the params' dtype.

    Returns:
        :class:`Solution` ``(params, iterations, converged, optimality, dtype)``, each
        with K first (``params`` in the params' dtype).

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
    if isinstance(loss_fn, (LeastSquares, Quadratic)) and data:
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
    if K == 0:
        raise ValueError(
            "solve: no models to solve (the strengths or stacked params have K = 0); pass at "
            "least one strength"
        )
    single = {n: p[0] for n, p in x0.items()}
    if isinstance(loss_fn, Quadratic) and loss_fn.shapes != {
        n: tuple(p.shape) for n, p in single.items()
    }:
        raise ValueError(f"solve: the quadratic loss needs params of shapes {loss_fn.shapes}")
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

    # -- the dtype the solver accumulates in ---------------------------------------------
    work = _work_dtype(dtype, compute_dtype)
    if work != dtype:
        cast, data0 = _caster(work), data
        x0, S, data = cast(x0), cast(S), tuple(cast(d) for d in data)
        L0 = None if L0 is None else L0.to(work)
        if isinstance(loss_fn, LeastSquares):
            loss_fn = LeastSquares(loss_fn.X.to(work), loss_fn.Y, loss_fn.fit_intercept)
        elif not _runs_in(loss_fn, {n: v[0] for n, v in x0.items()}, data):
            warnings.warn(
                f"solve: the loss does not run with {work} params and data, so the solver "
                f"accumulates in {dtype}; pass compute_dtype={dtype} to silence this",
                RuntimeWarning,
                stacklevel=2,
            )
            work, x0, S, data = dtype, _cast_back(x0, dtype), _cast_back(S, dtype), data0
            L0 = None if L0 is None else L0.to(dtype)
    single = {n: p[0] for n, p in x0.items()}

    # -- the route: a quadratic (given or found) or the general loop ----------------------
    q: Quadratic | None = None
    found = False
    if isinstance(loss_fn, LeastSquares):
        q = from_least_squares(loss_fn)
    elif isinstance(loss_fn, Quadratic):
        q = loss_fn.to(work)
    elif isinstance(loss_fn, NotQuadraticLoss):  # examined by the caller: no quadratic
        loss_fn = loss_fn.fn
    elif quadratic is True or (quadratic is None and _size(single) <= DETECT_MAX):
        with torch.enable_grad():
            q, why = extract(loss_fn, single, data)
        if q is None and quadratic is True:
            raise NotQuadratic(
                f"solve: quadratic=True, but the loss is not a quadratic in the params: {why}; "
                "drop quadratic=True (the general route handles any differentiable loss)"
            )
        q = None if q is None else q.to(work)
        found = q is not None
    problem = Problem(loss_fn, smooth, nonsmooth, single, data, max_iter, tol, backtrack, restart)
    with torch.no_grad():
        got = route(problem, q, x0, S, L0, newton=quadratic is None and L0 is None)
        if found:
            assert q is not None
            got = recheck(problem, q, S, L0, got)
        out, iterations, converged, floors, optimality = got
    _warn_floor(iterations, converged, floors, tol, max_iter, work)
    out = {n: v.to(dtype) for n, v in out.items()}
    return Solution(out, iterations, converged, optimality.to(torch.float64), work)


def from_sklearn_logistic(
    C: float | Tensor, n: int, penalty: str = "l1", select: Any = None
) -> tuple[Spec, dict[str, Any]]:
    """scikit-learn ``LogisticRegression(C=C, penalty=...)`` on ``n`` samples as a spec and
    its strengths: scikit-learn minimises ``Ω(w) + C Σ_i ℓ_i``, which is ``n·C`` times
    ``mean_i ℓ_i + Ω(w)/(n·C)``; so with the mean log-loss as the data term
    (``F.binary_cross_entropy_with_logits``, mean-reduced) the strength is ``1/(n·C)``:
    ``penalty="l1"`` is ``L1`` (``Σ|w|``), ``"l2"`` is ``L2`` (``½Σw²``, scikit-learn's
    ``½‖w‖²``). ``C`` may be a tensor of values (a grid). scikit-learn's ``liblinear``
    penalises the intercept too (``intercept_scaling``): compare with ``fit_intercept=False``
    or an unpenalised bias and ``solver="saga"``.

    >>> spec, s = from_sklearn_logistic(torch.tensor([0.1, 1.0]), n=len(y))
    >>> fr.solve(bce_loss, spec, params, s, X, y)      # LogisticRegression(penalty="l1", C)
    """
    from .penalties import L1, L2

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"from_sklearn_logistic: n must be the number of samples >= 1, got {n!r}")
    c = torch.as_tensor(C, dtype=torch.float64)
    if not bool((torch.isfinite(c) & (c > 0)).all()):
        raise ValueError(f"from_sklearn_logistic: C must be finite and > 0, got {C!r}")
    kind = {"l1": L1, "l2": L2}.get(penalty)
    if kind is None:
        raise ValueError(f"from_sklearn_logistic: penalty must be 'l1' or 'l2', got {penalty!r}")
    strength = 1.0 / (n * c)
    value: Any = float(strength) if strength.dim() == 0 else strength
    return Spec({penalty: kind(select)}), {penalty: value}


def _size(single: Params) -> int:
    return sum(int(v.numel()) for v in single.values())


def _work_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise ValueError(
                f"solve: compute_dtype must be a floating torch.dtype, got {compute_dtype!r}"
            )
        return compute_dtype
    return torch.float64 if dtype in _LOW else dtype


_LOW = (torch.float32, torch.float16, torch.bfloat16)


def _caster(work: torch.dtype) -> Callable[[Any], Any]:
    def cast(v: Any) -> Any:
        if isinstance(v, Tensor) and v.is_floating_point():
            return v.to(work)
        if isinstance(v, Mapping):
            return {k: cast(t) for k, t in v.items()}
        return v

    return cast


def _cast_back(tree: Params, dtype: torch.dtype) -> Params:
    return {k: v.to(dtype) for k, v in tree.items()}


def _runs_in(loss_fn: Callable[..., Tensor], single: Params, data: tuple[Any, ...]) -> bool:
    """Whether ``loss_fn`` evaluates to a finite-or-not 0-dim tensor at ``single``."""
    try:
        with torch.no_grad():
            out = loss_fn(single, *data)
    except (RuntimeError, TypeError, ValueError):
        return False
    return isinstance(out, Tensor) and out.dim() == 0


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
        f"{worst:.1e} relative to the gradient scale) and report converged=False; "
        + (
            f"use tol >= {worst:.1e}"
            if dtype == torch.float64
            else f"compute in float64 (compute_dtype=None, the default), or tol >= {worst:.1e}"
        ),
        RuntimeWarning,
        stacklevel=3,
    )
