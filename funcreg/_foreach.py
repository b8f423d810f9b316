"""Eager twins of the built-in optimizers' steps, for one unbatched model.

:func:`eager_update` gives, for an :class:`~funcreg.optim.Optimizer`, a function with the
signature and the results of its pure ``step`` but less per-tensor dispatch cost for a small
model in eager mode. :func:`funcreg.train.train_step` uses it with ``autograd=True`` (the
single-model chunks of ``fr.sweep``).

A twin applies the pure step's update with one ``torch._foreach_*`` call per op over a group
of parameters (same dtype and device), on freshly computed tensors only, so it is still pure
(nothing passed in is modified) — unless it was built with ``donate=True``: then it may
update the optimizer state it is given in place (JAX's ``donate_argnums``: the caller
promises never to read that state again), which saves a copy of it per step; the params
are never modified. SGD's ops are the pure step's, in the same order: on CPU
each ``_foreach`` op runs the ordinary kernel per tensor, so its numbers are bitwise those of
``step``. Adam/AdamW run torch's fused kernel (``torch.optim.Adam(fused=True)``'s; on CPU
``torch.optim.Adam``'s default path to a few ulps, and ``step``'s numbers up to rounding),
falling back to ``_foreach`` ops where it has none. A twin cannot run under ``vmap`` (neither
kind of kernel has a batching rule) and is not meant for ``torch.compile`` or
``torch.func.grad``. A hyperparameter that is not 0-dim (a per-element broadcast) sends the
step through the pure ``step``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor

from .optim import (
    AdamState,
    Hyper,
    Optimizer,
    Params,
    SGDState,
    adam_scalars,
    bias_corrections,
    check_grads,
    is_zero,
    sgd_scalars,
)

__all__ = ["built_in_step", "donates", "eager_update", "stacks"]

Update: TypeAlias = Callable[..., tuple[Params, Any]]
_Scalar: TypeAlias = Tensor | float
_Tensors: TypeAlias = tuple[Tensor, ...] | list[Tensor]  # what torch._foreach_* take and give


_BUILT_IN = ("sgd", "adam", "adamw")
_BUILT_IN_STEPS = ("sgd.<locals>.step", "_adam_like.<locals>.step")


def built_in_step(opt: Optimizer) -> bool:
    """Whether ``opt.step`` is the step that :func:`~funcreg.optim.sgd`,
    :func:`~funcreg.optim.adam` or :func:`~funcreg.optim.adamw` built, and ``opt.config``
    names that optimizer (not a step swapped in with ``opt._replace(step=...)``, which keeps
    the config and the flags)."""
    step = opt.step
    return (
        dict(opt.config).get("name") in _BUILT_IN
        and getattr(step, "__module__", None) == Optimizer.__module__
        and getattr(step, "__qualname__", "") in _BUILT_IN_STEPS
    )


def stacks(opt: Optimizer) -> bool:
    """Whether ``fr.sweep`` may apply ``opt.step`` once to a chunk's concatenated models:
    :attr:`~funcreg.optim.Optimizer.elementwise`, and for an optimizer configured as a
    built-in one its own step (a step swapped in with ``_replace`` keeps
    ``elementwise=True`` but not what it declares: a per-model gradient clip, say)."""
    if not opt.elementwise:
        return False
    return dict(opt.config).get("name") not in _BUILT_IN or built_in_step(opt)


def donates(opt: Optimizer) -> bool:
    """Whether ``eager_update(opt, donate=True)`` updates the state in place: the built-in
    twins of Adam/AdamW, and of SGD with momentum (plain SGD has no state to update)."""
    if opt.step_eager is not None or not built_in_step(opt):
        return False
    settings = dict(opt.config)
    return settings["name"] != "sgd" or not is_zero(settings["momentum"])


def eager_update(opt: Optimizer, donate: bool = False) -> Update | None:
    """The eager twin of ``opt.step``: ``opt.step_eager`` when its builder gave one, else the
    built-in twin of :func:`~funcreg.optim.sgd`, :func:`~funcreg.optim.adam` or
    :func:`~funcreg.optim.adamw`, found by the name in ``opt.config`` (only for the step
    those factories built: an optimizer that keeps their config with a step of its own gets
    no twin); ``None`` when there is none (use ``opt.step``). ``donate=True``: the built-in
    twins may overwrite the state they are given (Adam's moments, SGD's momentum buffers:
    contiguous tensors that share no memory with each other or the params) instead of
    copying it; the numbers are the same."""
    if opt.step_eager is not None:
        return opt.step_eager
    settings = dict(opt.config)
    twin = _TWINS.get(settings.get("name"))  # type: ignore[arg-type]
    if twin is None or not built_in_step(opt):
        return None
    return twin(opt, settings, donate)


def _foreach_ok(params: Params, *scalars: _Scalar) -> bool:
    """Whether ``step_eager`` can run: some params, and every tensor hyperparameter 0-dim
    (anything else — e.g. a per-parameter broadcast — goes through the pure ``step``)."""
    return bool(params) and all(not isinstance(s, Tensor) or s.ndim == 0 for s in scalars)


def _groups(params: Params) -> list[list[str]]:
    """Keys of ``params`` grouped by (dtype, device), in first-seen order."""
    out: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, p in params.items():
        out.setdefault((p.dtype, p.device), []).append(key)
    return list(out.values())


def _in_order(d: Params, params: Params) -> Params:
    """``d`` with the key order of ``params`` (``d`` itself when it has it already)."""
    if not d or list(d) == list(params):
        return d
    return {k: d[k] for k in params}


def _fe_scale(xs: _Tensors, s: _Scalar) -> _Tensors:
    """``[s * x for x in xs]`` (new tensors)."""
    return torch._foreach_mul(xs, s)


def _decayed(
    params: Params, grads: Params, keys: list[str], wd: _Scalar, decoupled_lr: _Scalar | None = None
) -> tuple[_Tensors, _Tensors]:
    """A group's ``(params, gradients)`` with weight decay ``wd`` applied as the pure steps
    do: coupled, ``g + wd·p`` (SGD, Adam), or decoupled, ``p·(1 - lr·wd)`` when
    ``decoupled_lr`` is given (AdamW); new tensors, nothing passed in is modified."""
    ps: _Tensors = [params[k] for k in keys]
    gs: _Tensors = [grads[k] for k in keys]
    if not is_zero(wd):
        if decoupled_lr is not None:
            ps = _fe_scale(ps, 1 - decoupled_lr * wd)
        else:
            gs = torch._foreach_add(gs, _fe_scale(ps, wd))
    return ps, gs


def _cpu_number(value: _Scalar) -> float | None:
    """``value`` as a Python float when it is a number or a 0-dim CPU tensor (no sync)."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" and value.ndim == 0 else None
    return float(value)


