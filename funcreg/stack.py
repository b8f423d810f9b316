"""Grids of strengths and stacked parameters: the data layout of a sweep.

A *grid* is a dict ``{axis name: 1-d tensor of length K}``: model ``k`` of a sweep trains
with ``{name: values[k]}``. Axis names are spec term names (strengths) or names an
optimizer reads (``adam(lr="lr")``). *Stacked* params are a dict of tensors whose leading
axis is that K (axis 0 is always the sweep axis)::

    grid = fr.grid(l1=torch.logspace(-5, -1, 32), lr=[1e-3, 1e-2])   # K = 64, product
    stacked = fr.stack(fr.params(net), grid)                          # (64, *shape) each
    fr.load_(net, fr.unstack(stacked, 3))                             # model 3 back into net

Grid values are stored in ``torch.get_default_dtype()`` (float32 unless changed), like
``torch.tensor`` of Python floats; :func:`fr.sweep <funcreg._sweep.sweep>` casts them to the
parameters' dtype. Pass ``dtype=torch.float64`` to keep full precision for fp64 models.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import _checks

__all__ = [
    "as_data",
    "build_grid",
    "check_stacked",
    "grid",
    "grid_size",
    "load_",
    "split_model",
    "stack",
    "stack_modules",
    "strength_values",
    "unstack",
    "with_buffers",
]


# --------------------------------------------------------------------------------- grid


def _axis_values(name: str, value: Any, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``(1-d values, was_scalar)`` of one grid axis, validated finite and >= 0."""
    if isinstance(value, bool | str):
        raise TypeError(
            f"grid axis {name!r} must be a number, a list, a numpy array or a tensor of "
            f"numbers, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, list | tuple) and any(isinstance(v, bool | np.bool_) for v in value):
        raise TypeError(f"grid axis {name!r} must hold real numbers, not booleans: {value!r:.80}")
    scalar = isinstance(value, numbers.Real) or (
        isinstance(value, Tensor | np.ndarray) and value.ndim == 0
    )
    try:
        if isinstance(value, Tensor):
            if value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"grid axis {name!r} must hold real numbers, got {value.dtype}")
            t = value.detach().to("cpu", dtype)
        else:
            arr = np.asarray(value)
            if arr.dtype == bool or arr.dtype.kind not in "iuf":
                raise TypeError(
                    f"grid axis {name!r} must hold real numbers, got {arr.dtype} ({value!r:.80})"
                )
            t = torch.as_tensor(arr.astype(np.float64)).to(dtype)
    except (ValueError, RuntimeError) as e:  # ragged lists and the like
        raise TypeError(f"grid axis {name!r}: cannot make a 1-d tensor of {value!r:.80}") from e
    if t.ndim > 1:
        raise ValueError(
            f"grid axis {name!r} must be a scalar or 1-d, got shape {tuple(t.shape)}; "
            "give each axis separately, e.g. fr.grid(l1=[...], lr=[...])"
        )
    t = t.reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"grid axis {name!r} is empty; give at least one value")
    bad = ~torch.isfinite(t) | (t < 0)
    if bool(bad.any()):
        raise ValueError(
            f"grid axis {name!r} must be finite and >= 0 (strengths, learning rates and other "
            f"hyperparameters), got {t[bad].tolist()[:5]}; use 0 to switch a term off"
        )
    return t, scalar


def grid(
    *, product: bool = True, dtype: torch.dtype | None = None, **axes: Any
) -> dict[str, Tensor]:
    """A grid of strengths and hyperparameters: ``{name: (K,) tensor}``.

    Each axis is a number, a list, a numpy array or a tensor (0-d or 1-d); every value
    must be finite and ``>= 0``.

    * ``product=True`` (default): every combination, like ``itertools.product`` over the
      axes in the order given (the first axis varies slowest); K is the product of the
      lengths.
    * ``product=False``: the axes are zipped; all non-scalar axes must have the same
      length K.

    Scalars broadcast to K in both modes::

        fr.grid(l1=torch.logspace(-5, -1, 64), l2=1e-4)          # K = 64
        fr.grid(l1=[1e-3, 1e-2], lr=[1e-3, 1e-2, 1e-1])          # K = 6
        fr.grid(l1=[1e-3, 1e-2], lr=[1e-2, 1e-1], product=False)  # K = 2

    Values are stored in ``dtype`` (default: ``torch.get_default_dtype()``).
    """
    return build_grid(axes, product=product, dtype=dtype)


