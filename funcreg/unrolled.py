"""Unrolled hypergradients of network training: the derivative of a validation loss with
respect to the strengths, through the last ``T`` steps of :func:`funcreg.train_step`.

Training is a map ``w_{t+1}, o_{t+1} = step(w_t, o_t, s, batch_t)`` (params ``w``,
optimizer state ``o``, strengths ``s``). For an outer objective ``E(w_N)``, the unrolled
hypergradient differentiates the composition of the steps by reverse mode
(``torch.func.grad`` through the pure step, itself built on ``torch.func.grad``)::

    dE/ds = Σ_t (∂_s step_t)ᵀ λ_{t+1},    λ_N = ∇E(w_N),   λ_t = (∂_w step_t)ᵀ λ_{t+1}

Truncated to the last ``T`` steps (Shaban et al. 2019, "Truncated back-propagation for
bilevel optimization"), the first ``N − T`` steps run without a graph and their result is a
constant: the gradient is then that of ``s ↦ E(steps_{N−T..N}(w_{N−T}, s))``, exactly (finite
differences through the same ``T`` steps agree), and an approximation of the full
derivative whose bias shrinks as ``T`` grows. Memory grows with ``T`` (the graph of ``T``
steps). With ``log=True`` (default) the gradient is with respect to ``log s``.

Non-smooth terms trained with prox steps are differentiated through the prox (the
soft-threshold's derivative is the 0/1 mask of the coordinates it keeps), as
:func:`funcreg.hypergrad` does at a fixed point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value

__all__ = ["unrolled_hypergrad"]


def unrolled_hypergrad(
    step: Callable[..., tuple[dict[str, Tensor], Any, Any]],
    params: Mapping[str, Tensor],
    state: Any,
    strengths: Mapping[str, Any],
    batches: Sequence[tuple[Any, ...]],
    outer_fn: Callable[..., Tensor],
    outer_data: tuple[Any, ...] = (),
    *,
    terms: Iterable[str] | None = None,
    truncate: int | None = None,
    log: bool = True,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Train through ``batches`` with ``step`` and differentiate ``outer_fn`` at the end
    with respect to the strengths, through the last ``truncate`` steps (all by default).

    Args:
        step: a pure step ``(params, state, strengths, *batch) -> (params, state, metrics)``,
            e.g. :func:`funcreg.train_step` (``torch.func`` mode, not ``autograd=True``).
        params, state: the starting params and optimizer state (``optimizer.init(params)``).
        strengths: ``{name: number}``: every strength (and optimizer hyperparameter read by
            name) the step needs.
        batches: one tuple of step arguments per step (``N`` steps).
        outer_fn: ``outer_fn(params, *outer_data) -> 0-dim tensor`` (a validation loss).
        terms: the strengths to differentiate (default: all of ``strengths``).
        truncate: differentiate through the last ``T`` steps only (``None``: all ``N``).
        log: gradients with respect to ``log s`` (default) instead of ``s``.

    Returns:
        ``(value, gradients, params)``: ``E`` at the trained params, ``{term: dE/d log s}``
        (0-dim tensors) and the trained params.

    Raises:
        ValueError: no batches, a bad ``truncate``, a term not in ``strengths``, a strength
            ``<= 0`` in log space, an ``outer_fn`` that does not depend on the params.
    """
    who = "unrolled_hypergrad"
    N = len(batches)
    if N == 0:
        raise ValueError(f"{who}: batches is empty; give one tuple of step arguments per step")
    T = N if truncate is None else truncate
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= N:
        raise ValueError(f"{who}: truncate must be an integer in [1, {N}], got {truncate!r}")
    names = tuple(strengths if terms is None else terms)
    for t in names:
        if t not in strengths:
            raise ValueError(f"{who}: term {t!r} is not in strengths {list(strengths)}")
        v = float(strengths[t])
        if not math.isfinite(v) or (log and v <= 0):
            raise ValueError(
                f"{who}: strength {t!r} is {v!r}; in log space it must be finite and > 0 "
                "(or use log=False)"
            )
    like = next(iter(params.values()))
    p, o = dict(params), state
    with torch.no_grad():
        for batch in batches[: N - T]:
            p, o, _ = step(p, o, strengths, *batch)
    x = {
        t: torch.as_tensor(float(strengths[t]), dtype=like.dtype, device=like.device) for t in names
    }
    if log:
        x = {t: v.log() for t, v in x.items()}

    def E(theta: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        s = dict(strengths)
        s.update({t: theta[t].exp() if log else theta[t] for t in names})
        q, st = p, o
        for batch in batches[N - T :]:
            q, st, _ = step(q, st, s, *batch)
        out = outer_fn(q, *outer_data)
        if not isinstance(out, Tensor) or out.dim() != 0:
            raise ValueError(f"{who}: outer_fn must return a 0-dim tensor, got {out!r}")
        return out, q

    g, (value, trained) = grad_and_value(E, has_aux=True)(x)
    if all(bool((gv == 0).all()) for gv in g.values()):
        probe = {n: t.detach().clone().requires_grad_() for n, t in trained.items()}
        with torch.enable_grad():
            if not outer_fn(probe, *outer_data).requires_grad:
                raise ValueError(
                    f"{who}: outer_fn does not depend on the params (its value has no "
                    "gradient); it must be computed from the params it is given"
                )
    trained = {n: t.detach() for n, t in trained.items()}
    return value.detach(), {t: v.detach() for t, v in g.items()}, trained