class _MissingKernels:
    """The (device type, dtype) pairs for which this process's torch has no fused Adam kernel.

    The one piece of state of the eager twins, owned by the single instance
    :data:`_NO_FUSED`. An entry appears the first time ``torch._fused_adam_`` (or
    ``_fused_adamw_``) raises "not implemented" for a group of parameters of that device
    type and dtype; from then on :func:`_fused_adam` goes straight to the ``_foreach`` ops
    for them, without trying the kernel again. Entries never go away: they describe the
    torch build, which does not change while the process runs (:meth:`clear` exists for
    tests). Safe under threads: adding and testing membership hold a lock, and a race costs
    at most one more failed try of the kernel, whose fallback gives the same numbers. Never
    read under ``torch.compile``/``vmap``: the eager twins do not run there.
    """

    def __init__(self) -> None:
        self._pairs: set[tuple[str, torch.dtype]] = set()
        self._lock = threading.Lock()

    def __contains__(self, where: object) -> bool:
        with self._lock:
            return where in self._pairs

    def add(self, where: tuple[str, torch.dtype]) -> None:
        with self._lock:
            self._pairs.add(where)

    def clear(self) -> None:
        with self._lock:
            self._pairs.clear()


_NO_FUSED = _MissingKernels()


def _owned(t: Tensor, donate: bool) -> Tensor:
    """``t`` itself when donated and contiguous, else a contiguous copy for an in-place kernel."""
    return t if donate and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _fused_adam(
    decoupled: bool,
    grads: Params,
    state: AdamState,
    params: Params,
    count: Tensor,
    *scalars: _Scalar,
    donate: bool = False,
) -> tuple[Params, AdamState] | None:
    """Adam/AdamW's step by ``torch._fused_adam_`` / ``torch._fused_adamw_`` — the kernel
    behind ``torch.optim.Adam(fused=True)``, one pass over each tensor — applied to
    contiguous copies (so the step stays pure; the CPU kernel walks memory in flat order,
    so every tensor it sees is contiguous); with ``donate`` to the state's own moments
    (the params are still copied: the caller's divergence guard may keep them). On CPU its
    numbers follow ``torch.optim.Adam``'s default path to a few ulps and ``step``'s up to
    rounding (tested).
    ``None`` when it cannot run here — a hyperparameter that is not a CPU number, state or
    gradients of another dtype or device than their parameter, a (device, dtype) this torch
    has no kernel for, or a ``torch`` without the op — and the caller takes the
    ``_foreach`` path."""
    lr_, b1, b2, eps_, wd = (_cpu_number(s) for s in scalars)
    kernel = getattr(torch, "_fused_adamw_" if decoupled else "_fused_adam_", None)
    if kernel is None or lr_ is None or b1 is None or b2 is None or eps_ is None or wd is None:
        return None
    new_params: Params = {}
    exp_avg: Params = {}
    exp_avg_sq: Params = {}
    groups = _groups(params)
    for keys in groups:  # every group checked before any kernel runs
        first = params[keys[0]]
        if (first.device.type, first.dtype) in _NO_FUSED:
            return None
        for k in keys:
            p = params[k]
            others = (grads[k], state.exp_avg[k], state.exp_avg_sq[k])
            if any((t.dtype, t.device, t.shape) != (p.dtype, p.device, p.shape) for t in others):
                return None
    # in place only for one group: a later group's missing kernel would send the step to the
    # _foreach path with the earlier groups' moments already updated
    donate = donate and len(groups) == 1
    for keys in groups:
        first = params[keys[0]]
        where = (first.device.type, first.dtype)
        fmt = torch.contiguous_format
        with torch.no_grad():
            ps = [params[k].detach().clone(memory_format=fmt) for k in keys]
            ms = [_owned(state.exp_avg[k], donate) for k in keys]
            vs = [_owned(state.exp_avg_sq[k], donate) for k in keys]
            try:
                kernel(
                    ps,
                    [grads[k].contiguous() for k in keys],
                    ms,
                    vs,
                    [],
                    [count.to(first.device, torch.float32)] * len(keys),
                    amsgrad=False,
                    lr=lr_,
                    beta1=b1,
                    beta2=b2,
                    weight_decay=wd,
                    eps=eps_,
                    maximize=False,
                    grad_scale=None,
                    found_inf=None,
                )
            except NotImplementedError:  # no kernel for this device/dtype: never again
                _NO_FUSED.add(where)
                return None
            except RuntimeError as err:
                if "not implemented" in str(err).lower():
                    _NO_FUSED.add(where)
                elif donate:  # the state may be half-updated: no silent fallback
                    raise
                return None
        new_params.update(zip(keys, ps, strict=True))
        exp_avg.update(zip(keys, ms, strict=True))
        exp_avg_sq.update(zip(keys, vs, strict=True))
    return (
        _in_order(new_params, params),
        AdamState(
            step=count,
            exp_avg=_in_order(exp_avg, params),
            exp_avg_sq=_in_order(exp_avg_sq, params),
        ),
    )


