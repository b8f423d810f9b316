"""A vmapped chunk's step with the optimizer update outside ``vmap``, for ``fr.sweep``.

Only the gradient (forward, backward, metrics) of the k models of a chunk runs under
``vmap``; an :attr:`~funcreg.optim.Optimizer.elementwise` optimizer (``sgd``, ``adam``,
``adamw``) then steps once, on the k models' parameters concatenated into one ``(k, N)``
tensor (its per-param state likewise, its step count and the strengths as ``(k, 1)``
columns): a handful of elementwise kernels in all, where the vmapped update ran that many per
parameter tensor, each through vmap's batching layer. Prox terms follow under ``vmap``, one
model's slice of the parameters and of the prox steps (:func:`~funcreg.optim.prox_steps`
of the stacked state) each. The new parameters and state are handed back as views of the
``(k, N)`` tensors, in the per-parameter layout the rest of the run reads (guard,
evaluation, checkpoints); the next step finds the whole tensor again behind its views
(:meth:`_Layout.join`), so nothing is copied back and forth. Any other layout (a chunk's
first step, parameters after a prox, a step after the guard restored a model) is
concatenated: the same numbers.

Every operation is one that ``vmap`` batched, on the same numbers, entry by entry: the
results equal those of the fully vmapped step to the bit.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from ._foreach import stacks
from .activity import Activity
from .optim import Optimizer, prox_steps
from .penalties import Penalty
from .spec import Spec
from .train import gradient_step

__all__ = ["finite_check_tensors", "stacked_step", "tiled"]

_KEY = "stacked"  # the one key of the (k, N) dicts the optimizer sees


class _Layout:
    """Where each parameter sits in a model's row of ``N`` entries."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.names = list(params)
        self.shapes = [tuple(p.shape[1:]) for p in params.values()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.n = sum(self.sizes)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """The per-parameter ``(k, *shape)`` views of a ``(k, N)`` tensor."""
        k = flat.shape[0]
        parts = flat.split(self.sizes, 1)
        return {n: t.view(k, *s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def join(self, tree: Mapping[str, Tensor]) -> Tensor | None:
        """One ``(k, N)`` tensor of ``tree`` (the params' keys, one dtype): the tensor whose
        :meth:`split` views ``tree`` holds, else their concatenation; ``None`` for another
        layout (keys, shapes or dtypes)."""
        leaves = list(tree.values())
        if list(tree) != self.names or len({t.dtype for t in leaves}) != 1:
            return None
        k = leaves[0].shape[0]
        if any(tuple(t.shape) != (k, *s) for t, s in zip(leaves, self.shapes, strict=True)):
            return None
        base = tiled(leaves)
        if base is not None:
            return base
        return torch.cat([t.reshape(k, -1) for t in leaves], 1)


def tiled(leaves: list[Tensor]) -> Tensor | None:
    """The ``(k, N)`` tensor whose rows ``leaves`` tile in order (each ``(k, *shape)``, a
    model's entries contiguous, one after another along the row), or ``None``: how a
    :meth:`_Layout.split` left them, whatever the layout."""
    base = leaves[0]._base if leaves else None
    if base is None or base.dim() != 2 or not base.is_contiguous():
        return None
    k, n = base.shape
    offset = base.storage_offset()
    for t in leaves:
        shape = tuple(t.shape)
        if t._base is not base or shape[:1] != (k,) or t.storage_offset() != offset:
            return None
        if t.stride() != (n, *_contiguous(shape[1:])):
            return None
        offset += math.prod(shape[1:])
    return base if offset == base.storage_offset() + n else None


def finite_check_tensors(params: Mapping[str, Tensor]) -> list[Tensor]:
    """``params``' tensors for the divergence guard's sums: the one ``(k, N)`` tensor behind
    them when they are its views (one sum instead of one per parameter), else themselves."""
    leaves = list(params.values())
    base = tiled(leaves)
    return leaves if base is None else [base]


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _Last:
    """What the last steps handed back (a params dict, a state) and the ``(k, N)`` tensors
    behind them: when a step gets those very objects back (the engine keeps a step's
    results as they are), their flat form is known without looking at strides. One entry
    per chunk in flight, taken when found; at most :attr:`MAX` (older ones dropped)."""

    MAX = 16

    def __init__(self) -> None:
        self.seen: OrderedDict[tuple[str, int], tuple[Any, tuple[Any, ...], Any]] = OrderedDict()

    def put(self, tree: Any, what: str, flat: Any) -> None:
        self.seen[(what, id(tree))] = (tree, _parts(tree), flat)
        while len(self.seen) > self.MAX:
            self.seen.popitem(last=False)

    def take(self, tree: Any, what: str) -> Any:
        hit = self.seen.pop((what, id(tree)), None)
        if hit is None or hit[0] is not tree:
            return None
        now = _parts(tree)
        same = len(hit[1]) == len(now) and all(a is b for a, b in zip(hit[1], now, strict=True))
        return hit[2] if same else None


def _parts(tree: Any) -> tuple[Any, ...]:
    """The objects a params dict or a state NamedTuple holds, one level into its dicts."""
    if isinstance(tree, dict):
        return tuple(tree.values())
    return tuple(x for v in tree for x in (v.values() if isinstance(v, dict) else (v,)))


def _flat_state(state: Any, layout: _Layout, k: int) -> Any | None:
    """``state`` with per-model scalars as ``(k, 1)`` and per-param dicts as one ``(k, N)``
    tensor; ``None`` when it is not a NamedTuple of those."""
    if not (isinstance(state, tuple) and hasattr(state, "_fields")):
        return None
    fields: list[Any] = []
    for v in state:
        if isinstance(v, Tensor) and v.shape == (k,):
            fields.append(v.view(k, 1))
        elif isinstance(v, dict) and not v:
            fields.append({})
        elif isinstance(v, dict) and (flat := layout.join(v)) is not None:
            fields.append({_KEY: flat})
        else:
            return None
    return type(state)(*fields)


def _unflat_state(flat: Any, like: Any, layout: _Layout) -> Any:
    fields: list[Any] = []
    for new, old in zip(flat, like, strict=True):
        if isinstance(old, Tensor):
            fields.append(new.view(old.shape))
        else:
            fields.append(layout.split(new[_KEY]) if old else {})
    return type(like)(*fields)


def stacked_step(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    optimizer: Optimizer,
    prox: bool,
    activity: Mapping[str, Activity] | None,
    metric_names: Sequence[str],
    dtype: torch.dtype,
    vmapped: Callable[..., Any],
) -> Callable[..., Any] | None:
    """The engine's vmapped chunk step ``(params, state, bufs, strengths, batch) ->
    (params, state, metric vector)`` with the update outside ``vmap``, or ``None`` for an
    optimizer that is not :attr:`~funcreg.optim.Optimizer.elementwise`. Prox terms follow
    the update under ``vmap``, with the steps of :func:`~funcreg.optim.prox_steps` computed
    on the stacked state. ``vmapped``: the fully vmapped step of the same signature, which
    it calls for params or state of another layout (mixed dtypes, a state that is not a
    NamedTuple of per-model scalars and per-param dicts)."""
    if not stacks(optimizer):
        return None
    gradient, prox_part = gradient_step(loss_fn, spec, prox, activity=activity)

    def one(p: Any, bufs: Any, hp: Any, b: Any) -> tuple[Any, Tensor]:
        grads, metrics = gradient(p, hp, bufs, *b)
        return grads, torch.stack([metrics[m].to(dtype) for m in metric_names])

    grads_and_metrics = vmap(one, in_dims=(0, 0, 0, None), randomness="different")
    layouts: dict[tuple[Any, ...], _Layout] = {}
    last = _Last()

    def step(params: Any, state: Any, bufs: Any, hp: Any, b: Any) -> Any:
        key = tuple((n, tuple(p.shape)) for n, p in params.items())
        layout = layouts.get(key)
        if layout is None:
            layout = layouts.setdefault(key, _Layout(params))
        k = next(iter(params.values())).shape[0] if params else 0
        flat_p = last.take(params, "params")
        if flat_p is None and params:
            flat_p = layout.join(params)
        flat_s = last.take(state, "state")
        if flat_s is None and flat_p is not None:
            flat_s = _flat_state(state, layout, k)
        if flat_p is None or flat_s is None:
            return vmapped(params, state, bufs, hp, b)
        grads, mvec = grads_and_metrics(params, bufs, hp, b)
        flat_g = layout.join(grads)
        assert flat_g is not None  # the gradient of each param has its shape and dtype
        hyper = {n: v.view(k, 1) for n, v in hp.items()}
        new_p, new_s = optimizer.step({_KEY: flat_g}, flat_s, {_KEY: flat_p}, hyper)
        out = layout.split(new_p[_KEY])
        if len(prox_part):
            out = _prox(prox_part, out, hp, prox_steps(optimizer, new_s, hyper), layout, k)
        else:
            last.put(out, "params", new_p[_KEY])
        views = _unflat_state(new_s, state, layout)
        last.put(views, "state", new_s)
        return out, views, mvec

    return step


def _prox(
    prox_part: Spec,
    params: dict[str, Tensor],
    hp: Mapping[str, Tensor],
    steps: Tensor | float | dict[str, Tensor],
    layout: _Layout,
    k: int,
) -> dict[str, Tensor]:
    """``prox_part.prox`` of each model under ``vmap``, its steps (``lr``, ``(k, 1)`` or a
    number, or ``{_KEY: (k, N)}`` per coordinate) cut per model."""
    if isinstance(steps, dict):
        cut: Any = layout.split(steps[_KEY])
    else:
        cut = steps.view(k) if isinstance(steps, Tensor) else steps
    batched = isinstance(cut, Tensor | dict)
    fn = vmap(prox_part.prox, in_dims=(0, 0, 0 if batched else None), randomness="different")
    return dict(fn(params, hp, cut))
