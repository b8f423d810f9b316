"""Sharding a sweep's grid over ``torch.distributed`` ranks.

The same call as :func:`fr.sweep <funcreg._sweep.sweep>`, launched with ``torchrun``, splits
the grid over the processes and hands back one result::

    # torchrun --standalone --nproc_per_node=2 examples/distributed_sweep.py
    import funcreg.distributed as frd
    result = frd.sweep(net, loss, spec, grid, train=(x, y), val=(xv, yv),
                       optimizer=fr.optim.adam(1e-3), steps=500, checkpoint="sweep.pt")
    # every rank now holds the SweepResult of all K models (gather_to=0: rank 0 only)

How it runs
-----------
* **Process group**: used as is when already initialised; otherwise, under ``torchrun``
  (its ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment variables), initialised with the
  ``nccl`` backend when CUDA is available and ``gloo`` otherwise (see :func:`init_from_env`).
  Without either, ``sweep`` is plain :func:`funcreg._sweep.sweep` in one process.
* **Device**: ``cuda:LOCAL_RANK`` when the backend is NCCL, else the model's device
  (``device=`` overrides).
* **Shards**: rank ``r`` trains the contiguous models ``shard_bounds(K, W, r)`` (sizes
  differ by at most one, no padding models) as the one-process sweep would train that
  slice of the grid (and of ``init=``): the same checks (:func:`funcreg._setup.prepare`)
  and engine (:func:`funcreg._engine.run_local`), given the whole grid's K
  (``whole_k=K``) to decide whether small chunks run vmapped (eager steps on CPU: grids
  of up to 4 models train one by one, in the shards as in one process). A shard of a
  single model trains beside a copy of itself, which is dropped, so that it runs vmapped
  like the others where the one-process sweep vmaps (see "Exactness"; where the grid
  trains one by one the copy is idle work).
* **Gather**: every rank packs its shard's tensors (parameters, buffers, history,
  divergence, optimizer state) into one fixed-size byte tensor, padded to the largest
  shard, and one ``all_gather`` (``gather`` for ``gather_to=0``) moves them; the merged
  :class:`~funcreg.result.SweepResult` is the shards concatenated along the model axis,
  with the identity of the whole sweep, so a merged result saved to a file can also resume
  as a single-process checkpoint. No ``*_object`` collective is used.
* **Checkpoints**: ``checkpoint="ckpt.pt"`` becomes ``ckpt.rank{r}-of-{W}.pt`` on rank
  ``r``; launching the same job again (same ``W``) resumes every shard.
* **Failures**: each rank's sweep runs inside ``try``; the ranks then exchange a status
  tensor (a flag and the error text), so when one rank raises, every rank raises: that rank
  its own exception, the others :class:`DistributedSweepError` naming the rank, its models
  and its error. The failing rank waits for the others to finish their shards (at most
  ``timeout``) before raising, so that every finished shard is checkpointed and the error
  reaches every rank's log; a launcher that stops all workers when one exits (``torchrun``)
  then ends the job. A rank that dies outright (killed, segfault) closes its connections:
  the others fail as soon as they reach the exchange; a rank that hangs is waited for at
  most ``timeout`` (default :data:`DEFAULT_TIMEOUT`, 10 minutes: shards differ by at most
  one model, so healthy ranks arrive close together). Either way the error names the rank
  (each rank counts its arrivals in the rendezvous store), and the exchange runs on its own
  process group whose collectives time out by themselves, so nothing is left in flight and
  the healthy processes exit normally.

Exactness
---------
Every step of a shard is the one-process sweep's per-model computation on the same
minibatches (the order is seeded by ``(seed, epoch)``, identical on every rank), so the
merged result (parameters, buffers, history, optimizer state) equals the one-process
sweep of the whole grid with the same seed:

* **bit for bit, by construction, when every chunk of the sharded run is a chunk of the
  one-process run** (the same models in one vmapped call, or the same model alone): the
  same operations then run on tensors of the same shapes. This holds with
  ``chunk_size=1``, for a CPU grid of up to 4 models without ``compile`` (one by one in
  the shards too), and for an explicit ``chunk_size`` whose one-process chunks fall on the
  shard bounds (e.g. ``W`` divides ``K`` and ``chunk_size`` divides ``K // W``);
* **to float rounding otherwise**: a vmapped model's numbers can depend on how many
  models share its call. PyTorch's CPU kernels evaluate ``pow``, ``exp``, ``log``,
  ``tanh``, ... with vectorized (SLEEF) code on the leading blocks of a tensor and with
  the C library on its last few elements, and the two can differ in the last bit. A
  per-model value such as Adam's bias correction ``β2**t`` (one element per model of the
  chunk) takes one route or the other depending on the chunk's size and the model's
  place in it, so at some steps it differs by one ulp (with AVX2 kernels, float32
  ``0.999**168``), and the difference grows over training like any rounding difference.
  Measured with ``examples/distributed_sweep.py --check`` (K=16 over 2 processes,
  float32, 300 Adam steps): max |Δparam| 3.6e-7 with ``ATEN_CPU_CAPABILITY=avx2``, 0 with
  AVX-512 kernels (chunks of 16 and 8 both take the scalar route there). A chunk of one
  model (no ``vmap``, plain autograd) against a vmapped chunk, and train-mode BatchNorm
  (vmapped ``batch_norm`` rounds with the number of models and threads), differ at the
  same level; a bias right before a BatchNorm has zero gradient and, under Adam, follows
  that rounding noise;
* **not at all** with randomness inside the model (dropout): under
  ``vmap(randomness="different")`` a model's masks depend on the number of models batched
  with it and on the draws of the chunks before it, so dropout models differ between
  shardings (each is still a valid run, reproducible for a given world size);
* on **different hardware or kernels** on the ranks than in the reference run (GPU
  models, library versions), cuBLAS/cuDNN may pick different kernels for different batch
  sizes: compare on the same setup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._engine import run_local
from ._setup import SweepArgs, prepare
from .penalties import Penalty
from .result import SweepResult
from .spec import Spec
from .stack import build_grid, check_stacked

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedSweepError",
    "checkpoint_path",
    "init_from_env",
    "shard_bounds",
    "sweep",
]

MESSAGE_BYTES = 4096  # room for a failing rank's error text in the status exchange
_ALIGN = 16  # bytes; each packed leaf starts at a multiple of this
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSweepError(RuntimeError):
    """Raised on the healthy ranks when another rank's shard failed."""


