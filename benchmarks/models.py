"""fr.sweep against a loop of torch.optim models on the models people train (CPU, one thread).

Models (synthetic data unless said, float32, Adam lr 1e-3, K L2 strengths log-spaced from
1e-6 to 1e-2, the penalty ``s·½Σ‖W‖²`` over the weights, ``ndim >= 2``: ``fr.L2()``):

- ``tiny``: MLP 32→64→64→1, minibatch 512, MSE;
- ``mlp``: MLP 784→512→512→10, minibatch 128, cross-entropy;
- ``cnn``: LeNet (conv 6@5×5, pool, conv 16@5×5, pool, 120, 84, 10) on 28×28, minibatch 64;
- ``transformer``: 2-layer encoder (d = 64, 4 heads, feed-forward 128, dropout 0.1,
  LayerNorm), sequences of 32, mean-pooled, 10 classes, minibatch 32;
- ``digits``: MLP 64→128→10 on scikit-learn's ``load_digits`` (1797 images), full batch;
- ``tiny-sgd``, ``tiny-adam``: the MLP task of ``sweep_vs_loop.py`` (``common.py``: MLP
  32→64→64→1, minibatch 512, MSE, ``λ·Σ|W1| + λ·Σ‖W‖²`` with λ log-spaced from 1e-5 to
  1e-1, ``prox=False``), with SGD (lr 0.05) and Adam (lr 1e-3); by default at K = 64 only,
  with ``compile`` (not in the default ``--models``: ``--models tiny-sgd,tiny-adam``).

Implementations, all in one worker process per (model, K), interleaved round by round so
that they share the machine's load (ratios come from one run):

- ``loop``: K ``nn.Module`` copies, each with its own default ``torch.optim.Adam``
  (the penalty added to the loss), one after another;
- ``fused``: the same with ``torch.optim.Adam(fused=True)`` (the peer on compute-bound models);
- ``vmap``: a hand-written ``vmap(grad(loss))`` over stacked params + functional Adam,
  all K at once (the "DIY" route);
- ``sweep``: ``fr.sweep`` with the plan its probe measures (one ``plan="measure"`` call
  first; its choice is then replayed with ``plan=`` in the timed calls, so each timed
  call costs its steps and its setup, not the probe);
- ``compile`` (``--compile``): ``fr.sweep(compile=True)`` (static plan; compile time left out);
- ``sweep-mem`` (``--impls ...,sweep-mem``): ``fr.sweep(plan={"max_memory": 1.5})``, the
  plan bounded to 1.5× a loop's estimated model memory (measured once, then replayed).
- ``graph`` (``--impls ...,graph``): ``fr.sweep(plan={"mode": "measure", "cuda_graph": True})``,
  the measured plan with every eager step replayed from a CUDA graph (CUDA devices only).

Peak memory: one more short process per (model, largest K, implementation), the high-water
mark of its resident set minus its resident set before training, over 3 steps (fr.sweep:
its setup, the chunks of its timed plan, its result; ``--no-memory`` skips). These
processes run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so
that a freed tensor goes back to the system and the high-water mark is that of live
memory: with glibc's dynamic threshold, freed blocks stay in the heap in an order that
changes from run to run, and four runs of the same loop (digits, K = 32) peaked at 20 to
60 MB.

Usage: ``python benchmarks/models.py`` (a few minutes: K = 1, 8, 32), ``--big`` adds
K = 128, ``--models mlp,cnn``, ``--k 8 32``, ``--out benchmarks/models_results.md``,
``--append`` (add to ``--out``/``--json``), ``--memory-only`` (the peak memory of the rows
in ``--json`` again, with their recorded chunks; their lines in ``--out`` rewritten).
JAX is not measured here (no peer written; ``sweep_vs_loop.py`` has one for the tiny MLP).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

MODELS = ("tiny", "mlp", "cnn", "transformer", "digits")
TASK_MODELS = ("tiny-sgd", "tiny-adam")  # sweep_vs_loop.py's task (common.py), L1 + L2
TASK_KS = (64,)  # their K when --k is not given; they add ``compile``
IMPLS = ("loop", "fused", "vmap", "sweep")
LR = 1e-3
MEMORY_RATIO = 1.5  # sweep-mem: plan={"max_memory": MEMORY_RATIO}
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONHASHSEED": "0"}
BLOCK_S = 0.4  # seconds of training per implementation per round (at least 2 steps)
SWEEP_MIN_STEPS = 20  # fr.sweep blocks: at least this many steps per call
RUN_STEPS = 200  # fr.sweep's ms/step: that of a run this long (its setup spread over it)
SWEEPS = ("sweep", "sweep-mem", "compile", "graph")


# ============================================================================ the models


def build(name: str, seed: int = 0) -> tuple[Any, Any, Any, int | None, str]:
    """``(model, X, Y, batch_size or None, loss kind)`` for ``name``, seeded."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name in TASK_MODELS:
        x, y = common.make_data(seed)
        return common.make_model(seed), x, y, 512, "mse"
    if name == "tiny":
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        net.append(nn.Linear(64, 1))
        x = torch.randn(4096, 32, generator=g)
        return net, x, torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3], 512, "mse"
    if name == "mlp":
        net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        net.append(nn.Linear(512, 10))
        return net, torch.randn(2048, 784, generator=g), _labels(2048, g), 128, "ce"
    if name == "cnn":
        net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )  # fmt: skip
        return net, torch.randn(1024, 1, 28, 28, generator=g), _labels(1024, g), 64, "ce"
    if name == "transformer":
        net = Encoder()
        return net, torch.randn(1024, 32, 64, generator=g), _labels(1024, g), 32, "ce"
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        return net, x, torch.tensor(d.target), None, "ce"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS + TASK_MODELS}")


