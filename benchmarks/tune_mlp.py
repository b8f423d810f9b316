"""Three per-layer L2 strengths of a small MLP: unrolled hypergradient descent vs the best
point of a 4×4×4 ``fr.sweep`` grid (and, when installed, Optuna's TPE with as many trainings).

The task is the MLP task of ``benchmarks/README.md`` at a small size so that it runs in about
a minute: the first ``--n`` samples for training, the next ``--n`` for validation, hidden
width ``--hidden``, full-batch Adam for ``--steps`` steps from one seeded init, one L2
strength per Linear layer (``l2_0``, ``l2_2``, ``l2_4``). Every training is the same pure
``fr.train_step`` loop, so the three methods differ only in which strengths they try:

* grid: ``fr.sweep`` of the 64 points ``{1e-4, 1e-3, 1e-2, 1e-1}³`` (vmapped), the best
  validation loss;
* hypergradient descent: ``--outer`` Adam steps (lr 0.5) on the log-strengths from the
  grid's centre, each a training from the init and a hypergradient, either *unrolled*
  through the last ``--truncate`` steps (``funcreg.unrolled.unrolled_hypergrad``) or
  *implicit* at the trained weights (``fr.hypergrad``: conjugate gradient on
  Hessian-vector products, at most 50 iterations; an approximation, since the weights are
  not an exact minimiser); the best validation loss of the strengths visited;
* Optuna (TPE, seeded; skipped when ``optuna`` is not installed): ``--outer`` trainings, log-
  uniform strengths in ``[1e-4, 1e-1]``.

    python benchmarks/tune_mlp.py [--n 256] [--hidden 32] [--steps 300] [--outer 12]
        [--search adam|secant] [--check-fd]

``--check-fd`` only compares, at the starting strengths, the unrolled (last ``--truncate``
steps and all steps) and implicit hypergradients with central finite differences of the
trained validation loss (±0.05 in log s).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable

import torch
from common import make_data
from torch import nn
from torch.func import functional_call

import funcreg as fr
from funcreg._secant import Secant
from funcreg.unrolled import unrolled_hypergrad

TERMS = ("l2_0", "l2_2", "l2_4")
GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--truncate", type=int, default=50)
    ap.add_argument("--outer", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument(
        "--search",
        choices=("adam", "secant"),
        default="adam",
        help="the outer steps: Adam (lr 0.5) or fr.tune's safeguarded secant search",
    )
    ap.add_argument(
        "--check-fd",
        action="store_true",
        help="only compare the hypergradients at the start with central finite differences",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    X, y = make_data(0)
    X, y = X.double(), y.double()
    Xt, yt, Xv, yv = X[: args.n], y[: args.n], X[args.n : 2 * args.n], y[args.n : 2 * args.n]
    torch.manual_seed(0)
    h = args.hidden
    net = nn.Sequential(nn.Linear(32, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
    net = net.double()

    def loss(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(net, p, (X,)) - y) ** 2).mean()

    spec = {t: fr.L2(f"{t[-1]}.weight") for t in TERMS}
    opt = fr.optim.adam(args.lr)
    step = fr.train_step(loss, spec, opt)
    p0 = fr.params(net)

    def trained(s: dict[str, float]) -> dict[str, torch.Tensor]:
        p, o = p0, opt.init(p0)
        with torch.no_grad():
            for _ in range(args.steps):
                p, o, _ = step(p, o, s, Xt, yt)
        return p

    def train(s: dict[str, float]) -> float:
        return float(loss(trained(s), Xv, yv))

    def unrolled(s: dict[str, float]) -> tuple[float, dict[str, torch.Tensor]]:
        val, g, _ = unrolled_hypergrad(
            step,
            p0,
            opt.init(p0),
            s,
            [(Xt, yt)] * args.steps,
            loss,
            (Xv, yv),
            truncate=args.truncate,
        )
        return float(val), g

    def implicit(s: dict[str, float]) -> tuple[float, dict[str, torch.Tensor]]:
        # the trained weights are not an exact minimiser (hypergrad warns with the measured
        # optimality): the implicit gradient is an approximation here (Lorraine et al. 2020)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            hg = fr.hypergrad(
                loss,
                loss,
                spec,
                trained(s),
                s,
                Xt,
                yt,
                outer_data=(Xv, yv),
                tol=1e-6,
                max_iter=50,
            )
        return float(hg.value[0]), {t: v[0] for t, v in hg.strengths.items()}

    if args.check_fd:  # dE/d log s at the start: finite differences vs the hypergradients
        c = {t: math.sqrt(1e-3 * 1e-2) for t in TERMS}
        _, g_unrolled = unrolled(c)
        _, g_implicit = implicit(c)
        _, g_full, _ = unrolled_hypergrad(
            step, p0, opt.init(p0), c, [(Xt, yt)] * args.steps, loss, (Xv, yv)
        )
        print(
            f"{'term':6s} {'central FD':>11s} {'unrolled':>10s} {'full unroll':>12s} "
            f"{'implicit':>9s}"
        )
        for t in TERMS:
            up, dn = (train({**c, t: c[t] * math.exp(e)}) for e in (0.05, -0.05))
            print(
                f"{t:6s} {(up - dn) / 0.1:11.4f} {float(g_unrolled[t]):10.4f} "
                f"{float(g_full[t]):12.4g} {float(g_implicit[t]):9.4f}"
            )
        return

    def descend(
        fn: Callable[[dict[str, float]], tuple[float, dict[str, torch.Tensor]]],
    ) -> tuple[float, dict[str, float], float]:
        t0 = time.perf_counter()
        theta = {
            t: torch.tensor(math.log(math.sqrt(1e-3 * 1e-2)), dtype=torch.float64) for t in TERMS
        }
        outer = fr.optim.adam(0.5)
        state = outer.init(theta)
        search = Secant() if args.search == "secant" else None
        best_val, best_s = math.inf, {}
        for _ in range(args.outer):
            s = {t: float(v.exp()) for t, v in theta.items()}
            val, g = fn(s)
            if val < best_val:
                best_val, best_s = val, s
            if search is None:
                theta, state = outer.step(g, state, theta, {})
                continue
            nxt = search.propose(theta, val, g)
            if nxt is None:  # converged: its next step is below xtol
                break
            theta = nxt
        return best_val, best_s, time.perf_counter() - t0

    # grid
    t0 = time.perf_counter()
    points = list(itertools.product(GRID, repeat=3))
    grid = {
        t: torch.tensor([pt[i] for pt in points], dtype=torch.float64) for i, t in enumerate(TERMS)
    }
    res = fr.sweep(
        net,
        loss,
        spec,
        grid,
        train=(Xt, yt),
        val=(Xv, yv),
        optimizer=opt,
        steps=args.steps,
        progress=False,
    )
    best = res.best()
    t_grid = time.perf_counter() - t0
    grid_check = train({t: best.strengths[t] for t in TERMS})

    # hypergradient descent: unrolled through the last steps, and implicit
    unrolled_best, unrolled_s, t_unrolled = descend(unrolled)
    implicit_best, implicit_s, t_implicit = descend(implicit)

    print(f"MLP 32-{h}-{h}-1, n = {args.n} train / {args.n} val, {args.steps} Adam steps")
    print(f"{'method':14s} {'trainings':>9s} {'time s':>7s} {'best val loss':>13s}  strengths")
    fmt = lambda s: " ".join(f"{t}={s[t]:.2e}" for t in TERMS)  # noqa: E731
    print(f"{'4x4x4 grid':14s} {64:9d} {t_grid:7.1f} {best.value:13.5f}  {fmt(best.strengths)}")
    print(f"{'(grid retrain)':14s} {1:9d} {'':7s} {grid_check:13.5f}")
    name = f"unrolled T={args.truncate}"
    for label, t, v, st in (
        (name, t_unrolled, unrolled_best, unrolled_s),
        ("implicit", t_implicit, implicit_best, implicit_s),
    ):
        print(f"{label:14s} {args.outer:9d} {t:7.1f} {v:13.5f}  {fmt(st)}")
    try:
        import optuna
    except ImportError:
        print("optuna: not installed, skipped (pip install optuna)")
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        t0 = time.perf_counter()
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
        study.optimize(
            lambda tr: train({t: tr.suggest_float(t, 1e-4, 1e-1, log=True) for t in TERMS}),
            n_trials=args.outer,
        )
        t_opt = time.perf_counter() - t0
        print(
            f"{'optuna TPE':14s} {args.outer:9d} {t_opt:7.1f} {study.best_value:13.5f}  "
            f"{fmt(study.best_params)}"
        )
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
