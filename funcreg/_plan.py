"""The execution plan of a sweep: how many models each call trains, chosen by measuring.

Before the first real step, ``fr.sweep`` (``chunk_size=None``) may time a few steps of
candidate chunk sizes on throwaway copies of the first models and train with the one that
is fastest per model:

* **Candidates** (:func:`candidates`): 1 (every model alone, eager autograd with the
  optimizer's fused kernel), the static rule's size
  (:func:`funcreg._chunking.auto_chunk_size`), and vmapped chunks up to the memory cap of
  :meth:`funcreg._chunking.Footprint.cap` (the cap itself, its half, 8 and 16).
* **Timing** (:func:`measure`): two warm-up steps, then :data:`PROBE_STEPS` interleaved
  rounds of one timed sample per candidate with :data:`clock` (a fast step repeated to
  last :data:`PROBE_SAMPLE_S`);
  a candidate's time is its fastest sample's step divided by its models. A candidate
  that raises is left out, and the probe's warnings are silenced. Speed first, memory
  second: the smallest candidate within :data:`MARGIN` of the fastest wins (:func:`choose`;
  a vmapped chunk's temporaries grow with its models, so a chunk of one model that is as
  fast costs the least memory).
* **Memory** (opt-in, ``plan={"max_memory": r}``): the static size and every candidate are
  at most :meth:`funcreg._chunking.Footprint.memory_cap`, the largest chunk whose
  estimated model memory (the K models' training state plus the chunk's step temporaries)
  stays within ``r`` times a loop's. It trades speed for memory where vmapping needs
  many models per call to pay off (the tiny MLP of ``benchmarks/models.py``), so it is not
  the default; ``{"mode": "measure", "max_memory": r}`` also always measures.
* **Cost**: probing runs only for runs of at least :data:`PROBE_MIN_STEPS` steps (``plan=
  None``), and only candidates whose probe model-steps fit in :data:`PROBE_BUDGET` of the
  run's (:func:`within_budget`); a choice is cached per (model shapes, batch shapes,
  device, dtype, K, optimizer, spec) for the life of the process (:data:`CACHE`).
* **Reproducibility**: the numbers of a run depend on its chunks, never on the timings
  themselves: the plan is fixed before the first real step (the probe's random draws are
  undone by reseeding), recorded in ``result.meta["plan"]`` (and ``meta["chunks"]``, which
  checkpoints carry, so a resume keeps it), and ``plan=result.meta["plan"]`` or
  ``chunk_size=`` replays it exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

__all__ = [
    "CACHE",
    "MARGIN",
    "PROBE_BUDGET",
    "PROBE_MIN_STEPS",
    "PROBE_STEPS",
    "PlanCache",
    "candidates",
    "check_plan",
    "choose",
    "cuda_graph",
    "max_memory",
    "measure",
    "with_cuda_graph",
    "within_budget",
]

PROBE_MIN_STEPS = 200
"""Runs with fewer steps keep the static plan unless ``plan="measure"``."""
PROBE_STEPS = 3
"""Timed samples per candidate (after one warm-up step)."""
PROBE_SAMPLE_S = 0.02
"""A timed sample repeats a fast step until it lasts about this long (at most
:data:`PROBE_MAX_REPS` steps), so that one lucky short step cannot win on a busy machine."""
PROBE_MAX_REPS = 20
PROBE_BUDGET = 0.05
"""The probe's model-steps are at most this fraction of the run's (``plan=None``)."""
MARGIN = 0.05
"""A larger chunk is chosen over a smaller one only when this much faster per model."""

clock: Callable[[], float] | None = None
"""The probe's clock when set (tests set a fake one); else :func:`measure` reads the
process's CPU time for a one-thread CPU run (steady while other processes share the cores:
a wall clock charges their time slices to whichever candidate was running) and the wall
clock otherwise (threads and devices work in parallel)."""

MODES = ("auto", "static", "measure")


OPTIONS = ("mode", "max_memory", "cuda_graph")
"""The keys of a ``plan=`` dict of options (a dict with other keys is a recorded plan)."""


def _options(plan: Mapping[str, Any]) -> bool:
    """Whether a ``plan=`` dict holds options (``{"max_memory": 1.5}``) rather than a
    recorded plan (``result.meta["plan"]``, which always has ``"chunk_size"``)."""
    return bool(plan) and set(plan) <= set(OPTIONS)


def max_memory(plan: Any) -> float | None:
    """The ``"max_memory"`` ratio of a ``plan=`` dict of options, else ``None``."""
    if isinstance(plan, Mapping) and _options(plan):
        ratio = plan.get("max_memory")
        return None if ratio is None else float(ratio)
    return None


def cuda_graph(plan: Any) -> bool:
    """Whether ``plan=`` (options or a recorded plan) asks for CUDA-graph replay of the eager
    steps (:mod:`funcreg._graphs`)."""
    return isinstance(plan, Mapping) and plan.get("cuda_graph") is True


def with_cuda_graph(record: Mapping[str, Any], plan: Any) -> dict[str, Any]:
    """A run's plan record marked ``"cuda_graph": True`` when this call's ``plan=`` asks for
    it, and unmarked otherwise (a resumed run's record says what the earlier run did)."""
    out = {k: v for k, v in record.items() if k != "cuda_graph"}
    return {**out, "cuda_graph": True} if cuda_graph(plan) else out


def check_plan(plan: Any, chunk_size: int | None) -> str | int:
    """``plan=`` of ``fr.sweep`` resolved: ``"auto"`` (``None``), ``"static"``,
    ``"measure"``, or the chunk size of a recorded plan (``result.meta["plan"]``). A dict
    of options, ``{"mode": "auto" | "static" | "measure", "max_memory": r, "cuda_graph":
    bool}`` (every key optional, ``r >= 1``), resolves to its mode (see :func:`max_memory`,
    :func:`cuda_graph`)."""
    if plan is None:
        return "auto"
    if isinstance(plan, Mapping) and not isinstance(plan.get("cuda_graph", False), bool):
        raise TypeError(f'plan: "cuda_graph" must be True or False, got {plan["cuda_graph"]!r}')
    if isinstance(plan, Mapping) and _options(plan):
        ratio = plan.get("max_memory")
        if ratio is not None and (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not math.isfinite(ratio)
            or ratio < 1
        ):
            raise ValueError(
                f'plan: "max_memory" is the largest ratio of the sweep\'s model memory to '
                f"a loop's, a number >= 1 (e.g. 1.5), got {ratio!r}"
            )
        mode = plan.get("mode", "auto")
        if mode not in MODES:
            raise ValueError(f'plan: "mode" must be one of {list(MODES)}, got {mode!r}')
        return check_plan(None if mode == "auto" else mode, chunk_size)
    if isinstance(plan, str):
        if plan not in MODES:
            raise ValueError(
                f"plan must be one of {list(MODES)} or a recorded plan "
                f'(result.meta["plan"]), got {plan!r}'
            )
        if plan == "measure" and chunk_size is not None:
            raise ValueError('give chunk_size= or plan="measure", not both')
        return plan
    if isinstance(plan, Mapping):
        size = plan.get("chunk_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f'plan: a recorded plan needs an int "chunk_size" >= 1, got {size!r} '
                f'(pass result.meta["plan"] of an earlier sweep)'
            )
        if chunk_size is not None and chunk_size != size:
            raise ValueError(
                f"plan has chunk_size {size}, chunk_size= is {chunk_size}; give one of them"
            )
        return size
    raise TypeError(f"plan must be None, a str or a recorded plan dict, got {type(plan).__name__}")


def candidates(k: int, static: int, cap: int) -> list[int]:
    """The chunk sizes worth timing for ``k`` models, ``static`` first: 1, ``static``, and
    vmapped chunks of ``min(k, cap)``, ``min(k, cap, 8)``, ``min(k, cap, 16)`` and half of
    ``min(k, cap)`` models (when >= 2). Past a few MiB per temporary a chunk can get slower
    per model, so 16 and the half are timed too (the tiny MLP of ``benchmarks/models.py``
    with SGD at K = 64: 32.5 ms per step in one chunk of 64, 23.4 and 24.1 ms in chunks of
    16 and 32, 31.1 in chunks of 8; with Adam at K = 128: 55, 60, 63 and 70 ms in chunks of
    16, 43, 64 and 8). Chunks of 16 also hold a quarter of the temporaries of 64."""
    sizes = [static, 1, min(k, cap), min(k, cap, 8), min(k, cap, 16), min(k, cap) // 2]
    out: list[int] = []
    for c in sizes:
        if 1 <= c <= k and c not in out:
            out.append(c)
    return out


def within_budget(sizes: list[int], k: int, steps: int) -> list[int]:
    """The leading ``sizes`` whose probe (``2 + PROBE_STEPS`` steps of ``c`` models each)
    costs at most :data:`PROBE_BUDGET` of the run's ``k·steps`` model-steps; never fewer
    than one."""
    allowed = PROBE_BUDGET * k * steps
    out: list[int] = []
    used = 0
    for c in sizes:
        cost = (2 + PROBE_STEPS) * c
        if out and used + cost > allowed:
            continue
        out.append(c)
        used += cost
    return out


def measure(
    sizes: list[int], make_step: Callable[[int], Callable[[], None]], cpu_time: bool = False
) -> dict[int, float]:
    """Seconds per model of one step for every chunk size: ``make_step(c)`` returns a
    function running one step of a throwaway chunk of ``c`` models. Every candidate runs two
    warm-up steps (the second, timed, sets how many steps a sample repeats to last
    :data:`PROBE_SAMPLE_S`), then :data:`PROBE_STEPS` rounds time one sample of each in
    turn; a candidate's figure is its fastest sample's time per step, divided by ``c``
    (CPU time of the process with ``cpu_time=True``, see :data:`clock`).
    A candidate that raises (a model that only runs without ``vmap``, say) is left out,
    and the probe's warnings (e.g. torch's vmap-fallback notice) are silenced: a plan that
    is not chosen must not change what the run does or says."""
    tick = clock or (time.process_time if cpu_time else time.perf_counter)
    ready: dict[int, tuple[Callable[[], None], int]] = {}
    best: dict[int, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in sizes:  # every candidate warmed up before any is timed
            try:
                step = make_step(c)
                step()  # first call: allocator, autograd graph, lazy initialisation
                t0 = tick()
                step()
                first = tick() - t0
            except Exception:  # noqa: BLE001 - any failure rules the candidate out
                continue
            reps = max(1, min(PROBE_MAX_REPS, math.ceil(PROBE_SAMPLE_S / max(first, 1e-9))))
            ready[c] = (step, reps)
            best[c] = math.inf
        for _ in range(PROBE_STEPS):  # interleaved, so that a change of load hits all
            for c, (step, reps) in list(ready.items()):
                try:
                    t0 = tick()
                    for _ in range(reps):
                        step()
                    best[c] = min(best[c], (tick() - t0) / reps)
                except Exception:  # noqa: BLE001
                    del ready[c], best[c]
    return {c: t / c for c, t in best.items()}


def choose(per_model: Mapping[int, float], static: int) -> int:
    """The smallest size whose time per model ``t_c`` is within :data:`MARGIN` of the
    fastest ``t*``: ``(1 - MARGIN)·t_c <= t*`` (speed first, then memory: a vmapped chunk's
    temporaries grow with its models); ``static`` when no candidate ran."""
    if not per_model:
        return static
    fastest = min(per_model.values())
    return min(c for c, t in per_model.items() if (1 - MARGIN) * t <= fastest)


class PlanCache:
    """Measured plans of this process, by the key of what they depend on (model and batch
    shapes, device, dtype, K, optimizer, spec, compile): a second sweep of the same problem
    reuses the choice instead of probing again. At most ``max_entries``, least recently
    used evicted first; :meth:`clear` empties it."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> dict[str, Any] | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: Hashable, record: dict[str, Any]) -> None:
        self._entries[key] = record
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


CACHE = PlanCache()
