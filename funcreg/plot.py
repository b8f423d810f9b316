"""Plots of regularization paths, cross-validation curves and training curves.

matplotlib is imported lazily (``pip install funcreg[plot]``). Every function draws on
``ax`` (a new figure when ``None``), returns the ``Axes``, and writes a PNG when ``save``
is a path. Strengths are drawn on a log axis, largest on the left, as ``plot.glmnet``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

KINDS = ("coef", "norm", "nonzero")


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "plotting needs matplotlib: pip install 'funcreg[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    plt = _pyplot()
    _, ax = plt.subplots(figsize=(6.4, 4.2))
    return ax


def finish(ax: Any, save: str | os.PathLike[str] | None) -> Any:
    if save is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(save, dpi=110)
    return ax


def _strength_axis(ax: Any, strengths: Tensor, label: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(label)
    lo, hi = float(strengths.min()), float(strengths.max())
    if hi > lo:
        ax.set_xlim(hi * 1.1, lo / 1.1)  # largest strength on the left, as glmnet


def _sorted(strengths: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.as_tensor(strengths, dtype=torch.float64).reshape(-1)
    if s.numel() != values.shape[0]:
        raise ValueError(
            f"{s.numel()} strengths but values have {values.shape[0]} models (leading axis)"
        )
    if bool((s <= 0).any()):
        raise ValueError("path plots use a log strength axis: strengths must be > 0")
    order = torch.argsort(s)
    return s[order], values[order]


def path(
    strengths: Tensor | Sequence[float],
    values: Tensor,
    kind: str = "coef",
    *,
    name: str = "",
    strength_label: str = "strength",
    ax: Any = None,
    save: str | os.PathLike[str] | None = None,
) -> Any:
    """Coefficient paths of one stacked parameter ``values`` (leading axis = models):

    * ``"coef"``: one line per coordinate (``values.flatten(1)``);
    * ``"norm"``: one line per input feature — the column norms ``‖W[:, j]‖₂`` of a 2-d
      weight (the groups of ``GroupLasso(dim=0)``), ``|w_j|`` for a vector;
    * ``"nonzero"``: the number of non-zero coordinates (one line).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    s, v = _sorted(torch.as_tensor(strengths), values.detach().cpu().double())
    ax = _axes(ax)
    x = s.numpy()
    if kind == "coef":
        lines = v.reshape(v.shape[0], -1)
        ylabel = "coefficient"
    elif kind == "norm":
        if v.dim() == 2:
            lines = v.abs()
        else:  # per input feature/channel: norm over the output axis and kernel axes
            lines = torch.linalg.vector_norm(v, dim=(1, *range(3, v.dim())))
        ylabel = "group norm ‖w_j‖₂"
    else:
        lines = (v.reshape(v.shape[0], -1) != 0).sum(1, keepdim=True).double()
        ylabel = "non-zero coefficients"
    for j in range(lines.shape[1]):
        ax.plot(x, lines[:, j].numpy(), label=f"{name}[{j}]" if kind != "nonzero" else name)
    _strength_axis(ax, s, strength_label)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name}: {kind} path" if name else f"{kind} path")
    return finish(ax, save)


def cv_curve(
    strengths: Tensor | Sequence[float],
    mean: Tensor,
    se: Tensor,
    *,
    strength_min: float | None = None,
    strength_1se: float | None = None,
    ylabel: str = "validation loss",
    strength_label: str = "strength",
    nonzero: Tensor | Sequence[int] | None = None,
    ax: Any = None,
    save: str | os.PathLike[str] | None = None,
) -> Any:
    """Mean cross-validation loss with ±1 standard-error bars and vertical lines at
    ``strength_min`` and ``strength_1se`` (as ``plot.cv.glmnet``); with ``nonzero`` (one
    count per strength) the counts label a top axis, as glmnet's."""
    s, order_vals = _sorted(torch.as_tensor(strengths), torch.stack([mean, se], 1).double())
    ax = _axes(ax)
    ax.errorbar(
        s.numpy(),
        order_vals[:, 0].numpy(),
        yerr=order_vals[:, 1].numpy(),
        fmt="o-",
        ms=3,
        capsize=2,
        label="mean ± 1 se",
    )
    if strength_min is not None:
        ax.axvline(strength_min, ls="--", color="k", label="strength_min")
    if strength_1se is not None:
        ax.axvline(strength_1se, ls=":", color="k", label="strength_1se")
    _strength_axis(ax, s, strength_label)
    ax.set_ylabel(ylabel)
    ax.legend()
    if nonzero is not None:
        counts = torch.as_tensor(nonzero).reshape(-1)
        if counts.numel() != s.numel():
            raise ValueError(f"{counts.numel()} non-zero counts for {s.numel()} strengths")
        counts = counts[torch.argsort(torch.as_tensor(strengths, dtype=torch.float64))]
        from matplotlib.ticker import NullLocator

        top = ax.secondary_xaxis("top")
        top.xaxis.set_minor_locator(NullLocator())
        ticks = torch.linspace(0, s.numel() - 1, min(s.numel(), 8)).round().long().unique()
        top.set_xticks(s[ticks].tolist(), [str(int(counts[i])) for i in ticks.tolist()])
        top.set_xlabel("non-zero coefficients")
    return finish(ax, save)


def training_curves(
    history: Tensor,
    *,
    labels: Sequence[str] | None = None,
    steps: Tensor | Sequence[int] | None = None,
    ylabel: str = "train loss",
    logy: bool = True,
    ax: Any = None,
    save: str | os.PathLike[str] | None = None,
) -> Any:
    """One curve per model: ``history`` is ``(T, K)`` (a step per row)."""
    h = history.detach().cpu().double()
    if h.dim() != 2:
        raise ValueError(f"history must be (steps, models), got shape {tuple(h.shape)}")
    ax = _axes(ax)
    t = torch.arange(h.shape[0]) if steps is None else torch.as_tensor(steps)
    for k in range(h.shape[1]):
        ax.plot(t.numpy(), h[:, k].numpy(), label=None if labels is None else labels[k])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if labels is not None:
        ax.legend(fontsize="small")
    return finish(ax, save)
