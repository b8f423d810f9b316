"""Gradient-based tuning of strengths: :func:`tune` and its :class:`TuneResult`.

For a convex problem (a loss, a :class:`~funcreg.Spec`, strengths), :func:`tune` minimises
an outer objective over the log-strengths ``θ = log s`` (and, optionally, the log of the
``weight=`` factors of some terms: one strength per feature or per group)::

    E(θ) = (1/F) Σ_f score(w_f(θ), held-out data of fold f)
    w_f(θ) = argmin_w loss(w, training data of fold f) + Σ_j e^{θ_j} Ω_j(w)

— one validation split (``F = 1``) or K-fold cross-validation. Each outer step solves every
fold's inner problem exactly with :func:`funcreg.solve` (warm-started from the fold's
previous solution; a :func:`funcreg.least_squares` loss with elementwise penalties is
solved on a working set of features, :mod:`funcreg._working_set`, which gives the same
solution and hypergradient at a fraction of the cost when the solution is sparse; for one
``L1`` term each fold's exact Lasso homotopy walks from its previous strength, so a step
pays only for the kinks between the two strengths), takes ``∇_θ E`` from
:func:`funcreg.hypergrad` (implicit differentiation of the proximal-gradient fixed point;
for one ``L1`` term on a working set with the default score, the same derivative in closed
form on the support) and moves ``θ`` with a functional optimizer from
:mod:`funcreg.optim` (default ``adam(lr=0.1)``: steps of about 10% in each strength). It
stops after ``steps`` outer steps, or when the best ``E`` has not improved by more than
``tol`` (relative) in ``patience`` steps, or when ``‖∇_θ E‖ ≤ gtol``.

Folds come from :func:`funcreg.selection.fold_masks` (the same splits as
:func:`funcreg.cross_validate` for the same ``folds`` and ``seed``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import _checks
from ._folds import fold_masks
from ._implicit import check_spec, solve_on_support
from ._secant import Outer
from ._working_set import WorkingSet, eligible
from .hypergrad import hypergrad
from .optim import Optimizer
from .penalties import L1, Penalty
from .progress import Progress
from .result import Best
from .solvers import LeastSquares, Solution, least_squares, solve
from .spec import Spec, as_spec

__all__ = ["TuneResult", "tune"]


@dataclass(eq=False)
class TuneResult:
    """What :func:`tune` returns.

    Attributes:
        strengths: ``{term: float}`` the strengths at the best outer step.
        weights: ``{term: tensor}`` the tuned ``weight=`` factors at the best step.
        value: the best outer objective (validation or mean CV score).
        params: ``{name: tensor}`` the solution at the best strengths: trained on ``data``
            (a validation split) or refitted on all of ``data`` (cross-validation).
        spec: the spec with the best ``weight=`` factors in place.
        history: ``{"step", "strengths", "value", "grad_norm", "inner_iterations",
            "solve_tol"}``, one entry per outer step (strengths as ``{term: float}``; the
            iterations summed over folds; the inner tolerance used).
        stopped: why tuning stopped (``"steps"``, ``"patience"``, ``"gradient"``, or
            ``"xtol"``: the secant search's next step was below ``xtol``).
        starts: with several starting points, each start's own result (in order); the
            fields above are those of the best start, except ``history``, which holds every
            start's steps one after the other with a ``"start"`` entry (its index).
    """

    strengths: dict[str, float]
    weights: dict[str, Tensor]
    value: float
    params: dict[str, Tensor]
    spec: Spec
    history: dict[str, list[Any]] = field(default_factory=dict)
    stopped: str = "steps"
    starts: list[TuneResult] = field(default_factory=list)

    def best(self) -> Best:
        """The best outer step as a :class:`~funcreg.Best` (``index``: its position in
        ``history``, the step itself for one start)."""
        values = self.history["value"]
        i = min(range(len(values)), key=lambda j: values[j])
        return Best(i, dict(self.history["strengths"][i]), "outer objective", float(values[i]))


def _split(data: tuple[Tensor, ...], mask: Tensor) -> tuple[Tensor, ...]:
    return tuple(t[mask] for t in data)


def tune(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    params: Mapping[str, Tensor],
    strengths: Mapping[str, Any],
    data: tuple[Tensor, ...] = (),
    *,
    validation: tuple[Tensor, ...] | None = None,
    folds: Any = None,
    seed: int = 0,
    score_fn: Callable[..., Tensor] | None = None,
    terms: Iterable[str] | None = None,
    weights: Iterable[str] = (),
    optimizer: Optimizer | str | None = None,
    steps: int = 50,
    patience: int = 5,
    tol: float = 1e-4,
    gtol: float = 1e-8,
    xtol: float = 1e-2,
    solve_tol: float = 1e-10,
    solve_tol_start: float | None = None,
    max_iter: int = 10_000,
    progress: bool = False,
    training: Any = None,
) -> TuneResult:
    """Tune strengths (and ``weight=`` factors) by hypergradient descent in log space.

    With ``training=fr.Training(optimizer, steps, ...)`` the inner problem is a network
    training instead of a convex solve (:mod:`funcreg._tune_net`: a validation split, smooth
    or prox-trained terms, ``"implicit"`` or ``"unrolled"`` hypergradients); the arguments
    that only make sense for ``fr.solve`` (``weights``, ``folds``, ``solve_tol*``,
    ``max_iter``) are then refused or unused.

    Args:
        loss_fn: ``loss_fn(params, *data) -> 0-dim tensor`` (mean-reduced, convex).
        spec: the penalty terms.
        params: the starting point of the inner solves (one model).
        strengths: the starting strengths ``{term: number}`` (> 0 for the tuned terms).
            Several starting points: give tuned terms a list or ``(S,)`` tensor of values
            (all of length S; the others a number): each start descends on its own (one
            after the other; each with its own warm starts) and the best final value wins.
        data: the training data, a tuple of tensors sharing the sample axis 0. With a
            :func:`funcreg.least_squares` loss pass none: each fold gets its own
            ``least_squares`` of its rows (the Gram fast path of :func:`funcreg.solve`), and
            the default score is the same loss on the held-out rows.
        validation: held-out data (same layout); else K-fold cross-validation of ``data``.
        folds: an int, fold ids or ``(train, test)`` index pairs (as
            :func:`funcreg.cross_validate`); default 5 when ``validation`` is not given.
        seed: shuffles the folds of an int ``folds``.
        score_fn: the outer objective ``score_fn(params, *held_out)`` (default ``loss_fn``).
        terms: the strengths to tune (default every term with a strength); others stay fixed.
        weights: terms whose ``weight=`` tensor is tuned too (one log-factor per entry).
        optimizer: a functional optimizer over ``{term: log s}`` (default ``adam(lr=0.1)``),
            or ``"secant"``: safeguarded secant (quasi-Newton) steps on ``log s``, a first
            step of 0.5 (a factor ``e^0.5``) then each coordinate's Newton step with a secant
            curvature, overshoots sent back by interpolation (:mod:`funcreg._secant`); it
            needs far fewer outer steps on a few strengths.
        steps: the most outer steps; patience, tol: stop when the best value has not
            improved by more than ``tol`` (relative) for ``patience`` steps; gtol: stop when
            ``‖∇_θ E‖ ≤ gtol``; xtol: with ``"secant"``, stop when its next step in ``log s``
            is at most ``xtol`` in every coordinate.
        solve_tol, max_iter: for each inner :func:`funcreg.solve`.
        solve_tol_start: a looser inner tolerance for the first outer step, tightened tenfold
            per step down to ``solve_tol`` (early steps only need the direction; the history
            records each step's ``solve_tol``). Default: ``solve_tol`` throughout.
        progress: a progress bar (tqdm when installed).

    Returns:
        A :class:`TuneResult`.

    Raises:
        ValueError: both or neither-and-bad ``validation``/``folds``, a tuned term that is
            not in the spec or has no strength, a tuned strength <= 0, a bad ``steps``, a
            non-convex term (MCP, SCAD: no implicit derivative) or a non-smooth term without
            a prox, a ``score_fn`` that does not depend on the params (from
            :func:`funcreg.hypergrad`).
    """
    who = "tune"
    if not isinstance(strengths, Mapping):
        raise TypeError(
            f"{who}: strengths must be a dict {{term: starting strength}}, e.g. {{'l1': 0.1}}, "
            f"got {type(strengths).__name__}"
        )
    if training is not None:  # a network: trained, not solved (funcreg._tune_net)
        from ._tune_net import tune_network

        return TuneResult(**tune_network(loss_fn, spec, params, strengths, data,
            training=training, validation=validation, folds=folds, score_fn=score_fn,
            terms=terms, weights=weights, optimizer=optimizer, steps=steps, patience=patience,
            tol=tol, gtol=gtol, xtol=xtol, progress=progress))  # fmt: skip
    spec = as_spec(spec)
    check_spec(spec, who)
    starts = _starts(strengths, who)
    if starts is not None:  # several starting points: one descent each, the best kept
        runs = [
            tune(
                loss_fn,
                spec,
                params,
                start,
                data,
                validation=validation,
                folds=folds,
                seed=seed,
                score_fn=score_fn,
                terms=terms,
                weights=weights,
                optimizer=optimizer,
                steps=steps,
                patience=patience,
                tol=tol,
                gtol=gtol,
                xtol=xtol,
                solve_tol=solve_tol,
                solve_tol_start=solve_tol_start,
                max_iter=max_iter,
                progress=progress,
            )
            for start in starts
        ]
        return _best_of(runs)
    score = loss_fn if score_fn is None else score_fn
    if validation is not None and folds is not None:
        raise ValueError(f"{who}: give validation= or folds=, not both")
    ls = loss_fn if isinstance(loss_fn, LeastSquares) else None
    if ls is not None and data:
        raise TypeError(f"{who}: a least_squares loss holds its data; pass no data")
    if ls is None and (not isinstance(data, tuple) or not data):
        raise TypeError(f"{who}: data must be a tuple of tensors, e.g. (X, y)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{who}: steps must be an integer >= 1, got {steps!r}")
    tuned = _checks.tuned_terms(who, spec.strength_names, strengths, terms)
    wterms = tuple(weights)
    for t in wterms:
        if t not in spec:
            raise ValueError(f"{who}: weights= names {t!r}, not a term of the spec {list(spec)}")
        if not isinstance(spec[t].weight, Tensor):
            raise ValueError(
                f"{who}: term {t!r} needs a weight= tensor to tune (e.g. torch.ones(p))"
            )
    like = next(iter(params.values()))
    rows = data if ls is None else (ls.X, ls.Y)
    n = int(rows[0].shape[0])
    # each split: (inner loss or a WorkingSet, its data, outer score or None, its data)
    splits: list[tuple[Any, tuple[Any, ...], Any, tuple[Any, ...]]] = []
    if validation is None:
        train_m, test_m = fold_masks(5 if folds is None else folds, n, seed)
        pairs = [(_split(rows, a), _split(rows, b)) for a, b in zip(train_m, test_m, strict=True)]
    else:
        pairs = [(rows, tuple(validation))]
    # least squares with elementwise penalties: each fold on a working set of features
    ws = ls is not None and eligible(ls, spec)
    for train, held in pairs:
        if ls is None:
            splits.append((loss_fn, train, score, held))
        elif ws:
            fold = WorkingSet(train[0], train[1].reshape(-1), ls.fit_intercept)
            splits.append((fold, (), score_fn, held))
        else:
            fit = least_squares(train[0], train[1], fit_intercept=ls.fit_intercept)
            if score_fn is None:
                outer = least_squares(held[0], held[1], fit_intercept=ls.fit_intercept)
                splits.append((fit, (), outer, ()))
            else:
                splits.append((fit, (), score_fn, held))

    theta: dict[str, Tensor] = {
        t: torch.tensor(math.log(float(strengths[t])), dtype=like.dtype) for t in tuned
    }
    for t in wterms:
        c = spec[t].weight
        assert isinstance(c, Tensor)
        if bool((c <= 0).any()):
            raise ValueError(
                f"{who}: weight= factors of {t!r} must be > 0 to be tuned in log space"
            )
        theta[f"{t}.weight"] = c.detach().to(like.dtype).log()
    outer_loop = Outer(who, optimizer, theta, tol, patience, gtol, xtol)
    warm = [dict(params) for _ in splits]
    # a least_squares fold's Lipschitz constant σ_max(X_f)²/n_f, once (solve would estimate
    # it at every call); the general path only starts from it
    lips: list[float | None] = [
        float(torch.linalg.matrix_norm(fn.X, 2)) ** 2 / fn.n
        if isinstance(fn, LeastSquares) and not fn.fit_intercept
        else None
        for fn, *_ in splits
    ]

    def current(th: Mapping[str, Tensor]) -> tuple[dict[str, float], Spec]:
        s = {t: float(strengths[t]) for t in spec.strength_names}
        s.update({t: float(th[t].exp()) for t in tuned})
        sp = spec
        if wterms:
            sp = Spec(
                {
                    t: replace(p, weight=th[f"{t}.weight"].exp()) if t in wterms else p
                    for t, p in spec.items()
                }
            )
        return s, sp

    history: dict[str, list[Any]] = {
        "step": [],
        "strengths": [],
        "value": [],
        "grad_norm": [],
        "inner_iterations": [],
        "solve_tol": [],
    }
    best_theta, stopped = dict(theta), "steps"
    with Progress(steps, enabled=progress, desc=who) as bar:
        for step in range(steps):
            s, sp = current(theta)
            # inexact early steps: the inner tolerance tightens tenfold per outer step
            step_tol = max(solve_tol, (solve_tol_start or solve_tol) * 0.1**step)
            total = 0.0
            grads = {k: torch.zeros_like(v) for k, v in theta.items()}
            inner = 0
            for f, (inner_fn, train, outer_fn, held) in enumerate(splits):
                if isinstance(inner_fn, WorkingSet):
                    if step == 0 and f > 0:  # the last fold's solution: a close first guess
                        prev = splits[f - 1][0]
                        assert isinstance(prev, WorkingSet)
                        inner_fn.seed(prev.full())
                    val, g, its = _working_set_step(
                        inner_fn, sp, s, outer_fn, held, wterms, step_tol, max_iter
                    )
                else:
                    sol = solve(
                        inner_fn,
                        sp,
                        warm[f],
                        s,
                        *train,
                        tol=step_tol,
                        max_iter=max_iter,
                        lipschitz=lips[f],
                    )
                    warm[f] = {k: v[0] for k, v in sol.params.items()}
                    its = int(sol.iterations.sum())
                    hg = hypergrad(
                        outer_fn,
                        inner_fn,
                        sp,
                        sol,
                        s,
                        *train,
                        outer_data=held,
                        weights=wterms,
                        check=max(1e-5, 10 * step_tol),
                    )
                    val = float(hg.value[0])
                    g = {t: hg.strengths[t][0] for t in hg.strengths}
                    g.update({f"{t}.weight": hg.weights[t][0] for t in wterms})
                inner += its
                total += val / len(splits)
                for k in grads:
                    grads[k] = grads[k] + g[k] / len(splits)
            gnorm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
            if step == 0 and gnorm == 0.0:
                warnings.warn(
                    f"{who}: the hypergradient is exactly 0 at the starting strengths {s}: "
                    "there the solution does not move with the strengths (typically a start "
                    "at or above strength_max, where every fold's solution is zero); start "
                    "below it, e.g. at fr.strength_max(...) / 10",
                    RuntimeWarning,
                    stacklevel=2,
                )
            history["step"].append(step)
            history["strengths"].append(s)
            history["value"].append(total)
            history["grad_norm"].append(gnorm)
            history["inner_iterations"].append(inner)
            history["solve_tol"].append(step_tol)
            bar.update()
            if outer_loop.record(total):
                best_theta = {k: v.clone() for k, v in theta.items()}
            bar.status(outer_loop.best, 0, len(splits))
            nxt, why = outer_loop.step(theta, total, grads, gnorm)
            if nxt is None:
                stopped = why or stopped
                break
            theta = nxt

    s, sp = current(best_theta)
    if ws:
        assert ls is not None
        whole = WorkingSet(ls.X, ls.Y[:, 0], ls.fit_intercept)
        # the folds' last solutions, averaged where most folds agree: a close guess of the
        # refit's support (the union of the folds' supports is several times too large)
        fw = torch.stack([fn.full() for fn, *_ in splits if isinstance(fn, WorkingSet)])
        guess = torch.where(2 * (fw != 0).sum(0) > len(fw), fw.mean(0), 0.0)
        whole.seed(guess)
        _, _, sol, cols = whole.solve(sp, s, solve_tol, max_iter)
        best_params = whole.expand(sol, cols)
    else:
        full = solve(loss_fn, sp, warm[0], s, *data, tol=solve_tol, max_iter=max_iter)
        best_params = {k: v[0] for k, v in full.params.items()}
    return TuneResult(
        strengths=s,
        weights={t: best_theta[f"{t}.weight"].exp() for t in wterms},
        value=outer_loop.best,
        params=best_params,
        spec=sp,
        history=history,
        stopped=stopped,
    )


def _working_set_step(
    fold: WorkingSet,
    spec: Spec,
    s: Mapping[str, float],
    score_fn: Callable[..., Tensor] | None,
    held: tuple[Tensor, ...],
    wterms: tuple[str, ...],
    tol: float,
    max_iter: int,
) -> tuple[float, dict[str, Tensor], int]:
    """One fold of a least-squares problem: solve on its working set, differentiate the
    restricted problem (the same hypergradient, see :mod:`funcreg._working_set`) and put the
    ``weight=`` gradients back on all features (zero off the working set)."""
    loss, sub, sol, cols = fold.solve(spec, s, tol, max_iter)
    Xh, yh = held[0], held[1]
    closed = None
    if score_fn is None:
        closed = _lasso_hypergrad(loss, sub, sol, s, Xh[:, cols], yh, wterms)
    if closed is not None:
        val, g = closed
        on_cols = {t: g[f"{t}.weight"] for t in wterms}
    else:
        outer: Callable[..., Tensor]
        if score_fn is None:
            outer = least_squares(Xh[:, cols], yh, fit_intercept=fold.fit_intercept)
            data: tuple[Tensor, ...] = ()
        else:

            def outer(q: Mapping[str, Tensor], *h: Tensor) -> Tensor:
                w = Xh.new_zeros(1, fold.p).index_copy(1, cols, q["weight"])
                return score_fn({**q, "weight": w}, *h)

            data = held
        hg = hypergrad(
            outer, loss, sub, sol, s, outer_data=data, weights=wterms, check=max(1e-5, 10 * tol)
        )
        val = float(hg.value[0])
        g = {t: hg.strengths[t][0] for t in hg.strengths}
        on_cols = {t: hg.weights[t][0] for t in wterms}
    for t in wterms:  # back on all features (zero off the working set)
        c = spec[t].weight
        assert isinstance(c, Tensor)
        full = c.new_zeros(fold.p)
        full[cols] = on_cols[t].reshape(-1).to(full.dtype)
        g[f"{t}.weight"] = full.reshape(c.shape)
    return val, g, int(sol.iterations.sum())


def _lasso_hypergrad(
    loss: LeastSquares,
    spec: Spec,
    sol: Solution,
    s: Mapping[str, float],
    Xh: Tensor,
    yh: Tensor,
    wterms: tuple[str, ...],
) -> tuple[float, dict[str, Tensor]] | None:
    """The held-out loss ``E = 1/(2n_h)‖y_h − X_h w − b‖²`` and its gradient in ``log s`` (and
    ``log c`` for tuned factors) for one ``L1`` term on least squares, in closed form: on the
    support ``S`` with signs ``σ`` (the intercept eliminated: ``G̃ = G − x̄x̄ᵀ``,
    ``b = ȳ − x̄ᵀw``), ``w_S = G̃_SS⁻¹(r̃_S − s c_S σ_S)``, so with the adjoint
    ``q = G̃_SS⁻¹ ∇_S E`` (``∇E`` through ``b`` as well), ``dE/d log c_j = −s c_j σ_j q_j`` on
    ``S`` (zero off it) and ``dE/d log s`` is their sum — the implicit derivative of
    :func:`funcreg.hypergrad` (the fixed point restricted to the support), one ``|S|×|S|``
    solve instead of its general machinery. ``None`` where it does not apply (other terms,
    ``toward=``, a scalar factor that is tuned, an unconverged solution): the caller takes
    :func:`funcreg.hypergrad`."""
    if len(spec) != 1 or not bool(sol.converged.all()):
        return None
    ((term, pen),) = spec.items()
    if type(pen) is not L1 or pen.toward is not None or term not in s:
        return None
    w = sol.params["weight"][0].reshape(-1)
    k = w.shape[0]
    c = pen.weight
    if c is None:
        cw = torch.ones_like(w)
    elif isinstance(c, Tensor) and c.numel() in (1, k) and (c.numel() == k or not wterms):
        cw = c.detach().to(w).reshape(-1).expand(k)
    else:
        return None
    res = Xh @ w - yh.reshape(-1)
    if loss.fit_intercept:
        res = res + sol.params["bias"][0]
    val = float(0.5 * res.square().mean())
    v = Xh.T @ res / res.shape[0]  # ∇_w E
    G = loss.gram
    if loss.fit_intercept:  # through b = ȳ − x̄ᵀw, on the centred Gram matrix
        mu = loss.x_mean
        v = v - mu * res.mean()
        G = G - torch.outer(mu, mu)
    on = (w != 0).nonzero().squeeze(1)
    gl = torch.zeros_like(w)
    if on.numel():
        q = solve_on_support(G[on][:, on], v[on])
        gl[on] = -float(s[term]) * cw[on] * w[on].sign() * q
    g = {term: gl.sum()}
    for t in wterms:
        g[f"{t}.weight"] = gl
    return val, g


def _starts(strengths: Mapping[str, Any], who: str) -> list[dict[str, Any]] | None:
    """The starting points when some strengths are lists or 1-D tensors, else ``None``."""
    many = {
        t: [float(x) for x in (v.tolist() if isinstance(v, Tensor) else v)]
        for t, v in strengths.items()
        if isinstance(v, (list, tuple)) or (isinstance(v, Tensor) and v.dim() == 1)
    }
    if not many:
        return None
    sizes = {len(v) for v in many.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"{who}: several starting points need strength lists of one length S >= 1, got "
            f"{ {t: len(v) for t, v in many.items()} }"
        )
    return [{**strengths, **{t: v[i] for t, v in many.items()}} for i in range(sizes.pop())]


def _best_of(runs: list[TuneResult]) -> TuneResult:
    """The best run, carrying every run and their histories one after the other."""
    best = min(runs, key=lambda r: r.value)
    history: dict[str, list[Any]] = {k: [] for k in runs[0].history}
    history["start"] = []
    for i, r in enumerate(runs):
        for k, v in r.history.items():
            history[k].extend(v)
        history["start"].extend([i] * len(r.history["value"]))
    return replace(best, history=history, starts=runs)
