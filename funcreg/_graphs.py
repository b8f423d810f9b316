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
step's numbers (with dropout, the masks come from the graph-safe Philox offsets that torch
registers for a capture: other draws than the eager step's). The divergence guard's host
read stays outside the graph. A capture that fails (an operation that cannot be captured: a
host synchronisation inside the loss, say) is reported once with a warning and that
signature runs eagerly.

On the CPU there is nothing to capture: the engine does not wrap the step (``fr.sweep``
warns that ``cuda_graph`` applies on CUDA devices). Tests drive the wrapper on the CPU
with :func:`replay_capture`, which has a CUDA graph's memory semantics (static inputs,
static outputs overwritten by each replay) without the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["MAX_GRAPHS", "GraphedStep", "cuda_capture", "graphed", "replay_capture"]

MAX_GRAPHS = 4
"""Signatures (input shapes and dtypes) that get a graph; further ones run eagerly."""

WARMUP = 3
"""Eager calls on a side stream before a capture (torch's advice for ``torch.cuda.graph``:
lazy initialisations, autograd's and cuBLAS's workspaces, happen outside the graph)."""

Capture = Callable[[Callable[..., Any], tuple[Any, ...]], tuple[Callable[[], None], Any]]
"""``capture(fn, static_inputs) -> (replay, static_outputs)``."""


def cuda_capture(fn: Callable[..., Any], static: tuple[Any, ...]) -> tuple[Callable[[], None], Any]:
    """Record ``fn(*static)`` in a ``torch.cuda.CUDAGraph`` after :data:`WARMUP` eager calls
    on a side stream; ``replay()`` reruns it on the same buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph.replay, out


def replay_capture(
    fn: Callable[..., Any], static: tuple[Any, ...]
) -> tuple[Callable[[], None], Any]:
    """A capture with a CUDA graph's memory semantics, for any device: ``replay()`` runs
    ``fn(*static)`` again and writes its results into the same output tensors."""
    out = fn(*static)

    def replay() -> None:
        new = fn(*static)
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

    def _record(
        self, leaves: list[Tensor], spec: Any
    ) -> tuple[list[Tensor], Callable[[], None], Any] | None:
        static = [t.clone() for t in leaves]
        try:
            replay, out = self.capture(self.fn, tree_unflatten(static, spec))
        except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly
            warnings.warn(
                f"fr.sweep: the step could not be captured in a CUDA graph ({type(e).__name__}: "
                f"{e}); this input signature runs eagerly. Remove host synchronisations "
                '(.item(), printing tensors) from the loss, or drop plan={"cuda_graph": True}.',
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
