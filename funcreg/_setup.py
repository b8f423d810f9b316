"""The arguments of :func:`fr.sweep <funcreg._sweep.sweep>`, checked and resolved into a
:class:`Setup` (:func:`prepare`) before any training: the grid against the spec and the
optimizer, the model's trained and carried tensors, every model's init, the data, the
training length and, when a checkpoint exists, the run it resumes (holding the checkpoint's
lock until :meth:`Setup.close`); then the loss on the first batch (:func:`check_first_batch`).
:class:`SweepArgs` is the one list of the sweep's options. Both the one-process sweep and
each shard of :func:`funcreg.distributed.sweep` start here; the run itself is
:func:`funcreg._engine.run_local`."""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks, _plan
from ._checkpoint import CheckpointLock, load_checkpoint, sweep_identity
from ._data import Batch, Data, make_data
from .activity import Activity
from .activity import penalized as activity_penalized
from .optim import Optimizer
from .penalties import Penalty
from .result import SweepResult
from .spec import Spec, as_spec
from .stack import build_grid, check_stacked, split_module, stack

__all__ = ["Setup", "SweepArgs", "check_first_batch", "prepare"]


@dataclass
class Setup:
    """Everything ``sweep`` validated and resolved before training starts: the input of
    :func:`funcreg._engine.run_local`."""

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    val_fn: Callable[..., Tensor] | None
    spec: Spec
    optimizer: Optimizer
    prox: bool
    compile: bool
    progress: bool
    seed: int
    grid: dict[str, Tensor]  # float64, CPU
    k: int
    dev: torch.device
    dtype: torch.dtype
    params0: dict[str, Tensor]  # one model: trained params
    fixed0: dict[str, Tensor]  # one model: buffers and frozen params
    stacked_p: dict[str, Tensor]
    stacked_b: dict[str, Tensor]
    train: Data
    val: Data | None
    steps: int
    eval_every: int
    checkpoint_every: int
    chunk_size: int | None
    metric_names: tuple[str, ...]
    selected: list[str]
    identity: dict[str, Any]
    ckpt: Path | None
    prev: SweepResult | None
    t_start: float
    lock: CheckpointLock | None = None  # the checkpoint's advisory lock, held while it runs

    def close(self) -> None:
        """Release what the run holds (the checkpoint's lock); the run has ended."""
        if self.lock is not None:
            self.lock.release()

    plan: Any = None  # fr.sweep's plan= (see funcreg._plan.check_plan)
    activity: dict[str, Any] = field(default_factory=dict)  # fr.sweep's activity= terms


def _check_activity(loss_fn: Callable[..., Any], spec: Spec, activity: Any) -> dict[str, Activity]:
    """``activity=`` as a ``{term: Activity}`` dict, checked by building the objective of
    :func:`funcreg.activity.penalized` once (names, types; no call)."""
    if activity is None:
        return {}
    if not isinstance(activity, Mapping):
        raise TypeError(
            "sweep: activity= must be a dict {term: fr.activity.Activity(penalty, module "
            f"path)}}, got {type(activity).__name__}"
        )
    activity_penalized(loss_fn, spec, activity)
    return dict(activity)


def data_loss(loss_fn: Callable[..., Any], activity: Mapping[str, Any]) -> Callable[..., Any]:
    """The data loss of ``loss_fn``: itself, or with activity terms (whose ``loss_fn``
    returns ``(data loss, {module path: activation})``) its first element."""
    if not activity:
        return loss_fn

    def first(params: Any, *batch: Any) -> Any:
        return _checks.activity_pair("sweep", loss_fn, loss_fn(params, *batch))[0]

    return functools.wraps(loss_fn)(first)


def _check_axes(
    grid: Mapping[str, Tensor], spec: Spec, optimizer: Optimizer, activity: Mapping[str, Any]
) -> None:
    strengths = {*spec.strength_names, *activity}
    hyper = set(optimizer.hyperparams)
    allowed = [*spec.strength_names, *activity, *sorted(hyper)]
    for name in grid:
        if name in strengths or name in hyper:
            continue
        if name in spec:
            raise ValueError(
                f"grid axis {name!r} names the constraint term {name!r}, which takes no "
                "strength; remove it from the grid"
            )
        near = _checks.closest(name, allowed, 1)
        raise ValueError(
            f"grid axis {name!r} names no spec term and no optimizer hyperparameter "
            f"(terms: {sorted(strengths)}, optimizer reads: {sorted(hyper)}). Did you mean "
            f"{near[0] if near else None!r}? To sweep a learning rate, build the optimizer "
            f'with a name, e.g. fr.optim.adam(lr="lr"), and add lr=[...] to the grid; to '
            f"sweep an activity strength, declare the term: activity={{{name!r}: "
            "fr.activity.Activity(fr.L1(), '<module path>')}"
        )
    missing = [n for n in allowed if n not in grid]
    if missing:
        raise ValueError(
            f"the grid has no value for {missing}; add them, e.g. fr.grid(..., "
            f"{missing[0]}=1e-4) (a scalar is shared by all models)"
        )


