"""Algebra on stacked parameter dicts, and reductions over lists of tensors.

**Stacked dicts** (the exact solvers): a ``Params`` dict ``{name: (k, *shape)}`` holds ``k``
models along a leading axis. :func:`dot`, :func:`sqnorm`, :func:`axpy` and :func:`sub` are
the per-model vector-space operations over all entries; :func:`take`/:func:`put` select and
write rows of nested dicts/tuples; :func:`retire` writes the models that stop into the result
and cuts the batch; :func:`stopping_rule` is the stopping rule of
:func:`funcreg.solvers.solve`; :func:`lanczos_max` estimates the largest eigenvalue of a
symmetric operator per model.

**Flat reductions** (a sweep's per-step bookkeeping: a closed-form penalty's value, the
divergence guard) reduce over a handful of tensors. For small ones, one ``cat`` into a flat
vector and a single reduction costs less than a kernel per tensor; large ones keep the
per-tensor route (on GPUs one fused ``_foreach_norm``), so the model is never concatenated
whole. On CPU the reductions are ``abs().sum()`` and ``abs().amax()``: ``vector_norm`` with
``ord=1`` or ``inf`` (and ``_foreach_norm``) runs 3-10x slower there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Params = dict[str, Tensor]

# ---------------------------------------------------------------------------------------
# Stacked dicts (leading axis = model)
# ---------------------------------------------------------------------------------------


def rows(v: Tensor, s: Tensor) -> Tensor:
    """A per-model ``(k,)`` tensor viewed to broadcast against a stacked ``(k, ...)`` one."""
    return s.view(-1, *([1] * (v.dim() - 1)))


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Per-model inner product ``⟨a, b⟩`` over all entries."""
    total: Tensor | None = None
    for key, v in a.items():
        d = torch.linalg.vecdot(v.reshape(v.shape[0], -1), b[key].reshape(v.shape[0], -1))
        total = d if total is None else total + d
    assert total is not None
    return total


def sqnorm(a: Mapping[str, Tensor]) -> Tensor:
    """Per-model squared norm ``‖a‖²`` over all entries."""
    total: Tensor | None = None
    for v in a.values():
        d = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).square()
        total = d if total is None else total + d
    assert total is not None
    return total