# ---------------------------------------------------------------------- pure helpers


def shard_bounds(k: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)``: the contiguous models of a K-model grid that ``rank`` trains.

    Balanced: the first ``K % world_size`` ranks get one model more, so shard sizes differ
    by at most one, e.g. K=5 over 2 ranks -> ``(0, 3)``, ``(3, 5)``. Needs ``K >= world_size``.
    """
    for name, v in (("K", k), ("world_size", world_size), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"shard_bounds: {name} must be an int, got {v!r}")
    if world_size < 1:
        raise ValueError(f"shard_bounds: world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_bounds: rank must be in [0, {world_size}), got {rank}")
    if k < world_size:
        raise ValueError(
            f"the grid has K={k} models for {world_size} processes, so some would have "
            f"nothing to train: launch at most {k} processes (--nproc_per_node) or grow the grid"
        )
    base, extra = divmod(k, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def checkpoint_path(path: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    """Rank ``rank``'s checkpoint file: ``ckpt.pt`` -> ``ckpt.rank{rank}-of-{world_size}.pt``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}-of-{world_size}{p.suffix}")


DEFAULT_TIMEOUT = timedelta(minutes=10)  # sweep's timeout= when none is given (module doc)


def _timedelta(timeout: float | timedelta | None) -> timedelta | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ValueError(f"timeout must be seconds > 0 or a timedelta, got {timeout!r}")
    return timedelta(seconds=float(seconds))


# ------------------------------------------------------------------ process group


def _under_launcher() -> bool:
    return all(v in os.environ for v in _ENV)


