"""Reductions over a list of tensors in as few kernels as possible.

The per-step bookkeeping of one eagerly trained model (a closed-form penalty's value, the
divergence guard) reduces over a handful of small tensors. ``torch._foreach_norm`` runs one
kernel per tensor and then needs a ``stack``; for small tensors, one ``cat`` into a flat
vector and a single reduction costs less. Large tensors keep the per-tensor route, so the
model is never copied whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """The sum of 0-dim tensors (one ``stack`` when they share a device and dtype)."""
    if len(xs) == 1:
        return xs[0]
    if len({(x.device, x.dtype) for x in xs}) == 1:
        return torch.stack(list(xs)).sum()
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def sum_abs(ts: Sequence[Tensor]) -> Tensor:
    """``Σ_t Σ_i |t_i|`` as a 0-dim tensor."""
    v = flat(ts)
    if v is not None:
        return torch.linalg.vector_norm(v, 1)
    return total(torch._foreach_norm(list(ts), 1))


def sum_squares(ts: Sequence[Tensor]) -> Tensor:
    """``Σ_t Σ_i t_i²`` as a 0-dim tensor."""
    v = flat(ts)
    if v is not None:
        return torch.dot(v, v)
    norms = torch._foreach_norm(list(ts))
    return total(torch._foreach_mul(norms, norms))


def max_abs(ts: Sequence[Tensor]) -> float:
    """``max_t max_i |t_i|`` read on the host (0.0 when every tensor is empty): an inf-norm,
    so it cannot overflow, and a NaN anywhere makes it NaN."""
    v = flat(ts)
    if v is not None:  # abs().amax(): several times faster than vector_norm(v, inf) on CPU
        return float(v.abs().amax()) if v.numel() else 0.0
    ts = [t for t in ts if t.numel()]
    if not ts:
        return 0.0
    return float(torch.stack(torch._foreach_norm(ts, math.inf)).max())
