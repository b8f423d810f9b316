"""Cross-validation of F folds × K strengths in one vmapped run against F×K sequential fits.

Both sides fit the same (F + 1) × K models — every fold at every strength, plus the K fits on
all the data that ``fr.cross_validate`` runs alongside for ``refit()`` — with the same solver
and stopping rule, and score the held-out folds:

* ``convex``: a lasso with an unpenalised intercept (``nn.Linear``, data term
  ``½ MSE``), solved by ``fr.solve`` (FISTA, ``tol``). One run: ``fr.cross_validate`` (the
  folds reach the loss as per-sample weights). Loop: one ``fr.solve`` per model on the
  fold's rows, the way a user would write it.
* ``network``: an MLP with an L1 penalty on its first layer, ``steps`` full-batch Adam steps
  with prox, trained by ``fr.sweep``. One run: ``fr.cross_validate(optimizer=...)``. Loop:
  one single-model ``fr.sweep`` per model on the fold's rows.

One thread (``torch.set_num_threads(1)``), CPU seconds (``time.process_time``), median of
``--repeats`` runs with the two methods interleaved. The last column checks that both give
the same CV curve.

    python benchmarks/cv_vs_loop.py            # F=5, K=30 (convex) and K=8 (network)
    python benchmarks/cv_vs_loop.py --quick    # CI size
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg._folds import fold_masks
from funcreg.selection import cross_validate
from funcreg.solvers import solve


def cpu_time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def problem(kind: str, n: int, p: int, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] + 1.0 + torch.randn(n, generator=g, dtype=x.dtype)
    torch.manual_seed(seed)
    if kind == "convex":
        net: nn.Module = nn.Linear(p, 1).double()
        with torch.no_grad():
            net.weight.zero_()
            net.bias.zero_()
    else:
        net = nn.Sequential(nn.Linear(p, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    return net, x, y.unsqueeze(1)


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    k = args.k if kind == "convex" else args.k_net
    net, x, y = problem(kind, args.n, args.p, args.seed)
    scale = 0.5 if kind == "convex" else 1.0

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return scale * F.mse_loss(functional_call(net, params, (xb,)), yb)

    def mse(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (xb,)), yb)

    spec = fr.Spec(l1=fr.L1("weight" if kind == "convex" else "0.weight"))
    strengths = torch.logspace(0, -3, k, dtype=torch.float64)
    train, test = fold_masks(args.folds, args.n, args.seed)
    pairs = zip(train, test, strict=True)
    rows = [(tr.nonzero().flatten(), te.nonzero().flatten()) for tr, te in pairs]
    rows.append((torch.arange(args.n), torch.arange(0)))  # the fits on all the data
    opt = fr.optim.adam(1e-2)
    p0 = fr.params(net)

    def one_run() -> Tensor:
        kw = {} if kind == "convex" else {"optimizer": opt, "steps": args.steps}
        cv = cross_validate(
            net, loss, spec, strengths, (x, y), args.folds, score_fn=mse, tol=args.tol, **kw
        )
        return cv.mean

    def loop() -> Tensor:
        scores = torch.zeros(args.folds, k, dtype=torch.float64)
        for f, (tr, te) in enumerate(rows):
            for j in range(k):
                if kind == "convex":
                    sol = solve(loss, spec, p0, {"l1": strengths[j]}, x[tr], y[tr], tol=args.tol)
                    fitted = {n: v[0] for n, v in sol.params.items()}
                else:
                    r = fr.sweep(
                        net, loss, spec, fr.grid(l1=strengths[j : j + 1]), train=(x[tr], y[tr]),
                        optimizer=opt, steps=args.steps, progress=False,
                    )  # fmt: skip
                    fitted = r.params(0)
                if te.numel():
                    with torch.no_grad():
                        scores[f, j] = mse(fitted, x[te], y[te])
        return scores.mean(0)

    times: dict[str, list[float]] = {"one vmapped run": [], "sequential loop": []}
    curves: dict[str, Tensor] = {}
    for _ in range(args.repeats):
        for name, fn in (("one vmapped run", one_run), ("sequential loop", loop)):
            t, curves[name] = cpu_time(fn)
            times[name].append(t)
    med = {name: statistics.median(v) for name, v in times.items()}
    a, b = curves["one vmapped run"], curves["sequential loop"]
    return {
        "kind": kind,
        "models": (args.folds + 1) * k,
        "median": med,
        "ratio": med["sequential loop"] / med["one vmapped run"],
        "curve_diff": float(((a - b).abs() / b.abs()).max()),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--p", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--k", type=int, default=30, help="strengths (convex)")
    ap.add_argument("--k-net", type=int, default=8, help="strengths (network)")
    ap.add_argument("--steps", type=int, default=100, help="Adam steps (network)")
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="convex,network")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.p, args.folds, args.k, args.k_net, args.steps = 60, 8, 3, 6, 3, 20
        args.repeats = 1
    torch.set_num_threads(1)
    print(f"F={args.folds} folds, n={args.n}, p={args.p}; 1 thread, CPU s, median of "
          f"{args.repeats}")  # fmt: skip
    head = ("problem", "models", "one run s", "loop s", "loop/run", "max rel diff of curves")
    print(f"{head[0]:<8} {head[1]:>6} {head[2]:>10} {head[3]:>8} {head[4]:>8}  {head[5]}")
    out = []
    for kind in args.kinds.split(","):
        r = run(kind, args)
        out.append(r)
        m = r["median"]
        print(
            f"{kind:<8} {r['models']:>6} {m['one vmapped run']:>10.3f} "
            f"{m['sequential loop']:>8.3f} {r['ratio']:>7.1f}x  {r['curve_diff']:.1e}"
        )
    return out


if __name__ == "__main__":
    main()
