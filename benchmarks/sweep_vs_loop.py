"""K regularization strengths as K loops vs. one vectorized run (task: benchmarks/README.md).

Implementations, each measured in its own fresh subprocess (so that peak RSS is attributable),
interleaved round-robin over repeats, medians over repeats reported:

  loop   (a) the seed-style loop: K ``nn.Sequential`` models, one ``torch.optim`` each
  vmap   (b) the raw hand-written step: ``vmap(grad(loss))`` over stacked params, then an
             in-place Adam/SGD update of the stacked tensors (torch.optim's formulas)
  sweep  (c) ``funcreg.sweep(..., prox=False)``
  sweep-compile (d) ``funcreg.sweep(..., prox=False, compile=True)``
  jax    (e) JAX + optax: ``jit(vmap(grad))`` step (only when jax and optax are installed)

Every implementation trains the same K models (same init, same batches, same strengths)
with the subgradient of L1, so the final parameters are compared against the loop's.

Timing: (a), (b), (e) time every step (blocking) and report the mean over the steps after
``--warmup`` (total / steps, the statistic (c) and (d) give, so that all are compared like for
like); the first step minus that mean is the warm-up (JAX: the jit compile). (c)
and (d) run the whole sweep of S steps twice in the worker; the per-step time is the second
run's time divided by S (nothing subtracted: data handling, history and all overhead are in),
and the compile time of (d) is the first run minus the second. Wall and process CPU time are
both reported: JAX/XLA may use more than one core even with one thread requested.

Run ``python benchmarks/sweep_vs_loop.py`` (about 6-8 minutes on a 2-core machine),
``--quick`` for a CI smoke run (< 60 s), ``--dtype float64`` for the exactness check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

IMPLS = {
    "loop": "(a) torch.optim loop",
    "vmap": "(b) raw vmap(grad)",
    "sweep": "(c) fr.sweep",
    "sweep-compile": "(d) fr.sweep compile",
    "jax": "(e) JAX+optax jit",
}
SWEEP_MISSING = "funcreg.sweep not available"


# ============================================================================ workers
# Each runs in a fresh process: ``python sweep_vs_loop.py --worker '<json config>'``.


def _torch_setup(cfg: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any], Any, Any]:
    """torch, dtype and the task's tensors on ``cfg["device"]`` (the batch indices too)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg["dtype"]]
    x, y, init, idx = common.read_task(Path(cfg["task"]))
    X = torch.from_numpy(x).to(dev, dtype)
    Y = torch.from_numpy(y).to(dev, dtype)
    init_t = {k: torch.from_numpy(v).to(dev, dtype) for k, v in init.items()}
    idx_t = None if idx is None else torch.from_numpy(idx).to(dev)
    return torch, dtype, X, init_t, Y, idx_t


