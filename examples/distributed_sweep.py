"""Shard a sweep's grid over processes with torchrun: one call, one result.

Each process trains its contiguous share of the grid (vmapped, on its own device:
``cuda:LOCAL_RANK`` with NCCL when there are GPUs, else the CPU with gloo); the shares are
gathered so that every rank holds the SweepResult of the whole grid, equal to the
one-process sweep with the same seed (``--check`` verifies it on rank 0).

    torchrun --standalone --nproc_per_node=2 examples/distributed_sweep.py
    torchrun --standalone --nproc_per_node=2 examples/distributed_sweep.py --check
    python examples/distributed_sweep.py                 # also runs as one plain process

With ``--checkpoint sweep.pt`` every rank saves ``sweep.rank{r}-of-{W}.pt``; launching the
same command again resumes every shard. Seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
import funcreg.distributed as frd
from funcreg import sweep
from funcreg.result import SweepResult

N_FEATURES, N_USEFUL = 20, 4


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] - x[:, 3] + 0.3 * torch.randn(n, generator=g)
    return x, ((y - y.mean()) / y.std()).unsqueeze(1)


def main(argv: list[str] | None = None) -> SweepResult | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strengths", type=int, default=16, help="grid size K")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--checkpoint", default=None, help="per-rank checkpoint files (resume)")
    ap.add_argument("--check", action="store_true", help="compare with a one-process sweep")
    args = ap.parse_args(argv)

    x, y = make_data(1024, seed=0)
    xv, yv = make_data(512, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, 1))

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (xb,), strict=True), yb)

    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
    lam = torch.logspace(-3, -0.5, args.strengths)
    grid = fr.grid(l1=lam, l2=1e-4)
    kwargs = dict(
        train=(x, y),
        val=(xv, yv),
        optimizer=fr.optim.adam(1e-2),
        steps=args.steps,
        batch_size=128,
        seed=0,
    )

    t0 = time.perf_counter()
    # the same arguments as fr.sweep; under torchrun this initialises the process group
    result = frd.sweep(net, loss, spec, grid, checkpoint=args.checkpoint, **kwargs)
    elapsed = time.perf_counter() - t0

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        world = result.meta.get("distributed", {}).get("world_size", 1)
        shards = result.meta.get("distributed", {}).get("shards", [[0, result.K]])
        print(result.table(max_rows=10))
        print(f"best: {result.best()}")
        print(f"{world} process(es), shards {shards}: {elapsed:.2f} s")
        if args.check:
            ref = sweep(net, loss, spec, grid, progress=False, **kwargs)
            diff = max((result.stacked[n] - v).abs().max().item() for n, v in ref.stacked.items())
            same = all(torch.equal(result.stacked[n], v) for n, v in ref.stacked.items())
            same = same and torch.equal(result.history["loss"], ref.history["loss"])
            agrees = all(
                torch.allclose(result.stacked[n], v, rtol=1e-4, atol=1e-5)
                for n, v in ref.stacked.items()
            )
            print(
                f"one-process sweep: agrees={agrees} identical={same} "
                f"(max |diff| of parameters {diff:.3g}; float rounding, see README)"
            )
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
