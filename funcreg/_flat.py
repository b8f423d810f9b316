"""Reductions over a list of tensors in as few kernels as possible.

The per-step bookkeeping of a sweep (a closed-form penalty's value, the divergence guard)
reduces over a handful of tensors. For small ones, one ``cat`` into a flat vector and a
single reduction costs less than a kernel per tensor; large ones keep the per-tensor route
(on GPUs one fused ``_foreach_norm``), so the model is never concatenated whole. On CPU the
reductions are ``abs().sum()`` and ``abs().amax()``: ``vector_norm`` with ``ord=1`` or
``inf`` (and ``_foreach_norm``) runs 3-10x slower there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

FLAT_MAX = 1 << 16
"""Elements up to which a list of tensors is copied into one vector for a reduction."""


def flat(ts: Sequence[Tensor]) -> Tensor | None:
    """The tensors of ``ts`` as one 1-d tensor, or ``None`` when that would need
    a copy of more than :data:`FLAT_MAX` elements, or dtypes/devices differ. One contiguous
    tensor is viewed, not copied."""
    if len(ts) == 1 and ts[0].is_contiguous():
        return ts[0].view(-1)
    if not ts:
        return None
    first, size = ts[0], 0
    for t in ts:
        size += t.numel()
        if size > FLAT_MAX or t.dtype != first.dtype or t.device != first.device:
            return None
    return torch.cat([t.reshape(-1) for t in ts])


def total(xs: Sequence[Tensor]) -> Tensor:
    """The sum of 0-dim tensors."""
    return _combine(xs, torch.sum, torch.add)


def total_max(xs: Sequence[Tensor]) -> Tensor:
    """The largest of 0-dim tensors (NaN if any is NaN)."""
    return _combine(xs, torch.max, torch.maximum)


def _combine(
    xs: Sequence[Tensor], reduce: Callable[[Tensor], Tensor], pair: Callable[..., Tensor]
) -> Tensor:
    """``reduce`` over 0-dim tensors: one ``stack`` when they share a device and dtype, else
    pairwise on the first one's device."""
    if len(xs) == 1:
        return xs[0]
    if len({(x.device, x.dtype) for x in xs}) == 1:
        return reduce(torch.stack(list(xs)))
    out = xs[0]
    for x in xs[1:]:
        out = pair(out, x.to(out.device))
    return out


def sum_abs(ts: Sequence[Tensor]) -> Tensor:
    """``Σ_t Σ_i |t_i|`` as a 0-dim tensor."""
    v = flat(ts)
    if v is not None:
        return v.abs().sum() if v.device.type == "cpu" else torch.linalg.vector_norm(v, 1)
    if ts[0].device.type != "cpu":  # one fused multi-tensor kernel on GPUs
        return total(torch._foreach_norm(list(ts), 1))
    return total([t.abs().sum() for t in ts])


def sum_squares(ts: Sequence[Tensor]) -> Tensor:
    """``Σ_t Σ_i t_i²`` as a 0-dim tensor."""
    v = flat(ts)
    if v is not None:
        return torch.dot(v, v)
    norms = torch._foreach_norm(list(ts))
    return total(torch._foreach_mul(norms, norms))


def max_abs(ts: Sequence[Tensor]) -> float:
    """``max_t max_i |t_i|`` read on the host (0.0 when every tensor is empty): it cannot
    overflow, unlike a sum, and a NaN anywhere makes it NaN."""
    v = flat(ts)
    if v is not None:
        return float(largest_abs(v)) if v.numel() else 0.0
    ts = [t for t in ts if t.numel()]
    if not ts:
        return 0.0
    if ts[0].device.type != "cpu":  # one fused multi-tensor kernel on GPUs
        return float(total_max(torch._foreach_norm(ts, math.inf)))
    return float(total_max([largest_abs(t) for t in ts]))


def largest_abs(t: Tensor, dim: int | None = None) -> Tensor:
    """``max |t|`` (over ``dim``, or all of ``t``), NaN if any entry is NaN: ``abs().amax()``
    on CPU (a temporary copy of ``t``; ``vector_norm(t, inf)`` is ~10× slower there),
    ``vector_norm(t, inf)`` elsewhere."""
    if t.device.type != "cpu":
        return torch.linalg.vector_norm(t, math.inf, dim=dim)
    return t.abs().amax() if dim is None else t.abs().amax(dim=dim)