def _sgd_twin(opt: Optimizer, settings: Mapping[str, Any], donate: bool = False) -> Update:
    """The eager twin of :func:`funcreg.optim.sgd`'s step: its ops, in its order, with one
    ``torch._foreach_*`` call per op and group (bitwise the pure step's numbers on CPU);
    ``donate``: the momentum buffers scaled in place (the same ops)."""
    use_momentum = not is_zero(settings["momentum"])
    nesterov = settings["nesterov"]

    def step_eager(
        grads: Params, state: SGDState, params: Params, hyper: Hyper | None = None
    ) -> tuple[Params, SGDState]:
        check_grads("sgd", grads, params)
        lr_, wd, mu, tau = sgd_scalars(settings, hyper)
        if not _foreach_ok(params, lr_, wd, mu, tau):
            return opt.step(grads, state, params, {} if hyper is None else hyper)
        # on CPU read the step count once instead of a torch.where per tensor
        on_cpu = state.step.device.type == "cpu"
        first_now = use_momentum and on_cpu and bool(state.step == 0)
        new_params: Params = {}
        new_buffers: Params = {}
        for keys in _groups(params):
            ps, gs = _decayed(params, grads, keys, wd)
            if use_momentum:
                bufs: _Tensors
                if first_now:
                    bufs = [g.clone() for g in gs]
                else:
                    old = [state.momentum_buffer[k] for k in keys]
                    if donate and all(b.is_contiguous() for b in old):
                        bufs = old
                        torch._foreach_mul_(bufs, mu)
                    else:
                        bufs = _fe_scale(old, mu)
                    torch._foreach_add_(bufs, _fe_scale(gs, 1 - tau))
                    if not on_cpu:
                        first = state.step == 0
                        bufs = [torch.where(first, g, b) for g, b in zip(gs, bufs, strict=True)]
                new_buffers.update(zip(keys, bufs, strict=True))
                gs = torch._foreach_add(gs, _fe_scale(bufs, mu)) if nesterov else bufs
            if isinstance(lr_, Tensor):  # a grid's learning rate: the pure step's p - lr·g
                stepped = torch._foreach_sub(ps, _fe_scale(gs, lr_))
            else:  # torch.optim.SGD's update
                stepped = torch._foreach_add(ps, gs, alpha=-lr_)
            new_params.update(zip(keys, stepped, strict=True))
        new_params = _in_order(new_params, params)
        new_buffers = _in_order(new_buffers, params)
        return new_params, SGDState(step=state.step + 1, momentum_buffer=new_buffers)

    return step_eager


