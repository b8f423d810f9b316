"""The training engine of :func:`fr.sweep <funcreg._sweep.sweep>`: :func:`run_local` trains
the K models of a checked :class:`~funcreg._setup.Setup` in this process, chunk by chunk
(:mod:`funcreg._chunking`), with the divergence guard, the compile cache
(:data:`COMPILED`), periodic evaluation and checkpoints (:mod:`funcreg._checkpoint`), and
returns their :class:`~funcreg.result.SweepResult`. See ``funcreg._sweep`` for what a run
guarantees."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import _plan
from . import _tree as _flat
from . import train as _train
from ._checkpoint import save_checkpoint
from ._chunking import Chunk, auto_chunk_size, footprint, memory_cap, plan_chunks, unsplit
from ._data import Batch
from ._graphs import graphed
from ._setup import Setup, data_loss
from ._stacked import finite_check_tensors, stacked_step
from .optim import Optimizer
from .progress import Progress
from .result import SweepResult
from .stack import eval_mode

__all__ = ["COMPILED", "CompileCache", "run_local"]


def run_local(setup: Setup, whole_k: int | None = None) -> SweepResult:
    """Train the models of ``setup`` in this process and return their result.

    ``whole_k``: the K of the whole grid when ``setup`` holds one shard of it
    (:mod:`funcreg.distributed`), so that the shard chooses its chunks as the one-process
    sweep of the whole grid would (see :func:`~funcreg._chunking.auto_chunk_size`).
    """
    return _Run(setup, whole_k).run()


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
    """``bool(_finite(...).all())`` for the whole chunk (:func:`funcreg._tree.all_finite`;
    views of one stacked tensor summed as that tensor)."""
    return _flat.all_finite([mvec, *finite_check_tensors(params)])


def _fresh_state(optimizer: Optimizer, params: dict[str, Tensor], batched: bool) -> Any:
    """A new optimizer state of owned, contiguous leaves (a lone model's step updates them
    in place; no 0-stride leaves)."""
    state = (vmap(optimizer.init) if batched else optimizer.init)(params)
    return tree_map(lambda t: t.clone(memory_format=torch.contiguous_format), state)


def _mask(keep: Tensor, mvec: Tensor, batched: bool) -> Tensor:
    return torch.where(_keep_view(keep, mvec, batched), mvec, torch.nan)


def _math_attention(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with ``scaled_dot_product_attention``'s math kernel: the fused CPU/GPU
    attention kernels have no ``vmap`` batching rule (torch falls back to a loop over the
    models, with a warning), the math kernel's matmuls and softmax do. For eager vmapped
    steps (attention layers, e.g. ``nn.TransformerEncoderLayer``); nothing else changes."""

    def run(*args: Any) -> Any:
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args)

    return run


# ------------------------------------------------------------------------ compile cache


class CompileCache:
    """The ``torch.compile``d chunk steps of ``compile=True`` sweeps, kept between calls.

    Lifetime: one instance per process (:data:`COMPILED`, created when the module is
    imported), so calling ``sweep`` again with the same ``loss_fn``, spec and optimizer
    objects reuses their compiled graphs instead of compiling again (10-80 s on CPU).
    Key: the identities of ``(loss_fn, spec, optimizer)`` with ``prox``, the dtype and
    whether the step is vmapped. An entry holds its key objects alive, so their ids cannot
    be reused by other objects while it lives. Bound: at most ``max_entries`` entries; the
    least recently used is evicted first (with its graph and key objects). :meth:`clear`
    empties it.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[Callable[..., Any], tuple[Any, ...]]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Callable[..., Any] | None:
        """The compiled step for ``key`` (now the most recently used), or ``None``."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: Hashable, fn: Callable[..., Any], keep_alive: tuple[Any, ...]) -> None:
        """Store ``fn`` under ``key``, holding ``keep_alive`` (the objects whose ids are in
        the key) until the entry is evicted."""
        self._entries[key] = (fn, keep_alive)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


COMPILED = CompileCache()