def _check_prox_steps(spec: Spec, optimizer: Optimizer, grid: Mapping[str, Tensor]) -> None:
    """Every learning rate of the grid gives a defined prox step (MCP needs lr < gamma, ...)."""
    lr = optimizer.learning_rate(grid)
    values = sorted(set(lr.reshape(-1).tolist())) if isinstance(lr, Tensor) else [float(lr)]
    for term, pen in spec.nonsmooth().items():
        for v in values:
            try:
                pen.check_step(v)
            except ValueError as e:
                raise ValueError(f"sweep: term {term!r}: {e}") from None


def _check_cuda_graph(compiled: bool, dev: torch.device) -> None:
    """``plan={"cuda_graph": True}`` replays eager steps: refused with ``compile=True``,
    a no-op (said once) off CUDA."""
    if compiled:
        raise ValueError(
            'sweep: plan={"cuda_graph": True} replays the eager step from a CUDA graph; '
            "compile=True compiles it instead: use one of them."
        )
    if dev.type != "cuda":
        warnings.warn(
            f'sweep: plan={{"cuda_graph": True}} applies on CUDA devices; on {dev} the steps '
            "run eagerly.",
            stacklevel=4,
        )


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _split_model(
    model: nn.Module, dev: torch.device
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(trained, carried)`` on ``dev`` (see :func:`funcreg.stack.split_module`)."""
    params0, fixed0 = split_module(model)
    if not params0:
        raise ValueError("sweep: the model has no floating-point parameter to train")
    return {n: v.to(dev) for n, v in params0.items()}, {n: v.to(dev) for n, v in fixed0.items()}


def _initial(
    init: Any, params0: dict[str, Tensor], fixed0: dict[str, Tensor], k: int, dev: torch.device
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stacked ``(params, buffers)`` every model starts from."""
    if init is None:
        return stack(params0, k), stack(fixed0, k)
    init_p, init_b = init if isinstance(init, tuple) else (init, {})
    frozen = [n for n in init_p if n not in params0 and n in fixed0]
    if frozen:  # fr.stack_modules / fr.stack list frozen parameters with the trained ones
        init_b = {**{n: init_p[n] for n in frozen}, **init_b}
        init_p = {n: v for n, v in init_p.items() if n not in frozen}
    check_stacked(init_p, k, "init")
    check_stacked(init_b, k, "init buffers")
    if list(init_p) != list(params0):
        raise ValueError(
            f"sweep: init has params {_checks._names(init_p)}, the model trains "
            f"{_checks._names(params0)}; give exactly the model's trainable parameters"
        )
    for n, v in init_p.items():
        if tuple(v.shape[1:]) != tuple(params0[n].shape):
            raise ValueError(
                f"sweep: init[{n!r}] is {tuple(v.shape)}, expected (K={k}, "
                f"*{tuple(params0[n].shape)})"
            )
    unknown = [n for n in init_b if n not in fixed0]
    if unknown:
        raise ValueError(f"sweep: init buffers {unknown} are not buffers of the model")
    stacked_p = {n: v.detach().to(dev, params0[n].dtype).clone() for n, v in init_p.items()}
    stacked_b = stack(fixed0, k)
    for n, v in init_b.items():
        stacked_b[n] = v.detach().to(dev, fixed0[n].dtype).clone()
    return stacked_p, stacked_b


@dataclass(frozen=True)
class SweepArgs:
    """The arguments of one call of :func:`fr.sweep <funcreg._sweep.sweep>` (and of each
    shard of :func:`funcreg.distributed.sweep`: the same call with its part of the grid):
    the four positional ones, then the keyword ones with their defaults, the one list of
    them. The public signature of ``fr.sweep`` spells them out for its readers; a test keeps
    the two equal. Their meanings are documented at ``fr.sweep``."""

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    spec: Spec | Mapping[str, Penalty]
    grid: Mapping[str, Any]
    train: Any
    optimizer: Optimizer
    val: Any = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    prox: bool = True
    eval_every: int | None = None
    chunk_size: int | None = None
    compile: bool = False
    progress: bool = True
    seed: int = 0
    checkpoint: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    device: torch.device | str | None = None
    val_fn: Callable[..., Tensor] | None = None
    init: Any = None
    plan: Any = None
    activity: Any = None

    @classmethod
    def names(cls) -> list[str]:
        """Every argument's name, the positional ones first."""
        return [f.name for f in fields(cls)]

    @classmethod
    def keywords(cls) -> list[str]:
        """The keyword arguments' names (all but ``model, loss_fn, spec, grid``)."""
        return cls.names()[4:]

    def options(self) -> dict[str, Any]:
        """The keyword arguments by name: ``fr.sweep(model, loss_fn, spec, grid,
        **args.options())`` is this call."""
        return {name: getattr(self, name) for name in self.keywords()}

    @classmethod
    def of(
        cls, where: str, call: tuple[Any, Any, Any, Any], kwargs: Mapping[str, Any]
    ) -> SweepArgs:
        """``SweepArgs(*call, **kwargs)`` for ``call = (model, loss_fn, spec, grid)``,
        refusing an unknown or missing keyword with the closest one (a misspelled keyword
        must not pass unnoticed)."""
        _checks.check_keyword(where, kwargs, cls.keywords())
        for name in ("train", "optimizer"):
            if name not in kwargs:
                raise TypeError(f"{where}: missing the keyword argument {name}=")
        return cls(*call, **kwargs)


def _check_init_finite(params: Mapping[str, Tensor], stacked: bool) -> None:
    """No NaN/inf in the parameters every model starts from (``init=`` or the model's)."""
    for n, v in params.items():
        what = f"init[{n!r}] (model axis first)" if stacked else f"the model's parameter {n!r}"
        fix = "every model would diverge at once; " + (
            "fix init=" if stacked else "re-initialise the model (e.g. reset_parameters())"
        )
        _checks.check_finite("sweep", what, v, fix)


def _seeded_batch(data: Data, step: int, seed: int, dev: torch.device) -> Batch:
    """Batch ``step`` of ``data``, read as the run reads it: under the run's seed (a
    shuffling ``DataLoader`` draws its order from the global RNG), in a forked RNG. The data
    keeps it in its cache, so the run gets this very batch (a one-shot iterator is not read
    twice)."""
    devices = []
    if dev.type == "cuda":
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        return data.batch(step)


def check_first_batch(
    loss_fn: Callable[..., Tensor],
    val_fn: Callable[..., Tensor] | None,
    train: Data,
    val: Data | None,
    stacked_p: Mapping[str, Tensor],
    stacked_b: Mapping[str, Tensor],
    step: int,
    seed: int,
    dev: torch.device,
    activity: Mapping[str, Activity] | None = None,
) -> None:
    """Before any training, on the first batch the run will read (and the first validation
    batch): no NaN/inf in it, ``loss_fn``/``val_fn`` accept ``(params, *batch)``, validation
    batches hold tensors shaped like the training ones, and model 0's loss is a 0-dim tensor
    that reaches its params, as do the activations ``activity`` terms read
    (:func:`funcreg._checks.check_loss_on_batch`). One forward and
    backward of one model: the misuses that would otherwise train nothing, or fail after
    the whole training, fail here."""
    batch = _seeded_batch(train, step, seed, dev)
    train.check_batch(batch, step)
    _checks.check_loss_signature("sweep", "loss_fn", loss_fn, batch, "train")
    p0 = {n: v[0] for n, v in stacked_p.items()}
    b0 = {n: v[0] for n, v in stacked_b.items()}
    _checks.check_loss_on_batch("sweep", loss_fn, p0, b0, batch, activity)
    if val is None:
        return
    with torch.random.fork_rng(devices=[]):
        vb = next(iter(val.iter_batches()))
    val.check_batch(vb, 0)
    _checks.check_loss_signature("sweep", "loss_fn", loss_fn, vb, "val")
    if val_fn is not None:
        _checks.check_loss_signature("sweep", "val_fn", val_fn, vb, "val")
    for i, (tv, tt) in enumerate(zip(vb, batch, strict=False)):
        if tuple(tv.shape[1:]) != tuple(tt.shape[1:]) or tv.dtype != tt.dtype:
            raise ValueError(
                f"sweep: val[{i}] holds samples of shape {tuple(tv.shape[1:])} ({tv.dtype}), "
                f"train[{i}] of shape {tuple(tt.shape[1:])} ({tt.dtype}); give val= the same "
                "kind of tensors as train=, in the same order, e.g. val=(x_val, y_val)"
            )


def prepare(args: SweepArgs) -> Setup:
    """Check ``fr.sweep``'s arguments (``args``: same names and meanings) and resolve them
    into the :class:`Setup` of one run, loading the checkpoint it resumes, if any; then try
    the loss on the first batch (:func:`check_first_batch`), before any training."""
    a = args
    model, loss_fn, grid = a.model, a.loss_fn, a.grid
    train, val, optimizer, steps, epochs = a.train, a.val, a.optimizer, a.steps, a.epochs
    batch_size, prox, seed, checkpoint, val_fn, init = (
        a.batch_size, a.prox, a.seed, a.checkpoint, a.val_fn, a.init
    )  # fmt: skip
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"sweep: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"sweep: loss_fn must be callable, got {type(loss_fn).__name__}")
    if val_fn is not None and not callable(val_fn):
        raise TypeError(f"sweep: val_fn must be callable, got {type(val_fn).__name__}")
    _checks.check_optimizer("sweep", optimizer)
    seed = _checks.check_seed("sweep", seed)
    spec = as_spec(a.spec)
    _plan.check_plan(a.plan, a.chunk_size)
    activity = _check_activity(loss_fn, spec, a.activity)
    if not isinstance(grid, Mapping):
        raise TypeError(
            f"sweep: grid must be a dict of axes as from fr.grid(...), got {type(grid).__name__}"
        )
    g64 = build_grid(grid, product=False, dtype=torch.float64)
    k = next(iter(g64.values())).numel()
    _check_axes(g64, spec, optimizer, activity)
    dev = _resolve_device(model, a.device)
    if _plan.cuda_graph(a.plan):
        _check_cuda_graph(bool(a.compile), dev)
    params0, fixed0 = _split_model(model, dev)
    spec.validate(params0, g64)
    if prox:
        _check_prox_steps(spec, optimizer, g64)
    stacked_p, stacked_b = _initial(init, params0, fixed0, k, dev)

    batch_size = _checks.positive_int("batch_size", batch_size)
    train_data = make_data(train, "train", batch_size, seed, dev)
    val_data = None if val is None else make_data(val, "val", batch_size, seed, dev)
    if val_fn is not None and val_data is None:
        raise ValueError("sweep: val_fn= needs validation data (val=)")
    if (steps is None) == (epochs is None):
        raise ValueError("sweep: give exactly one of steps= or epochs=")
    if steps is None:
        steps = int(_checks.positive_int("epochs", epochs, allow_none=False) or 0) * len(train_data)
    n_steps = int(_checks.positive_int("steps", steps, allow_none=False) or 0)

    selected = spec.selected_names(params0)
    identity = sweep_identity(
        params0,
        fixed0,
        spec,
        g64,
        optimizer,
        prox,
        train=train_data,
        val=val_data,
        loss_fn=loss_fn,
        val_fn=val_fn,
        batch_size=batch_size,
        seed=seed,
        activity=activity,
    )
    ckpt = None if checkpoint is None else Path(checkpoint)
    lock = None if ckpt is None else CheckpointLock(ckpt)  # held until Setup.close()
    try:
        prev = None if ckpt is None else load_checkpoint(ckpt, identity, n_steps, model)
        if prev is not None:
            stacked_p = {n: v.to(dev) for n, v in prev.stacked.items()}
            stacked_b = {n: v.to(dev) for n, v in prev.stacked_buffers.items()}
        else:
            _check_init_finite(stacked_p if init is not None else params0, init is not None)
        if prev is None or prev.steps < n_steps:  # a finished checkpoint trains nothing
            check_first_batch(
                loss_fn, val_fn, train_data, val_data, stacked_p, stacked_b,
                0 if prev is None else prev.steps, seed, dev, activity,
            )  # fmt: skip
    except BaseException:
        if lock is not None:
            lock.release()
        raise

    return Setup(
        model=model,
        loss_fn=loss_fn,
        val_fn=val_fn,
        spec=spec,
        optimizer=optimizer,
        prox=bool(prox),
        compile=bool(a.compile),
        progress=bool(a.progress),
        seed=seed,
        grid=g64,
        k=k,
        dev=dev,
        dtype=next(iter(params0.values())).dtype,
        params0=params0,
        fixed0=fixed0,
        stacked_p=stacked_p,
        stacked_b=stacked_b,
        train=train_data,
        val=val_data,
        steps=n_steps,
        eval_every=_checks.positive_int("eval_every", a.eval_every)
        or (prev.meta.get("eval_every") if prev is not None else None)  # the run's cadence
        or max(1, n_steps // 20),
        checkpoint_every=_checks.positive_int("checkpoint_every", a.checkpoint_every)
        or max(1, n_steps // 10),
        chunk_size=_checks.positive_int("chunk_size", a.chunk_size),
        metric_names=("loss", "penalty", *spec, *activity),
        selected=selected,
        identity=identity,
        ckpt=ckpt,
        prev=prev,
        t_start=t_start,
        lock=lock,
        plan=a.plan,
        activity=activity,
    )