def _adam_twin(opt: Optimizer, settings: Mapping[str, Any], donate: bool = False) -> Update:
    """The eager twin of :func:`funcreg.optim.adam`/:func:`~funcreg.optim.adamw`'s step:
    torch's fused kernel (:func:`_fused_adam`, on the state itself with ``donate``), else
    the pure step's arithmetic with ``torch._foreach_*`` ops (equal to the pure step to
    rounding; new tensors)."""
    name = settings["name"]
    decoupled = name == "adamw"

    def step_eager(
        grads: Params, state: AdamState, params: Params, hyper: Hyper | None = None
    ) -> tuple[Params, AdamState]:
        check_grads(name, grads, params)
        lr_, b1, b2, eps_, wd = adam_scalars(settings, hyper)
        if not _foreach_ok(params, lr_, b1, b2, eps_, wd):
            return opt.step(grads, state, params, {} if hyper is None else hyper)
        count = state.step + 1
        fused = _fused_adam(
            decoupled, grads, state, params, count, lr_, b1, b2, eps_, wd, donate=donate
        )
        if fused is not None:
            return fused
        cache: dict[torch.dtype, tuple[_Scalar, _Scalar]] = {}
        new_params: Params = {}
        exp_avg: Params = {}
        exp_avg_sq: Params = {}
        for keys in _groups(params):
            ps, gs = _decayed(params, grads, keys, wd, lr_ if decoupled else None)
            ms = _fe_scale([state.exp_avg[k] for k in keys], b1)
            torch._foreach_add_(ms, _fe_scale(gs, 1 - b1))
            vs = _fe_scale([state.exp_avg_sq[k] for k in keys], b2)
            gg = torch._foreach_mul(gs, gs)
            torch._foreach_mul_(gg, 1 - b2)
            torch._foreach_add_(vs, gg)
            dtype = torch.promote_types(count.dtype, ps[0].dtype)
            if dtype not in cache:
                cache[dtype] = bias_corrections(count, dtype, lr_, b1, b2)
            step_size, bc2_sqrt = cache[dtype]
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps_)
            upd = torch._foreach_div(ms, denom)
            torch._foreach_mul_(upd, step_size)
            new_params.update(zip(keys, torch._foreach_sub(ps, upd), strict=True))
            exp_avg.update(zip(keys, ms, strict=True))
            exp_avg_sq.update(zip(keys, vs, strict=True))
        new_params = _in_order(new_params, params)
        exp_avg = _in_order(exp_avg, params)
        exp_avg_sq = _in_order(exp_avg_sq, params)
        return new_params, AdamState(step=count, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)

    return step_eager


_TWINS: dict[str, Callable[[Optimizer, Mapping[str, Any], bool], Update]] = {
    "sgd": _sgd_twin,
    "adam": _adam_twin,
    "adamw": _adam_twin,
}