def init_from_env(timeout: float | timedelta | None = None) -> torch.device:
    """Initialise the default process group from ``torchrun``'s environment variables
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) unless it is
    initialised already, and return this rank's device.

    Backend ``nccl`` and device ``cuda:LOCAL_RANK`` when CUDA is available, else ``gloo``
    and the CPU. ``timeout`` (seconds or a ``timedelta``; default: torch's) bounds how long
    a collective waits for the other ranks.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return _default_device()
    missing = [v for v in _ENV if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"cannot initialise torch.distributed: environment variables {missing} are not "
            "set. Launch with torchrun, e.g. `torchrun --standalone --nproc_per_node=2 "
            "script.py`, or call torch.distributed.init_process_group yourself"
        )
    td = _timedelta(timeout)
    kwargs: dict[str, Any] = {} if td is None else {"timeout": td}
    if torch.cuda.is_available():
        dev = torch.device("cuda", _local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", **kwargs)
        return dev
    dist.init_process_group("gloo", **kwargs)
    return torch.device("cpu")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))


def _uses_nccl() -> bool:
    return "nccl" in str(dist.get_backend()).lower()


def _default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under NCCL, the CPU otherwise."""
    if _uses_nccl() and torch.cuda.is_available():
        return torch.device("cuda", _local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


# ------------------------------------------------------------------------ packing


def _model_dim(top: str, t: Tensor) -> int | None:
    """The model axis of a leaf of the packed result (``None``: not per model)."""
    if top in ("stacked", "stacked_buffers", "diverged", "diverged_at", "opt_state"):
        return 0
    if top == "history":  # (steps or evaluations, K); 1-d entries (eval_step) are shared
        return 1 if t.ndim >= 2 else None
    return None


def _flatten(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Tensor]]:
    if isinstance(tree, Tensor):
        return [(path, tree)]
    if isinstance(tree, Mapping):
        return [leaf for k, v in tree.items() for leaf in _flatten(v, (*path, str(k)))]
    if isinstance(tree, list | tuple):
        return [leaf for i, v in enumerate(tree) for leaf in _flatten(v, (*path, str(i)))]
    return []  # plain values (numbers, strings, None) are the same on every rank: kept


def _rebuild(tree: Any, leaves: dict[tuple[str, ...], Tensor], path: tuple[str, ...] = ()) -> Any:
    if isinstance(tree, Tensor):
        return leaves[path]
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, leaves, (*path, str(k))) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_rebuild(v, leaves, (*path, str(i))) for i, v in enumerate(tree)]
    return tree


