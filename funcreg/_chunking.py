"""Chunks of a grid: how many models one vmapped call trains (:func:`auto_chunk_size`, from a
byte probe of one model's forward), which models each chunk holds (:func:`plan_chunks`), and
one chunk's training state (:class:`Chunk`, :func:`unsplit` to join the chunks again)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "Chunk",
    "Footprint",
    "auto_chunk_size",
    "footprint",
    "memory_cap",
    "plan_chunks",
    "unsplit",
]

# Auto chunking on CPU (measured on the 32-64-64-1 MLP task, 1 thread; see
# auto_chunk_size): models whose forward handles megabytes train one by one without vmap;
# otherwise a chunk's temporaries stay below glibc's mmap threshold.
UNBATCHED_FORWARD_BYTES = 3 * 2**20
UNBATCHED_MAX_K = 4
LARGEST_TEMP_BYTES = 16 * 2**20
FORWARD_BYTES = 64 * 2**20
# models with this many bytes of parameters are compute-bound on CPU: one by one (see below)
UNBATCHED_PARAM_BYTES = 2**20


class _Bytes(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.total += t.nbytes
                self.largest = max(self.largest, t.nbytes)
        return out


def auto_chunk_size(
    forward: Callable[[], Any],
    k: int,
    device: torch.device | str = "cpu",
    whole_k: int | None = None,
    compiled: bool = False,
    params: Mapping[str, Tensor] | None = None,
) -> int:
    """The static rule's chunk size: ``fr.sweep``'s with ``chunk_size=None`` when it does
    not measure (short runs, ``plan="static"``; see :mod:`funcreg._plan`), and the first
    candidate when it does.

    Runs ``forward()`` (one model's loss on one training batch) once under ``no_grad`` and
    measures its floating-point temporaries (per-model footprint ``A``, largest one ``M``);
    ``params`` (one model's trained tensors) give the parameter bytes ``P`` and the largest
    parameter ``W`` (a gradient, each optimizer-state tensor and each temporary of an
    out-of-place update is as large). On CPU:

    * ``K <= 4`` and eager steps: 1 — vmapping so few models costs more than running them
      one by one (not so for a compiled step, whose dispatch cost is small): on
      the 32-64-64-1 MLP with batch 512 (Adam, 1 thread) a vmapped step took 1768 µs per
      model at K = 2 and 1283 at K = 4, against 1118 and 1053 for the models one by one;
      at K = 6 vmap won (938 vs 1028), and SGD gave the same crossover.
    * ``A >= 3 MiB``: 1 — every model trains alone, without ``vmap``
      (:func:`funcreg.train.eager_step`). vmap on CPU only saves per-op dispatch
      overhead, which is nothing once each op handles megabytes, while its batching rules
      add copies: on the 32-64-64-1 MLP with full batch 4096 (A = 4.75 MB) a plain
      per-model step took 2.99 ms and a vmapped one 3.2-4.0 ms per model (the torch.optim
      loop: 2.79 ms); at batch 2048 they tied.
    * otherwise the largest C with ``C·M <= 16 MiB`` and ``C·A <= 64 MiB`` (at least 2, at
      most K). glibc ``malloc`` hands blocks above its mmap threshold (at most 32 MiB) back
      to the OS on every free, so a step with bigger temporaries page-faults them in again
      each time: past it a vmapped step got 2x slower per model (batch 512: K=256 in one
      call), below it the time per model is flat; a stacked parameter (its gradient, Adam's
      moments and their temporaries) counts like a forward temporary: one first-layer
      weight of the wide MLP above stacked over 32 models is 51 MB, and every step
      page-faulted all of them in (65% of its CPU time in the kernel). (A high
      ``MALLOC_MMAP_THRESHOLD_`` environment variable removes this cliff; pass
      ``chunk_size`` yourself then.) The
      footprint cap is a precaution for small caches, not binding in our measurements.

    On other devices the whole grid runs at once (K). ``whole_k``: the K of the whole grid
    when these ``k`` models are one shard of it (the ``K <= 4`` rule looks at the grid);
    ``compiled``: the step is ``torch.compile``d (``compile=True``).
    """
    if k <= 1:
        return k
    if torch.device(device).type != "cpu":
        return k
    if not compiled and (k if whole_k is None else whole_k) <= UNBATCHED_MAX_K:
        return 1
    fp = footprint(forward, params)
    if fp.params >= UNBATCHED_PARAM_BYTES or fp.total >= UNBATCHED_FORWARD_BYTES:
        return 1
    return int(max(2, min(k, fp.cap())))


@dataclass(frozen=True)
class Footprint:
    """One model's bytes: its forward's floating-point temporaries (``total``, the
    ``largest`` one) and its trained parameters (``params``, the ``largest_param``)."""

    total: int
    largest: int
    params: int
    largest_param: int

    def cap(self) -> int:
        """The largest chunk ``C`` (at least 1) with ``C·max(M, W) <= 16 MiB`` and
        ``C·A <= 64 MiB`` (see :func:`auto_chunk_size`)."""
        largest = max(self.largest, self.largest_param, 1)
        return max(1, min(LARGEST_TEMP_BYTES // largest, FORWARD_BYTES // max(self.total, 1)))

    def memory_cap(self, k: int, state: int, ratio: float) -> int:
        """The largest chunk ``C`` (1 to ``k``) whose models' memory stays within ``ratio``
        times a loop's: a loop of ``k`` models holds their training state ``k·S`` (``state``
        = ``S``, one model's parameters, gradients and optimizer state) and one model's
        step temporaries ``A`` (estimated by its forward's, ``total``); a sweep holds
        ``k·S + C·A``. So ``k·S + C·A <= ratio·(k·S + A)``, i.e.
        ``C = floor(1 + (ratio - 1)·(k·S + A) / A)``. The process's own memory (the
        library, the data) is left out of both sides, so the measured ratio is lower.
        """
        a = max(self.total, 1)
        return int(max(1, min(k, math.floor(1 + (ratio - 1) * (k * state + a) / a))))


def footprint(forward: Callable[[], Any], params: Mapping[str, Tensor] | None = None) -> Footprint:
    """Run ``forward()`` once under ``no_grad`` and count its floating-point temporaries;
    count the floating-point tensors of ``params``."""
    counter = _Bytes()
    with torch.no_grad(), counter:
        forward()
    sizes = [t.nbytes for t in (params or {}).values() if t.is_floating_point()]
    return Footprint(counter.total, counter.largest, sum(sizes), max(sizes, default=0))


def memory_cap(
    forward: Callable[[], Any], params: Mapping[str, Tensor], opt_state: Any, k: int, ratio: float
) -> int:
    """:meth:`Footprint.memory_cap` for one model's ``forward``, ``params`` and optimizer
    state ``opt_state`` (a pytree): ``S`` = the bytes of the params, of as many gradients
    and of the state's tensors."""
    state = sum(t.nbytes for t in tree_flatten(opt_state)[0] if isinstance(t, Tensor))
    grads = sum(t.nbytes for t in params.values())
    return footprint(forward, params).memory_cap(k, 2 * grads + state, ratio)


def plan_chunks(k: int, size: int | None, balanced: bool = True) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` chunks of at most ``size`` models covering ``range(k)``
    (``size=None``: one chunk of all ``k``).

    ``balanced=True`` (a sweep's plan): as few chunks as ``size`` allows, their sizes
    differing by at most one, e.g. ``k=10, size=4`` -> sizes ``[4, 3, 3]``.
    ``balanced=False`` (a path's plan, which follows the grid): chunks of exactly ``size``
    models, the last one shorter, e.g. ``[4, 4, 2]``.
    """
    if size is None:
        return [(0, k)]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {size!r}")
    if not balanced:
        return [(a, min(a + size, k)) for a in range(0, k, size)]
    n = -(-k // size)
    base, extra = divmod(k, n)
    out, start = [], 0
    for j in range(n):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass
class Chunk:
    """Models ``start:stop`` of the grid during a run: their params, optimizer state,
    buffers and strengths (a model axis first when ``batched``, none for a lone model), which
    are alive, when the others diverged, and their rows of the history."""

    start: int
    stop: int
    batched: bool
    params: dict[str, Tensor]
    state: Any
    bufs: dict[str, Tensor]
    strengths: dict[str, Tensor]
    alive: Tensor
    diverged_at: Tensor
    hist: Tensor
    healthy: bool = True

    def take(self, t: Tensor) -> Tensor:
        return t[self.start : self.stop].clone() if self.batched else t[self.start].clone()


_C = torch.contiguous_format


def unsplit(
    chunks: list[Chunk],
    get: Callable[[Chunk], Any],
    release: Callable[[Chunk], None] | None = None,
) -> Any:
    """Concatenate a pytree over chunks along axis 0 (unbatched chunks get one).

    ``release`` (the run's last result): called on every chunk once its tree is read, to
    drop the chunk's references; each leaf's parts are then freed as soon as they are
    joined (one chunk's leaves are taken as they are), so the joined tree never coexists
    with a whole copy of itself: at the end of a run of K models with P bytes of
    parameters and 2P of Adam state, that copy was 3·K·P bytes more at the peak."""
    trees = [get(ch) for ch in chunks]
    flat = [tree_flatten(t) for t in trees]
    if release is not None:
        for ch in chunks:
            release(ch)
        del trees
    spec = flat[0][1]
    leaves = []
    for i in range(len(flat[0][0])):
        parts = [
            f[0][i] if ch.batched else f[0][i].unsqueeze(0)
            for f, ch in zip(flat, chunks, strict=True)
        ]
        if len(parts) > 1:
            leaves.append(torch.cat(parts))
        else:
            # contiguous: a chunk's leaves may be views of one (k, N) tensor (funcreg._stacked)
            one = parts[0]
            leaves.append(one.contiguous() if release is not None else one.clone(memory_format=_C))
        if release is not None:
            del parts
            for f in flat:
                f[0][i] = None
    return tree_unflatten(leaves, spec)
