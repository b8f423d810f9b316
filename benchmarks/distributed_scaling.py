"""One process vs N processes for the MLP sweep task of benchmarks/README.md (funcreg.distributed).

Every measurement runs inside one ``torchrun`` job of N processes, interleaved over repeats:

  1 process   ``fr.sweep`` of the whole grid on rank 0 (its device; on CPU with
              ``--threads`` threads) while the other ranks wait at a barrier;
  1 process, N threads   (CPU, with ``--thread-baseline``) the same with N threads: one
              process given as many cores as the N processes use;
  N processes ``funcreg.distributed.sweep`` of the same grid: each rank trains its shard on
              its own device (CPU: ``--threads`` threads each), then the shards are gathered
              to every rank. Timed from a barrier before the call to a barrier after it, so
              the gather and the slowest shard are included.

Reported: median seconds per sweep, wall and CPU (all ranks together) microseconds per
strength-step (time / (K · steps)), strength-steps per second, and the speed-up of N
processes over 1 (wall time). CPU time is the steadier figure on a shared machine. The
merged result is checked against the one-process result (``identical`` = bit for bit).

    python benchmarks/distributed_scaling.py            # launches torchrun with 2 processes
    python benchmarks/distributed_scaling.py --quick    # smoke run, seconds
    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_scaling.py --k 64
    # multi-GPU, unchanged: NCCL, one GPU per process (cuda:LOCAL_RANK), e.g. on 8 GPUs
    torchrun --standalone --nproc_per_node=8 benchmarks/distributed_scaling.py --k 1024 --steps 200

Task: X 4096 × 32, the 32-64-64-1 MLP, Adam lr 1e-3, subgradient L1 on the first layer +
L2 on the weights (``l1 = λ``, ``l2 = 2λ``, λ log-spaced in [1e-5, 1e-1]), minibatches of 512.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

import funcreg as fr  # noqa: E402
import funcreg.distributed as frd  # noqa: E402
from funcreg import sweep  # noqa: E402
from funcreg.result import SweepResult  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[8, 64], help="grid sizes K")
    ap.add_argument("--steps", type=int, default=50, help="training steps per sweep")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads per process (CPU)")
    ap.add_argument("--nproc", type=int, default=2, help="processes when not under torchrun")
    ap.add_argument(
        "--thread-baseline", action="store_true", help="also 1 process with N threads (CPU)"
    )
    ap.add_argument("--quick", action="store_true", help="K=8, 10 steps, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.k, args.steps, args.repeats = [8], 10, 2
    return args


def task(k: int, steps: int, device: torch.device) -> tuple[Any, ...]:
    x, y = common.make_data(0)
    net = common.make_model(0).to(device)

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, p, (xb,), strict=True), yb)

    lam = torch.as_tensor(common.strengths(k))
    grid = fr.grid(l1=lam, l2=2 * lam, product=False)
    spec = fr.Spec(l1=fr.L1(common.L1_PARAM), l2=fr.L2())
    kwargs = dict(
        train=(x, y),
        optimizer=fr.optim.adam(common.ADAM_LR),
        steps=steps,
        batch_size=512,
        prox=False,
        progress=False,
        device=device,
        seed=0,
    )
    return net, loss, spec, grid, kwargs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def identical(a: SweepResult, b: SweepResult) -> bool:
    return all(torch.equal(a.stacked[n], v) for n, v in b.stacked.items()) and torch.equal(
        a.history["loss"], b.history["loss"]
    )


def worker(args: argparse.Namespace) -> None:
    device = frd.init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = device.type == "cpu"
    rows = []
    for k in args.k:
        net, loss, spec, grid, kw = task(k, args.steps, device)
        modes: list[tuple[str, int]] = [("1 process", args.threads)]
        if cpu and world > 1 and args.thread_baseline:
            modes.append((f"1 process, {world * args.threads} threads", world * args.threads))
        modes.append((f"{world} processes", args.threads))
        times: dict[str, list[float]] = {m: [] for m, _ in modes}
        cpus: dict[str, list[float]] = {m: [] for m, _ in modes}
        ref: SweepResult | None = None
        same = True
        for rep in range(args.repeats + 1):  # repeat 0 warms up every mode
            for mode, threads in modes:
                torch.set_num_threads(threads)
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                if mode.startswith("1 process"):
                    if rank == 0:
                        res = sweep(net, loss, spec, grid, **kw)
                        sync(device)
                        ref = res
                else:
                    res = frd.sweep(net, loss, spec, grid, **kw)
                    sync(device)
                    if rank == 0 and ref is not None:
                        same = same and identical(res, ref)
                cpu_s = torch.tensor([time.process_time() - c0], dtype=torch.float64)
                dist.barrier()
                wall = time.perf_counter() - t0
                dist.all_reduce(cpu_s)  # CPU seconds of every rank together
                if rep:
                    times[mode].append(wall)
                    cpus[mode].append(float(cpu_s))
        torch.set_num_threads(args.threads)
        base = statistics.median(times["1 process"])
        for mode, _ in modes:
            t = statistics.median(times[mode])
            per = t / (k * args.steps)
            cpu_per = statistics.median(cpus[mode]) / (k * args.steps)
            same_ = "" if mode[0] == "1" else same
            rows.append((k, mode, t, per, cpu_per, 1 / per, base / t, same_))
    if rank == 0:
        where = f"{torch.cuda.get_device_name(device)}" if not cpu else platform.processor()
        print(
            f"torch {torch.__version__}, {world} ranks, backend {dist.get_backend()}, "
            f"device {device} ({where or platform.machine()}), {os.cpu_count()} CPUs, "
            f"{args.threads} thread(s)/process, {args.steps} steps, minibatch 512, "
            f"median of {args.repeats}"
        )
        head = f"{'K':>5}  {'mode':<24} {'s/sweep':>8} {'wall µs/str-step':>17} "
        head += f"{'CPU µs/str-step':>16} {'str-steps/s':>12} {'speed-up':>9}  identical"
        print(head)
        print("-" * len(head))
        for k, mode, t, per, cpu_per, rate, up, same_ in rows:
            print(
                f"{k:>5}  {mode:<24} {t:>8.3f} {per * 1e6:>17.1f} {cpu_per * 1e6:>16.1f} "
                f"{rate:>12.0f} {up:>8.2f}x  {same_}"
            )
        print(
            "CPU µs/str-step: CPU seconds of all ranks together per strength-step (includes "
            "the gather); speed-up: 1-process wall time / this wall time"
        )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        worker(args)
        return
    # not under torchrun: launch ourselves with --nproc processes on this machine
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        __file__,
        *(argv if argv is not None else sys.argv[1:]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