# ---------------------------------------------------------------------------- the run


class _Run:
    """One sweep's training loop over chunks of models."""

    def __init__(self, s: Setup, whole_k: int | None = None) -> None:
        self.s = s
        self.whole_k = whole_k
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

        act = s.activity
        one = with_metric_vector(
            _train.train_step(wrapped, s.spec, s.optimizer, s.prox, activity=act)
        )

        def eager(donate: bool) -> Callable[..., Any]:  # a lone model: autograd, fused kernels
            step = _train.eager_step(wrapped, s.spec, s.optimizer, s.prox, act, donate)
            return with_metric_vector(step)

        # donated: the chunk's own state; copying: a diverged model's and CUDA graphs' step
        one_eager, self.copying_step = eager(True), eager(False)
        data_loss_fn = data_loss(loss_fn, act)

        def one_val(p: dict[str, Tensor], bufs: dict[str, Tensor], b: Batch) -> Tensor:
            full = {**p, **bufs}
            vals = [data_loss_fn(full, *b).to(dtype)]
            if val_fn is not None:
                vals.append(torch.as_tensor(val_fn(full, *b)).to(dtype))
            return torch.stack(vals)

        self.wrapped = wrapped
        vmapped = vmap(one, in_dims=(0, 0, 0, 0, None), randomness="different")
        self.fns: dict[bool, Callable[..., Any]] = {  # compile=True compiles these
            True: vmapped,
            False: one if s.compile else one_eager,
        }
        # eager: the update outside vmap, once on the chunk's models (funcreg._stacked)
        split = stacked_step(wrapped, s.spec, s.optimizer, s.prox, act, names, dtype, vmapped)
        batched = vmapped if split is None else split
        self.eager_fns = {True: _math_attention(batched), False: self.fns[False]}
        self.val_fns: dict[bool, Callable[..., Any]] = {
            True: _math_attention(vmap(one_val, in_dims=(0, 0, None), randomness="different")),
            False: one_val,
        }
        self.compiled: dict[bool, Callable[..., Any]] = {}
        self.chunks: list[Chunk] = []
        self.plan: list[tuple[int, int]] = []
        self.plan_record: dict[str, Any] = {}

    # -- pieces ---------------------------------------------------------------------------
    def _guarded(self, batched: bool) -> Callable[..., Any]:
        """The compiled chunk step: vmapped step + divergence guard in one graph, from
        :data:`COMPILED` when the same objects were compiled before."""
        s = self.s
        key = (id(s.loss_fn), id(s.spec), id(s.optimizer), s.prox, s.dtype, batched)
        hit = COMPILED.get(key)
        if hit is not None:
            return hit
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
        COMPILED.put(key, compiled, (s.loss_fn, s.spec, s.optimizer))
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

    def _choose_plan(self, first: Batch) -> tuple[list[tuple[int, int]], dict[str, Any]]:
        """The chunks of this run and the record of how they were chosen (see
        :mod:`funcreg._plan`): a resumed run's recorded plan, ``chunk_size=``/a recorded
        ``plan=``, the static rule, or the fastest of a few timed candidates."""
        s = self.s
        resumed = {} if s.prev is None else s.prev.meta
        # a merged distributed result records its shards' plans: re-plan for one process
        planned = None if "distributed" in resumed else resumed.get("chunks")
        mode = _plan.check_plan(s.plan, s.chunk_size)
        if s.chunk_size is None and isinstance(mode, str) and planned:
            chunks = [(int(a), int(b)) for a, b in planned]
            return chunks, dict(resumed.get("plan") or {"how": "resumed"})
        if s.chunk_size is not None or isinstance(mode, int):
            size = s.chunk_size if s.chunk_size is not None else int(mode)
            return plan_chunks(s.k, size), {"how": "given", "chunk_size": size}
        # the probes may draw random numbers: run() reseeds after
        b0 = {n: v[0].clone() for n, v in s.stacked_b.items()}
        p0 = {n: v[0] for n, v in s.stacked_p.items()}

        def forward() -> Any:
            return self.wrapped(p0, b0, *first)

        static = auto_chunk_size(
            forward, s.k, s.dev, whole_k=self.whole_k, compiled=s.compile, params=p0
        )
        ratio = _plan.max_memory(s.plan)
        bound: dict[str, Any] = {}
        if ratio is not None:  # plan={"max_memory": r}: no chunk past the memory cap
            mem_cap = memory_cap(forward, p0, s.optimizer.init(p0), s.k, ratio)
            static = min(static, mem_cap)
            bound = {"max_memory": ratio, "memory_cap": mem_cap}
        steps = s.steps - self.start
        probe = mode == "measure" or (mode == "auto" and steps >= _plan.PROBE_MIN_STEPS)
        # shards of a distributed sweep and compiled steps (a compile per candidate) keep
        # the static rule
        if s.k < 2 or self.whole_k is not None or s.compile or not probe:
            return plan_chunks(s.k, static), {"how": "static", "chunk_size": static, **bound}
        key = (self._plan_key(first), ratio)
        hit = _plan.CACHE.get(key)
        if hit is not None:
            return plan_chunks(s.k, hit["chunk_size"]), {**hit, "cached": True}
        # off the CPU there is no mmap cliff: vmapped candidates up to the whole grid
        cap = footprint(forward, p0).cap() if s.dev.type == "cpu" else s.k
        cap = min(cap, bound.get("memory_cap", cap))
        sizes = _plan.candidates(s.k, static, cap)
        if mode == "auto":
            sizes = _plan.within_budget(sizes, s.k, steps)
        one_cpu_thread = s.dev.type == "cpu" and torch.get_num_threads() == 1
        per_model = _plan.measure(sizes, lambda c: self._probe_step(c, first), one_cpu_thread)
        size = _plan.choose(per_model, static)
        record = {
            "how": "measured",
            "chunk_size": size,
            "static": static,
            "per_model_s": {str(c): t for c, t in per_model.items()},
            **bound,
        }
        _plan.CACHE.put(key, record)
        return plan_chunks(s.k, size), record

    def _plan_key(self, first: Batch) -> Hashable:
        """What a measured plan depends on: shapes and dtypes of one model and a batch,
        device, K, optimizer, spec, prox."""
        s = self.s

        def shapes(ts: Mapping[str, Tensor] | Batch) -> tuple[Any, ...]:
            items = ts.items() if isinstance(ts, Mapping) else enumerate(ts)
            return tuple((n, tuple(t.shape), str(t.dtype)) for n, t in items)

        spec = tuple((n, type(p).__name__) for n, p in s.spec.items())
        config = tuple(sorted((k, repr(v)) for k, v in dict(s.optimizer.config).items()))
        return (
            type(s.model).__qualname__,
            shapes(s.params0),
            shapes(s.fixed0),
            shapes(first),
            str(s.dev),
            str(s.dtype),
            s.k,
            config,
            spec,
            s.prox,
        )

    def _probe_step(self, c: int, batch: Batch) -> Callable[[], None]:
        """One step of a throwaway chunk of the first ``c`` models (copies of their params,
        buffers, strengths and a fresh optimizer state), as :meth:`_train_step` runs it."""
        s = self.s
        batched = c > 1

        def take(t: Tensor) -> Tensor:
            return t[:c].clone() if batched else t[0].clone()

        params = {n: take(v) for n, v in s.stacked_p.items()}
        held: list[Any] = [
            params,
            _fresh_state(s.optimizer, params, batched),
            {n: take(v) for n, v in s.stacked_b.items()},
        ]
        strengths = {n: take(v.to(s.dev, s.dtype)) for n, v in s.grid.items()}
        fn = self.eager_fns[batched]

        def step() -> None:
            old_b = {n: v.clone() for n, v in held[2].items()}  # as the guard does
            new_p, new_s, mvec = fn(held[0], held[1], held[2], strengths, batch)
            _all_finite(mvec, new_p)
            held[0], held[1] = new_p, new_s
            del old_b
            if s.dev.type == "cuda":
                torch.cuda.synchronize(s.dev)

        return step

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
            ch.state = _fresh_state(s.optimizer, ch.params, batched)
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
        # the chunks hold their own copies: the stacked init (K models) is not read again
        s.stacked_p, s.stacked_b = {}, {}

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
                # a lone diverged model steps on copies: its frozen state must not drift
                fn = self.eager_fns[ch.batched] if ch.healthy or ch.batched else self.copying_step
                new_p, new_s, mvec = fn(ch.params, ch.state, ch.bufs, ch.strengths, batch)
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
            with eval_mode(s.model):  # each validation batch is read once, for every chunk
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
            v = self.val_hist[e, :, 0]
            best = float(torch.where(torch.isnan(v), math.inf, v).min())
        for n in s.selected:
            for ch in self.chunks:
                p = ch.params[n].reshape(ch.stop - ch.start, -1)
                # (p == 0).float().mean(1) to the bit (a count below 2**24 is exact in
                # float32, then one rounded division), in one pass without temporaries
                zeros = p.shape[1] - torch.count_nonzero(p, dim=1)
                self.zeros[n][e, ch.start : ch.stop] = zeros.float() / p.shape[1]
        self.e_index += 1
        return best

    def _snapshot(self, done: int, last: bool = False) -> SweepResult:
        """The result after ``done`` steps; ``last``: the run's result, built from the
        chunks' own tensors (they are left empty, see :func:`unsplit`'s ``release``)."""
        s, e, names = self.s, self.e_index, self.s.metric_names
        chunks = self.chunks

        def drop(attr: str, empty: Any) -> Callable[[Chunk], None] | None:
            return (lambda ch: setattr(ch, attr, empty)) if last else None

        before = 0.0 if s.prev is None else float(s.prev.meta.get("elapsed_s", 0.0))
        meta = {
            "identity": s.identity,
            "metrics": list(names),
            "selected": list(s.selected),
            "eval_every": s.eval_every,
            "chunks": [[a, b] for a, b in self.plan],
            "plan": self.plan_record,
            "compile": s.compile,
            "device": str(s.dev),
            "elapsed_s": before + time.perf_counter() - s.t_start,
        }
        resume = {
            "opt_state": tree_flatten(unsplit(chunks, lambda ch: ch.state, drop("state", None)))[0],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(s.dev) if s.dev.type == "cuda" else None,
        }
        return SweepResult.from_run(
            grid=s.grid,
            stacked=unsplit(chunks, lambda ch: ch.params, drop("params", {})),
            stacked_buffers=unsplit(chunks, lambda ch: ch.bufs, drop("bufs", {}))
            if s.fixed0
            else {},
            rows=self.hist[:done],
            metric_names=names,
            eval_step=self.eval_steps[:e],
            val_rows=None
            if s.val is None
            else self.val_hist[:e, :, : (1 if s.val_fn is None else 2)],
            zeros={n: z[:e] for n, z in self.zeros.items()},
            diverged=~torch.cat([ch.alive for ch in chunks]),
            diverged_at=torch.cat([ch.diverged_at for ch in chunks]),
            steps=done,
            meta=meta,
            resume=resume,
            model=s.model,
            clone=False,
        )

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> SweepResult:
        s = self.s
        self._history()
        with contextlib.ExitStack() as stack_:
            stack_.enter_context(torch.random.fork_rng(devices=_rng_devices(s.dev)))
            _seed(s.seed, s.dev)  # also seeds a shuffling DataLoader's first pass
            first = s.train.batch(self.start)
            self.plan, self.plan_record = self._choose_plan(first)
            self.plan_record = _plan.with_cuda_graph(self.plan_record, s.plan)
            if self.plan_record.get("cuda_graph"):
                pure = {True: self.eager_fns[True], False: self.copying_step}  # graphs: no donation
                self.eager_fns = graphed(pure, s.dev)
                self.copying_step = self.eager_fns[False]
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
            result = self._snapshot(s.steps, last=True)
        return result
