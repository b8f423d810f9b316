"""Regularization paths: the largest useful strength and geometric grids below it.

``strength_max`` is the smallest strength at which zero is stationary for the selected
parameters: above it, (proximal) training leaves them exactly at zero. From the gradient
``g`` of the data loss at ``w_selected = 0``:

* ``L1``: ``max_i |g_i| / c_i``;  ``ElasticNet(r)``: ``max_i |g_i| / (r c_i)``
* ``GroupLasso``: ``max_g ‖g_g‖₂ / (√|g| c_g)``
* ``SparseGroupLasso(r)``: the smallest ``λ`` with ``‖soft(g_g, λ r c)‖₂ ≤ λ (1 − r) √|g| c_g``
  for every group (found by bisection)

This is exact for convex losses that are linear in the selected parameters' effect (lasso,
elastic net, group lasso on linear and generalised linear models) when the *other*
parameters (e.g. an intercept) are at their optimum given ``w_selected = 0`` — pass them so
(for least squares with an intercept: ``b = mean(y)``), as scikit-learn does by centring.
For networks it is the standard heuristic (LassoNet, glmnet-style grids): zero is a
stationary point of the first-order conditions at the given other parameters.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad

from . import _checks
from ._chunking import plan_chunks
from ._homotopy import whole_path
from ._quadratic import DETECT_MAX, NotQuadraticLoss, Quadratic, extract, gradient_gap
from ._sweep import sweep
from .optim import Optimizer
from .penalties import Penalty
from .result import SweepResult
from .solvers import solve
from .spec import Spec, as_spec
from .stack import as_data, split_model, strength_values, with_buffers

__all__ = ["geometric_grid", "path", "strength_max"]


def strength_max(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    term: str,
    params: Mapping[str, Tensor],
    *data: Any,
) -> float:
    """The smallest strength of ``term`` at which its selected parameters are all zero at a
    stationary point (see the module docstring for the formula and when it is exact).

    The other terms of ``spec`` are not included (glmnet's convention: the path's top is
    set by the data loss alone). ``toward=`` references shift the zero point to ``w_ref``.
    """
    spec = as_spec(spec)
    if term not in spec:
        raise ValueError(f"strength_max: no term {term!r} in the spec; it has {list(spec)}")
    pen = spec[term]
    if type(pen).zero_threshold is Penalty.zero_threshold:  # no exact zeros
        raise ValueError(
            f"strength_max: term {term!r} is {type(pen).__name__}, which induces no exact "
            "sparsity; it is defined for L1, ElasticNet (l1_ratio > 0), GroupLasso and "
            "SparseGroupLasso"
        )
    names = spec.selection(params)[term]
    at_zero = dict(params)
    for n in names:
        ref = pen.reference(n)
        at_zero[n] = torch.zeros_like(params[n]) if ref is None else ref.to(params[n])
    g = grad(loss_fn)(at_zero, *data)
    bad = [n for n in names if not bool(torch.isfinite(g[n]).all())]
    if bad:
        raise ValueError(
            f"strength_max: the data loss's gradient at zero is not finite for {bad} (term "
            f"{term!r}): NaN or inf in the data or the loss"
        )
    return max(pen.zero_threshold(g[n].detach(), n) for n in names)


def geometric_grid(strength_max: float, eps: float = 1e-3, n: int = 100) -> Tensor:
    """``n`` strengths from ``strength_max`` down to ``eps · strength_max``, equally spaced
    in log scale, descending (scikit-learn's ``lasso_path`` defaults), float64."""
    if not (math.isfinite(strength_max) and strength_max > 0):
        raise ValueError(f"geometric_grid: strength_max must be finite and > 0, got {strength_max}")
    if not 0 < eps < 1:
        raise ValueError(f"geometric_grid: eps must be in (0, 1), got {eps}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"geometric_grid: n must be an integer >= 1, got {n!r}")
    top = math.log10(strength_max)
    out = torch.logspace(top, top + math.log10(eps), n, dtype=torch.float64)
    out[0] = strength_max  # exact ends, as numpy.geomspace: the top is the all-zero point
    if n > 1:
        out[-1] = strength_max * eps
    return out


# ---------------------------------------------------------------------------------------
# Warm-started paths
# ---------------------------------------------------------------------------------------


def _fixed_axes(fixed: Mapping[str, Any], k: int) -> dict[str, Tensor]:
    return {nm: torch.full((k,), float(v), dtype=torch.float64) for nm, v in fixed.items()}


def _replicate_last(stacked: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    return {nm: v[-1].expand(k, *v.shape[1:]).clone() for nm, v in stacked.items()}


def _top_of_path(
    loss: Callable[..., Tensor],
    quadratic: Quadratic | None,
    spec: Spec,
    term: str,
    params0: dict[str, Tensor],
    fixed: Mapping[str, Any],
    data: tuple[Tensor, ...],
    tol: float,
    max_iter: int,
) -> tuple[dict[str, Tensor], tuple[dict[str, Tensor], float]]:
    """``(settled, (point, strength))`` at the top of the path, on ``quadratic`` where one
    was found (the same gradients to round-off, without running the loss again).

    ``settled``: the other parameters at their optimum with ``term``'s parameters at zero
    (or at their ``toward=`` reference): a solve at a strength above ``strength_max`` — or,
    for ``term`` alone on a quadratic, without ``toward=``, one linear solve
    (:meth:`~funcreg._quadratic.Quadratic.settle`).
    ``point``: the settled point with ``term``'s parameters set exactly to zero (or to their
    reference); ``strength``: the smallest strength of ``term`` at which that point
    satisfies the KKT conditions, so that it *is* the solution there. It is
    :func:`strength_max` of the data loss plus the other terms at their ``fixed`` strengths
    (their gradient at the point; at zero a norm contributes the subgradient 0), so that a
    smooth term pulling ``term``'s parameters away from zero raises it. With ``term`` alone
    it equals the grid's top, ``strength_max`` at the settled point, to the bit (the other
    terms add exact zeros)."""
    exact, exact_data = (loss, data) if quadratic is None else (quadratic, ())
    names = spec.selection(params0)[term]
    pen = spec[term]
    settled = params0
    closed = None  # term alone on a quadratic: the other params by one linear solve
    alone = set(spec) == {term} and all(pen.reference(n) is None for n in names)
    if quadratic is not None and alone and set(names) != set(params0):
        closed = quadratic.settle(names)
    if closed is not None:
        settled = {n: v.to(params0[n]) for n, v in closed.items()}
    elif set(names) != set(params0):
        big = 1e3 * max(strength_max(exact, spec, term, params0, *exact_data), 1.0)
        for _ in range(4):
            sol = solve(
                exact, spec, params0, {**fixed, term: big}, *exact_data, tol=tol, max_iter=max_iter
            )
            settled = {n: v[0] for n, v in sol.params.items()}
            top = strength_max(exact, spec, term, settled, *exact_data)
            if top < big:
                break
            big = 1e3 * top

    point = dict(settled)
    for n in names:
        ref = pen.reference(n)
        point[n] = torch.zeros_like(settled[n]) if ref is None else ref.to(settled[n]).clone()
    sel = spec.selection(settled)
    if any(p.is_constraint and set(sel[t]) & set(names) for t, p in spec.items()):
        return settled, (point, math.inf)  # zero need not be feasible: no certificate
    others = Spec({t: p for t, p in spec.items() if t != term and not p.is_constraint})
    if not others:
        return settled, (point, strength_max(exact, spec, term, point, *exact_data))
    other_strengths = {t: fixed[t] for t in others}

    def with_others(p: Mapping[str, Tensor], *d: Any) -> Tensor:
        return exact(p, *d) + others(p, other_strengths)

    return settled, (point, strength_max(with_others, spec, term, point, *exact_data))


def _recheck_path(
    loss: Callable[..., Tensor],
    q: Quadratic,
    spec: Spec,
    out: dict[str, Tensor],
    iters: Tensor,
    conv: Tensor,
    s: Tensor,
    fixed: Mapping[str, Any],
    term: str,
    data: tuple[Tensor, ...],
    tol: float,
    max_iter: int,
) -> None:
    """The path's solutions were found on ``q``, the quadratic extracted from ``loss``;
    where ``loss``'s own gradient differs from ``q``'s by more than ``max(tol, 1e-9)``
    (relative), the model is solved again on the general route from where it is (in
    place)."""
    with torch.no_grad():
        delta = gradient_gap(loss, q, out, data).cpu()
    redo = ~(delta <= max(tol, 1e-9))
    if not bool(redo.any()):
        return
    sel = redo.nonzero().squeeze(1)
    dtype = next(iter(out.values())).dtype
    x0 = {nm: v[sel].clone() for nm, v in out.items()}
    strengths = {**{t: v for t, v in fixed.items()}, term: s[sel].to(dtype)}
    sol = solve(
        loss, spec, x0, strengths, *data, stacked=True, tol=tol, max_iter=max_iter,
        quadratic=False,
    )  # fmt: skip
    for nm, v in sol.params.items():
        out[nm][sel] = v
    iters[sel] = sol.iterations.cpu()
    conv[sel] = sol.converged.cpu()


def path(
    model_or_params: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    term: str | None = None,
    *,
    data: Any = (),
    strengths: Any = None,
    eps: float = 1e-3,
    n: int = 100,
    fixed: Mapping[str, Any] | None = None,
    chunk_size: int | None = 10,
    warm_start: bool = True,
    descending: bool | None = None,
    optimizer: Optimizer | None = None,
    steps: int | None = None,
    val: Any = None,
    tol: float = 1e-8,
    max_iter: int = 10_000,
    progress: bool = False,
    compute_dtype: torch.dtype | None = None,
    **sweep_kwargs: Any,
) -> SweepResult:
    """A warm-started regularization path: the grid of ``term``'s strengths, largest first,
    in chunks of ``chunk_size`` models fitted at once (vmapped), every chunk starting from
    the previous chunk's last solution (glmnet's and LassoNet's warm starts).

    * Without ``optimizer``: each chunk is solved exactly by
      :func:`~funcreg.solvers.solve` (FISTA, convex problems) to ``tol`` from that start;
      ``result.meta["iterations"]`` holds each model's iteration count, ``meta["tol"]``
      and ``meta["max_iter"]`` the solver's settings. ``loss_fn`` may be a
      :func:`~funcreg.solvers.least_squares` loss (pass ``ls.init()`` as params, no data).
    * With ``optimizer`` and ``steps``: each chunk trains ``steps`` steps with
      :func:`fr.sweep <funcreg._sweep.sweep>` (networks); ``model_or_params`` must be the
      module and ``data`` is its ``train=`` (extra keywords such as ``batch_size`` go to
      ``sweep``; ``checkpoint="p.pt"`` becomes one file per chunk, ``p.chunk0.pt``, ...,
      so that a rerun resumes every chunk).

    Args:
        model_or_params: the model (or a dict of params); its current values start the
            first chunk.
        loss_fn: ``loss_fn(params, *data) -> 0-dim tensor`` (params include buffers).
        spec: the penalty; ``term`` names the strength the path varies (default: the only
            term with a strength). Other terms and optimizer hyperparameters read by name
            get their values from ``fixed``.
        strengths: the grid; default ``geometric_grid(strength_max, eps, n)`` with
            ``strength_max`` computed at the given params — for a convex fit after solving
            for the unpenalised parameters (e.g. an intercept) with ``term``'s at zero,
            which makes it exact (see :func:`strength_max`). Run in the order ``descending``
            says. Without ``optimizer``, the default grid's models at or above the KKT
            strength of that settled point (its top, and any other there) are set to it,
            not solved for: ``term``'s parameters exactly zero (or at their ``toward=``
            reference) on every machine, ``meta["iterations"]`` 0.
        chunk_size: models per vmapped chunk (``None``: one chunk, i.e. no warm starts);
            smaller chunks warm-start more often, larger ones run more models at once.
            Ignored (one chunk) with ``warm_start`` where the loss is found quadratic and
            ``term`` is the only term, a plain ``L1``: one batched solve is faster there
            than warm chunks (measured up to 600 entries and 400 strengths), and strengths
            start from their exact solutions by the homotopy (:mod:`funcreg._homotopy`):
            all of them up to 64 entries (256 on an ill-conditioned problem), the sparse
            top of the path from 512.
        warm_start: ``False`` starts every chunk from ``model_or_params`` (cold starts, for
            comparison; no homotopy starts either).
        descending: the order the chunks run in: ``True`` largest strength first (glmnet:
            from the all-zero end), ``False`` smallest first (LassoNet: dense to sparse).
            Default: ``True`` for ``solve``, ``False`` with an optimizer — a network warm-
            started from an all-zero layer trains slowly; measured on
            ``examples/feature_selection.py``, dense-to-sparse warm starts reach a lower
            objective than cold starts in the same steps, sparse-to-dense ones a higher.
        val: validation data; recorded as ``history["val_loss"]`` so ``result.best()``
            picks by it.
        compute_dtype: without ``optimizer``, the dtype :func:`~funcreg.solvers.solve`
            accumulates in (default float64 for float32/16 params; their dtype is kept in
            the result). ``meta["optimality"]`` holds each model's ``‖G(x)‖/ref`` reached.

    Returns:
        A :class:`~funcreg.result.SweepResult` ordered by strength, largest first (also
        when run smallest first);
        ``meta["warm_start"]``, ``meta["run_order"]`` and ``meta["chunks"]`` (model ranges
        in run order) describe the run.
    """
    spec = as_spec(spec)
    term = spec.strength_term(term, "path")
    fixed = dict(fixed or {})
    if term in fixed:
        raise ValueError(f"path: term {term!r} is the path's axis; remove it from fixed=")
    _checks.check_engine_args("path", optimizer, steps)
    if optimizer is None:
        _checks.check_no_sweep_keywords("path", sweep_kwargs, path)
    params0, bufs0, model = split_model(model_or_params)
    loss = with_buffers(loss_fn, bufs0)
    val_t = as_data(val, "val")
    data_t = as_data(data) if optimizer is None or strengths is None else data
    missing = [t for t in spec.strength_names if t != term and t not in fixed]
    if missing:
        raise ValueError(
            f"path: the terms {missing} need a strength; pass fixed={{{missing[0]!r}: ...}}"
        )
    taken = sorted(set(sweep_kwargs) & {"train", "init"})
    if taken:
        raise ValueError(
            f"path: {taken} are set by path itself (data= is the training data, and every "
            "chunk starts from model_or_params or the previous chunk); remove them"
        )
    t0 = time.perf_counter()
    q: Quadratic | None = None  # the loss's quadratic, found once for every chunk
    solve_loss: Callable[..., Tensor] = loss  # what the solves below get where q is None
    if optimizer is None and sum(v.numel() for v in params0.values()) <= DETECT_MAX:
        with torch.enable_grad():
            q, _ = extract(loss, params0, data_t)
        if q is None:  # found not quadratic: the solves do not look again
            solve_loss = NotQuadraticLoss(loss)
    settled = params0
    known: tuple[dict[str, Tensor], float] | None = None  # (the top's solution, from where)
    if strengths is None:
        if optimizer is None:
            settled, known = _top_of_path(
                solve_loss, q, spec, term, params0, fixed, data_t, tol, max_iter
            )
        top_loss, top_data = (loss, data_t) if q is None else (q, ())
        top = strength_max(top_loss, spec, term, settled, *top_data)
        if not top > 0:
            raise ValueError(
                f"path: strength_max of term {term!r} is {top}: the data loss has zero "
                "gradient at zero, so every strength gives zeros; pass strengths="
            )
        s = geometric_grid(top, eps, n)
    else:
        s = strength_values(strengths, "path")
    if descending is None:
        descending = optimizer is None
    s = torch.sort(s, descending=bool(descending)).values
    k = s.numel()
    chunks = plan_chunks(k, chunk_size, balanced=False)  # a path's chunks follow the grid
    if q is not None and warm_start and whole_path(spec, term, params0):
        chunks = [(0, k)]  # the homotopy starts the strengths it reaches at their solutions
    info: dict[str, Any] = {"warm_start": bool(warm_start), "path_axis": term}
    info["run_order"] = "descending" if descending else "ascending"
    info["chunks"] = [list(c) for c in chunks]  # in run order

    if optimizer is None:
        info.update(tol=tol, max_iter=max_iter)
        out = {nm: v.new_empty(k, *v.shape) for nm, v in params0.items()}
        iters = torch.zeros(k, dtype=torch.int64)
        conv = torch.zeros(k, dtype=torch.bool)
        opt = torch.zeros(k, dtype=torch.float64)  # 0 where the solution is set, not solved
        # at and above the KKT strength of the settled point the solution is known: that
        # point, with term's parameters exactly zero; it is set, not solved for
        is_set = torch.zeros(k, dtype=torch.bool) if known is None else s >= known[1]
        start = settled if known is None else known[0]
        start = start if warm_start else params0  # the settled point is the path's top
        dtype = next(iter(params0.values())).dtype
        for a, b in chunks:
            todo = (~is_set[a:b]).nonzero().reshape(-1)
            if todo.numel() < b - a:
                assert known is not None
                for nm, v in known[0].items():
                    out[nm][a:b] = v
                conv[a:b] = True
            if todo.numel():
                x0 = {nm: v.expand(todo.numel(), *v.shape).clone() for nm, v in start.items()}
                strengths_ab = {**fixed, term: s[a:b][todo].to(dtype)}
                exact, exact_data = (solve_loss, data_t) if q is None else (q, ())
                if q is not None and not warm_start:
                    exact = q.cold()  # cold starts, for comparison: no homotopy either
                sol = solve(
                    exact, spec, x0, strengths_ab, *exact_data, stacked=True, tol=tol,
                    max_iter=max_iter, compute_dtype=compute_dtype,
                )  # fmt: skip
                for nm, v in sol.params.items():
                    out[nm][a + todo] = v
                iters[a + todo] = sol.iterations.cpu()
                conv[a + todo] = sol.converged.cpu()
                if sol.optimality is not None:
                    opt[a + todo] = sol.optimality.cpu()
            if warm_start:
                start = {nm: v[b - 1] for nm, v in out.items()}
        if q is not None:  # certify with the loss itself; re-solve where it disagrees
            _recheck_path(loss, q, spec, out, iters, conv, s, fixed, term, data_t, tol, max_iter)
        grid = {term: s, **_fixed_axes(fixed, k)}
        info["optimality"] = opt
        info["elapsed_s"] = time.perf_counter() - t0
        res = SweepResult.from_solution(
            model, loss, spec, grid, out, bufs0, data_t, val_t, iters, conv, info
        )
        return res if descending else res.flip()

    if model is None:
        raise TypeError("path(optimizer=...) trains with fr.sweep: pass the nn.Module itself")
    results: list[SweepResult] = []
    init: Any = None
    ckpt = sweep_kwargs.pop("checkpoint", None)
    for j, (a, b) in enumerate(chunks):
        g = {term: s[a:b], **_fixed_axes(fixed, b - a)}
        if ckpt is not None:  # one file per chunk, so that each chunk resumes its own
            stem = Path(ckpt)
            sweep_kwargs["checkpoint"] = stem.with_name(f"{stem.stem}.chunk{j}{stem.suffix}")
        r = sweep(
            model,
            loss_fn,
            spec,
            g,
            train=data,
            val=val,
            optimizer=optimizer,
            steps=steps,
            init=init,
            progress=progress,
            **sweep_kwargs,
        )
        results.append(r)
        if warm_start and j + 1 < len(chunks):
            size = chunks[j + 1][1] - chunks[j + 1][0]
            init = (_replicate_last(r.stacked, size), _replicate_last(r.stacked_buffers, size))
    info["elapsed_s"] = time.perf_counter() - t0
    res = SweepResult.concat(results, info)
    return res if descending else res.flip()
