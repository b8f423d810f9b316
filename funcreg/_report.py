"""Display of a sweep's result: the text table and the figures of a ``SweepResult``.

:class:`funcreg.result.SweepResult` delegates ``table``, ``plot_path`` and ``plot_training``
here. The functions are typed by ``SweepResult`` itself, imported for the type checker only
(``TYPE_CHECKING``): at run time this module sits below ``result.py`` and imports point one
way, and the result's layout has one owner, with no mirror of its fields to keep in step.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import plot

if TYPE_CHECKING:  # types only: no import at run time
    from .result import SweepResult

__all__ = ["EVAL_METRICS", "plot_path", "plot_training", "table"]

EVAL_METRICS = ("val_loss", "val_metric")


def _selected(result: SweepResult) -> list[str]:
    sel = result.meta.get("selected")
    return list(sel) if isinstance(sel, list | tuple) else list(result.stacked)


def _path_models(result: SweepResult, axis: str | None, what: str) -> tuple[str, Tensor, str]:
    """``(axis, model indices along it, note)``: with other axes varying too, the
    models that share the other axes' values with :meth:`best`."""
    along = result.path_axis(axis, what)
    others = [a for a in result.varying_axes() if a != along]
    idx = torch.arange(result.K)
    note = ""
    if others:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = result.best().index
        keep = torch.ones(result.K, dtype=torch.bool)
        for a in others:
            keep &= result.grid[a].cpu() == result.grid[a][b].cpu()
        idx = idx[keep]
        note = ", ".join(f"{a}={float(result.grid[a][b]):.3g}" for a in others)
    return along, idx, note


def plot_path(
    result: SweepResult,
    param: str,
    kind: str = "coef",
    axis: str | None = None,
    *,
    ax: Any = None,
    save: str | os.PathLike[str] | None = None,
) -> Any:
    """Coefficient path of ``param`` against the grid ``axis`` on a log scale, largest
    strength on the left (``plot.glmnet``); see :func:`funcreg.plot.path` for ``kind``
    (``"coef"``, ``"norm"``: per input feature, ``"nonzero"``). ``axis`` defaults to
    the only varying axis and is required when several vary; the other varying axes
    are held at the values of :meth:`best`. Returns the matplotlib ``Axes``."""
    selected = _selected(result)
    if param not in selected:
        raise ValueError(
            f"plot_path: the spec does not touch {param!r}, so it has no regularization "
            f"path; the spec selects {selected}"
        )
    along, idx, note = _path_models(result, axis, "plot_path")
    out = plot.path(
        result.grid[along][idx],
        result.stacked[param][idx.to(result.stacked[param].device)],
        kind,
        name=param,
        strength_label=along,
        ax=ax,
        save=None,
    )
    if note:
        out.set_title(f"{out.get_title()} ({note})")
    return plot.finish(out, save)


def plot_training(
    result: SweepResult,
    metric: str = "loss",
    models: Any = None,
    *,
    ax: Any = None,
    save: str | os.PathLike[str] | None = None,
    logy: bool = True,
) -> Any:
    """Training curves (``history[metric]``, one line per model; default: the best
    model and up to 4 others spread over the grid), labelled by their grid values."""
    if result.meta.get("solver") == "fista":
        raise ValueError(
            "plot_training: this result was solved exactly (fr.solve), it has no training "
            "steps to plot; meta['iterations'] has the iteration counts"
        )
    h = result.history.get(metric)
    if not isinstance(h, Tensor) or h.ndim != 2:
        known = [k for k, v in result.history.items() if isinstance(v, Tensor) and v.ndim == 2]
        raise ValueError(f"plot_training: no per-step metric {metric!r}; this result has {known}")
    if models is None:
        picks = torch.linspace(0, result.K - 1, min(result.K, 4)).round().long().tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(ValueError):
                picks.append(result.best().index)
        models = sorted(set(picks))
    idx = [result._index(i) for i in (models if isinstance(models, list | tuple) else [models])]
    varying = result.varying_axes() or list(result.grid)[:1]
    labels = [", ".join(f"{a}={float(result.grid[a][i]):.3g}" for a in varying) for i in idx]
    rows = h[: result.steps][:, idx]
    return plot.training_curves(rows, labels=labels, ylabel=metric, logy=logy, ax=ax, save=save)


def table(result: SweepResult, max_rows: int | None = None) -> str:
    """One row per model: grid values, final train/val losses, exact-zero fractions and
    divergence; ``*`` marks :meth:`best` (by validation loss when available)."""
    h = result.history
    cols: list[tuple[str, list[str]]] = [("#", [str(i) for i in range(result.K)])]
    for name, v in result.grid.items():
        cols.append((name, [f"{float(x):.4g}" for x in v]))
    metrics = ["loss"] + [m for m in EVAL_METRICS if m in h]
    for m in metrics:
        if result.steps == 0 and m == "loss":
            continue
        try:
            vals = result.values(m)
        except ValueError:
            continue
        cols.append(("train_loss" if m == "loss" else m, [f"{float(x):.4g}" for x in vals]))
    for name in list(h.get("zeros", {}))[:4]:
        rows = h["zeros"][name]
        if rows.shape[0]:
            cols.append((f"zeros[{name}]", [f"{float(x):.3f}" for x in rows[-1]]))
    status = [
        f"diverged@{int(t)}" if d else ""
        for d, t in zip(result.diverged.tolist(), result.diverged_at.tolist(), strict=True)
    ]
    cols.append(("status", status))
    best_idx = -1
    if result.steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                best_idx = result.best().index
            except ValueError:
                best_idx = -1
    cols[0] = ("#", [f"{r}{'*' if i == best_idx else ''}" for i, r in enumerate(cols[0][1])])
    order = list(range(result.K))
    if max_rows is not None and max_rows < result.K:
        half = max(1, max_rows // 2)
        order = order[:half] + [-1] + order[-half:]
    widths = [max(len(title), *(len(c) for c in vals)) for title, vals in cols]
    lines = ["  ".join(t.rjust(w) for (t, _), w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for i in order:
        if i < 0:
            lines.append("...")
            continue
        cells = [vals[i].rjust(w) for (_, vals), w in zip(cols, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    n_div = int(result.diverged.sum())
    foot = f"{result.K} models, {result.steps} steps"
    if n_div:
        foot += f", {n_div} diverged"
    return "\n".join([*lines, foot])
