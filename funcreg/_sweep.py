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
* **Checks**: before the first step, the data and init are checked for NaN/inf, and the
  loss is tried once on the first batch (:func:`funcreg._setup.check_first_batch`): its
  signature, its value (a 0-dim tensor), and that its graph reaches the params.
* **Data**: a tensor or a tuple of tensors is one dataset, minibatched by funcreg with one
  seeded permutation per epoch (:func:`~funcreg._data.batch_order`; the same batches for
  every model and reproducible from ``(seed, step)``); ``batch_size=None`` means full
  batch. Any other iterable (a list of batches, a ``DataLoader``) yields batches (a tensor
  or a tuple of tensors) and is re-iterated when exhausted.
* **Chunks**: the grid runs in chunks of at most ``chunk_size`` models per vmapped call;
  results equal the unchunked run to float rounding, and bit for bit where the chunks are
  the same (the same models in each vmapped call). A model's numbers can depend on how
  many models share its call: PyTorch's CPU kernels evaluate ``pow``/``exp``/``log``/...
  with vectorized code on the leading blocks of a tensor and with the C library on its
  last few elements (one ulp apart at times; a per-model value such as Adam's bias
  correction takes one route or the other with the chunk's size), vmapped train-mode
  BatchNorm rounds with the number of models, and a chunk of one model runs without
  ``vmap``, with plain autograd — faster. ``chunk_size=None`` chooses it: a run of at
  least 200 steps times a few steps of candidate chunk sizes on throwaway copies first and
  keeps the smallest within 5% of the fastest per model (:mod:`funcreg._plan`; cached per
  problem in the process);
  shorter runs, ``plan="static"``, ``compile=True`` and distributed shards use the static
  rule (:func:`~funcreg._chunking.auto_chunk_size`: on CPU, grids of up to 4 models and
  models with 1 MiB of parameters train one by one; on other devices the whole grid runs
  at once). The choice is made before the first real step and recorded in
  ``result.meta["plan"]``; ``plan=result.meta["plan"]`` replays it. Bit-for-bit
  comparisons between two grids need the same chunks for each model, e.g.
  ``chunk_size=1``.
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
  the same batches each pass). A checkpoint written by a different sweep (model, any spec
  field, grid, optimizer, prox, data shapes or values, batch size or seed differ) is
  refused; a different loss function is warned about (see :mod:`funcreg._checkpoint`); a
  damaged file is refused naming it; two sweeps on one path at once are refused (a lock).
  A resumed run continues from the checkpoint's weights:
  the model's current values and ``init=`` are not read then. It keeps the chunk plan and,
  unless given, the ``eval_every`` it started with.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _distributed
from ._engine import run_local
from ._setup import SweepArgs, prepare
from .activity import Activity
from .optim import Optimizer
from .penalties import Penalty
from .result import SweepResult
from .spec import Spec

__all__ = ["sweep"]


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
    plan: Any = None,
    activity: Mapping[str, Activity] | None = None,
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
        chunk_size: models per vmapped call (``None``: the plan's, see ``plan``).
        plan: how ``chunk_size=None`` is chosen: ``None`` (measure a few steps of candidate
            chunk sizes before training when the run has at least 200 steps, else the
            static rule :func:`~funcreg._chunking.auto_chunk_size`), ``"static"``,
            ``"measure"`` (always measure), or ``result.meta["plan"]`` of an earlier run
            (the same chunks, hence the same numbers). Options as a dict: ``{"max_memory":
            1.5}`` keeps the chunks within 1.5x a loop's estimated model memory (slower
            where vmap needs many models per call), ``{"mode": "measure", ...}``,
            ``{"cuda_graph": True}`` captures the eager step of each chunk shape once in a
            CUDA graph and replays it (one launch instead of hundreds; CUDA devices only, not
            with ``compile=True``; :mod:`funcreg._graphs`). See :mod:`funcreg._plan`.
        activity: activity terms whose strengths are grid axes, ``{term:
            fr.activity.Activity(penalty, module path)}``; ``loss_fn`` then returns
            ``(data loss, {module path: activation})`` and the objective gains
            ``s_t · Σ_a Ω_t(a)`` per term (:func:`funcreg.activity.penalized`). The K
            activity strengths train in one vectorized run, with no forward hooks; the
            history gains one row per activity term; validation uses the data loss.
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
    options = locals()  # the arguments, by their names in SweepArgs (one list)
    args = SweepArgs(**{name: options[name] for name in SweepArgs.names()})
    if distributed:
        if plan is not None:
            raise ValueError(
                "sweep: plan= is not supported with distributed=True (shards use the static "
                "rule); pass chunk_size= instead"
            )
        return _distributed.sweep(model, loss_fn, spec, grid, **args.options())
    with contextlib.closing(prepare(args)) as setup:
        return run_local(setup)