def axpy(alpha: Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """``y + alpha·x`` with a per-model ``alpha``."""
    return {k: torch.addcmul(y[k], rows(y[k], alpha), x[k]) for k in y}


def sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    """``a − b``."""
    return {k: a[k] - b[k] for k in a}


def take(tree: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of every tensor in a (nested) dict/tuple."""
    if isinstance(tree, Tensor):
        return tree.index_select(0, idx)
    if isinstance(tree, dict):
        return {k: take(v, idx) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(take(v, idx) for v in tree)
    return tree


def put(dst: Any, idx: Tensor, src: Any) -> None:
    """In place: rows ``idx`` of ``dst`` ← ``src`` (same nesting)."""
    if isinstance(dst, Tensor):
        dst.index_copy_(0, idx, src)
    elif isinstance(dst, dict):
        for k in dst:
            put(dst[k], idx, src[k])
    elif isinstance(dst, tuple):
        for d, s in zip(dst, src, strict=True):
            put(d, idx, s)


def retire(
    done: Tensor,
    ok: Tensor,
    it: int,
    idx: Tensor,
    xn: Any,
    out: Any,
    iterations: Tensor,
    converged: Tensor,
    state: tuple[Any, ...],
) -> tuple[Tensor, tuple[Any, ...]] | None:
    """Write the batch rows that stop at iteration ``it`` (mask ``done``; ``idx`` maps batch
    rows to grid models) into ``out``/``iterations``/``converged``; return ``idx`` and the
    per-model ``state`` cut to the rows that go on, or ``None`` when every model has
    stopped."""
    stop = done.nonzero().squeeze(1)
    where = idx.index_select(0, stop)
    put(out, where, take(xn, stop))
    iterations[where] = it
    converged[where] = ok.index_select(0, stop)
    if bool(done.all()):
        return None
    keep = (~done).nonzero().squeeze(1)
    return idx.index_select(0, keep), take(state, keep)


ROUNDOFF_FLOOR = 4.0
"""The round-off floor of the stopping rule, in units of ``eps·(max(‖∇f(0)‖, ‖∇f(x)‖) +
L‖x‖)``: the error of a prox-gradient mapping computed in floating point (measured at most
2 units at exact minimisers of least-squares problems in float32 and float64)."""


def stopping_rule(
    mapping: Tensor, gnorm: Tensor, scale: Tensor, L: Tensor | float, xnorm: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """The stopping rule of :func:`~funcreg.solvers.solve`, per model, at a point ``x``:
    ``(stop, converged)``.

    ``mapping = ‖G(x)‖ = L ‖x − prox_{h/L}(x − ∇f(x)/L)‖``, ``gnorm = ‖∇f(x)‖``, ``scale =
    max(‖∇f(0)‖, ‖∇f(x_0)‖)``, ``xnorm = ‖x‖``. With ``ref = max(scale, gnorm)``:

    * ``converged``: ``‖G(x)‖ ≤ tol · ref``, and that test is above the round-off floor
      ``ROUNDOFF_FLOOR · eps · (ref + L‖x‖)``: below it a computed ``G`` is rounding noise
      (``x − ∇f(x)/L`` is rounded to ``eps·|x|``; ``∇f`` to about ``eps·ref``), so a point
      could pass the test by chance;
    * ``stop``: converged, or ``‖G(x)‖`` at the floor (no iteration in this dtype can
      certify more; the model stops with ``converged`` false)."""
    eps = torch.finfo(mapping.dtype).eps
    ref = torch.maximum(scale, gnorm)
    floor = (ROUNDOFF_FLOOR * eps) * (ref + L * xnorm)
    target = tol * ref
    return mapping <= torch.maximum(target, floor), (mapping <= target) & (target >= floor)


def floor_ratio(gnorm: Tensor, scale: Tensor, L: Tensor | float, xnorm: Tensor) -> Tensor:
    """The round-off floor of :func:`stopping_rule` relative to its scale ``ref``: the
    smallest ``tol`` that the rule can certify at this point."""
    eps = torch.finfo(gnorm.dtype).eps
    ref = torch.maximum(scale, gnorm)
    return ROUNDOFF_FLOOR * eps * (1 + L * xnorm / ref.clamp(min=torch.finfo(ref.dtype).tiny))


def roundoff(*values: Tensor) -> Tensor:
    """An allowance for round-off in a sum of these per-model values."""
    eps = torch.finfo(values[0].dtype).eps
    total = values[0].abs()
    for v in values[1:]:
        total = total + v.abs()
    return 64 * eps * total


def lanczos_max(op: Callable[[Params], Params], v0: Params, steps: int) -> Tensor:
    """Largest eigenvalue of a symmetric PSD operator on stacked params, per model, from
    ``steps`` Lanczos steps (no reorthogonalisation: it only adds copies of converged
    eigenvalues, which does not affect the largest)."""
    v = {k: t / rows(t, sqnorm(v0).sqrt()) for k, t in v0.items()}
    v_prev: Params | None = None
    beta_prev: Tensor | None = None
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    dim = sum(t[0].numel() for t in v0.values())
    for _ in range(min(steps, dim)):
        w = op(v)
        a = dot(w, v)
        w = axpy(-a, v, w)
        if v_prev is not None and beta_prev is not None:
            w = axpy(-beta_prev, v_prev, w)
        b = sqnorm(w).sqrt()
        alphas.append(a)
        betas.append(b)
        ok = b > 1e-12 * alphas[0].abs()
        if not bool(ok.any()):
            break
        safe = torch.where(ok, b, torch.ones_like(b))
        v_prev, beta_prev = v, torch.where(ok, b, torch.zeros_like(b))
        v = {k: torch.where(rows(t, ok), t / rows(t, safe), 0.0) for k, t in w.items()}
    m = len(alphas)
    diag = torch.stack(alphas, 1)
    T = torch.diag_embed(diag)
    if m > 1:
        off = torch.stack(betas[:-1], 1)
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    return torch.linalg.eigvalsh(T)[:, -1].clamp(min=0)


# ---------------------------------------------------------------------------------------
# Reductions over a list of tensors, in as few kernels as possible
# ---------------------------------------------------------------------------------------

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


def all_finite(ts: Sequence[Tensor]) -> bool:
    """Whether every entry of ``ts`` is finite, read on the host: one sum per tensor (~10x
    cheaper than ``abs().amax()`` on CPU) proves it when the total is finite; else (also a
    sum of finite entries that overflows) the largest magnitude (:func:`max_abs`) decides."""
    ts = [t for t in ts if t.numel()]
    if not ts:
        return True
    if math.isfinite(float(torch.stack([t.sum().double() for t in ts]).sum())):
        return True
    return math.isfinite(max_abs(ts))


def largest_abs(t: Tensor, dim: int | None = None) -> Tensor:
    """``max |t|`` (over ``dim``, or all of ``t``), NaN if any entry is NaN: ``abs().amax()``
    on CPU (a temporary copy of ``t``; ``vector_norm(t, inf)`` is ~10× slower there),
    ``vector_norm(t, inf)`` elsewhere."""
    if t.device.type != "cpu":
        return torch.linalg.vector_norm(t, math.inf, dim=dim)
    return t.abs().amax() if dim is None else t.abs().amax(dim=dim)