def _labels(n: int, g: Any) -> Any:
    import torch

    return torch.randint(0, 10, (n,), generator=g)


def _encoder_class() -> type:
    from torch import nn

    class _Encoder(nn.Module):
        """Two post-norm encoder layers (dropout 0.1, LayerNorm), mean-pooled, 10 classes."""

        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 10)

        def forward(self, x: Any) -> Any:
            return self.head(self.encoder(x).mean(1))

    return _Encoder


def Encoder() -> Any:  # noqa: N802 - a class built on first use (torch imported lazily)
    return _encoder_class()()


def strengths(k: int) -> list[float]:
    return [10 ** (-6 + 4 * i / max(k - 1, 1)) for i in range(k)]


def data_loss(kind: str) -> Callable[[Any, Any], Any]:
    import torch.nn.functional as F

    return F.mse_loss if kind == "mse" else F.cross_entropy


# ============================================================================ workers


class Workload:
    """One (model, K): the implementations' step blocks, built once, run interleaved."""

    def __init__(self, name: str, k: int, device: str = "cpu") -> None:
        import torch

        self.torch = torch
        self.name, self.k, self.device = name, k, torch.device(device)
        net, x, y, self.bs, kind = build(name)
        self.net, self.x, self.y = net.to(device), x.to(device), y.to(device)
        self.loss = data_loss(kind)
        self.s = strengths(k)
        self.s1: list[float] | None = None  # L1 strengths of "0.weight" (the task models)
        self.opt, self.lr = ("sgd", common.SGD_LR) if name == "tiny-sgd" else ("adam", LR)
        if name in TASK_MODELS:
            lam = common.strengths(k).tolist()
            self.s1, self.s = lam, [2 * v for v in lam]
        n = self.x.shape[0]
        self.n_batches = 1 if self.bs is None else n // self.bs

    def batch(self, i: int) -> tuple[Any, Any]:
        if self.bs is None:
            return self.x, self.y
        j = i % self.n_batches
        return self.x[j * self.bs : (j + 1) * self.bs], self.y[j * self.bs : (j + 1) * self.bs]

    # -- loop of torch.optim models ------------------------------------------------------
    def loop(self, fused: bool) -> Callable[[int], None]:
        import copy

        torch = self.torch
        nets = [copy.deepcopy(self.net) for _ in range(self.k)]
        cls = torch.optim.SGD if self.opt == "sgd" else torch.optim.Adam
        opts = [cls(m.parameters(), lr=self.lr, fused=fused or None) for m in nets]
        l1s = self.s1 or [0.0] * self.k
        pairs = list(zip(nets, opts, self.s, l1s, strict=True))

        def steps(n: int) -> None:
            for i in range(n):
                xb, yb = self.batch(i)
                for m, opt, s, s1 in pairs:
                    opt.zero_grad(set_to_none=True)
                    penalty = 0.5 * sum(p.pow(2).sum() for p in m.parameters() if p.ndim > 1)
                    loss = self.loss(m(xb), yb) + s * penalty
                    if self.s1 is not None:
                        loss = loss + s1 * m[0].weight.abs().sum()
                    loss.backward()
                    opt.step()

        return steps

    # -- DIY vmap(grad) + functional Adam -------------------------------------------------
    def vmap(self) -> Callable[[int], None]:
        torch = self.torch
        from torch.func import functional_call, grad, vmap

        net, k = self.net, self.k
        p = {n: v.detach().unsqueeze(0).repeat(k, *[1] * v.ndim) for n, v in net.named_parameters()}
        m = {n: torch.zeros_like(v) for n, v in p.items()}
        v2 = {n: torch.zeros_like(v) for n, v in p.items()}
        lam = torch.tensor(self.s, device=self.device)
        lam1 = torch.tensor(self.s1 or [0.0] * k, device=self.device)
        b1, b2, eps = 0.9, 0.999, 1e-8
        loss, l1 = self.loss, self.s1 is not None

        def objective(params: Any, s: Any, s1: Any, xb: Any, yb: Any) -> Any:
            penalty = 0.5 * sum(w.pow(2).sum() for w in params.values() if w.ndim > 1)
            out = loss(functional_call(net, params, (xb,)), yb) + s * penalty
            return out + s1 * params["0.weight"].abs().sum() if l1 else out

        g_fn = vmap(grad(objective), in_dims=(0, 0, 0, None, None), randomness="different")
        state = {"p": p, "m": m, "v": v2, "t": 0}

        def steps(n: int) -> None:
            for i in range(n):
                xb, yb = self.batch(i)
                g = g_fn(state["p"], lam, lam1, xb, yb)
                if self.opt == "sgd":
                    for key in g:
                        state["p"][key] = state["p"][key] - self.lr * g[key]
                    continue
                state["t"] += 1
                t = state["t"]
                c1, c2 = 1 - b1**t, math.sqrt(1 - b2**t)
                for key in g:
                    mk = state["m"][key] * b1 + g[key] * (1 - b1)
                    vk = state["v"][key] * b2 + g[key] * g[key] * (1 - b2)
                    denom = vk.sqrt() / c2 + eps
                    state["p"][key] = state["p"][key] - (LR / c1) * mk / denom
                    state["m"][key], state["v"][key] = mk, vk

        return steps

    # -- fr.sweep -------------------------------------------------------------------------
    def _sweep_args(self) -> tuple[Any, ...]:
        from torch.func import functional_call

        import funcreg as fr

        net, loss = self.net, self.loss

        def loss_fn(params: Any, xb: Any, yb: Any) -> Any:
            return loss(functional_call(net, params, (xb,)), yb)

        if self.s1 is None:
            return net, loss_fn, fr.Spec(l2=fr.L2()), fr.grid(l2=self.s)
        spec = fr.Spec(l1=fr.L1(common.L1_PARAM), l2=fr.L2())
        return net, loss_fn, spec, fr.grid(l1=self.s1, l2=self.s, product=False)

    def sweep_kwargs(self) -> dict[str, Any]:
        """fr.sweep's arguments beside the model, loss, spec and grid (the task models:
        ``prox=False``, the subgradient L1 that the loop and the DIY vmap take)."""
        import funcreg as fr

        opt = fr.optim.sgd(self.lr) if self.opt == "sgd" else fr.optim.adam(self.lr)
        kw: dict[str, Any] = dict(
            train=(self.x, self.y), optimizer=opt, batch_size=self.bs, progress=False
        )
        return {**kw, "prox": False} if self.s1 is not None else kw

    def sweep(
        self, compile: bool = False, max_memory: float | None = None, graph: bool = False
    ) -> tuple[Callable[[int], None], dict[str, Any]]:
        import funcreg as fr

        net, loss_fn, spec, g = self._sweep_args()
        kw = {**self.sweep_kwargs(), "compile": compile}
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        first: Any = (
            "measure" if max_memory is None else {"mode": "measure", "max_memory": max_memory}
        )
        if graph:  # the measured plan (eager steps), then replayed from CUDA graphs
            first = {"mode": "measure", "cuda_graph": True}
        if compile:
            r = fr.sweep(net, loss_fn, spec, g, steps=2, **kw)
        else:
            r = fr.sweep(net, loss_fn, spec, g, steps=2, plan=first, **kw)
        info["first_call_s"] = time.perf_counter() - t0
        info["plan"] = r.meta["plan"]
        info["chunks"] = [b - a for a, b in r.meta["chunks"]]
        plan = None if compile else r.meta["plan"]

        def steps(n: int) -> None:  # one evaluation (zeros) per call, as in a long run's 20
            fr.sweep(net, loss_fn, spec, g, steps=n, plan=plan, eval_every=n, **kw)

        return steps, info


