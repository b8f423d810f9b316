"""fr.sweep's vmapped chunks with the optimizer update outside vmap against the update under
vmap, interleaved in one process (CPU, one thread).

Rows of ``models.py`` (``tiny``, ``digits``; Adam lr 1e-3, ``fr.L2()``), each with the chunk
size its probe picks there (tiny K = 8: one chunk of 8; tiny K = 32: 2 × 16; digits K = 32:
4 × 8), and a ``tiny+l1`` row (``L1("0.weight")`` by prox beside the L2, K = 8). Three
implementations, round after round, each timing one call of ``--steps`` steps:

- ``outside``: ``fr.sweep`` as it is: a chunk's gradients under ``vmap``, then one
  optimizer update on the chunk's concatenated models (``funcreg._stacked``);
- ``inside``: the same call with the update, prox and all, in the vmapped step (the route
  before; ``funcreg._stacked.stacked_step`` declining, patched here for the comparison);
- ``vmap``: ``models.py``'s hand-written ``vmap(grad)`` + functional Adam (no L1 term),
  started from the initial weights on every call, as a sweep call is.

ms = CPU ms per step of all K models (a sweep call's setup spread over its steps), median
over the rounds; ``paired`` is the median of each round's outside/inside ratio; page faults
per step: the process's minor faults (fresh pages from the kernel) during the calls, median
over the rounds. glibc's malloc returns freed memory at the top of its heap to the kernel and
faults it in again at the next step; ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456`` in the environment keeps it (see ``README.md``).

Usage: ``python benchmarks/update_outside_vmap.py [--rows tiny:8:8 tiny:32:16 ...]
[--rounds 15] [--steps 200]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

ROWS = ("tiny:8:8", "tiny:32:16", "digits:32:8", "tiny+l1:8:8")


def implementations(name: str, k: int, chunk: int) -> dict[str, Callable[[int], None]]:
    import funcreg as fr
    from funcreg import _engine

    w = models.Workload(name.removesuffix("+l1"), k)
    net, loss_fn, spec, g = w._sweep_args()
    if name.endswith("+l1"):
        spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
        g = fr.grid(l1=[1e-4 * (i + 1) for i in range(k)], l2=models.strengths(k), product=False)
    kw = w.sweep_kwargs()
    real = _engine.stacked_step

    def sweep(outside: bool) -> Callable[[int], None]:
        def steps(n: int) -> None:
            _engine.stacked_step = real if outside else (lambda *a: None)
            try:
                fr.sweep(net, loss_fn, spec, g, steps=n, chunk_size=chunk, eval_every=n, **kw)
            finally:
                _engine.stacked_step = real

        return steps

    def diy(n: int) -> None:  # from the initial weights on every call, as a sweep call
        w.vmap()(n)

    return {"outside": sweep(True), "inside": sweep(False), "vmap": diy}


def measure(row: str, rounds: int, steps: int) -> dict[str, Any]:
    name, k, chunk = row.split(":")
    fns = implementations(name, int(k), int(chunk))
    n = steps if name.startswith("tiny") else max(steps // 4, 10)
    for f in fns.values():
        f(5)
    ms: dict[str, list[float]] = {impl: [] for impl in fns}
    faults: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(rounds):
        for impl, f in fns.items():
            f0, t0 = _minor_faults(), time.process_time()
            f(n)
            ms[impl].append(1e3 * (time.process_time() - t0) / n)
            faults[impl].append((_minor_faults() - f0) / n)
    med = {impl: statistics.median(v) for impl, v in ms.items()}
    paired = statistics.median(a / b for a, b in zip(ms["outside"], ms["inside"], strict=True))
    flt = {impl: statistics.median(v) for impl, v in faults.items()}
    return {"row": row, "steps": n, **med, "paired": paired, "faults": flt}


def _minor_faults() -> int:
    """Page faults of this process so far (fresh pages the allocator got from the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), help="model:K:chunk")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=200, help="steps per call (digits: a quarter)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    print("| row (model:K:chunk) | inside ms | outside ms | vmap ms | outside/inside | paired "
          "| inside/vmap | outside/vmap | page faults per step inside/outside/vmap |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in args.rows:
        r = measure(row, args.rounds, args.steps)
        print(
            f"| {row} | {r['inside']:.2f} | {r['outside']:.2f} | {r['vmap']:.2f} "
            f"| {r['outside'] / r['inside']:.3f} | {r['paired']:.3f} "
            f"| {r['inside'] / r['vmap']:.3f} | {r['outside'] / r['vmap']:.3f} "
            f"| {'/'.join(format(r['faults'][i], '.0f') for i in ('inside', 'outside', 'vmap'))} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