def build_grid(
    axes: Mapping[str, Any], *, product: bool = True, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """:func:`grid` taking the axes as a dict (names need not be valid keywords)."""
    if not isinstance(axes, Mapping):
        raise TypeError(f"expected a dict of grid axes, got {type(axes).__name__}")
    if not axes:
        raise ValueError(
            "grid() needs at least one axis, e.g. fr.grid(l1=torch.logspace(-5, -1, 32))"
        )
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"grid(dtype=...) must be a floating dtype, got {dtype}")
    vals: dict[str, Tensor] = {}
    scalars: dict[str, bool] = {}
    for name, value in axes.items():
        vals[name], scalars[name] = _axis_values(name, value, dtype)
    if product:
        sizes = [v.numel() for v in vals.values()]
        total = math.prod(sizes)
        out: dict[str, Tensor] = {}
        inner = total
        for (name, v), n in zip(vals.items(), sizes, strict=True):
            inner //= n
            out[name] = v.repeat_interleave(inner).repeat(total // (inner * n))
        return out
    lengths = {n: v.numel() for n, v in vals.items() if not scalars[n]}
    distinct = set(lengths.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{n}: {k}" for n, k in lengths.items())
        raise ValueError(
            f"grid(product=False) zips its axes, so they must have the same length, got "
            f"{shown} (scalars broadcast); use product=True for every combination"
        )
    k = distinct.pop() if distinct else 1
    return {n: v.expand(k).clone() if scalars[n] else v for n, v in vals.items()}


def grid_size(g: Mapping[str, Any]) -> int:
    """K of a grid: the common length of its 1-d tensors (errors name the odd axis)."""
    if not isinstance(g, Mapping) or not g:
        raise TypeError(
            f"expected a grid {{name: (K,) tensor}} as from fr.grid(...), got {g!r:.80}"
        )
    sizes: dict[str, int] = {}
    for name, v in g.items():
        if not isinstance(v, Tensor) or v.ndim != 1:
            raise TypeError(
                f"grid axis {name!r} must be a 1-d tensor (use fr.grid(...)), got "
                f"{type(v).__name__}{'' if not isinstance(v, Tensor) else tuple(v.shape)}"
            )
        sizes[name] = v.numel()
    if len(set(sizes.values())) != 1:
        shown = ", ".join(f"{n}: {k}" for n, k in sizes.items())
        raise ValueError(f"grid axes have different lengths ({shown}); build it with fr.grid")
    return next(iter(sizes.values()))


def strength_values(values: Any, what: str) -> Tensor:
    """A non-empty 1-d float64 tensor of finite strengths >= 0."""
    try:
        if isinstance(values, Tensor):
            t = values.detach().to("cpu", torch.float64).reshape(-1)
        else:  # via numpy: Python floats must not pass through float32
            t = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{what} must be a 1-d list or tensor of numbers, got {values!r:.80}"
        ) from e
    if t.numel() == 0:
        raise ValueError(f"{what}: the grid of strengths is empty; give at least one strength")
    bad = ~torch.isfinite(t) | (t < 0)
    if bool(bad.any()):
        raise ValueError(f"{what}: strengths must be finite and >= 0, got {t[bad].tolist()[:5]}")
    return t


def split_module(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(trained, carried)`` detached copies of a module's state: floating-point parameters
    with ``requires_grad`` (trained and penalised) vs its buffers and other parameters."""
    trained: dict[str, Tensor] = {}
    carried: dict[str, Tensor] = {}
    for n, p in model.named_parameters():
        target = trained if p.is_floating_point() and p.requires_grad else carried
        target[n] = p.detach().clone()
    for n, b in model.named_buffers():
        carried[n] = b.detach().clone()
    return trained, carried


@contextlib.contextmanager
def eval_mode(model: nn.Module | None) -> Iterator[None]:
    """``model.eval()`` for the block, then every submodule's own ``training`` flag back as
    it was (also after an exception). ``None`` (no module: a params dict) does nothing."""
    modes = {m: m.training for m in model.modules()} if model is not None else {}
    if model is not None:
        model.eval()
    try:
        yield
    finally:
        for m, flag in modes.items():
            m.training = flag


def split_model(
    model_or_params: nn.Module | Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], nn.Module | None]:
    """``(trained params, buffers and frozen params, module or None)``, detached copies.

    A module contributes its floating-point parameters with ``requires_grad`` (trained
    and penalised) and carries its buffers and other parameters along; a dict is all
    trained."""
    if isinstance(model_or_params, nn.Module):
        params0, fixed0 = split_module(model_or_params)
        if not params0:
            raise ValueError("the model has no floating-point parameter to fit")
        return params0, fixed0, model_or_params
    if isinstance(model_or_params, Mapping):
        _checks.check_float_params(model_or_params)
        if not model_or_params:
            raise ValueError("params is empty; pass fr.params(model) or the model itself")
        return {n: v.detach().clone() for n, v in model_or_params.items()}, {}, None
    raise TypeError(
        "expected an nn.Module or a dict of params {name: tensor}, got "
        f"{type(model_or_params).__name__}"
    )


def with_buffers(loss_fn: Callable[..., Tensor], fixed: Mapping[str, Tensor]) -> Callable[..., Any]:
    """``loss_fn`` seeing the buffers beside the params (so ``functional_call(model, p, x)``
    with ``strict=True`` works); ``loss_fn`` itself when there are none."""
    if not fixed:
        return loss_fn

    def loss(p: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Tensor:
        return loss_fn({**p, **fixed}, *args, **kwargs)

    return loss


def as_data(data: Any, what: str = "data") -> tuple[Tensor, ...]:
    """A tuple of tensors from a tensor, a tuple/list of tensors or ``None``."""
    if data is None:
        return ()
    if isinstance(data, Tensor):
        return (data,)
    if isinstance(data, tuple | list) and all(isinstance(t, Tensor) for t in data):
        return tuple(data)
    raise TypeError(
        f"{what} must be a tensor or a tuple of tensors such as (x, y), got {type(data).__name__}"
    )


def _k_of(grid_or_k: Mapping[str, Any] | int) -> int:
    if isinstance(grid_or_k, bool):
        raise TypeError("K must be an int >= 1 or a grid, got a bool")
    if isinstance(grid_or_k, Mapping):
        return grid_size(grid_or_k)
    if not isinstance(grid_or_k, numbers.Integral):
        raise TypeError(f"expected K (an int) or a grid, got {type(grid_or_k).__name__}")
    k = int(grid_or_k)
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    return k


def _as_params(params: Mapping[str, Tensor] | nn.Module) -> Mapping[str, Tensor]:
    if isinstance(params, nn.Module):
        return {n: p for n, p in params.named_parameters() if p.is_floating_point()}
    _checks.check_float_params(params)
    return params


def stack(
    params: Mapping[str, Tensor] | nn.Module, grid_or_k: Mapping[str, Any] | int
) -> dict[str, Tensor]:
    """K copies of one set of params: ``{name: (K, *shape)}``, detached, each model its own
    memory (``expand`` then ``clone``, so in-place updates are safe).

    ``params`` is a dict (e.g. ``fr.params(net)``) or a module (its floating parameters);
    ``grid_or_k`` is K or a grid whose length is K.
    """
    k = _k_of(grid_or_k)
    src = _as_params(params)
    return {n: v.detach().expand(k, *v.shape).clone() for n, v in src.items()}


def stack_modules(models: Sequence[nn.Module]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, buffers)`` of K modules of the same architecture, stacked along axis 0
    (different inits, one per model of a sweep: ``fr.sweep(..., init=fr.stack_modules(ms))``).

    ``params`` holds the floating-point parameters, ``buffers`` every buffer; both detached
    copies. Names, shapes and dtypes must agree across the models.
    """
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("stack_modules expects a non-empty list of nn.Module")
    ref_p = {n: p for n, p in models[0].named_parameters() if p.is_floating_point()}
    ref_b = dict(models[0].named_buffers())
    for i, m in enumerate(models[1:], start=1):
        for kind, ref, cur in (
            ("parameter", ref_p, {n: p for n, p in m.named_parameters() if p.is_floating_point()}),
            ("buffer", ref_b, dict(m.named_buffers())),
        ):
            if list(ref) != list(cur):
                raise ValueError(
                    f"stack_modules: model {i} has {kind}s {_checks._names(cur)}, model 0 has "
                    f"{_checks._names(ref)}; all models must share one architecture"
                )
            for n, v in cur.items():
                if v.shape != ref[n].shape or v.dtype != ref[n].dtype:
                    raise ValueError(
                        f"stack_modules: {kind} {n!r} of model {i} is {tuple(v.shape)} "
                        f"{v.dtype}, model 0 has {tuple(ref[n].shape)} {ref[n].dtype}"
                    )
    params = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in ref_p
    }
    buffers = {n: torch.stack([dict(m.named_buffers())[n].detach() for m in models]) for n in ref_b}
    return params, buffers


def check_stacked(stacked: Mapping[str, Tensor], k: int, what: str = "params") -> None:
    """Every tensor of ``stacked`` has leading size ``k`` (errors name the entry and both)."""
    _checks.check_float_params(stacked, what)
    for name, v in stacked.items():
        if v.ndim == 0 or v.shape[0] != k:
            lead = "no leading axis (0-dim)" if v.ndim == 0 else f"leading size {v.shape[0]}"
            raise ValueError(
                f"{what}[{name!r}] has {lead}, but the grid has K={k} models; stack it with "
                f"fr.stack(params, grid) or give a grid of {v.shape[0] if v.ndim else 1} values"
            )


def _leading(stacked: Mapping[str, Tensor]) -> int:
    _checks.check_float_params(stacked, "stacked")
    sizes = {n: (v.shape[0] if v.ndim else None) for n, v in stacked.items()}
    distinct = set(sizes.values())
    if not sizes or None in distinct or len(distinct) != 1:
        shown = ", ".join(f"{n}: {s}" for n, s in list(sizes.items())[:6])
        raise ValueError(f"stacked params must share one leading size K, got {shown}")
    return int(next(iter(distinct)))  # type: ignore[arg-type]


def unstack(stacked: Mapping[str, Tensor], i: Any) -> dict[str, Tensor]:
    """Model ``i`` of stacked params: ``{name: stacked[name][i]}`` (detached copies).

    ``i`` is an int (negative counts from the end) or anything with ``__index__``, such as
    the value returned by ``result.best()``.
    """
    if isinstance(i, bool | np.bool_):
        raise TypeError("unstack: the model index must be an int, got a bool")
    if not stacked:
        raise ValueError("unstack: the stacked params are empty")
    k = _leading(stacked)
    idx = operator.index(i)
    if not -k <= idx < k:
        raise IndexError(f"model index {idx} is out of range for K={k} stacked models")
    return {n: v[idx].detach().clone() for n, v in stacked.items()}


@torch.no_grad()
def load_(module: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
    """Copy ``params`` (parameters and, optionally, buffers, keyed like
    ``named_parameters()`` / ``named_buffers()``) into ``module`` in place; returns it.

    Strict: every key must name a parameter or buffer of the module, every floating-point
    parameter must be given, and shapes must match (buffers not given keep their values).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"load_ expects an nn.Module, got {type(module).__name__}")
    _checks.check_float_params(params)
    own_p = dict(module.named_parameters())
    own_b = dict(module.named_buffers())
    targets = {**own_b, **own_p}
    unknown = [n for n in params if n not in targets]
    if unknown:
        near = _checks.closest(unknown[0], targets)
        raise ValueError(
            f"load_: {_checks._names(unknown)} not in the module; closest names: "
            f"{_checks._names(near)}. Module has {_checks._names(targets)}"
        )
    missing = [n for n, p in own_p.items() if p.is_floating_point() and n not in params]
    if missing:
        raise ValueError(
            f"load_: no value for parameter(s) {_checks._names(missing)}; give every "
            "floating-point parameter, frozen ones included (a sweep keeps frozen parameters "
            "with the buffers: use {**result.params(i), **result.buffers(i)} or "
            "result.module(i))"
        )
    for n, v in params.items():
        t = targets[n]
        if tuple(v.shape) != tuple(t.shape):
            hint = (
                "; it looks stacked: pick one model with fr.unstack(stacked, i)"
                if tuple(v.shape[1:]) == tuple(t.shape)
                else ""
            )
            raise ValueError(
                f"load_: {n!r} has shape {tuple(v.shape)}, the module's is {tuple(t.shape)}{hint}"
            )
    for n, v in params.items():
        targets[n].copy_(v)
    return module