def _sync(cfg: dict[str, Any]) -> Any:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    import torch

    if cfg["device"].startswith("cuda"):
        dev = torch.device(cfg["device"])
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def _host(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


def _batch(X: Any, Y: Any, idx: Any, i: int) -> tuple[Any, Any]:
    if idx is None:
        return X, Y
    b = idx[i]
    return X[b], Y[b]


def _new_model(torch: Any, dtype: Any, init: dict[str, Any]) -> Any:
    model = common.make_model().to(init["0.weight"].device, dtype)
    with torch.no_grad():
        model.load_state_dict(init)
    return model


def worker_loop(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(a) K modules, K torch.optim optimizers, hand-written penalty in the loss."""
    torch, dtype, X, init, Y, idx = _torch_setup(cfg)
    import torch.nn.functional as F

    lams = [float(v) for v in common.strengths(cfg["K"])]
    models = [_new_model(torch, dtype, init) for _ in lams]
    if cfg["optimizer"] == "adam":
        opts = [
            torch.optim.Adam(
                m.parameters(), lr=common.ADAM_LR, betas=common.ADAM_BETAS, eps=common.ADAM_EPS
            )
            for m in models
        ]
    else:
        opts = [torch.optim.SGD(m.parameters(), lr=common.SGD_LR) for m in models]
    rss0 = common.current_rss_mb()
    sync = _sync(cfg)

    def step(i: int) -> None:
        xb, yb = _batch(X, Y, idx, i)
        for model, opt, lam in zip(models, opts, lams, strict=True):
            w1, w2, w3 = model[0].weight, model[2].weight, model[4].weight
            reg = lam * w1.abs().sum() + lam * (w1.pow(2).sum() + w2.pow(2).sum() + w3.pow(2).sum())
            loss = F.mse_loss(model(xb), yb) + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()

    timing = common.time_steps(step, cfg["steps"], cfg["warmup"])
    timing["rss_start_mb"] = rss0
    final = {
        name: _host(torch.stack([dict(m.named_parameters())[name] for m in models]))
        for name in common.PARAM_NAMES
    }
    return timing, final


def worker_vmap(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(b) ``vmap(grad)`` over stacked params + in-place torch.optim-formula update."""
    torch, dtype, X, init, Y, idx = _torch_setup(cfg)
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    K = cfg["K"]
    base = _new_model(torch, dtype, init)
    # one init for all K models: expand, then clone (in-place updates follow)
    P = {k: v.expand(K, *v.shape).clone() for k, v in init.items()}
    lam = torch.tensor(common.strengths(K), dtype=dtype, device=X.device)

    def loss_fn(p: dict[str, Any], lam: Any, xb: Any, yb: Any) -> Any:
        out = functional_call(base, p, (xb,), strict=True)
        w1, w2, w3 = p["0.weight"], p["2.weight"], p["4.weight"]
        reg = lam * w1.abs().sum() + lam * (w1.pow(2).sum() + w2.pow(2).sum() + w3.pow(2).sum())
        return F.mse_loss(out, yb) + reg

    grad_fn = vmap(grad(loss_fn), in_dims=(0, 0, None, None))
    adam = cfg["optimizer"] == "adam"
    m = {k: torch.zeros_like(v) for k, v in P.items()} if adam else {}
    v2 = {k: torch.zeros_like(v) for k, v in P.items()} if adam else {}
    b1, b2 = common.ADAM_BETAS
    t = [0]
    rss0 = common.current_rss_mb()
    sync = _sync(cfg)

    def step(i: int) -> None:
        xb, yb = _batch(X, Y, idx, i)
        g = grad_fn(P, lam, xb, yb)
        with torch.no_grad():
            if not adam:
                for k, p in P.items():
                    p.add_(g[k], alpha=-common.SGD_LR)
                sync()
                return
            t[0] += 1
            step_size = common.ADAM_LR / (1 - b1 ** t[0])
            bc2_sqrt = (1 - b2 ** t[0]) ** 0.5
            for k, p in P.items():
                m[k].lerp_(g[k], 1 - b1)
                v2[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                denom = (v2[k].sqrt() / bc2_sqrt).add_(common.ADAM_EPS)
                p.addcdiv_(m[k], denom, value=-step_size)
        sync()

    timing = common.time_steps(step, cfg["steps"], cfg["warmup"])
    timing["rss_start_mb"] = rss0
    return timing, {k: _host(v) for k, v in P.items()}


class _Batches:
    """The task's minibatches as a re-iterable sequence of ``(x, y)``, gathered lazily."""

    def __init__(self, X: Any, Y: Any, idx: Any) -> None:
        self.X, self.Y, self.idx = X, Y, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for b in self.idx:
            yield self.X[b], self.Y[b]


def _sweep_module() -> Any:
    """The module holding ``sweep`` (``funcreg`` or ``funcreg.sweep``), or None."""
    try:
        import funcreg as fr
    except ImportError:
        return None
    if callable(getattr(fr, "sweep", None)) and not isinstance(fr.sweep, ModuleType):
        return fr
    try:
        mod = importlib.import_module("funcreg._sweep")
    except ImportError:
        return None
    return mod if callable(getattr(mod, "sweep", None)) else None


def _same_batches(mod: Any, idx: Any, batch_size: int) -> bool:
    """Whether funcreg's own batching (``batch_order``) yields exactly the task's batches."""
    order = getattr(mod, "batch_order", None)
    for where in ("funcreg._data", "funcreg._sweep"):  # where it lives, where it lived
        if order is None:
            try:
                order = getattr(importlib.import_module(where), "batch_order", None)
            except ImportError:
                continue
    if order is None:
        return False
    per_epoch = common.N_SAMPLES // batch_size
    for epoch in range(-(-len(idx) // per_epoch)):
        perm = order(common.N_SAMPLES, batch_size, 0, epoch)
        mine = idx[epoch * per_epoch : (epoch + 1) * per_epoch].reshape(-1)
        if perm is None or not perm[: mine.numel()].equal(mine):
            return False
    return True


def _stacked(res: Any, K: int) -> dict[str, Any]:
    """Final stacked params of a SweepResult (``stacked``, else ``params(i)`` per model)."""
    import torch

    stacked = getattr(res, "stacked", None)
    if isinstance(stacked, dict):
        return {k: stacked[k] for k in common.PARAM_NAMES}
    per_model = [res.params(i) for i in range(K)]
    return {k: torch.stack([p[k] for p in per_model]) for k in common.PARAM_NAMES}


def worker_sweep(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(c)/(d) ``funcreg.sweep`` with ``prox=False`` (subgradient L1), run twice."""
    torch, dtype, X, init, Y, idx = _torch_setup(cfg)
    import torch.nn.functional as F
    from torch.func import functional_call

    import funcreg as fr
    from funcreg import optim as fo

    mod = _sweep_module()
    if mod is None:
        raise RuntimeError(SWEEP_MISSING)
    K, S = cfg["K"], cfg["steps"]
    model = _new_model(torch, dtype, init)
    spec = fr.Spec(l1=fr.L1(common.L1_PARAM), l2=fr.L2())
    lam = torch.tensor(common.strengths(K), dtype=torch.float64)  # cast by the sweep
    if hasattr(fr, "grid"):
        # float64 values: fr.grid stores float32 by default, which rounds the strengths of
        # a float64 run (the sweep casts them to the params' dtype itself)
        grid = fr.grid(l1=lam, l2=2 * lam, product=False, dtype=torch.float64)
    else:
        grid = {"l1": lam, "l2": 2 * lam}
    if cfg["optimizer"] == "adam":
        opt = fo.adam(lr=common.ADAM_LR, betas=common.ADAM_BETAS, eps=common.ADAM_EPS)
    else:
        opt = fo.sgd(lr=common.SGD_LR)

    def loss_fn(params: dict[str, Any], xb: Any, yb: Any) -> Any:
        return F.mse_loss(functional_call(model, params, (xb,)), yb)

    # funcreg batches the tensors itself when its batch order is the task's (the usual
    # way to call it); otherwise it gets the task's batches as a re-iterable sequence
    batch_size = None if idx is None else idx.shape[1]
    native = idx is None or _same_batches(mod, idx.cpu(), batch_size)
    train = (X, Y) if native else _Batches(X, Y, idx)
    compiled = cfg["impl"] == "sweep-compile"
    rss0 = common.current_rss_mb()
    sync = _sync(cfg)

    def run(steps: int) -> tuple[Any, tuple[float, float, float]]:
        sync()
        start = common.Clock()
        res = mod.sweep(
            model,
            loss_fn,
            spec,
            grid,
            train=train,
            optimizer=opt,
            steps=steps,
            batch_size=batch_size if native else None,
            prox=False,
            compile=compiled,
            progress=False,
            seed=0,
        )
        sync()
        return res, common.Clock().since(start)

    _, (w1, c1, _) = run(S)
    res, (w2, c2, s2) = run(S)
    timing = {
        "first_s": w1 / S,  # per step, so that first - steady = compile / S
        "compile_s": w1 - w2,
        "compile_cpu_s": c1 - c2,
        "wall_s": w2 / S,
        "cpu_s": c2 / S,
        "sys_share": s2 / max(c2, 1e-12),
        "timed_steps": S,
        "rss_start_mb": rss0,
        "batching": "funcreg" if native else "iterable",
    }
    return timing, {k: _host(v) for k, v in _stacked(res, K).items()}


def worker_jax(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(e) JAX + optax: one ``jit(vmap(grad))`` step, parameters donated."""
    import jax

    if cfg["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    x, y, init, idx = common.read_task(Path(cfg["task"]))
    dt = {"float32": jnp.float32, "float64": jnp.float64}[cfg["dtype"]]
    K = cfg["K"]
    X, Y = jnp.asarray(x, dt), jnp.asarray(y, dt)
    P = {k: jnp.broadcast_to(jnp.asarray(v, dt), (K, *v.shape)).copy() for k, v in init.items()}
    lam = jnp.asarray(common.strengths(K), dt)
    if cfg["optimizer"] == "adam":
        b1, b2 = common.ADAM_BETAS
        opt = optax.adam(common.ADAM_LR, b1=b1, b2=b2, eps=common.ADAM_EPS)
    else:
        opt = optax.sgd(common.SGD_LR)
    state = jax.vmap(opt.init)(P)

    def loss_fn(p: dict[str, Any], lam: Any, xb: Any, yb: Any) -> Any:
        h = jax.nn.relu(xb @ p["0.weight"].T + p["0.bias"])
        h = jax.nn.relu(h @ p["2.weight"].T + p["2.bias"])
        out = h @ p["4.weight"].T + p["4.bias"]
        w1, w2, w3 = p["0.weight"], p["2.weight"], p["4.weight"]
        reg = lam * jnp.abs(w1).sum() + lam * ((w1**2).sum() + (w2**2).sum() + (w3**2).sum())
        return jnp.mean((out - yb) ** 2) + reg

    def update(p: Any, s: Any, lam: Any, xb: Any, yb: Any) -> tuple[Any, Any]:
        g = jax.vmap(jax.grad(loss_fn), in_axes=(0, 0, None, None))(p, lam, xb, yb)
        upd, s = jax.vmap(opt.update)(g, s, p)
        return optax.apply_updates(p, upd), s

    if idx is None:
        step_fn = jax.jit(lambda p, s, lam, X, Y: update(p, s, lam, X, Y), donate_argnums=(0, 1))
    else:
        step_fn = jax.jit(
            lambda p, s, lam, X, Y, b: update(p, s, lam, X[b], Y[b]), donate_argnums=(0, 1)
        )
        idx_j = [jnp.asarray(b) for b in idx]
    box = [P, state]
    rss0 = common.current_rss_mb()

    def step(i: int) -> None:
        args = (lam, X, Y) if idx is None else (lam, X, Y, idx_j[i])
        box[0], box[1] = step_fn(box[0], box[1], *args)
        jax.block_until_ready(box[0])

    timing = common.time_steps(step, cfg["steps"], cfg["warmup"])
    timing["rss_start_mb"] = rss0
    return timing, {k: np.asarray(v) for k, v in box[0].items()}


WORKERS = {
    "loop": worker_loop,
    "vmap": worker_vmap,
    "sweep": worker_sweep,
    "sweep-compile": worker_sweep,
    "jax": worker_jax,
}


def run_worker(cfg: dict[str, Any]) -> None:
    timing, final = WORKERS[cfg["impl"]](cfg)
    np.savez(cfg["out"], **final)
    timing["peak_rss_mb"] = common.peak_rss_mb()
    timing["peak_device_mb"] = _peak_device_mb(cfg)
    print("RESULT " + json.dumps(timing), flush=True)


def _peak_device_mb(cfg: dict[str, Any]) -> float:
    """Peak memory allocated on the GPU by this worker, MB (NaN on the CPU)."""
    if not cfg["device"].startswith("cuda"):
        return float("nan")
    if cfg["impl"] == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", float("nan")) / 2**20
    import torch

    return torch.cuda.max_memory_allocated(torch.device(cfg["device"])) / 2**20


# ============================================================================ parent


def available(impl: str) -> str | None:
    """None if ``impl`` can run here, else why not."""
    if impl in ("sweep", "sweep-compile"):
        return None if _sweep_module() is not None else SWEEP_MISSING
    if impl == "jax":
        missing = [m for m in ("jax", "optax") if importlib.util.find_spec(m) is None]
        return f"{' and '.join(missing)} not installed" if missing else None
    return None


def steps_for(K: int, rows: int, args: argparse.Namespace) -> int:
    """``--steps`` while K*rows/512 <= ``--work-k``, then proportionally fewer (>= min-steps).

    So the Δparam check runs the full 200 steps at small K, and large runs cost about the same
    as the ``--work-k`` one.
    """
    work = K * rows / 512
    return int(min(args.steps, max(args.min_steps, round(args.steps * args.work_k / work))))


def child_env(threads: int, tune_malloc: bool, device: str = "cpu") -> dict[str, str]:
    """The workers' environment; ``cuda:N`` becomes the only visible GPU (``cuda`` there),
    so that JAX, which takes the first visible one, runs on it too."""
    env = dict(os.environ)
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    n = str(threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    # JAX runs where torch runs: its CPU backend for --device cpu even on a GPU machine;
    # on a GPU it allocates as it goes (not 75% of the card up front), so peaks compare
    gpu = device.startswith("cuda")
    env["JAX_PLATFORMS"] = "cuda" if gpu else "cpu"
    if gpu:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if threads == 1:
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    if tune_malloc:
        # glibc serves blocks above the mmap threshold (at most 32 MiB by default) with
        # mmap and unmaps them on free, so a vmapped step page-faults its big temporaries
        # back in every step (seen as sys time); 1 GiB keeps them in the heap for reuse
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**30))
    return env


def launch(cfg: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    return common.launch(__file__, cfg, env, timeout)


def max_abs_diff(a_path: str, b_path: str) -> float:
    with np.load(a_path) as a, np.load(b_path) as b:
        return max(
            float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
            for k in common.PARAM_NAMES
        )


def fmt(x: float, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, nargs="+", default=[1, 8, 64, 256], help="K, minibatch")
    p.add_argument("--full-k", type=int, nargs="*", default=[64], help="K, full batch")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N)")
    p.add_argument("--device", default="cpu", help="where every implementation runs: cpu, cuda")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--steps", type=int, default=200, help="steps per run (small K)")
    p.add_argument(
        "--work-k", type=float, default=16, help="K*rows/512 up to which runs take --steps"
    )
    p.add_argument("--min-steps", type=int, default=20, help="fewest steps of a large run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the mean")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats")
    p.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}"
    )
    p.add_argument(
        "--compile-repeats", type=int, default=1, help="repeats that include (d) (compiles)"
    )
    p.add_argument("--tune-malloc", action="store_true", help="glibc mmap/trim thresholds 1 GiB")
    p.add_argument("--quick", action="store_true", help="CI smoke run: K 1 and 8, 20 steps")
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    p.add_argument("--json", type=Path, help="write all measurements here")
    args = p.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return {}
    if args.quick:
        args.k, args.full_k, args.steps, args.warmup, args.repeats = [1, 8], [], 20, 3, 1
        if "--impls" not in (argv if argv is not None else sys.argv):
            args.impls = "loop,vmap,sweep,jax"  # compile=True alone takes 10-50 s per K

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown implementation(s) {sorted(unknown)}; choose from {list(IMPLS)}")
    skipped = {i: why for i in impls if (why := available(i)) is not None}
    impls = [i for i in impls if i not in skipped]
    configs = [(K, args.batch_size) for K in args.k] + [(K, None) for K in args.full_k]
    env = child_env(args.threads, args.tune_malloc, args.device)
    worker_device = "cuda" if args.device.startswith("cuda") else args.device

    import torch

    versions = f"torch {torch.__version__}"
    if args.device.startswith("cuda"):
        versions += f" on {torch.cuda.get_device_name(torch.device(args.device))}"
    if "jax" in impls:
        import jax
        import optax

        versions += f", jax {jax.__version__}, optax {optax.__version__}"
    print(
        f"# sweep_vs_loop: {versions}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; threads={args.threads} (torch.set_num_threads, "
        f"OMP/MKL_NUM_THREADS; JAX: --xla_cpu_multi_thread_eigen=false when 1); "
        f"{args.optimizer} (lr {common.ADAM_LR if args.optimizer == 'adam' else common.SGD_LR})"
        f", {args.dtype}, {args.repeats} repeats, warm-up {args.warmup} steps"
        + (", tuned malloc" if args.tune_malloc else ""),
        flush=True,
    )
    for impl, why in skipped.items():
        print(f"# skipped {IMPLS[impl]}: {why}", flush=True)

    results: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sweep_vs_loop_") as tmp:
        tasks = {}
        for K, bs in configs:
            S = steps_for(K, bs or common.N_SAMPLES, args)
            key = (S, bs)
            if key not in tasks:
                tasks[key] = str(Path(tmp) / f"task_{S}_{bs}.npz")
                common.write_task(Path(tasks[key]), S, bs)
        for r in range(args.repeats):
            for K, bs in configs:
                S = steps_for(K, bs or common.N_SAMPLES, args)
                for impl in impls:
                    if impl == "sweep-compile" and r >= args.compile_repeats:
                        continue
                    cfg = {
                        "impl": impl,
                        "K": K,
                        "task": tasks[(S, bs)],
                        "steps": S,
                        "warmup": args.warmup,
                        "threads": args.threads,
                        "dtype": args.dtype,
                        "optimizer": args.optimizer,
                        "device": worker_device,
                        "out": str(Path(tmp) / f"{impl}_{K}_{bs}_{r}.npz"),
                    }
                    res = launch(cfg, env, args.timeout)
                    res.update(steps=S, out=cfg["out"])
                    results[(impl, K, bs)].append(res)
                    if args.json:  # so far, for a run cut short by a time limit
                        partial = {" ".join(map(str, key)): v for key, v in results.items()}
                        args.json.write_text(json.dumps({"partial": partial}, indent=1))
                    status = res.get("error") or f"{1e3 * res['wall_s']:.2f} ms/step"
                    print(
                        f"  [{time.perf_counter() - t0:6.1f} s] repeat {r + 1}/{args.repeats} "
                        f"{impl:>13} K={K:<4} batch={bs or 'full':<5} S={S:<4} {status}",
                        file=sys.stderr,
                        flush=True,
                    )
        rows = summarise(results, impls, configs)
    print_tables(rows, args)
    print(f"\n# total {time.perf_counter() - t0:.0f} s")
    if args.json:
        record = {"args": vars(args) | {"json": None}, "rows": rows}
        args.json.write_text(json.dumps(record, indent=2))
    return {"rows": rows, "skipped": skipped}


def summarise(
    results: dict[tuple, list[dict[str, Any]]], impls: list[str], configs: list[tuple]
) -> list[dict[str, Any]]:
    rows = []
    for K, bs in configs:
        loop_runs = results.get(("loop", K, bs), [])
        for impl in impls:
            runs = results[(impl, K, bs)]
            ok = [r for r in runs if "error" not in r]
            row: dict[str, Any] = {"impl": impl, "K": K, "batch": bs or "full"}
            if not ok:
                row["error"] = runs[0].get("error", "?") if runs else "not run"
                rows.append(row)
                continue
            ratios, cpu_ratios = [], []
            for run, base in zip(runs, loop_runs, strict=False):
                if "error" not in run and "error" not in base:
                    ratios.append(run["wall_s"] / base["wall_s"])
                    cpu_ratios.append(run["cpu_s"] / base["cpu_s"])
            wall = common.median([r["wall_s"] for r in ok])
            dparam = float("nan")
            if loop_runs and "error" not in loop_runs[0] and "error" not in runs[0]:
                dparam = max_abs_diff(runs[0]["out"], loop_runs[0]["out"])
            warm = [r.get("compile_s", r["first_s"] - r["wall_s"]) for r in ok]
            row.update(
                steps=ok[0]["steps"],
                wall_ms=1e3 * wall,
                cpu_ms=1e3 * common.median([r["cpu_s"] for r in ok]),
                us_per_strength_step=1e6 * wall / K,
                strength_steps_per_s=K / wall,
                ratio=common.median(ratios),
                cpu_ratio=common.median(cpu_ratios),
                sys_share=common.median([r["sys_share"] for r in ok]),
                warmup_s=common.median(warm),
                peak_rss_mb=common.median([r["peak_rss_mb"] for r in ok]),
                peak_device_mb=common.median([r.get("peak_device_mb", math.nan) for r in ok]),
                rss_start_mb=common.median([r["rss_start_mb"] for r in ok]),
                max_dparam=dparam,
                repeats=len(ok),
                batching=ok[0].get("batching", "task indices"),
            )
            rows.append(row)
    return rows


def print_tables(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    gpu = args.device.startswith("cuda")
    memory = ("peak GPU MB", "peak_device_mb") if gpu else ("peak RSS MB", "peak_rss_mb")
    print(
        "\n| impl | K | batch | ms/step | µs per strength-step | ratio vs loop "
        f"| {memory[0]} | max \\|Δparam\\| |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        name = IMPLS[r["impl"]]
        if "error" in r:
            print(f"| {name} | {r['K']} | {r['batch']} | failed: {r['error']} | | | | |")
            continue
        print(
            f"| {name} | {r['K']} | {r['batch']} | {fmt(r['wall_ms'], '.2f')} "
            f"| {fmt(r['us_per_strength_step'], '.0f')} | {fmt(r['ratio'], '.2f')} "
            f"| {fmt(r[memory[1]], '.0f')} | {fmt(r['max_dparam'], '.1e')} |"
        )
    print(
        "\n| impl | K | batch | steps | CPU ms/step | CPU ratio vs loop | strength-steps/s "
        "| sys share | warm-up/compile s | RSS at start MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            continue
        print(
            f"| {IMPLS[r['impl']]} | {r['K']} | {r['batch']} | {r['steps']} "
            f"| {fmt(r['cpu_ms'], '.2f')} | {fmt(r['cpu_ratio'], '.2f')} "
            f"| {fmt(r['strength_steps_per_s'], '.0f')} | {fmt(r['sys_share'], '.0%')} "
            f"| {fmt(r['warmup_s'], '.2f')} | {fmt(r['rss_start_mb'], '.0f')} |"
        )
    print(
        f"\nms/step: mean over the steps after {args.warmup} warm-up steps ((c)/(d): second "
        "sweep run / S), median over repeats; ratios: median of per-repeat ratios to the loop "
        "(same repeat, interleaved); max |Δparam|: final params vs the loop after `steps` "
        "steps, all K models, repeat 1; warm-up/compile: first step minus mean ((d): first "
        "sweep run minus second)."
    )


if __name__ == "__main__":
    main()
