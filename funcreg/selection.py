"""Choosing a strength: the min and one-standard-error rules, and k-fold cross-validation
of every fold × every strength in one vectorized run.

    cv = fr.cross_validate(net, loss, spec, fr.grid(l1=strengths), (x, y), folds=5)
    cv.strength_min, cv.strength_1se      # as cv.glmnet's lambda.min / lambda.1se
    cv.plot()                             # mean ± 1 se against log strength
    model = cv.refit("1se")               # fitted on all the data at strength_1se

How the folds reach an ordinary loss
------------------------------------
Fold ``f`` is a 0/1 weight per sample (``train[f, i] = 1`` when sample ``i`` trains fold
``f``): the data is stored once and every model reads it through its own weight row, so
nothing is copied per fold or per strength. A fit on all the data rides along as one more
row of ones (the ``refit`` models). The weighted data term of fold ``f`` is the mean of the
per-sample losses over its training samples, ``Σ_i w_fi ℓ_i / Σ_i w_fi``, reached in one
of two ways:

* ``loss_fn`` takes a ``weight=`` keyword (``loss_fn(params, *batch, weight=w)``, ``w`` of
  shape ``(n,)``) — funcreg passes the weights and the loss must return the weighted mean
  ``Σ w_i ℓ_i / Σ w_i``; this is the fast way (one forward over the batch);
* otherwise funcreg evaluates the unchanged, mean-reduced ``loss_fn`` on every sample alone,
  ``loss_fn(params, x_i[None], y_i[None])``, under ``vmap`` over samples, and takes the
  weighted mean. Any per-sample-separable mean loss (MSE, cross-entropy, ...) gives the same
  numbers as on the fold's rows; a loss that couples samples (train-mode BatchNorm, a
  contrastive loss) does not: give it ``weight=``. (With ``weight=`` the forward still
  sees every sample of the batch: train-mode BatchNorm statistics include the fold's
  held-out samples.)

Scores (``score_fn``, default ``loss_fn``) on each fold's held-out samples are computed the
same way. Internally the fold of a model is a one-hot vector that travels with its params
(as an extra entry for :func:`~funcreg.solvers.solve`, as a buffer for
:func:`~funcreg._sweep.sweep`); it receives no gradient and is never penalised.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import _checks
from ._folds import (
    FOLD_KEY,
    accepts_weight,
    check_no_activity,
    exclude_fold,
    fold_masks,
    fold_pairs,
    weighted_mean,
    without_fold,
)
from ._quadratic import DETECT_MAX
from ._sweep import sweep
from .optim import Optimizer
from .penalties import Penalty
from .result import Best, SweepResult, one_se_index
from .solvers import NotQuadratic, Solution, solve
from .spec import Spec, as_spec
from .stack import as_data, build_grid, eval_mode, split_model, strength_values, with_buffers

__all__ = ["CVResult", "cross_validate", "fold_masks", "fold_pairs"]

# ----------------------------------------------------------------------------- result


@dataclass(eq=False)
class CVResult:
    """The outcome of :func:`cross_validate` (``F`` folds, ``K`` grid points).

    Attributes:
        grid: ``{axis: (K,)}`` the strengths (and hyperparameters) of each grid point.
        scores: ``(F, K)`` float64, the held-out score of every fold at every grid point
            (NaN where the fit diverged).
        folds: the ``(train_idx, test_idx)`` index pairs used.
        path: a :class:`~funcreg.result.SweepResult` of the ``K`` fits on all the data, with
            ``history["val_loss"]`` = :attr:`mean` and ``history["val_loss_se"]`` = :attr:`se`
            (so ``cv.path.best(rule="1se")`` works too).
        axis: the grid axis that orders the models (the most regularised has its largest
            value), or ``None`` when several strength axes vary.
        fits: the fold fits as a ``SweepResult`` of ``F·K`` models (fold-major:
            model ``f·K + k``), for inspection.
        meta: timing, the solver used and its iteration counts or steps (``solve``: also
            ``tol`` and ``max_iter``), and ``chunks``, the ``[start, stop)`` model ranges
            of the fits run together (over the ``(F + 1)·K`` fits, fold-major, the all-data
            fits last).
    """

    grid: dict[str, Tensor]
    scores: Tensor
    folds: list[tuple[Tensor, Tensor]]
    path: SweepResult
    axis: str | None
    fits: SweepResult | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    params_only: bool = False

    # -- statistics -----------------------------------------------------------------------
    @property
    def K(self) -> int:  # noqa: N802 - the grid size is called K everywhere
        return int(self.scores.shape[1])

    @property
    def n_folds(self) -> int:
        return int(self.scores.shape[0])

    @property
    def mean(self) -> Tensor:
        """``(K,)`` mean held-out score over the folds (each fold counts once)."""
        return self.scores.mean(0)

    @property
    def se(self) -> Tensor:
        """``(K,)`` standard error of :attr:`mean`: ``std(scores, ddof=1) / √F``."""
        return self.scores.std(0, correction=1) / math.sqrt(self.n_folds)

    def best(self, rule: str = "min", axis: str | None = None) -> Best:
        """The grid point chosen by ``rule``: ``"min"`` (lowest mean score; among tied
        minima the most regularised along ``axis``, as glmnet's ``lambda.min``) or ``"1se"``
        (the most regularised within one standard error of it, along ``axis``)."""
        if rule not in ("min", "1se"):
            raise ValueError(f"rule must be 'min' or '1se', got {rule!r}")
        mean = self.mean
        along = axis or self.axis
        if along is not None and along not in self.grid:
            raise ValueError(f"axis {along!r} is not a grid axis; the grid has {list(self.grid)}")
        if rule == "min":
            if not bool(torch.isfinite(mean).any()):
                raise ValueError("no grid point has a finite mean score (all fits diverged?)")
            if along is None:
                idx = int(torch.where(torch.isfinite(mean), mean, math.inf).argmin())
            else:  # tied minima (e.g. every strength above strength_max): the most regularised
                idx = one_se_index(mean, torch.zeros_like(mean), self.grid[along])
            note = ""
        else:
            if along is None:
                raise ValueError(
                    f"rule='1se' needs an order: the grid varies along several strength axes "
                    f"{self.path.varying_axes()}; pass axis="
                )
            idx = one_se_index(mean, self.se, self.grid[along])
            note = f"one-standard-error rule along {along!r}"
        strengths = {k: float(v[idx]) for k, v in self.grid.items()}
        return Best(idx, strengths, "cv_mean", float(mean[idx]), note)

    def strength_of(self, rule: str) -> float:
        if self.axis is None:
            raise ValueError(
                "the grid varies along several strength axes; use cv.best(rule).strengths"
            )
        return float(self.grid[self.axis][self.best(rule).index])

    @property
    def strength_min(self) -> float:
        """The strength with the lowest mean score (cv.glmnet's ``lambda.min``)."""
        return self.strength_of("min")

    @property
    def strength_1se(self) -> float:
        """The largest strength within one SE of the best (cv.glmnet's ``lambda.1se``)."""
        return self.strength_of("1se")

    @property
    def nonzero(self) -> Tensor:
        """``(K,)`` non-zero coefficients of the all-data fits, over the params the spec's
        non-smooth terms select (all selected params when it has none): glmnet's nzero."""
        return self.meta["nonzero"]

    @property
    def nonzero_groups(self) -> Tensor | None:
        """``(K,)`` non-zero groups of the all-data fits for the spec's group-lasso terms
        (``None`` without such terms)."""
        return self.meta.get("nonzero_groups")

    # -- the chosen model -----------------------------------------------------------------
    def refit(self, rule: str = "min") -> Any:
        """The model fitted on all the data at the grid point chosen by ``rule`` (these
        fits ran in the same vectorized run as the folds): a fresh copy of the module, or a
        params dict when ``cross_validate`` was given a dict."""
        i = self.best(rule).index
        if self.params_only:
            return self.path.params(i)
        return self.path.module(i)

    # -- display --------------------------------------------------------------------------
    def plot(
        self, *, axis: str | None = None, ax: Any = None, save: Any = None, ylabel: str = ""
    ) -> Any:
        """The CV curve (``plot.cv.glmnet``): mean ± 1 se against the log strength, dashed
        and dotted vertical lines at ``strength_min`` and ``strength_1se``, the number of
        non-zero coefficients on the top axis. Returns the matplotlib ``Axes``."""
        from . import plot

        along = axis or self.axis
        if along is None:
            raise ValueError(
                f"plot: the grid varies along several strength axes "
                f"{self.path.varying_axes()}; pass axis="
            )
        lo = float(self.grid[along].min())
        if not lo > 0:
            raise ValueError(
                f"plot: the CV curve uses a log {along!r} axis, so every strength must be > 0 "
                f"(the grid has {lo})"
            )
        return plot.cv_curve(
            self.grid[along],
            self.mean,
            self.se,
            strength_min=float(self.grid[along][self.best("min").index]),
            strength_1se=float(self.grid[along][self.best("1se", along).index]),
            ylabel=ylabel or f"CV score ({self.n_folds} folds)",
            strength_label=along,
            nonzero=self.nonzero if self.meta.get("sparse_terms") else None,
            ax=ax,
            save=save,
        )

    def plot_path(self, param: str, kind: str = "coef", axis: str | None = None, **kw: Any) -> Any:
        """Coefficient path of the all-data fits (:meth:`SweepResult.plot_path`), with
        vertical lines at ``strength_min`` and ``strength_1se``."""
        out = self.path.plot_path(param, kind, axis or self.axis, ax=kw.pop("ax", None))
        along = axis or self.axis
        if along is not None:
            out.axvline(float(self.grid[along][self.best("min").index]), ls="--", color="k")
            out.axvline(float(self.grid[along][self.best("1se", along).index]), ls=":", color="k")
        from .plot import finish

        return finish(out, kw.pop("save", None))

    def table(self) -> str:
        """One row per grid point: strengths, mean ± se, non-zeros; ``min``/``1se`` marks."""
        i_min = self.best("min").index
        i_1se = self.best("1se").index if self.axis is not None else -1
        cols: list[tuple[str, list[str]]] = [("#", [str(i) for i in range(self.K)])]
        for name, v in self.grid.items():
            cols.append((name, [f"{float(x):.4g}" for x in v]))
        cols.append(("cv_mean", [f"{float(x):.5g}" for x in self.mean]))
        cols.append(("cv_se", [f"{float(x):.3g}" for x in self.se]))
        if self.meta.get("sparse_terms"):
            cols.append(("nonzero", [str(int(x)) for x in self.nonzero]))
        marks = [
            " ".join(m for m, j in (("min", i_min), ("1se", i_1se)) if j == i)
            for i in range(self.K)
        ]
        cols.append(("", marks))
        widths = [max(len(t), *(len(c) for c in vals)) for t, vals in cols]
        lines = ["  ".join(t.rjust(w) for (t, _), w in zip(cols, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        for i in range(self.K):
            lines.append(
                "  ".join(v[i].rjust(w) for (_, v), w in zip(cols, widths, strict=True)).rstrip()
            )
        return "\n".join([*lines, f"{self.n_folds}-fold CV of {self.K} grid points"])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"CVResult(folds={self.n_folds}, K={self.K}, grid=({', '.join(self.grid)}))"


# ---------------------------------------------------------------------- cross_validate


def _cv_grid(grid: Any, spec: Spec) -> dict[str, Tensor]:
    if isinstance(grid, Mapping):
        if not grid:
            raise ValueError(
                "cross_validate: the grid is empty; give e.g. fr.grid(l1=torch.logspace(-4, 0, 20))"
            )
        return build_grid(grid, product=False, dtype=torch.float64)
    term = spec.strength_term(None, "cross_validate (a grid given as a list of strengths)")
    return {term: strength_values(grid, "cross_validate")}


def _order_axis(grid: Mapping[str, Tensor], spec: Spec, axis: str | None) -> str | None:
    if axis is not None:
        if axis not in grid:
            raise ValueError(f"cross_validate: axis {axis!r} is not a grid axis ({list(grid)})")
        return axis
    terms = [t for t in spec.strength_names if t in grid]
    varying = [t for t in terms if bool((grid[t] != grid[t][0]).any())]
    if len(varying) == 1:
        return varying[0]
    if not varying:
        return terms[0] if terms else None
    return None


def _nonzeros(spec: Spec, stacked: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    single = {n: v[0] for n, v in stacked.items()}
    sel = spec.selection(single)
    sparse = [t for t, pen in spec.items() if not pen.smooth and not pen.is_constraint]
    names: list[str] = []
    for t in sparse or list(sel):
        names += [n for n in sel[t] if n not in names]
    k = next(iter(stacked.values())).shape[0]
    nz = torch.zeros(k, dtype=torch.int64)
    for n in names:
        nz += (stacked[n].reshape(k, -1) != 0).sum(1).cpu()
    groups: Tensor | None = None
    for t, pen in spec.items():
        for n in sel[t]:
            count = _nonzero_groups(pen, stacked[n])
            if count is not None:
                groups = count.cpu() if groups is None else groups + count.cpu()
    return nz, groups


def _nonzero_groups(pen: Penalty, stacked: Tensor) -> Tensor | None:
    """``(K,)`` non-zero groups of each model's ``stacked`` parameter under ``pen``;
    ``None`` when ``pen`` has no groups."""
    if pen.nonzero_groups(stacked[0]) is None:
        return None
    return vmap(pen.nonzero_groups)(stacked)


def _scores(
    score: Callable[..., Tensor],
    stacked: Mapping[str, Tensor],
    bufs: Mapping[str, Tensor] | None,
    test: Tensor,
    k: int,
    data: tuple[Tensor, ...],
    model: nn.Module | None,
) -> Tensor:
    """``(F, K)`` weighted held-out scores of the fold fits (fold-major stacked params)."""
    f = test.shape[0]
    with eval_mode(model):
        rows = []
        with torch.no_grad():
            for j in range(f):
                p = {n: v[j * k : (j + 1) * k] for n, v in stacked.items()}
                if bufs:
                    b = {n: v[j * k : (j + 1) * k] for n, v in bufs.items()}
                    fn = vmap(
                        lambda p, b, w, *d: score({**p, **b}, w, *d),
                        in_dims=(0, 0, None) + (None,) * len(data),
                    )
                    rows.append(fn(p, b, test[j], *data))
                else:
                    fn = vmap(score, in_dims=(0, None) + (None,) * len(data))
                    rows.append(fn(p, test[j], *data))
    return torch.stack(rows).double().cpu()


def _solve_by_fold(
    fit_loss: Callable[..., Tensor],
    spec: Spec,
    params0: Mapping[str, Tensor],
    bufs0: Mapping[str, Tensor],
    norm_w: Tensor,
    grid: Mapping[str, Tensor],
    data: tuple[Tensor, ...],
    tol: float,
    max_iter: int,
) -> Solution | None:
    """The fits fold by fold (each row of ``norm_w`` with every grid point) when the
    weighted loss is a quadratic in the params (:mod:`funcreg._quadratic`): each fold then
    has its own Gram matrix and :func:`~funcreg.solvers.solve` takes the Gram route. ``None``
    when a fold's loss is not quadratic (or too large to look at), so that one solve of
    every fit runs instead."""
    single = dict(params0)
    if sum(v.numel() for v in single.values()) > DETECT_MAX:
        return None

    def fold_loss(row: Tensor) -> Callable[..., Tensor]:
        return lambda p, *d: fit_loss({**p, **bufs0}, row, *d)

    opts: dict[str, Any] = {"tol": tol, "max_iter": max_iter, "quadratic": True}
    try:  # each fold's Gram route, its quadratic found (and certified) by solve
        parts = [solve(fold_loss(row), spec, single, dict(grid), *data, **opts) for row in norm_w]
    except NotQuadratic:
        return None
    params = {n: torch.cat([s.params[n] for s in parts]) for n in single}
    cat = [torch.cat([getattr(s, f) for s in parts]) for f in ("iterations", "converged")]
    optimality = torch.cat([s.optimality for s in parts if s.optimality is not None])
    return Solution(params, cat[0], cat[1], optimality, parts[0].dtype)


def cross_validate(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    grid: Any,
    data: Any,
    folds: Any = 5,
    *,
    optimizer: Optimizer | None = None,
    steps: int | None = None,
    score_fn: Callable[..., Tensor] | None = None,
    seed: int = 0,
    axis: str | None = None,
    tol: float = 1e-8,
    max_iter: int = 10_000,
    progress: bool = False,
    **sweep_kwargs: Any,
) -> CVResult:
    """K-fold cross-validation of every grid point, all folds × strengths in one run.

    Every fold's fit at every grid point — and, as one extra fold, the fit on all the data
    (the :meth:`CVResult.refit` models) — is one model of a single vectorized run; fold
    ``f`` sees the data through a 0/1 sample-weight row (see the module docstring for how
    the weights reach ``loss_fn``), so the data is stored once.

    * Without ``optimizer``: each fit is solved exactly by :func:`~funcreg.solvers.solve`
      (FISTA to ``tol``; convex problems — what ``LassoCV``/``cv.glmnet`` users expect).
    * With ``optimizer`` and ``steps``: every fit trains ``steps`` steps with
      :func:`fr.sweep <funcreg._sweep.sweep>` from the model's current weights (networks);
      extra keywords (``batch_size``, ``chunk_size``, ``compile``, ...) go to ``sweep``.
      With ``batch_size``, each minibatch's loss is the weighted mean over the fold's
      training samples in it.

    Args:
        model: the model (its weights start every fit) or, for ``solve``, a params dict.
        loss_fn: ``loss_fn(params, *data) -> 0-dim tensor``, mean-reduced (params include
            buffers); optionally with a ``weight=`` keyword (module docstring).
        spec: the penalty.
        grid: ``fr.grid(...)`` / a dict of axes (zipped, scalars broadcast), or a list or
            tensor of strengths for the spec's only term with a strength.
        data: ``(x, y)`` or any tuple of tensors sharing the sample dimension.
        folds: an int (shuffled K-fold seeded by ``seed``), a per-sample fold-id tensor
            (glmnet's ``foldid``) or a list of ``(train_idx, test_idx)`` pairs
            (scikit-learn's ``cv.split(X)``).
        score_fn: the held-out score ``score_fn(params, *data)`` (default ``loss_fn``;
            lower is better), weighted like the loss.
        axis: the grid axis that says which model is more regularised (for ``"1se"``);
            default the only varying strength axis.
        tol, max_iter: for ``solve``.

    Returns:
        A :class:`CVResult`.
    """
    t0 = time.perf_counter()
    spec = as_spec(spec)
    _checks.check_engine_args("cross_validate", optimizer, steps)
    if optimizer is None:
        _checks.check_no_sweep_keywords("cross_validate", sweep_kwargs, cross_validate)
    check_no_activity(sweep_kwargs)
    if not callable(loss_fn):
        raise TypeError(f"cross_validate: loss_fn must be callable, got {type(loss_fn).__name__}")
    if type(loss_fn).__name__ == "LeastSquares":
        raise TypeError(
            "cross_validate: a least_squares loss holds its data; write the loss as a function "
            "loss(params, X, y) (e.g. 0.5 * F.mse_loss(...)) and pass data=(X, y)"
        )
    _checks.check_seed("cross_validate", seed)
    g = _cv_grid(grid, spec)
    k = next(iter(g.values())).numel()
    along = _order_axis(g, spec, axis)
    data_t = as_data(data)
    if not data_t or data_t[0].ndim == 0:
        raise ValueError("cross_validate: data must be a tuple of tensors sharing dimension 0")
    n = int(data_t[0].shape[0])
    if any(t.ndim == 0 or t.shape[0] != n for t in data_t):
        raise ValueError(
            "cross_validate: the data tensors must share their first (sample) dimension, got "
            f"shapes {[tuple(t.shape) for t in data_t]}"
        )
    for i, t in enumerate(data_t):
        _checks.check_finite("cross_validate", f"data[{i}]", t)
    train_m, test_m = fold_masks(folds, n, seed)
    nf = train_m.shape[0]
    fold_pairs = [
        (tr.nonzero().reshape(-1), te.nonzero().reshape(-1))
        for tr, te in zip(train_m, test_m, strict=True)
    ]
    params0, bufs0, module = split_model(model)
    dtype = next(iter(params0.values())).dtype
    device = next(iter(params0.values())).device
    rows = nf + 1  # the folds, then all the data
    weights = torch.cat([train_m, torch.ones(1, n, dtype=torch.bool)]).to(device, dtype)
    test_w = test_m.to(device, dtype)
    onehot = torch.eye(rows, dtype=dtype, device=device).repeat_interleave(k, 0)  # (rows·K, rows)
    big = {name: v.repeat(rows) for name, v in g.items()}
    fit_loss = weighted_mean(loss_fn, accepts_weight(loss_fn))
    score = score_fn if score_fn is not None else loss_fn
    if not callable(score):
        raise TypeError(f"cross_validate: score_fn must be callable, got {type(score).__name__}")
    score_w = weighted_mean(score, accepts_weight(score))
    info: dict[str, Any] = {}

    if optimizer is None:
        extra = [a for a in g if a not in spec.strength_names]
        if extra:
            raise ValueError(
                f"cross_validate: grid axes {extra} name no spec term with a strength; without "
                "an optimizer only strengths can vary (or pass optimizer= and steps=)"
            )
        norm_w = weights / weights.sum(1, keepdim=True)

        def cv_loss(p: Mapping[str, Tensor], w_rows: Tensor, *d: Tensor) -> Tensor:
            w = p[FOLD_KEY].detach() @ w_rows
            return fit_loss({**without_fold(p), **bufs0}, w, *d)

        strengths = {nm: v.to(dtype) for nm, v in big.items()}
        sol = _solve_by_fold(fit_loss, spec, params0, bufs0, norm_w, g, data_t, tol, max_iter)
        if sol is None:  # one solve of every fit, each reading its fold's weights
            x0 = {nm: v.expand(rows * k, *v.shape).clone() for nm, v in params0.items()}
            x0[FOLD_KEY] = onehot
            sol = solve(
                cv_loss, exclude_fold(spec), x0, strengths, norm_w, *data_t,
                stacked=True, tol=tol, max_iter=max_iter,
            )  # fmt: skip
        fitted = without_fold(sol.params)
        info.update(
            solver="fista",
            iterations=sol.iterations.reshape(rows, k).cpu(),
            converged=sol.converged.reshape(rows, k).cpu(),
            tol=tol,
            max_iter=max_iter,
            chunks=[[0, rows * k]],  # one solve of every fit
        )
        diverged = ~torch.isfinite(next(iter(fitted.values())).reshape(rows * k, -1).sum(1))
        fit_bufs: dict[str, Tensor] | None = (
            {nm: v.expand(rows * k, *v.shape) for nm, v in bufs0.items()} if bufs0 else None
        )
        full_idx = slice(nf * k, rows * k)
        full_p = {nm: v[full_idx].clone() for nm, v in fitted.items()}
        loss_all: Callable[..., Tensor] = with_buffers(loss_fn, bufs0)
        if accepts_weight(loss_fn):
            ones = torch.ones(n, dtype=dtype, device=device)

            def loss_all(p: Mapping[str, Tensor], *d: Tensor) -> Tensor:
                return fit_loss({**p, **bufs0}, ones, *d)

        full = SweepResult.from_solution(
            module, loss_all, spec, {nm: v.clone() for nm, v in g.items()}, full_p, bufs0,
            data_t, (), sol.iterations[full_idx].cpu(), sol.converged[full_idx].cpu(),
            {"cv_refit": True, "tol": tol, "max_iter": max_iter},
        )  # fmt: skip
        fits = None
    else:
        if module is None:
            raise TypeError(
                "cross_validate(optimizer=...) trains with fr.sweep: pass the nn.Module itself"
            )
        _checks.check_optimizer("cross_validate", optimizer)
        carrier = copy.deepcopy(module)
        carrier.register_buffer(FOLD_KEY, torch.zeros(rows, dtype=dtype, device=device))
        raw_w = weights

        def sweep_loss(p: Mapping[str, Tensor], *batch: Tensor) -> Tensor:
            *d, idx = batch
            w = p[FOLD_KEY] @ raw_w.index_select(1, idx)
            return fit_loss(without_fold(p), w, *d)

        sample_idx = torch.arange(n, device=data_t[0].device)
        init_p = {nm: v.expand(rows * k, *v.shape).clone() for nm, v in params0.items()}
        r = sweep(
            carrier, sweep_loss, spec, big, train=(*data_t, sample_idx), optimizer=optimizer,
            steps=steps, seed=int(seed), progress=progress, init=(init_p, {FOLD_KEY: onehot}),
            **sweep_kwargs,
        )  # fmt: skip
        fitted = r.stacked
        fit_bufs = {nm: v for nm, v in r.stacked_buffers.items() if nm != FOLD_KEY} or None
        diverged = r.diverged
        info.update(solver="sweep", steps=r.steps, chunks=r.meta.get("chunks"))
        g_full = {nm: v.clone() for nm, v in g.items()}
        refit_idx = torch.arange(nf * k, rows * k)
        full = r.take(refit_idx, g_full, {"cv_refit": True}, drop_buffers=(FOLD_KEY,))
        full.model = module
        g_fits = {nm: v[: nf * k].clone() for nm, v in big.items()}
        fits = r.take(torch.arange(nf * k), g_fits, {}, drop_buffers=(FOLD_KEY,))
        fits.model = module

    scores = _scores(score_w, fitted, fit_bufs, test_w, k, data_t, module)
    scores[diverged[: nf * k].reshape(nf, k).cpu()] = math.nan
    nz, groups = _nonzeros(spec, full.stacked)
    sparse = [t for t, pen in spec.items() if not pen.smooth and not pen.is_constraint]
    cv = CVResult(
        grid={nm: v.clone() for nm, v in g.items()},
        scores=scores,
        folds=fold_pairs,
        path=full,
        axis=along,
        fits=fits,
        meta={**info, "nonzero": nz, "nonzero_groups": groups, "sparse_terms": sparse},
        params_only=module is None,
    )
    full.history["val_loss"] = cv.mean[None]
    full.history["val_loss_se"] = cv.se[None]
    cv.meta["elapsed_s"] = time.perf_counter() - t0
    return cv