def _make(w: Workload, impl: str) -> tuple[Callable[[int], None], dict[str, Any]]:
    if impl in ("loop", "fused"):
        return w.loop(impl == "fused"), {}
    if impl == "vmap":
        return w.vmap(), {}
    if impl == "sweep":
        return w.sweep()
    if impl == "sweep-mem":
        return w.sweep(max_memory=MEMORY_RATIO)
    if impl == "compile":
        return w.sweep(compile=True)
    if impl == "graph":
        return w.sweep(graph=True)
    raise ValueError(impl)


def worker_time(cfg: dict[str, Any]) -> dict[str, Any]:
    """Interleaved rounds: each implementation trains a block of steps per round; ms/step is
    the median over rounds (CPU time of the process, and wall time).

    An ``fr.sweep`` call also pays a setup (stacking the K models, building the result) once:
    from its block time ``B = O + n·s`` and the median time of one-step calls ``T1 = O + s``
    its step ``s`` and setup ``O`` follow, and its ms/step is that of a run of
    :data:`RUN_STEPS` steps, ``s + O / RUN_STEPS`` (``O`` recorded as ``setup_cpu_ms``)."""
    import torch

    torch.set_num_threads(1)
    w = Workload(cfg["model"], cfg["k"], cfg.get("device", "cpu"))
    cuda = w.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(w.device)

    runs: dict[str, tuple[Callable[[int], None], int]] = {}
    out: dict[str, Any] = {"impls": {}}
    for impl in cfg["impls"]:
        fn, info = _make(w, impl)
        t0 = time.process_time()
        fn(2)  # warm-up and calibration
        sync()
        per = max((time.process_time() - t0) / 2, 1e-6)
        n = max(2, min(200, round(BLOCK_S / per)))
        if impl in SWEEPS:
            n = max(n, SWEEP_MIN_STEPS)
        runs[impl] = (fn, n)
        out["impls"][impl] = {**info, "steps_per_block": n, "cpu_ms": [], "wall_ms": []}
    for _ in range(cfg["rounds"]):
        for impl, (fn, n) in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn(n)
            sync()
            rec = out["impls"][impl]
            rec["cpu_ms"].append(1e3 * (time.process_time() - c0) / n)
            rec["wall_ms"].append(1e3 * (time.perf_counter() - w0) / n)
    for impl, (fn, n) in runs.items():
        rec = out["impls"][impl]
        if impl in SWEEPS:
            ones = []
            for _ in range(3):
                c0, w0 = time.process_time(), time.perf_counter()
                fn(1)
                sync()
                ones.append((1e3 * (time.process_time() - c0), 1e3 * (time.perf_counter() - w0)))
            for j, clock in enumerate(("cpu_ms", "wall_ms")):
                t1 = statistics.median(o[j] for o in ones)
                rec[clock + "_calls"] = rec[clock]
                steps = [(b * n - t1) / (n - 1) for b in rec[clock]]
                setup = max(0.0, t1 - statistics.median(steps))
                rec[clock] = [x + setup / RUN_STEPS for x in steps]
                rec["setup_" + clock] = setup
        rec["cpu_ms_median"] = statistics.median(rec["cpu_ms"])
        rec["wall_ms_median"] = statistics.median(rec["wall_ms"])
    return out