class _Packed:
    """A shard's tensors as one flat byte tensor, each per-model leaf padded to
    ``k_max`` models (model axis first), with a signature of the layout that every rank
    must share."""

    def __init__(self, tree: dict[str, Any], k_local: int, k_max: int) -> None:
        self.tree = tree
        self.leaves = _flatten(tree)
        self.k_max = k_max
        self.layout: list[tuple[tuple[str, ...], torch.dtype, tuple[int, ...], int | None]] = []
        parts: list[Tensor] = []
        for path, t in self.leaves:
            dim = _model_dim(path[0], t)
            if dim is not None:
                if t.shape[dim] != k_local:
                    raise RuntimeError(
                        f"funcreg.distributed: {'/'.join(path)} has shape {tuple(t.shape)}, "
                        f"expected {k_local} models on axis {dim}"
                    )
                t = t.movedim(dim, 0)
                if k_max > k_local:
                    t = torch.cat([t, t.new_zeros(k_max - k_local, *t.shape[1:])])
            rest = tuple(t.shape[1:]) if dim is not None else tuple(t.shape)
            self.layout.append((path, t.dtype, rest, dim))
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            if raw.numel() % _ALIGN:  # every leaf starts aligned, so unpacking is a view
                raw = torch.cat([raw, raw.new_zeros(_ALIGN - raw.numel() % _ALIGN)])
            parts.append(raw)
        self.nbytes = sum(p.numel() for p in parts)
        self.parts = parts

    def buffer(self, device: torch.device) -> Tensor:
        if not self.parts:
            return torch.zeros(0, dtype=torch.uint8, device=device)
        return torch.cat([p.to(device) for p in self.parts])

    def signature(self) -> int:
        text = repr([(p, str(d), s, m) for p, d, s, m in self.layout]) + f"|{self.nbytes}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")

    def unpack(
        self, buffers: list[Tensor], sizes: list[int]
    ) -> dict[tuple[str, ...], Tensor | list[Tensor]]:
        """Per leaf: the models of every rank concatenated along the model axis (per-model
        leaves), or the list of every rank's value (the others)."""
        out: dict[tuple[str, ...], Tensor | list[Tensor]] = {}
        offset = 0
        for (path, dtype, shape, dim), (_, local) in zip(self.layout, self.leaves, strict=True):
            full = (self.k_max, *shape) if dim is not None else shape
            n = math.prod(full) * torch.empty((), dtype=dtype).element_size()
            per_rank = [
                b[offset : offset + n].view(dtype).reshape(full).to(local.device, copy=True)
                for b in buffers
            ]  # copies: each leaf owns its memory, as in a one-process result
            offset += -(-n // _ALIGN) * _ALIGN
            if dim is None:
                out[path] = per_rank
            else:
                out[path] = torch.cat(
                    [t[:k] for t, k in zip(per_rank, sizes, strict=True)]
                ).movedim(0, dim)
        return out


def _shard_tree(res: SweepResult, k_local: int, k_max: int) -> dict[str, Any]:
    """The tensors of a shard's result that the merged result needs, first ``k_local``
    models only (a padded single-model shard drops its copy)."""

    def first(t: Tensor, dim: int) -> Tensor:
        return t.narrow(dim, 0, k_local)

    hist = {
        key: (
            {n: first(z, 1) for n, z in v.items()}
            if isinstance(v, Mapping)
            else (first(v, 1) if isinstance(v, Tensor) and v.ndim >= 2 else v)
        )
        for key, v in res.history.items()
    }
    chunks = torch.full((k_max, 2), -1, dtype=torch.int64)  # the same shape on every rank
    for i, (a, b) in enumerate(res.meta.get("chunks", [])[: chunks.shape[0]]):
        chunks[i] = torch.tensor([min(a, k_local), min(b, k_local)])
    tree: dict[str, Any] = {
        "stacked": {n: first(v, 0) for n, v in res.stacked.items()},
        "stacked_buffers": {n: first(v, 0) for n, v in res.stacked_buffers.items()},
        "history": hist,
        "diverged": first(res.diverged, 0),
        "diverged_at": first(res.diverged_at, 0),
        "chunks": chunks,
        "elapsed": torch.tensor([float(res.meta.get("elapsed_s", 0.0))], dtype=torch.float64),
    }
    if res.resume is not None:
        tree["opt_state"] = [first(t, 0) for t in res.resume["opt_state"]]
        tree["rng"] = res.resume["rng"]
    return tree


# ---------------------------------------------------------------------- collectives


def _arrivals(rank: int, world: int, arrive: bool) -> list[int] | None:
    """Counters in the rendezvous store, one per rank, +1 as the rank reaches a sweep's
    result exchange (``arrive=True``). Returns the ranks behind this one (not arrived in
    this call), or ``None`` when the store cannot tell (e.g. the rank hosting it died)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        mine = store.add(f"funcreg/sweep/arrived/{rank}", int(arrive))
        return [r for r in range(world) if store.add(f"funcreg/sweep/arrived/{r}", 0) < mine]
    except Exception:
        return None


def _comm_device(dev: torch.device) -> torch.device:
    if _uses_nccl():
        return dev if dev.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_status(
    error: BaseException | None, signature: int, nbytes: int, comm: torch.device, group: Any
) -> list[tuple[bool, int, int, str]]:
    """Every rank's ``(failed, signature, nbytes, message)``: fixed-size tensors only."""
    head = torch.tensor([int(error is not None), signature, nbytes], dtype=torch.int64)
    msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        raw = text.encode("utf-8", "replace")[:MESSAGE_BYTES]
        msg[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    mine = torch.cat([head.view(torch.uint8), msg]).to(comm)
    world = dist.get_world_size()
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    out = []
    for t in got:
        t = t.cpu()
        failed, sig, nb = t[:24].view(torch.int64).tolist()
        text = bytes(t[24:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
        out.append((bool(failed), int(sig), int(nb), text))
    return out


# --------------------------------------------------------------------------- sweep


@overload
def sweep(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    grid: Mapping[str, Any],
    *,
    gather_to: Literal["all"] = "all",
    init_process_group: bool | None = None,
    timeout: float | timedelta | None = None,
    **sweep_kwargs: Any,
) -> SweepResult: ...


@overload
def sweep(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    grid: Mapping[str, Any],
    *,
    gather_to: int,
    init_process_group: bool | None = None,
    timeout: float | timedelta | None = None,
    **sweep_kwargs: Any,
) -> SweepResult | None: ...


def sweep(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    grid: Mapping[str, Any],
    *,
    gather_to: Literal["all"] | int = "all",
    init_process_group: bool | None = None,
    timeout: float | timedelta | None = None,
    **sweep_kwargs: Any,
) -> SweepResult | None:
    """:func:`fr.sweep <funcreg._sweep.sweep>` with the grid sharded over the ranks of
    ``torch.distributed`` (see the module docstring). Takes the same arguments, plus:

    Args:
        gather_to: ``"all"`` (default): every rank returns the merged result; a rank
            number: only that rank does, the others return ``None``.
        init_process_group: ``None`` (default): use the process group if initialised, else
            initialise it when launched by ``torchrun``, else run in one process.
            ``True``: initialise it (:func:`init_from_env`) or fail. ``False``: never
            initialise; without a process group, run in one process.
        timeout: seconds (or a ``timedelta``) a rank waits for the others when they
            exchange results (a dead rank is noticed at once; a hung one after
            ``timeout``), and the process group's timeout when this call creates it. It
            must exceed the difference between the shards' training times. Default:
            :data:`DEFAULT_TIMEOUT` (10 minutes).

    Returns:
        The :class:`~funcreg.result.SweepResult` of the whole grid, equal to the one
        process result (see "Exactness"); its ``meta["distributed"]`` records the world
        size and shards. ``checkpoint=`` names one file per rank (:func:`checkpoint_path`).

    Raises:
        DistributedSweepError: on the healthy ranks when another rank's shard raised (that
            rank re-raises its own exception), or when a rank died or hung (the error names
            it). The process can then exit normally: nothing is left in flight.
    """
    td = _timedelta(timeout) or DEFAULT_TIMEOUT
    args = SweepArgs.of("funcreg.distributed.sweep", (model, loss_fn, spec, grid), sweep_kwargs)
    if gather_to != "all" and (isinstance(gather_to, bool) or not isinstance(gather_to, int)):
        raise ValueError(f"gather_to must be 'all' or a rank number, got {gather_to!r}")
    if init_process_group is True or (
        init_process_group is None
        and dist.is_available()
        and not dist.is_initialized()
        and _under_launcher()
        and int(os.environ["WORLD_SIZE"]) > 1
    ):
        init_from_env(td)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_world_size() == 1:
        if gather_to not in ("all", 0):
            raise ValueError(f"gather_to={gather_to} but there is only one process (rank 0)")
        with contextlib.closing(prepare(args)) as setup:
            return run_local(setup)

    rank, world = dist.get_rank(), dist.get_world_size()
    if gather_to != "all" and not 0 <= int(gather_to) < world:
        raise ValueError(f"gather_to={gather_to} is not a rank of this {world}-process group")
    if args.device is None and _default_device().type == "cuda":
        args = dataclasses.replace(args, device=_default_device())
    if "progress" not in sweep_kwargs:
        args = dataclasses.replace(args, progress=rank == 0)

    # the exchange's own group, made while every rank is alive: its collectives time out by
    # themselves, so a timed-out or dead peer leaves nothing in flight and the process can
    # exit (an abandoned wait on the default group's collective blocked or aborted at exit)
    group = dist.new_group(timeout=td)
    try:
        return _shard_and_gather(args, gather_to, td, group)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)


def _shard_and_gather(
    args: SweepArgs, gather_to: Literal["all"] | int, td: timedelta, group: Any
) -> SweepResult | None:
    """This rank's shard of the grid, then the status exchange and the gather (see the
    module docstring, "Failures")."""
    rank, world = dist.get_rank(), dist.get_world_size()
    error: BaseException | None = None
    packed: _Packed | None = None
    g64: dict[str, Tensor] = {}
    k = 0
    bounds: list[tuple[int, int]] = []
    local: SweepResult | None = None
    grid = args.grid
    try:
        if not isinstance(grid, Mapping):
            raise TypeError(
                "sweep: grid must be a dict of axes as from fr.grid(...), got "
                f"{type(grid).__name__}"
            )
        g64 = build_grid(grid, product=False, dtype=torch.float64)
        k = next(iter(g64.values())).numel()
        bounds = [shard_bounds(k, world, r) for r in range(world)]
        a, b = bounds[rank]
        # a lone model trains beside a copy of itself so that it runs vmapped, as it does
        # in the one-process sweep (chunk_size=1 runs every model alone anyway; so does a
        # CPU grid of <= 4 models without compile, where the copy is idle work)
        pad = b - a == 1 and k > 1 and args.chunk_size != 1
        idx = torch.tensor([a, a]) if pad else torch.arange(a, b)
        shard = dataclasses.replace(
            args,
            grid={n: v[idx] for n, v in g64.items()},
            init=None if args.init is None else _slice_init(args.init, k, idx),
            checkpoint=None
            if args.checkpoint is None
            else checkpoint_path(args.checkpoint, rank, world),
        )
        with contextlib.closing(prepare(shard)) as setup:
            local = run_local(setup, whole_k=k)
        k_max = max(hi - lo for lo, hi in bounds)
        packed = _Packed(_shard_tree(local, b - a, k_max), b - a, k_max)
    except Exception as e:  # every rank must learn of it, or the others would hang
        error = e

    t_done = time.perf_counter()
    comm = _comm_device(torch.device(args.device) if args.device else torch.device("cpu"))
    _arrivals(rank, world, arrive=True)
    try:
        status = _exchange_status(
            error,
            0 if packed is None else packed.signature(),
            0 if packed is None else packed.nbytes,
            comm,
            group,
        )
    except Exception as e:
        if error is not None:
            raise error from e
        raise _lost(rank, world, bounds, k, td, e, args.checkpoint) from e
    if error is not None:
        raise error
    failed = [(r, msg) for r, (bad, _, _, msg) in enumerate(status) if bad]
    if failed:
        shown = "; ".join(f"rank {r} (models {_span(bounds, r, k)}): {msg}" for r, msg in failed)
        saved = _saved(args.checkpoint, rank, world)
        raise DistributedSweepError(f"{len(failed)} of {world} ranks failed: {shown}{saved}")
    assert packed is not None and local is not None
    if len({s for _, s, _, _ in status}) != 1 or len({n for _, _, n, _ in status}) != 1:
        raise DistributedSweepError(
            "the ranks' shard results have different layouts (different models, specs, "
            "steps or funcreg versions on the ranks?)"
        )

    mine = packed.buffer(comm)
    if gather_to == "all":
        bufs = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(bufs, mine, group=group)
    else:
        dst = int(gather_to)
        bufs = [torch.empty_like(mine) for _ in range(world)] if rank == dst else []
        dist.gather(mine, bufs if rank == dst else None, dst=dst, group=group)
        if rank != dst:
            return None
    merged = packed.unpack(bufs, [hi - lo for lo, hi in bounds])
    return _merge(local, packed, merged, g64, bounds, world, time.perf_counter() - t_done)


def _lost(
    rank: int, world: int, bounds: Any, k: int, td: timedelta, e: Exception, ckpt: Any
) -> DistributedSweepError:
    """The error of a rank whose status exchange failed: the ranks that never arrived
    (dead: their connections closed; or hung past ``td``) and their models."""
    missing, text = _arrivals(rank, world, arrive=False), str(e)
    died = "closed" in text.lower() or "reset" in text.lower()
    how = "died (its connection closed)" if died else f"hangs (waited {td}, the timeout)"
    who = ", ".join(f"rank {r} (models {_span(bounds, r, k)})" for r in missing or [])
    what = f"{who} never reached the result exchange: it {how}; see its log" if missing else (
        f"another rank {how}; the store cannot tell which")  # fmt: skip
    return DistributedSweepError(
        f"rank {rank} of {world}: {what}{_saved(ckpt, rank, world)} (the collective "
        f"reported: {text:.300})"
    )


def _saved(ckpt: Any, rank: int, world: int) -> str:
    if ckpt is None:
        return ""
    path = os.fspath(checkpoint_path(ckpt, rank, world))
    return f"; this rank's finished shard is saved in {path!r} and resumes when the job is rerun"


def _span(bounds: list[tuple[int, int]], r: int, k: int) -> str:
    return f"{bounds[r][0]}..{bounds[r][1] - 1} of K={k}" if bounds else "?"


def _slice_init(init: Any, k: int, idx: Tensor) -> Any:
    init_p, init_b = init if isinstance(init, tuple) else (init, None)
    check_stacked(init_p, k, "init")
    out_p = {n: v.index_select(0, idx.to(v.device)) for n, v in init_p.items()}
    if init_b is None:
        return out_p
    check_stacked(init_b, k, "init buffers")
    return out_p, {n: v.index_select(0, idx.to(v.device)) for n, v in init_b.items()}


def _merge(
    local: SweepResult,
    packed: _Packed,
    merged: dict[tuple[str, ...], Tensor | list[Tensor]],
    g64: dict[str, Tensor],
    bounds: list[tuple[int, int]],
    world: int,
    gather_s: float,
) -> SweepResult:
    """The whole grid's SweepResult from the gathered leaves."""

    def cat(path: tuple[str, ...]) -> Tensor:
        v = merged[path]
        if isinstance(v, list):  # shared across ranks (eval steps, RNG state): rank 0's
            return v[0]
        return v

    leaves = {p: cat(p) for p, _ in packed.leaves}
    tree = _rebuild(packed.tree, leaves)
    chunks_of = merged[("chunks",)]
    elapsed_of = merged[("elapsed",)]
    assert isinstance(chunks_of, list) and isinstance(elapsed_of, list)
    chunks = [
        [a + lo, b + lo]
        for (lo, hi), rows in zip(bounds, chunks_of, strict=True)
        for a, b in rows.tolist()
        if a >= 0 and b > a
    ]
    meta = dict(local.meta)
    identity = dict(meta.get("identity") or {})
    identity["grid"] = {n: v.clone() for n, v in g64.items()}
    meta.update(
        identity=identity,
        chunks=chunks,
        elapsed_s=max(float(t[0]) for t in elapsed_of),
        distributed={
            "world_size": world,
            "shards": [list(b) for b in bounds],
            "backend": str(dist.get_backend()),
            "rank_elapsed_s": [float(t[0]) for t in elapsed_of],  # each shard's sweep
            "gather_s": gather_s,  # this rank: from its shard's end to the merged result
        },
    )
    resume = None
    if local.resume is not None:
        resume = {
            "opt_state": tree["opt_state"],
            "rng": tree["rng"],
            "cuda_rng": local.resume.get("cuda_rng"),
        }
    return SweepResult(
        grid={n: v.clone() for n, v in g64.items()},
        stacked=tree["stacked"],
        stacked_buffers=tree["stacked_buffers"],
        history=tree["history"],
        diverged=tree["diverged"],
        diverged_at=tree["diverged_at"],
        steps=local.steps,
        meta=meta,
        resume=resume,
        model=local.model,
    )
