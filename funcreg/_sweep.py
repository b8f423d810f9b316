"""fr.sweep: train K strengths (and learning rates) at once, in one vmapped run.

    grid = fr.grid(l1=torch.logspace(-5, -1, 64), l2=1e-4)
    result = fr.sweep(net, loss, spec, grid, train=(x, y), val=(xv, yv),
                      optimizer=fr.optim.adam(1e-3), steps=500, batch_size=256)
    print(result); net_best = result.module(result.best())

Model ``k`` trains with the strengths and hyperparameters ``{axis: grid[axis][k]}`` using
:func:`funcreg.train.train_step` (the same pure step a single-model loop would use), all K
models from the same init (or ``init=``), on the same minibatches.

How it runs
-----------
* **Vectorized**: the per-model step is ``vmap``-ed over stacked params, optimizer state,
  buffers and strengths (``randomness="different"``: every model gets its own dropout
  masks). Nothing in a step reduces over models, so each model's numbers do not depend on
  the others.
* **Buffers**: the dict handed to ``loss_fn`` holds the model's buffers beside the params,
  stacked per model, so ``functional_call(model, params, x)`` works unchanged and
  BatchNorm running stats update per model. Only floating-point parameters with
  ``requires_grad=True`` are trained and penalised; frozen parameters travel with the
  buffers. Training uses the module's current train/eval mode; validation runs in
  ``eval()`` mode (the flags are restored afterwards).
* **Data**: a tensor or a tuple of tensors is one dataset, minibatched by funcreg with one
  seeded permutation per epoch (:func:`~funcreg._data.batch_order`; the same batches for
  every model and reproducible from ``(seed, step)``); ``batch_size=None`` means full
  batch. Any other iterable (a list of batches, a ``DataLoader``) yields batches (a tensor
  or a tuple of tensors) and is re-iterated when exhausted.
* **Chunks**: the grid runs in chunks of at most ``chunk_size`` models per vmapped call;
  results equal the unchunked run (bit for bit for plain MLPs whenever every chunk holds
  >= 2 models, as far as we measured; vmapped train-mode BatchNorm rounds differently with
  the number of models in a call, and a chunk of one model runs without ``vmap``, with
  plain autograd — faster — both agreeing to float rounding). ``chunk_size=None``
  chooses it on CPU (see :func:`auto_chunk_size`; without ``compile=True`` a grid of up to
  4 models trains one by one); on other devices the whole grid runs at once. Bit-for-bit
  comparisons between two grids need the same kind of chunk for each model: pass
  ``chunk_size=1``, or a size that leaves no single-model chunk in either grid.
* **Divergence**: after every step, a model whose loss, penalty or parameters are
  non-finite is frozen at its last finite parameters (``torch.where`` per model) and
  reported in ``result.diverged`` / ``result.diverged_at``; its history rows become NaN.
  The other models are untouched. While every model of a chunk is finite (one largest
  magnitude over the chunk, read on the host each step) the step is taken as it is; the
  per-model ``torch.where`` runs only from the first non-finite step on.
* **Compile**: ``compile=True`` wraps the whole chunk step (vmap, step, divergence guard)
  in ``torch.compile(fullgraph=True)``; hyperparameters are tensors, so one graph serves
  every strength (expect 10-80 s of compile time on CPU). On a GPU, where eager steps are
  bound by kernel launches, it is the fast path: on an H200 at K = 64 the eager sweep had
  17x the throughput of a loop of K models, the compiled one 69x (benchmarks/README.md).
* **Checkpoints**: with ``checkpoint=path`` the sweep saves its state every
  ``checkpoint_every`` steps and at the end (atomically). Calling ``sweep`` again with the
  same path resumes, also with a larger ``steps``/``epochs``, and ends with the same numbers
  as an uninterrupted run (given deterministic data: tensors, or an iterable that yields
  the same batches each pass). A checkpoint written by a different sweep (model, spec
  including its ``toward=``/``weight=`` tensors, grid, optimizer, prox, data shapes, batch
  size or seed differ) is refused. A resumed run continues from the checkpoint's weights:
  the model's current values and ``init=`` are not read then. It keeps the chunk plan and,
  unless given, the ``eval_every`` it started with.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import _checks, _flat
from ._checkpoint import load_checkpoint, save_checkpoint, sweep_identity
from ._chunking import Chunk, auto_chunk_size, plan_chunks, unsplit
from ._data import Batch, Data, make_data
from .optim import Optimizer
from .penalties import Penalty
from .progress import Progress
from .result import SweepResult
from .spec import Spec, as_spec
from .stack import build_grid, check_stacked, split_module, stack
from .train import train_step

__all__ = ["eager_step", "sweep"]

# K of the whole grid while this process sweeps one shard of it (funcreg.distributed), so
# that the shard decides "vmap or one by one" as the one-process sweep of the grid would
WHOLE_GRID_K: ContextVar[int | None] = ContextVar("WHOLE_GRID_K", default=None)


# ------------------------------------------------------------------------ validation


def _positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_axes(grid: Mapping[str, Tensor], spec: Spec, optimizer: Optimizer) -> None:
    strengths = set(spec.strength_names)
    hyper = set(optimizer.hyperparams)
    allowed = [*spec.strength_names, *sorted(hyper)]
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
            f'with a name, e.g. fr.optim.adam(lr="lr"), and add lr=[...] to the grid'
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


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _seed(seed: int, device: torch.device) -> None:
    """Seed the CPU generator, and a CUDA ``device``'s (its index resolved, see
    :func:`_rng_devices`): the generators ``fork_rng`` restores after the sweep.
    ``torch.manual_seed`` would also reseed every other GPU without restoring it, and costs
    ~0.1 ms per call on a CPU-only build. Other device types keep ``torch.manual_seed``."""
    if device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    for index in _rng_devices(device):
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA device indices ``fork_rng`` saves for a sweep on ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# ---------------------------------------------------------------------- guard helpers


def _keep_view(keep: Tensor, t: Tensor, batched: bool) -> Tensor:
    return keep.view(-1, *([1] * (t.ndim - 1))) if batched else keep.view(())


def _merge(keep: Tensor, new: Any, old: Any, batched: bool) -> Any:
    return tree_map(lambda n, o: torch.where(_keep_view(keep, n, batched), n, o), new, old)


def _finite(mvec: Tensor, params: Mapping[str, Tensor], batched: bool) -> Tensor:
    """Per-model ``(C,)`` bool: the largest magnitude over the model's metrics and params is
    finite (an inf-norm per tensor: it cannot overflow, and a NaN propagates)."""

    def largest(t: Tensor) -> Tensor:
        return _flat.largest_abs(t.reshape(t.shape[0], -1), 1) if batched else _flat.largest_abs(t)

    m = largest(mvec)
    for p in params.values():
        if p.numel():
            m = torch.maximum(m, largest(p))
    return torch.isfinite(m).reshape(-1)


def _all_finite(mvec: Tensor, params: Mapping[str, Tensor]) -> bool:
    """``bool(_finite(...).all())`` for the whole chunk at once: the largest magnitude over
    every tensor (:func:`funcreg._flat.max_abs`), read on the host."""
    return math.isfinite(_flat.max_abs([mvec, *params.values()]))


def _mask(keep: Tensor, mvec: Tensor, batched: bool) -> Tensor:
    return torch.where(_keep_view(keep, mvec, batched), mvec, torch.nan)


# ------------------------------------------------------------- single-model eager step


def eager_step(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    optimizer: Optimizer,
    prox: bool = True,
) -> Callable[..., tuple[dict[str, Tensor], Any, dict[str, Tensor]]]:
    """:func:`funcreg.train.train_step` for one unbatched model with ``autograd=True``:
    same signature, the same numbers up to rounding, less per-step overhead on CPU.
    ``fr.sweep`` runs chunks of one model with it."""
    return train_step(loss_fn, spec, optimizer, prox, autograd=True)


# --------------------------------------------------------------------------- the setup


@dataclass
class _Setup:
    """Everything ``sweep`` validated and resolved before training starts."""

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


# ------------------------------------------------------------------------------ sweep


def sweep(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    grid: Mapping[str, Any],
    *,
    train: Any,
    val: Any = None,
    optimizer: Optimizer,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    prox: bool = True,
    eval_every: int | None = None,
    chunk_size: int | None = None,
    compile: bool = False,
    progress: bool = True,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    device: torch.device | str | None = None,
    val_fn: Callable[..., Tensor] | None = None,
    init: Any = None,
    distributed: bool = False,
) -> SweepResult:
    """Train one model per grid point, all at once; see the module docstring for how.

    Args:
        model: the architecture; its current weights are every model's init (unless
            ``init=``) and its buffers are stacked per model. Not modified.
        loss_fn: ``loss_fn(params, *batch) -> 0-dim tensor``; ``params`` holds the
            parameters and buffers, so ``functional_call(model, params, (x,))`` works.
        spec: the penalty terms (``fr.Spec`` or a dict of penalties).
        grid: ``{axis: (K,) values}``, e.g. ``fr.grid(...)``; a plain dict is zipped
            (scalars broadcast). Axes name spec terms or optimizer hyperparameters, and
            every spec term needing a strength and every hyperparameter the optimizer
            reads by name must have an axis.
        train, val: a tensor, a tuple of tensors, or an iterable of batches.
        optimizer: a functional optimizer, e.g. ``fr.optim.adam(lr="lr")``.
        steps, epochs: training length (exactly one; ``epochs`` needs sized data).
        batch_size: minibatch size for tensor data (``None``: full batch); validation
            tensors are evaluated in batches of the same size.
        prox: non-smooth terms by their prox (exact zeros) or by subgradient (``False``).
        eval_every: evaluate (validation loss/metric, exact-zero fractions) every this many
            steps and at the end (default: 20 evaluations per run; a resumed run keeps the
            cadence it started with).
        chunk_size: models per vmapped call (``None``: :func:`auto_chunk_size`).
        compile: ``torch.compile(fullgraph=True)`` the chunk step.
        progress: a tqdm bar (plain lines without tqdm); ``False`` for silence.
        seed: seeds the batch order and the RNG (dropout) of the run; the global RNG
            state is restored afterwards.
        checkpoint, checkpoint_every: save/resume path, and how often to save (default:
            10 times per run, and always at the end).
        device: where to train (default: the model's device).
        val_fn: an extra validation metric ``val_fn(params, *batch) -> 0-dim tensor``,
            recorded as ``history["val_metric"]``.
        init: stacked initial params ``{name: (K, *shape)}`` or ``(params, buffers)`` as
            from ``fr.stack_modules(models)`` (different inits).
        distributed: shard the grid over the ranks of ``torch.distributed`` (initialised
            from ``torchrun``'s environment when needed) and gather one result on every
            rank: the same call as :func:`funcreg.distributed.sweep`.

    Returns:
        A :class:`~funcreg.result.SweepResult`.
    """
    if distributed:
        from .distributed import sweep as distributed_sweep

        return distributed_sweep(
            model,
            loss_fn,
            spec,
            grid,
            train=train,
            val=val,
            optimizer=optimizer,
            steps=steps,
            epochs=epochs,
            batch_size=batch_size,
            prox=prox,
            eval_every=eval_every,
            chunk_size=chunk_size,
            compile=compile,
            progress=progress,
            seed=seed,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            device=device,
            val_fn=val_fn,
            init=init,
        )
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"sweep: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"sweep: loss_fn must be callable, got {type(loss_fn).__name__}")
    if val_fn is not None and not callable(val_fn):
        raise TypeError(f"sweep: val_fn must be callable, got {type(val_fn).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            "sweep: optimizer must be a functional optimizer such as fr.optim.adam(1e-3), "
            f"got {type(optimizer).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"sweep: seed must be an int >= 0, got {seed!r}")
    seed = int(seed)
    spec = as_spec(spec)
    if not isinstance(grid, Mapping):
        raise TypeError(
            f"sweep: grid must be a dict of axes as from fr.grid(...), got {type(grid).__name__}"
        )
    g64 = build_grid(grid, product=False, dtype=torch.float64)
    k = next(iter(g64.values())).numel()
    _check_axes(g64, spec, optimizer)
    dev = _resolve_device(model, device)
    params0, fixed0 = _split_model(model, dev)
    spec.validate(params0, g64)
    if prox:
        _check_prox_steps(spec, optimizer, g64)
    stacked_p, stacked_b = _initial(init, params0, fixed0, k, dev)

    batch_size = _positive_int("batch_size", batch_size)
    train_data = make_data(train, "train", batch_size, seed, dev)
    val_data = None if val is None else make_data(val, "val", batch_size, seed, dev)
    if val_fn is not None and val_data is None:
        raise ValueError("sweep: val_fn= needs validation data (val=)")
    if (steps is None) == (epochs is None):
        raise ValueError("sweep: give exactly one of steps= or epochs=")
    if steps is None:
        steps = int(_positive_int("epochs", epochs, allow_none=False) or 0) * len(train_data)
    n_steps = int(_positive_int("steps", steps, allow_none=False) or 0)

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
        has_val_fn=val_fn is not None,
        batch_size=batch_size,
        seed=seed,
    )
    ckpt = None if checkpoint is None else Path(checkpoint)
    prev = None if ckpt is None else load_checkpoint(ckpt, identity, n_steps, model)
    if prev is not None:
        stacked_p = {n: v.to(dev) for n, v in prev.stacked.items()}
        stacked_b = {n: v.to(dev) for n, v in prev.stacked_buffers.items()}

    setup = _Setup(
        model=model,
        loss_fn=loss_fn,
        val_fn=val_fn,
        spec=spec,
        optimizer=optimizer,
        prox=bool(prox),
        compile=bool(compile),
        progress=bool(progress),
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
        eval_every=_positive_int("eval_every", eval_every)
        or (prev.meta.get("eval_every") if prev is not None else None)  # the run's cadence
        or max(1, n_steps // 20),
        checkpoint_every=_positive_int("checkpoint_every", checkpoint_every)
        or max(1, n_steps // 10),
        chunk_size=_positive_int("chunk_size", chunk_size),
        metric_names=("loss", "penalty", *spec),
        selected=selected,
        identity=identity,
        ckpt=ckpt,
        prev=prev,
        t_start=t_start,
    )
    return _Run(setup).run()


# ---------------------------------------------------------------------------- the run

_COMPILED: OrderedDict[tuple[Any, ...], tuple[Callable[..., Any], tuple[Any, ...]]] = OrderedDict()
_COMPILED_MAX = 8


class _Run:
    """One sweep's training loop over chunks of models."""

    def __init__(self, s: _Setup) -> None:
        self.s = s
        loss_fn, val_fn, dtype, names = s.loss_fn, s.val_fn, s.dtype, s.metric_names

        def wrapped(p: dict[str, Tensor], bufs: dict[str, Tensor], *batch: Tensor) -> Tensor:
            return loss_fn({**p, **bufs}, *batch)  # a new dict: the loss may change it

        def with_metric_vector(step: Callable[..., Any]) -> Callable[..., Any]:
            def one(
                p: dict[str, Tensor], st: Any, bufs: dict[str, Tensor], hp: Any, b: Batch
            ) -> tuple[dict[str, Tensor], Any, Tensor]:
                new_p, new_s, metrics = step(p, st, hp, bufs, *b)
                return new_p, new_s, torch.stack([metrics[m].to(dtype) for m in names])

            return one

        one = with_metric_vector(train_step(wrapped, s.spec, s.optimizer, prox=s.prox))
        one_eager = with_metric_vector(eager_step(wrapped, s.spec, s.optimizer, prox=s.prox))

        def one_val(p: dict[str, Tensor], bufs: dict[str, Tensor], b: Batch) -> Tensor:
            full = {**p, **bufs}
            vals = [loss_fn(full, *b).to(dtype)]
            if val_fn is not None:
                vals.append(torch.as_tensor(val_fn(full, *b)).to(dtype))
            return torch.stack(vals)

        self.wrapped = wrapped
        self.fns: dict[bool, Callable[..., Any]] = {
            True: vmap(one, in_dims=(0, 0, 0, 0, None), randomness="different"),
            False: one if s.compile else one_eager,
        }
        self.val_fns: dict[bool, Callable[..., Any]] = {
            True: vmap(one_val, in_dims=(0, 0, None), randomness="different"),
            False: one_val,
        }
        self.compiled: dict[bool, Callable[..., Any]] = {}
        self.chunks: list[Chunk] = []
        self.plan: list[tuple[int, int]] = []
        self.modes = {m: m.training for m in s.model.modules()}

    # -- pieces ---------------------------------------------------------------------------
    def _guarded(self, batched: bool) -> Callable[..., Any]:
        """The compiled chunk step: vmapped step + divergence guard in one graph. Cached
        per (loss_fn, spec, optimizer, prox, dtype) object identities, so calling ``sweep``
        again with the same objects reuses the compiled graphs."""
        s = self.s
        key = (id(s.loss_fn), id(s.spec), id(s.optimizer), s.prox, s.dtype, batched)
        hit = _COMPILED.get(key)
        if hit is not None:
            _COMPILED.move_to_end(key)
            return hit[0]
        fn = self.fns[batched]

        def run(p: Any, st: Any, bufs: Any, hp: Any, alive: Tensor, b: Batch) -> Any:
            old_b = {n: v.clone() for n, v in bufs.items()}
            new_p, new_s, mvec = fn(p, st, bufs, hp, b)
            keep = alive & _finite(mvec, new_p, batched)
            return (
                _merge(keep, new_p, p, batched),
                _merge(keep, new_s, st, batched),
                _merge(keep, bufs, old_b, batched),
                _mask(keep, mvec, batched),
                keep,
            )

        compiled = torch.compile(run, fullgraph=True)
        # the entry keeps its key objects alive, so their ids cannot be reused meanwhile
        _COMPILED[key] = (compiled, (s.loss_fn, s.spec, s.optimizer))
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
        return compiled

    def _history(self) -> None:
        s, prev, k = self.s, self.s.prev, self.s.k
        start = 0 if prev is None else prev.steps
        n_prev = 0 if prev is None else int(prev.history["eval_step"].numel())
        self.eval_at = {
            t for t in range(start + 1, s.steps + 1) if t % s.eval_every == 0 or t == s.steps
        }
        n_eval = n_prev + len(self.eval_at)
        n_val = 0 if s.val is None else (2 if s.val_fn is not None else 1)
        nan = math.nan
        self.hist = torch.full((s.steps, k, len(s.metric_names)), nan, dtype=s.dtype, device=s.dev)
        self.eval_steps = torch.zeros(n_eval, dtype=torch.int64)
        self.val_hist = torch.full((n_eval, k, n_val), nan, dtype=s.dtype, device=s.dev)
        self.zeros = {n: torch.zeros(n_eval, k, device=s.dev) for n in s.selected}
        self.e_index = n_prev
        self.start = start
        if prev is None:
            return
        h = prev.history
        for j, m in enumerate(s.metric_names):
            self.hist[:start, :, j] = h[m].to(s.dev, s.dtype)
        self.eval_steps[:n_prev] = h["eval_step"]
        for j, m in enumerate(("val_loss", "val_metric")[:n_val]):
            self.val_hist[:n_prev, :, j] = h[m].to(s.dev, s.dtype)
        for n in s.selected:
            self.zeros[n][:n_prev] = h["zeros"][n].to(s.dev)

    def _make_chunks(self) -> None:
        s, prev = self.s, self.s.prev
        alive = torch.ones(s.k, dtype=torch.bool, device=s.dev)
        div_at = torch.full((s.k,), -1, dtype=torch.int64, device=s.dev)
        if prev is not None:
            alive, div_at = ~prev.diverged.to(s.dev), prev.diverged_at.to(s.dev)
        hp_all = {n: v.to(s.dev, s.dtype) for n, v in s.grid.items()}
        for a, b in self.plan:
            batched = b - a > 1
            ch = Chunk(
                a,
                b,
                batched,
                {},
                None,
                {},
                {},
                alive[a:b].clone(),
                div_at[a:b].clone(),
                self.hist[:, a:b] if batched else self.hist[:, a],
            )
            ch.params = {n: ch.take(v) for n, v in s.stacked_p.items()}
            ch.bufs = {n: ch.take(v) for n, v in s.stacked_b.items()}
            ch.strengths = {n: v[a:b] if batched else v[a] for n, v in hp_all.items()}
            init = vmap(s.optimizer.init) if batched else s.optimizer.init
            ch.state = tree_map(Tensor.contiguous, init(ch.params))  # no 0-stride leaves
            ch.healthy = bool(ch.alive.all())
            if prev is not None and prev.resume is not None:
                saved = prev.resume["opt_state"]
                leaves, tspec = tree_flatten(ch.state)
                if len(leaves) != len(saved):
                    raise ValueError(
                        f"checkpoint {os.fspath(s.ckpt or '')!r}: the optimizer state has "
                        f"{len(saved)} tensors, this optimizer has {len(leaves)}"
                    )
                restored = [
                    ch.take(v.to(s.dev)).to(o.dtype) for v, o in zip(saved, leaves, strict=True)
                ]
                ch.state = tree_unflatten(restored, tspec)
            self.chunks.append(ch)

    def _train_step(self, t: int, batch: Batch) -> None:
        for ch in self.chunks:
            if self.s.compile:
                if ch.batched not in self.compiled:
                    self.compiled[ch.batched] = self._guarded(ch.batched)
                ch.params, ch.state, ch.bufs, mvec, keep = self.compiled[ch.batched](
                    ch.params, ch.state, ch.bufs, ch.strengths, ch.alive, batch
                )
                ch.diverged_at = torch.where(ch.alive & ~keep, t, ch.diverged_at)
                ch.alive = keep
            else:
                old_b = {n: v.clone() for n, v in ch.bufs.items()}  # BatchNorm updates in place
                new_p, new_s, mvec = self.fns[ch.batched](
                    ch.params, ch.state, ch.bufs, ch.strengths, batch
                )
                if ch.healthy and _all_finite(mvec, new_p):  # nothing to undo
                    ch.params, ch.state = new_p, new_s
                else:
                    ok = _finite(mvec, new_p, ch.batched)
                    keep = ch.alive & ok
                    ch.params = _merge(keep, new_p, ch.params, ch.batched)
                    ch.state = _merge(keep, new_s, ch.state, ch.batched)
                    ch.bufs = _merge(keep, ch.bufs, old_b, ch.batched)
                    mvec = _mask(keep, mvec, ch.batched)
                    ch.diverged_at = torch.where(ch.alive & ~keep, t, ch.diverged_at)
                    ch.alive = keep
                    ch.healthy = False
            ch.hist[t].copy_(mvec)

    @torch.no_grad()
    def _evaluate(self, done: int) -> float | None:
        """Record validation values and exact-zero fractions; the best val loss now."""
        s, e = self.s, self.e_index
        self.eval_steps[e] = done
        best: float | None = None
        if s.val is not None:
            s.model.eval()
            try:  # each validation batch is read once, then used by every chunk
                acc: list[Tensor | float] = [0.0] * len(self.chunks)
                weight = 0
                for b in s.val.iter_batches():
                    w = int(b[0].shape[0]) if b[0].ndim else 1
                    for j, ch in enumerate(self.chunks):
                        acc[j] = acc[j] + self.val_fns[ch.batched](ch.params, ch.bufs, b) * w
                    weight += w
                for ch, total in zip(self.chunks, acc, strict=True):
                    row = _mask(ch.alive, torch.as_tensor(total) / weight, ch.batched)
                    self.val_hist[e, ch.start : ch.stop] = row.view(ch.stop - ch.start, -1)
            finally:
                self._restore_modes()
            v = self.val_hist[e, :, 0]
            best = float(torch.where(torch.isnan(v), math.inf, v).min())
        for n in s.selected:
            for ch in self.chunks:
                p = ch.params[n].reshape(ch.stop - ch.start, -1)
                self.zeros[n][e, ch.start : ch.stop] = (p == 0).float().mean(1)
        self.e_index += 1
        return best

    def _restore_modes(self) -> None:
        for m, flag in self.modes.items():
            m.training = flag

    def _snapshot(self, done: int) -> SweepResult:
        s, e, names = self.s, self.e_index, self.s.metric_names
        chunks = self.chunks
        history: dict[str, Any] = {m: self.hist[:done, :, j].clone() for j, m in enumerate(names)}
        history["eval_step"] = self.eval_steps[:e].clone()
        if s.val is not None:
            history["val_loss"] = self.val_hist[:e, :, 0].clone()
            if s.val_fn is not None:
                history["val_metric"] = self.val_hist[:e, :, 1].clone()
        history["zeros"] = {n: z[:e].clone() for n, z in self.zeros.items()}
        before = 0.0 if s.prev is None else float(s.prev.meta.get("elapsed_s", 0.0))
        meta = {
            "identity": s.identity,
            "metrics": list(names),
            "selected": list(s.selected),
            "eval_every": s.eval_every,
            "chunks": [[a, b] for a, b in self.plan],
            "compile": s.compile,
            "device": str(s.dev),
            "elapsed_s": before + time.perf_counter() - s.t_start,
        }
        resume = {
            "opt_state": tree_flatten(unsplit(chunks, lambda ch: ch.state))[0],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(s.dev) if s.dev.type == "cuda" else None,
        }
        return SweepResult(
            grid={n: v.clone() for n, v in s.grid.items()},
            stacked=unsplit(chunks, lambda ch: ch.params),
            stacked_buffers=unsplit(chunks, lambda ch: ch.bufs) if s.fixed0 else {},
            history=history,
            diverged=~torch.cat([ch.alive for ch in chunks]),
            diverged_at=torch.cat([ch.diverged_at for ch in chunks]),
            steps=done,
            meta=meta,
            resume=resume,
            model=s.model,
        )

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> SweepResult:
        s = self.s
        self._history()
        with contextlib.ExitStack() as stack_:
            stack_.enter_context(torch.random.fork_rng(devices=_rng_devices(s.dev)))
            _seed(s.seed, s.dev)  # also seeds a shuffling DataLoader's first pass
            first = s.train.batch(self.start)
            size = s.chunk_size
            resumed = {} if s.prev is None else s.prev.meta
            # a merged distributed result records its shards' plans: re-plan for one process
            planned = None if "distributed" in resumed else resumed.get("chunks")
            if size is None and planned:  # a resumed run keeps the plan it started with
                self.plan = [(int(a), int(b)) for a, b in planned]
            else:
                if size is None:  # the probe forward may draw random numbers: reseed after
                    b0 = {n: v[0].clone() for n, v in s.stacked_b.items()}
                    p0 = {n: v[0] for n, v in s.stacked_p.items()}
                    size = auto_chunk_size(
                        lambda: self.wrapped(p0, b0, *first),
                        s.k,
                        s.dev,
                        whole_k=WHOLE_GRID_K.get(),
                        compiled=s.compile,
                    )
                self.plan = plan_chunks(s.k, size)
            if s.prev is not None and s.prev.resume is not None:
                torch.set_rng_state(s.prev.resume["rng"])
                if s.dev.type == "cuda" and s.prev.resume.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(s.prev.resume["cuda_rng"], s.dev)
            else:
                _seed(s.seed, s.dev)
            self._make_chunks()

            bar = stack_.enter_context(Progress(s.steps, self.start, enabled=s.progress))
            best_so_far = math.inf
            for t in range(self.start, s.steps):
                self._train_step(t, s.train.batch(t))
                bar.update(1)
                done = t + 1
                if done in self.eval_at:
                    best = self._evaluate(done)
                    if best is not None:
                        best_so_far = min(best_so_far, best)
                    n_div = sum(int((~ch.alive).sum()) for ch in self.chunks)
                    bar.status(best_so_far if s.val is not None else None, n_div, s.k)
                if s.ckpt is not None and (done % s.checkpoint_every == 0 or done == s.steps):
                    save_checkpoint(self._snapshot(done), s.ckpt)
            result = self._snapshot(s.steps)
        self._restore_modes()
        return result