def worker_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak resident set of 3 steps of one implementation (its models, optimizer states and
    temporaries) minus the resident set before it starts, after the data, the imports and
    one tiny warm-up of autograd and vmap; MB."""
    import torch
    from torch.func import grad, vmap

    import funcreg as fr

    torch.set_num_threads(1)
    w = Workload(cfg["model"], cfg["k"], cfg.get("device", "cpu"))
    cuda = w.device.type == "cuda"
    vmap(grad(lambda a: (a * a).sum()))(torch.ones(2, 3, requires_grad=True)).sum()
    impl = cfg["impl"]
    base = common.current_rss_mb()
    common.reset_peak_rss()
    if cuda:
        torch.cuda.synchronize(w.device)
        base = torch.cuda.memory_allocated(w.device) / 2**20
        torch.cuda.reset_peak_memory_stats(w.device)
    if impl in SWEEPS:
        net, loss_fn, spec, g = w._sweep_args()
        kw = w.sweep_kwargs()
        fr.sweep(net, loss_fn, spec, g, steps=3, chunk_size=cfg["chunk_size"], **kw)
    else:
        fn, _ = _make(w, impl)
        fn(3)
    if cuda:
        return {"peak_mb": torch.cuda.max_memory_allocated(w.device) / 2**20 - base}
    return {"peak_mb": common.peak_rss_mb() - base}


# ============================================================================ parent


def measure_memory(row: dict[str, Any], impls: list[str], device: str) -> dict[str, float]:
    """Peak MB of each implementation but ``compile`` for one row (model, K), fr.sweep's
    with the chunks of its timed plan."""
    out: dict[str, float] = {}
    for impl in (i for i in impls if i != "compile"):
        chunk = max(row["impls"].get(impl, {}).get("chunks") or [1])
        mcfg = {"model": row["model"], "k": row["k"], "impl": impl, "chunk_size": chunk}
        out[impl] = launch({**mcfg, "device": device}, 600).get("peak_mb", float("nan"))
    return out


def remeasure(json_path: str, md_path: str | None, device: str) -> list[dict[str, Any]]:
    """``--memory-only``: the memory of the rows of ``json_path`` that have one, again."""
    rows = json.loads(Path(json_path).read_text())
    for row in rows:
        if "memory" in row:
            row["memory"] = measure_memory(row, list(row["impls"]), device)
            print(row["model"], row["k"], row["memory"], flush=True)
    Path(json_path).write_text(json.dumps(rows, indent=1))
    if md_path:
        key = "wall_ms_median" if device.startswith("cuda") else "cpu_ms_median"
        by = {(r["model"], str(r["k"])): r for r in rows if "memory" in r}
        lines, impls = Path(md_path).read_text().splitlines(), []
        for j, line in enumerate(lines):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("| model |"):
                impls = [c[:-3] for c in cells if c.endswith(" ms")]
            elif line.startswith("| ") and (cells[0], cells[1]) in by:
                lines[j] = table([by[cells[0], cells[1]]], impls, key)[2]
        Path(md_path).write_text("\n".join(lines) + "\n")
    return rows


def launch(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if "impl" in cfg:  # a memory worker: live memory, not the heap's history (docstring)
        env.update(MEMORY_ENV)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return common.launch(__file__, cfg, env, timeout)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None or x != x else format(x, spec)


def table(rows: list[dict[str, Any]], impls: list[str], key: str = "cpu_ms_median") -> list[str]:
    head = ["model", "K", *[f"{i} ms" for i in impls], *[f"{i}/loop" for i in impls[1:]]]
    planned = [i for i in ("sweep", "sweep-mem") if i in impls]
    head += ["sweep/min(loop,vmap)", *[f"{i} chunks" for i in planned]]
    head += ["peak MB " + "/".join(impls), "peak sweep/loop"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        t = r.get("impls", {})
        ms = {i: t.get(i, {}).get(key) for i in impls}
        loop = ms.get("loop")
        ratios = [ms[i] / loop if ms[i] and loop else None for i in impls[1:]]
        peers = [ms[i] for i in ("loop", "vmap") if ms.get(i)]
        env = ms["sweep"] / min(peers) if ms.get("sweep") and peers else None
        plans = []
        for i in planned:
            chunks = t.get(i, {}).get("chunks")
            how = t.get(i, {}).get("plan", {}).get("how", "")
            plans.append(f"{_chunk_text(chunks)} ({how})" if chunks else "—")
        mem = r.get("memory", {})
        peak = "/".join(_fmt(mem.get(i), ".0f") for i in impls) if mem else "—"
        rel = mem["sweep"] / mem["loop"] if mem.get("sweep") and mem.get("loop") else None
        cells = [r["model"], str(r["k"]), *[_fmt(ms[i]) for i in impls]]
        cells += [_fmt(x, ".2f") for x in ratios] + [_fmt(env, ".2f"), *plans, peak]
        cells.append(_fmt(rel, ".2f"))
        if "error" in r:
            cells[2] = "error: " + r["error"][:80]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _chunk_text(sizes: list[int]) -> str:
    groups: dict[int, int] = {}
    for s in sizes:
        groups[s] = groups.get(s, 0) + 1
    return "+".join(f"{n}×{s}" for s, n in sorted(groups.items(), reverse=True))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument(
        "--k", type=int, nargs="+", help="K values (default 1 8 32; 64 for the task models)"
    )
    p.add_argument("--big", action="store_true", help="add K = 128")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--compile", action="store_true", help="add fr.sweep(compile=True)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per (model, K)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU: wall ms, GPU memory)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--append", action="store_true", help="add to --out/--json, not replace")
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="measure the peak memory of the rows in --json again (their recorded plans) "
        "and rewrite their lines in --out",
    )
    p.add_argument("--timeout", type=float, default=1200)
    args = p.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        res = worker_memory(cfg) if "impl" in cfg else worker_time(cfg)
        print("RESULT " + json.dumps(res), flush=True)
        return []
    if args.memory_only:
        return remeasure(args.json, args.out, args.device)
    models = [m for m in args.models.split(",") if m]
    base_impls = [i for i in args.impls.split(",") if i] + (["compile"] if args.compile else [])
    key = "wall_ms_median" if args.device.startswith("cuda") else "cpu_ms_median"
    what = "wall" if args.device.startswith("cuda") else "CPU"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    all_impls: list[str] = []
    for model in models:
        task = model in TASK_MODELS
        ks = args.k or (list(TASK_KS) if task else [1, 8, 32])
        ks = sorted(set(ks + ([128] if args.big else [])))
        impls = base_impls + (["compile"] if task and "compile" not in base_impls else [])
        all_impls += [i for i in impls if i not in all_impls]
        for k in ks:
            cfg = {"model": model, "k": k, "impls": impls, "rounds": args.rounds}
            cfg["device"] = args.device
            row = {"model": model, "k": k, **launch(cfg, args.timeout)}
            if not args.no_memory and k == ks[-1] and "error" not in row:
                row["memory"] = measure_memory(row, impls, args.device)
            rows.append(row)
            print("\n".join(table([row], impls, key)[2:]), flush=True)
    impls = all_impls
    load1 = os.getloadavg()
    import torch

    lines = [
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, one thread per worker; "
        f"load average {load0[0]:.2f}/{load0[1]:.2f} before, {load1[0]:.2f}/{load1[1]:.2f} "
        f"after; {time.perf_counter() - t0:.0f} s in all; ms = {what} ms per step of all K "
        f"models, median of {args.rounds} interleaved rounds",
        "",
        *table(rows, impls, key),
    ]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        before = out.read_text() + "\n" if args.append and out.exists() else ""
        out.write_text(before + "\n".join(lines) + "\n")
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if args.append and path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
