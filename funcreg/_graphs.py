"""CUDA-graph replay of ``fr.sweep``'s eager chunk step (``plan={"cuda_graph": True}``).

On a GPU an eager step is bound by kernel launches: the vmapped step of a small model is
a few hundred kernels of microseconds each, launched one by one from Python. A CUDA graph
records them once and replays them with one launch. :class:`GraphedStep` wraps the step
``fn(params, state, bufs, strengths, batch) -> (params, state, metric vector)``:

* the first call with a new *signature* (the shapes and dtypes of every input; a shorter
  last minibatch is another signature) warms ``fn`` up on a side stream and records it on
  static input buffers (:func:`cuda_capture`); at most :data:`MAX_GRAPHS` signatures get a
  graph, the others run eagerly;
* every call copies its inputs into the graph's static buffers, replays, copies the
  buffers' in-place updates (BatchNorm running statistics) back into ``bufs``, and returns
  *copies* of the static outputs: the engine keeps the previous params to restore a model
  whose step turned non-finite, and the next replay overwrites the static outputs.

The step is pure and runs the same kernels in the same order, so a replay gives the eager
step's numbers; the warm-ups' random draws are undone. Whether dropout masks under replay
equal the eager run's (torch advances a captured generator by the capture's draws per
replay) is for ``tests/test_cuda.py`` to show on a GPU. The divergence guard's host read
stays outside the graph. What the step does in Python runs at capture only: a loss that
reads a Python counter, a CPU tensor or NumPy's generator has those values frozen into the
graph. A step that cannot be captured (a host synchronisation inside the loss, say) is
found during the warm-ups or by the capture (:class:`CaptureFailed`), said once with a
warning, and that signature runs eagerly; any other error is the step's own and propagates.

On the CPU there is nothing to capture: the engine does not wrap the step (``fr.sweep``
warns that ``cuda_graph`` applies on CUDA devices). Tests drive the wrapper on the CPU
with :func:`replay_capture`, which traces the step once and replays the trace on static
buffers: a CUDA graph's memory semantics, and its Python frozen at capture.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "MAX_GRAPHS",
    "CaptureFailed",
    "GraphedStep",
    "cuda_capture",
    "graphed",
    "replay_capture",
]

MAX_GRAPHS = 2
"""Signatures (input shapes and dtypes) that get a graph per step kind (one-model or
vmapped chunks): the minibatch and a shorter last one. Each graph keeps its step's
temporaries allocated (its own memory pool); further signatures run eagerly."""

WARMUP = 3
"""Eager calls on the capture's stream before a capture (torch's advice for
``torch.cuda.graph``: lazy initialisations, autograd's and cuBLAS's workspaces, happen
outside the graph); the last one with synchronising operations turned into errors."""

Capture = Callable[[Callable[..., Any], tuple[Any, ...]], tuple[Callable[[], None], Any]]
"""``capture(fn, static_inputs) -> (replay, static_outputs)``; raises :class:`CaptureFailed`
when ``fn`` cannot be recorded (any other error is the step's own and propagates)."""


class CaptureFailed(RuntimeError):
    """The step runs but cannot be recorded in a CUDA graph (a host synchronisation, a
    CPU-to-GPU copy, an operation capture forbids)."""


def cuda_capture(fn: Callable[..., Any], static: tuple[Any, ...]) -> tuple[Callable[[], None], Any]:
    """Record ``fn(*static)`` in a ``torch.cuda.CUDAGraph`` after :data:`WARMUP` eager calls
    on the capture's side stream (their random draws undone); ``replay()`` reruns it on the
    same buffers. A failed capture restores the caller's stream before it raises."""
    device = next(t.device for t in tree_flatten(static)[0] if isinstance(t, Tensor))
    prev = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(prev)
    with torch.random.fork_rng(devices=[device]), torch.cuda.stream(side):
        for _ in range(WARMUP - 1):
            fn(*static)  # errors of the step itself propagate
        previous_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(*static)
        except RuntimeError as e:
            raise CaptureFailed(f"the step synchronises with the host: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)
    prev.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            out = fn(*static)
    except Exception as e:  # noqa: BLE001 - what capture refuses, whatever its type
        torch.cuda.set_stream(prev)
        torch.cuda.synchronize(device)
        raise CaptureFailed(f"{type(e).__name__}: {e}") from e
    return graph.replay, out


def replay_capture(
    fn: Callable[..., Any], static: tuple[Any, ...]
) -> tuple[Callable[[], None], Any]:
    """A capture with a CUDA graph's semantics, for any device: ``fn`` is traced once
    (``make_fx``: the Python of the step runs at capture only, as with a graph) and
    ``replay()`` reruns the trace on the static inputs, writing into the same outputs. A
    step that reads a CPU tensor's value on the host (the one-model step's fast path for a
    0-dim CPU strength, which a CUDA step does not take) is rerun whole instead."""
    try:
        run: Callable[..., Any] = make_fx(fn, tracing_mode="real")(*static)
    except RuntimeError:  # a data-dependent host read while tracing
        run = fn
    out = run(*static)

    def replay() -> None:
        new = run(*static)
        for dst, src in zip(tree_flatten(out)[0], tree_flatten(new)[0], strict=True):
            dst.copy_(src)

    return replay, out


def _signature(leaves: list[Any]) -> tuple[Any, ...]:
    return tuple(
        (tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else type(t) for t in leaves
    )


class GraphedStep:
    """``fn`` replayed from a graph per input signature (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], capture: Capture = cuda_capture) -> None:
        self.fn = fn
        self.capture = capture
        self.graphs: dict[tuple[Any, ...], tuple[list[Tensor], Callable[[], None], Any] | None] = {}

    def __call__(self, params: Any, state: Any, bufs: Any, strengths: Any, batch: Any) -> Any:
        args = (params, state, bufs, strengths, batch)
        leaves, spec = tree_flatten(args)
        if not all(isinstance(t, Tensor) for t in leaves):
            return self.fn(*args)
        key = (_signature(leaves), spec)
        if key not in self.graphs:
            self.graphs[key] = self._record(leaves, spec) if self._room() else None
        entry = self.graphs[key]
        if entry is None:
            return self.fn(*args)
        static, replay, out = entry
        torch._foreach_copy_(static, leaves)
        replay()
        # BatchNorm's running statistics: the step updates its buffers in place
        first = len(tree_flatten((params, state))[0])
        last = first + len(tree_flatten(bufs)[0])
        if last > first:
            torch._foreach_copy_(leaves[first:last], static[first:last])
        return tree_map(Tensor.clone, out)

    def _room(self) -> bool:
        return sum(v is not None for v in self.graphs.values()) < MAX_GRAPHS

    def _record(self, leaves: list[Tensor], spec: Any) -> tuple[list[Tensor], Any, Any] | None:
        static = [t.clone() for t in leaves]
        try:
            replay, out = self.capture(self.fn, tree_unflatten(static, spec))
        except CaptureFailed as e:
            warnings.warn(
                f"fr.sweep: the step could not be captured in a CUDA graph ({e}); this input "
                "signature runs eagerly. Remove host synchronisations (.item(), printing "
                'tensors, CPU tensors moved to the GPU) from the loss, or drop plan={"cuda_graph": '
                "True}.",
                stacklevel=3,
            )
            return None
        return static, replay, out


def graphed(
    fns: dict[bool, Callable[..., Any]], device: torch.device
) -> dict[bool, Callable[..., Any]]:
    """The engine's eager steps (by ``batched``) as :class:`GraphedStep` on a CUDA device;
    unchanged elsewhere (nothing to capture)."""
    if device.type != "cuda":
        return fns
    return {batched: GraphedStep(fn) for batched, fn in fns.items()}
