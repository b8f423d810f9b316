"""Shared pieces of the benchmarks: the MLP task described in benchmarks/README.md, batches, timing.

The task (implemented exactly as written there):

- data: ``X`` standard Gaussian, 4096 × 32 (seeded); the target depends on the first 8
  features only (a fixed smooth nonlinear function plus noise), standardised to mean 0 / std 1;
- model: ``Sequential(Linear(32, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 1))``, one seeded
  init shared by all K models (4,353 numbers per model);
- objective of model k: ``mean((f_k(X_b) - y_b)²) + λ_k Σ|W1| + λ_k (‖W1‖² + ‖W2‖² + ‖W3‖²)``,
  biases unpenalised; in funcreg terms ``Spec(l1=L1("0.weight"), l2=L2())`` with strengths
  ``l1 = λ``, ``l2 = 2λ``;
- strengths: K values log-spaced from 1e-5 to 1e-1;
- minibatches of 512 from one seeded permutation per epoch (the same batches for everyone),
  or full batch.

Everything a worker needs is written once by the parent process into an ``.npz`` file
(:func:`write_task` / :func:`read_task`), so that every implementation, JAX included, starts
from the same numbers and a JAX worker never has to import torch.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

N_SAMPLES = 4096
N_FEATURES = 32
N_INFORMATIVE = 8
HIDDEN = 64
LAYERS = ("0", "2", "4")  # Linear layers of the Sequential
PARAM_NAMES = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
WEIGHTS = ("0.weight", "2.weight", "4.weight")
L1_PARAM = "0.weight"
LAM_MIN, LAM_MAX = 1e-5, 1e-1
SGD_LR = 0.05
ADAM_LR = 1e-3
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


# ----------------------------------------------------------------------------- the task


def make_data(seed: int = 0) -> tuple[Any, Any]:
    """``(X, y)`` as float32 torch tensors, ``X`` (4096, 32), ``y`` (4096, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g, dtype=torch.float64)
    f = (
        torch.sin(2.0 * x[:, 0])
        + x[:, 1] * x[:, 2]
        + torch.tanh(x[:, 3] - 0.5 * x[:, 4])
        + 0.5 * x[:, 5] ** 2
        + torch.cos(x[:, 6]) * x[:, 7]
    )
    y = f + 0.3 * torch.randn(N_SAMPLES, generator=g, dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    return x.float(), y.float().unsqueeze(1)


def make_model(seed: int = 0) -> Any:
    """The task's MLP with one seeded (PyTorch default) init, float32."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N_FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 1),
    )


def strengths(k: int) -> np.ndarray:
    """K values λ log-spaced from 1e-5 to 1e-1 (float64)."""
    return np.logspace(math.log10(LAM_MIN), math.log10(LAM_MAX), k)


def epoch_permutation(n: int, seed: int, epoch: int) -> Any:
    """The permutation of ``epoch``: ``torch.randperm(n)`` from a generator seeded by
    ``(seed, epoch)`` — the scheme of ``funcreg._data.batch_order``, so that ``fr.sweep`` can
    batch the tensors itself and still see the same batches as everyone else."""
    import torch

    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**63)
    return torch.randperm(n, generator=g)


def batch_indices(steps: int, batch_size: int, n: int = N_SAMPLES, seed: int = 0) -> np.ndarray:
    """``(steps, batch_size)`` row indices: one seeded permutation per epoch, cut in order
    (4096 / 512 = 8 batches per epoch; ``n`` must be a multiple of ``batch_size``)."""
    if n % batch_size:
        raise ValueError(f"n={n} is not a multiple of batch_size={batch_size}")
    per_epoch = n // batch_size
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        perm = epoch_permutation(n, seed, epoch).numpy()
        out.extend(perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
        epoch += 1
    return np.stack(out[:steps]).astype(np.int64)


def write_task(path: Path, steps: int, batch_size: int | None, seed: int = 0) -> None:
    """Write data, the shared init and the batch indices (empty for full batch) to ``path``."""
    x, y = make_data(seed)
    model = make_model(seed)
    arrays = {f"p:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    idx = (
        np.zeros((0, 0), np.int64)
        if batch_size is None
        else batch_indices(steps, batch_size, seed=seed)
    )
    np.savez(path, X=x.numpy(), y=y.numpy(), idx=idx, **arrays)


Task = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray | None]


def read_task(path: Path) -> Task:
    """``(X, y, init_params, idx or None)`` as numpy arrays (float32 data and params)."""
    with np.load(path) as z:
        params = {k[2:]: z[k] for k in z.files if k.startswith("p:")}
        idx = z["idx"]
        return z["X"], z["y"], params, (idx if idx.size else None)


# ----------------------------------------------------------------------------- measuring


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB.

    Linux's ``VmHWM`` (the high-water mark of this address space) where available:
    ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``exec``, so in a worker started by a parent
    that had imported torch and JAX it reported the parent's peak, not the worker's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def reset_peak_rss() -> None:
    """Reset this process's peak resident set (``VmHWM``) to its current one (Linux >= 4.0:
    ``5`` to ``/proc/self/clear_refs``), so that :func:`peak_rss_mb` measures from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - not Linux
        pass


def current_rss_mb() -> float:
    """Current resident set size of this process, MB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover - not Linux
        return float("nan")


class Clock:
    """Wall time, process CPU time and system time at one instant."""

    __slots__ = ("wall", "cpu", "sys")

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.sys = resource.getrusage(resource.RUSAGE_SELF).ru_stime

    def since(self, start: Clock) -> tuple[float, float, float]:
        return self.wall - start.wall, self.cpu - start.cpu, self.sys - start.sys


def time_steps(step: Callable[[int], None], steps: int, warmup: int) -> dict[str, Any]:
    """Run ``step(i)`` for ``i < steps`` and time every call (``step`` must block until done).

    Returns the first step's wall time and, over the steps after the first ``warmup`` ones,
    the means (``wall_s``, ``cpu_s``: total time / steps, the statistic a whole ``fr.sweep``
    run gives, so that the two are compared like for like) and the medians; the warm-up
    steps train too (they count in ``steps``).
    """
    walls, cpus, syss = [], [], []
    for i in range(steps):
        start = Clock()
        step(i)
        w, c, s = Clock().since(start)
        walls.append(w)
        cpus.append(c)
        syss.append(s)
    timed = slice(min(warmup, steps - 1), None)
    return {
        "first_s": walls[0],
        "wall_s": statistics.fmean(walls[timed]),
        "cpu_s": statistics.fmean(cpus[timed]),
        "wall_median_s": statistics.median(walls[timed]),
        "cpu_median_s": statistics.median(cpus[timed]),
        "sys_share": sum(syss[timed]) / max(sum(cpus[timed]), 1e-12),
        "timed_steps": len(walls[timed]),
    }


def launch(script: str | Path, cfg: dict[str, Any], env: dict[str, str], timeout: float) -> dict:
    """Run ``python script --worker '<json cfg>'`` in a fresh process and return the JSON of
    its ``RESULT`` line, or ``{"error": ...}`` (its last stderr line, or the time-out)."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"error": err}


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")
