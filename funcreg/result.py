"""SweepResult: everything a sweep produced, and the ways to use it.

``fr.sweep`` returns a :class:`SweepResult`::

    result = fr.sweep(net, loss, spec, grid, train=(x, y), val=(xv, yv), optimizer=opt, steps=500)
    print(result)                        # one row per model: strengths, losses, zeros, status
    best = result.best()                 # lowest final validation loss among healthy models
    model = result.module(best)          # a fresh copy of the model with those weights
    result.plot_path("hidden.weight")    # coefficient path against the strength (log x)
    result.plot_training()               # training curves of a few models
    result.save("sweep.pt")              # atomic; SweepResult.load("sweep.pt", model=net)

Contents (K models, S steps done, E evaluation points):

* ``grid`` — ``{axis: (K,)}`` strengths and hyperparameters of each model;
* ``stacked`` — final trained parameters ``{name: (K, *shape)}``; ``stacked_buffers`` —
  buffers (BatchNorm running stats) and frozen parameters, also stacked;
* ``history`` — ``"loss"``, ``"penalty"`` and each spec term's ``s·Ω``, each ``(S, K)``
  (row ``t``: the minibatch of step ``t``, at the parameters before that step; NaN from the
  step a model diverged); ``"eval_step"`` ``(E,)`` (steps done at each evaluation);
  ``"val_loss"`` / ``"val_metric"`` ``(E, K)`` when validation data / ``val_fn`` was given;
  ``"zeros"`` ``{param: (E, K)}``, the fraction of exact zeros of every parameter a spec
  term selects;
* ``diverged`` ``(K,)`` bool and ``diverged_at`` ``(K,)`` int (the step whose update was
  rejected, -1 if none): a diverged model keeps its last finite parameters;
* ``steps`` and ``meta`` (identity of the run, metric names, timing).

Only tensors and plain containers are stored, so :meth:`SweepResult.load` uses
``torch.load(weights_only=True)``. A saved result also holds the optimizer state and RNG
state, so ``fr.sweep(..., checkpoint=path)`` can continue it.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import os
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import _report
from ._files import read_verified, write_atomic
from ._report import EVAL_METRICS as _EVAL_METRICS
from .spec import Spec, penalized
from .stack import eval_mode, load_, unstack

__all__ = ["FORMAT", "Best", "SweepResult", "one_se_index"]

FORMAT = "funcreg.SweepResult/1"
_RUN_ONLY = ("identity", "chunks", "plan")  # meta of one run that a new result drops


def one_se_index(mean: Tensor, se: Tensor, order: Tensor) -> int:
    """The one-standard-error rule: among the models whose ``mean`` is at most
    ``mean[i_min] + se[i_min]`` (``i_min`` the lowest finite mean), the one with the largest
    ``order`` (the most regularised; ties: the lower mean). Non-finite means never win."""
    mean, se, order = mean.double(), se.double(), order.double()
    ok = torch.isfinite(mean)
    if not bool(ok.any()):
        raise ValueError("one-standard-error rule: no model has a finite score")
    i_min = int(torch.where(ok, mean, math.inf).argmin())
    spread = float(se[i_min]) if math.isfinite(float(se[i_min])) else 0.0
    within = ok & (mean <= float(mean[i_min]) + spread)
    top = torch.where(within, order, -math.inf)
    tied = within & (top == top.max())
    return int(torch.where(tied, mean, math.inf).argmin())


@dataclass(frozen=True)
class Best:
    """The model a selection rule chose. Usable as an index: ``result.module(best)``."""

    index: int
    strengths: dict[str, float]
    metric: str
    value: float
    note: str = ""

    def __index__(self) -> int:
        return self.index

    def __int__(self) -> int:
        return self.index

    def __str__(self) -> str:
        s = ", ".join(f"{k}={v:.4g}" for k, v in self.strengths.items())
        out = f"model {self.index}: {s} ({self.metric} = {self.value:.6g})"
        return f"{out}\n  note: {self.note}" if self.note else out


@dataclass(eq=False)
class SweepResult:
    """The outcome of :func:`fr.sweep <funcreg._sweep.sweep>` (see the module docstring)."""

    grid: dict[str, Tensor]
    stacked: dict[str, Tensor]
    stacked_buffers: dict[str, Tensor]
    history: dict[str, Any]
    diverged: Tensor
    diverged_at: Tensor
    steps: int
    meta: dict[str, Any] = field(default_factory=dict)
    resume: dict[str, Any] | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    # -- basics ---------------------------------------------------------------------------
    @property
    def K(self) -> int:  # noqa: N802 - the sweep axis is called K everywhere
        return int(self.diverged.shape[0])

    def __len__(self) -> int:
        return self.K

    def _index(self, i: Any) -> int:
        idx = operator.index(i)
        if not -self.K <= idx < self.K:
            raise IndexError(f"model index {idx} is out of range for a sweep of K={self.K}")
        return idx % self.K

    def strengths(self, i: Any) -> dict[str, float]:
        """``{axis: value}`` of model ``i``."""
        idx = self._index(i)
        return {k: float(v[idx]) for k, v in self.grid.items()}

    def params(self, i: Any) -> dict[str, Tensor]:
        """Trained parameters of model ``i`` (detached copies)."""
        return unstack(self.stacked, self._index(i))

    def buffers(self, i: Any) -> dict[str, Tensor]:
        """Buffers (and frozen parameters) of model ``i`` (detached copies)."""
        if not self.stacked_buffers:
            return {}
        return unstack(self.stacked_buffers, self._index(i))

    def module(self, i: Any) -> nn.Module:
        """A fresh deep copy of the swept model holding model ``i``'s weights and buffers."""
        if self.model is None:
            raise ValueError(
                "this result has no model to copy (results loaded from disk do not store "
                "it): use SweepResult.load(path, model=net) or set result.model = net"
            )
        out = copy.deepcopy(self.model)
        return load_(out, {**self.buffers(i), **self.params(i)})

    # -- building: the only code that knows where the model axis sits in each field -------
    @classmethod
    @torch.no_grad()
    def from_solution(
        cls,
        model: nn.Module | None,
        loss_fn: Callable[..., Tensor],
        spec: Spec,
        grid: dict[str, Tensor],
        stacked: dict[str, Tensor],
        fixed: Mapping[str, Tensor],
        data: tuple[Tensor, ...],
        val: tuple[Tensor, ...],
        iterations: Tensor,
        converged: Tensor,
        meta: Mapping[str, Any],
    ) -> SweepResult:
        """A result of K exact solutions (from :func:`~funcreg.solvers.solve`).

        There are no training steps: every per-step history entry has one row, the
        objective's parts at the solution (``"loss"`` on ``data``, ``"penalty"``, each
        term); ``steps`` is the largest number of iterations; ``meta`` has ``"solver":
        "fista"``, ``"iterations"`` and ``"converged"`` (both ``(K,)``)."""
        k = int(iterations.shape[0])
        first = next(iter(stacked.values()))
        strengths = {n: v.to(first.device, first.dtype) for n, v in grid.items() if n in spec}
        objective = penalized(loss_fn, spec, return_parts=True)
        dims = (0, 0) + (None,) * len(data)
        _, parts = vmap(objective, in_dims=dims)(stacked, strengths, *data)
        penalty = sum((parts[t] for t in spec), torch.zeros_like(parts["loss"]))
        names = ["loss", "penalty", *spec]
        columns = [parts["loss"], penalty, *(parts[t] for t in spec)]
        dtype = functools.reduce(torch.promote_types, [c.dtype for c in columns])
        steps = int(iterations.max()) if k else 0
        val_rows = None
        if val:
            with eval_mode(model):
                vl = vmap(loss_fn, in_dims=(0,) + (None,) * len(val))(stacked, *val)
            val_rows = vl[None, :, None]
        single = {n: v[0] for n, v in stacked.items()}
        selected = spec.selected_names(single)
        diverged = ~torch.isfinite(parts["loss"] + penalty)
        return cls.from_run(
            grid=grid,
            stacked=stacked,
            stacked_buffers={n: v.expand(k, *v.shape).clone() for n, v in fixed.items()},
            rows=torch.stack([c.to(dtype) for c in columns], -1)[None],
            metric_names=names,
            eval_step=torch.tensor([steps]),
            val_rows=val_rows,
            zeros={n: (stacked[n].reshape(k, -1) == 0).float().mean(1)[None] for n in selected},
            diverged=diverged,
            diverged_at=torch.where(diverged, steps, -1).to(torch.int64),
            steps=steps,
            meta={
                "solver": "fista",
                "iterations": iterations.clone(),
                "converged": converged.clone(),
                "metrics": names,
                "selected": selected,
                **meta,
            },
            resume=None,
            model=model,
            clone=False,
        )

    @classmethod
    def from_run(
        cls,
        *,
        grid: Mapping[str, Tensor],
        stacked: dict[str, Tensor],
        stacked_buffers: Mapping[str, Tensor],
        rows: Tensor,
        metric_names: Sequence[str],
        eval_step: Tensor,
        val_rows: Tensor | None,
        zeros: Mapping[str, Tensor],
        diverged: Tensor,
        diverged_at: Tensor,
        steps: int,
        meta: dict[str, Any],
        resume: dict[str, Any] | None,
        model: nn.Module | None,
        clone: bool = True,
    ) -> SweepResult:
        """A result from what a run recorded (copies, so the recorders may go on):

        * ``rows`` ``(S, K, M)``: per step and model, the metrics ``metric_names``
          (``"loss"``, ``"penalty"``, each term) — ``history[name]`` is ``(S, K)``;
        * ``eval_step`` ``(E,)`` and, at those evaluations, ``val_rows`` ``(E, K, V)``
          (``val_loss``, then ``val_metric`` when ``V = 2``; ``None`` without validation)
          and ``zeros`` ``{param: (E, K)}``;
        * ``stacked`` and ``stacked_buffers``: ``{name: (K, *shape)}``, taken as they are
          with ``clone=False`` (when they are fresh tensors already)."""
        history: dict[str, Any] = {m: rows[..., j].clone() for j, m in enumerate(metric_names)}
        history["eval_step"] = eval_step.clone()
        if val_rows is not None:
            history["val_loss"] = val_rows[..., 0].clone()
            if val_rows.shape[-1] > 1:
                history["val_metric"] = val_rows[..., 1].clone()
        history["zeros"] = {n: z.clone() for n, z in zeros.items()}
        return cls(
            grid={n: v.clone() for n, v in grid.items()},
            stacked={n: v.clone() for n, v in stacked.items()} if clone else stacked,
            stacked_buffers=(
                {n: v.clone() for n, v in stacked_buffers.items()}
                if clone
                else dict(stacked_buffers)
            ),
            history=history,
            diverged=diverged,
            diverged_at=diverged_at,
            steps=steps,
            meta=meta,
            resume=resume,
            model=model,
        )

    @classmethod
    def _of_models(
        cls,
        results: Sequence[SweepResult],
        along: Callable[[list[Tensor], int], Tensor],
        grid: dict[str, Tensor] | None,
        meta: dict[str, Any],
        drop_buffers: Collection[str] = (),
    ) -> SweepResult:
        """A result whose models are ``along(the results' tensors, model dim)`` of every
        per-model field: dim 0 of the grid, params, buffers and status, dim 1 of the
        history's rows (``(S, K)`` and ``(E, K)``, ``zeros`` included); ``eval_step`` and
        ``steps`` are the first result's (the same run shape)."""
        first = results[0]

        def joined(d: str, skip: Collection[str] = ()) -> dict[str, Tensor]:
            got = getattr(first, d)
            return {n: along([getattr(r, d)[n] for r in results], 0) for n in got if n not in skip}

        history: dict[str, Any] = {}
        for key, v in first.history.items():
            if key == "zeros":
                history[key] = {n: along([r.history[key][n] for r in results], 1) for n in v}
            elif isinstance(v, Tensor) and v.ndim == 2:
                history[key] = along([r.history[key] for r in results], 1)
            else:
                history[key] = v
        return cls(
            grid=joined("grid") if grid is None else grid,
            stacked=joined("stacked"),
            stacked_buffers=joined("stacked_buffers", drop_buffers),
            history=history,
            diverged=along([r.diverged for r in results], 0),
            diverged_at=along([r.diverged_at for r in results], 0),
            steps=first.steps,
            meta=meta,
            resume=None,
            model=first.model,
        )

    @classmethod
    def concat(cls, results: Sequence[SweepResult], meta: Mapping[str, Any]) -> SweepResult:
        """Results of the same run shape (steps, evaluations) joined along the models;
        ``meta`` is the first's (without its run's identity and chunks), the summed
        ``elapsed_s``, then ``meta``."""
        base = {k: v for k, v in results[0].meta.items() if k not in _RUN_ONLY}
        base["elapsed_s"] = sum(float(r.meta.get("elapsed_s", 0.0)) for r in results)
        return cls._of_models(results, lambda ts, d: torch.cat(ts, d), None, {**base, **meta})

    def flip(self) -> SweepResult:
        """The same result with the model order reversed (meta's per-model tensors too)."""

        def rev(v: Any) -> Any:
            if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == self.K:
                return v.flip(0)
            return v

        meta = {k: rev(v) for k, v in self.meta.items()}
        return self._of_models([self], lambda ts, d: ts[0].flip(d), None, meta)

    def take(
        self,
        idx: Tensor,
        grid: dict[str, Tensor],
        meta: Mapping[str, Any],
        drop_buffers: Collection[str] = (),
    ) -> SweepResult:
        """Models ``idx`` (a 1-d index tensor) with the grid ``grid``, without the buffers
        ``drop_buffers``; ``meta`` is this result's (without its run's identity and
        chunks), then ``meta``."""
        base = {k: v for k, v in self.meta.items() if k not in _RUN_ONLY}

        def pick(ts: list[Tensor], d: int) -> Tensor:
            return ts[0][(slice(None),) * d + (idx,)]

        return self._of_models([self], pick, grid, {**base, **meta}, drop_buffers)

    # -- selection ------------------------------------------------------------------------
    def values(self, metric: str = "val_loss") -> Tensor:
        """Per-model value of ``metric`` (``(K,)`` float64): the last evaluation of
        ``"val_loss"``/``"val_metric"``/a ``zeros`` parameter name, or for per-step
        metrics (``"loss"``, ``"penalty"``, a term) the mean over the last 10% of steps."""
        h = self.history
        if (metric in _EVAL_METRICS and metric in h) or metric in h.get("zeros", {}):
            rows = h[metric] if metric in _EVAL_METRICS else h["zeros"][metric]
            if rows.shape[0] == 0:
                raise ValueError(f"no evaluation of {metric!r} was recorded yet")
            return rows[-1].double()
        if metric in h and isinstance(h[metric], Tensor) and h[metric].ndim == 2:
            rows = h[metric][: self.steps]
            if rows.shape[0] == 0:
                raise ValueError("no training step was recorded yet")
            window = max(1, rows.shape[0] // 10)
            return rows[-window:].double().mean(0)
        known = [k for k, v in h.items() if isinstance(v, Tensor) and v.ndim == 2]
        known += list(h.get("zeros", {}))
        raise KeyError(f"unknown metric {metric!r}; this result has {known}")

    def strength_axes(self) -> list[str]:
        """The grid axes that name spec terms (strengths), as recorded in ``meta``; every
        axis when the result does not say."""
        metrics = self.meta.get("metrics")
        if isinstance(metrics, list | tuple) and len(metrics) >= 2:
            terms = [m for m in metrics[2:] if m in self.grid]
            return terms
        return list(self.grid)

    def varying_axes(self) -> list[str]:
        """The grid axes whose value differs between models."""
        return [n for n, v in self.grid.items() if v.numel() > 1 and bool((v != v[0]).any())]

    def path_axis(self, axis: str | None = None, what: str = "plot") -> str:
        """The grid axis a path runs along: ``axis`` if given, else the only varying axis
        (an error when several vary)."""
        if axis is not None:
            if axis not in self.grid:
                raise ValueError(
                    f"{what}: axis {axis!r} is not a grid axis; the grid has {list(self.grid)}"
                )
            return axis
        varying = self.varying_axes()
        if len(varying) > 1:
            raise ValueError(
                f"{what}: the grid varies along several axes {varying}; pass axis= (one of "
                "them) to say which goes on the x axis / orders the models"
            )
        if varying:
            return varying[0]
        terms = self.strength_axes() or list(self.grid)
        return terms[0]

    def best(
        self,
        metric: str = "val_loss",
        mode: str = "min",
        *,
        rule: str = "min",
        axis: str | None = None,
    ) -> Best:
        """The healthy model with the lowest (``mode="max"``: highest) ``metric``.

        ``metric="val_loss"`` (default) uses the last validation loss. Without validation
        data it falls back to the training loss (mean over the last 10% of steps), says so
        in ``Best.note`` and warns: that choice favours the weakest regularization.
        Diverged models and non-finite values are never chosen.

        ``rule="1se"`` (the one-standard-error rule of cv.glmnet): the most regularised
        model — the largest value of ``axis`` (default: the only varying strength axis) —
        whose metric is within one standard error of the best. It needs standard errors,
        ``history[metric + "_se"]``, which :func:`fr.cross_validate
        <funcreg.selection.cross_validate>` records (``cv.path.best(rule="1se")``); a
        plain sweep has one validation score per model and none.
        """
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if rule not in ("min", "1se"):
            raise ValueError(f"rule must be 'min' or '1se', got {rule!r}")
        note = ""
        if rule == "1se" and f"{metric}_se" not in self.history:
            raise ValueError(
                f"rule='1se' needs the standard error of {metric!r} across folds, and this "
                "result has a single score per model (no history[" + repr(f"{metric}_se") + "]). "
                "Use fr.cross_validate(...) and cv.best('1se') (or cv.path.best(rule='1se')), "
                "or rule='min'"
            )
        if metric in _EVAL_METRICS and metric not in self.history:
            if metric == "val_metric":
                raise ValueError("no val_metric recorded: pass val_fn= (and val=) to fr.sweep")
            note = (
                "no validation data: chose by training loss (mean of the last 10% of steps), "
                "which favours the weakest regularization; pass val= to fr.sweep"
            )
            warnings.warn(note, UserWarning, stacklevel=2)
            metric = "loss"
        vals = self.values(metric).cpu().clone()  # a sweep on a GPU keeps its history there
        ok = torch.isfinite(vals) & ~self.diverged.cpu()
        if not bool(ok.any()):
            raise ValueError(
                f"no model has a finite {metric!r}: all {self.K} diverged or are NaN; lower "
                "the learning rate or the strengths"
            )
        fill = math.inf if mode == "min" else -math.inf
        vals[~ok] = fill
        if rule == "1se":
            se = self.history[f"{metric}_se"][-1].double().cpu()
            along = self.path_axis(axis, "best(rule='1se')")
            sign = 1.0 if mode == "min" else -1.0
            idx = one_se_index(sign * vals, se, self.grid[along].double().cpu())
            note = f"one-standard-error rule along {along!r}"
        else:
            idx = int(vals.argmin() if mode == "min" else vals.argmax())
        return Best(idx, self.strengths(idx), metric, float(vals[idx]), note)

    # -- plots and display (written in _report.py) ----------------------------------------
    plot_path = _report.plot_path
    plot_training = _report.plot_training
    table = _report.table

    def __str__(self) -> str:
        return self.table(max_rows=40)

    def __repr__(self) -> str:
        axes = ", ".join(self.grid)
        return (
            f"SweepResult(K={self.K}, steps={self.steps}, grid=({axes}), "
            f"diverged={int(self.diverged.sum())})"
        )

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The stored form: tensors (on CPU) and plain containers only."""

        def cpu(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.detach().cpu()
            if isinstance(x, dict):
                return {k: cpu(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [cpu(v) for v in x]
            return x

        return {
            "format": FORMAT,
            "grid": cpu(self.grid),
            "stacked": cpu(self.stacked),
            "stacked_buffers": cpu(self.stacked_buffers),
            "history": cpu(self.history),
            "diverged": cpu(self.diverged),
            "diverged_at": cpu(self.diverged_at),
            "steps": int(self.steps),
            "meta": cpu(self.meta),
            "resume": cpu(self.resume),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result and a SHA-256 of it to ``path`` atomically (a temporary file in
        the same folder, ``fsync``, then ``os.replace``): a crash or a full disk never leaves
        a half-written file."""
        target = Path(path)
        write_atomic(target, self.to_dict(), kind="result")
        return target

    _KEYS: tuple[str, ...] = ("grid", "stacked", "stacked_buffers", "history", "diverged")
    _KEYS += ("diverged_at", "steps", "meta", "resume")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], model: nn.Module | None = None) -> SweepResult:
        """The result of a stored form (:meth:`to_dict`)."""
        return cls(**{k: data[k] for k in cls._KEYS}, model=model)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module | None = None) -> SweepResult:
        """Read a saved result (``torch.load(weights_only=True)``: no code is run; its
        checksum verified: a damaged file is a ``ValueError`` naming it). Pass ``model`` (the
        swept architecture) to use :meth:`module`."""
        data = read_verified(
            Path(path), FORMAT, cls._KEYS, kind="result", name="saved funcreg SweepResult"
        )
        return cls.from_dict(data, model)
