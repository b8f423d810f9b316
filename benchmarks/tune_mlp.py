"""Three per-layer L2 strengths of a small MLP: ``fr.tune`` (network route, unrolled and
implicit hypergradients) vs the best point of a 4×4×4 ``fr.sweep`` grid and Optuna's TPE.

The task is the MLP task of ``benchmarks/README.md`` at a small size: the first ``--n``
samples for training, the next ``--n`` for validation, hidden width ``--hidden``, activation
``--act`` (ReLU: the original task; GELU: a smooth one), full-batch training for ``--steps``
steps from one seeded init with ``--train`` (``adam``: Adam lr 1e-2; ``sgdm``: SGD lr 0.02,
momentum 0.9), one L2 strength per Linear layer (``l2_0``, ``l2_2``, ``l2_4``), float64:

* grid: ``fr.sweep`` of the 64 points ``{1e-4, 1e-3, 1e-2, 1e-1}³`` (vmapped), the best
  validation loss;
* Optuna (TPE, seeded by ``--optuna-seed``; skipped when ``optuna`` is not installed):
  ``--outer`` trainings, log-uniform strengths in ``[1e-4, 1e-1]``;
* ``fr.tune(..., training=fr.Training(opt, steps, hypergrad="unrolled"))``: at most ``--outer``
  outer steps (Adam, lr ``--outer-lr``, on log s, from all strengths at ``--start``), each a
  training from the init and its exact reverse-mode derivative (all steps, or the last
  ``--truncate``);
* ``fr.tune(..., training=fr.Training(opt, steps, hypergrad="implicit"))``: the first outer step
  trains ``--steps`` steps, then every step L-BFGS to a stationary point of the penalized
  loss (warm-started from the previous step's weights) and the implicit hypergradient. Its
  inner map (a stationary point) is not the grid's (``--steps`` optimizer steps), so its
  best strengths are also retrained the grid's way ("retrained"), and with
  ``--converged-optuna`` Optuna runs on the same inner map (each trial trained then
  L-BFGS-polished from the init).

    python benchmarks/tune_mlp.py [--act relu|gelu] [--train adam|sgdm] [--outer 25]
        [--methods unrolled,implicit,grid,optuna] [--check-fd] [--check-smooth]

``--check-fd`` only compares, at the starting strengths, the hypergradients with central
finite differences of the trained validation loss at several steps in log s, for the
training map (the full unroll, and the unroll truncated to the last 1, 5, 20, 50 steps) and
for the stationary-point map (the implicit gradient). ``--check-smooth`` compares, at four
points, the unroll (truncated to the last 1, 5, 20, 50 steps, and full) with the trend of
the map: the least-squares slope of the validation loss over 96 trainings at antithetic
Gaussian perturbations of log s (σ = 0.15, seed 2), with its standard error.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
import warnings

import torch
from common import make_data
from torch import nn
from torch.func import functional_call, grad

import funcreg as fr
from funcreg._tune_net import Training, _Implicit
from funcreg.unrolled import unrolled_hypergrad

TERMS = ("l2_0", "l2_2", "l2_4")
GRID = (1e-4, 1e-3, 1e-2, 1e-1)
START = 10**-2.5
REACH = (0.56, 0.54, 0.5296, 0.5228, 0.52, 0.50)  # ReLU/Adam: the grid's, Optuna's best
TRUNCATE = (1, 5, 20, 50)  # --check-fd, --check-smooth: the truncated unrolls they print
SMOOTH_AT = {  # --check-smooth: the start, two points on the way, the grid's best
    "start": (START,) * 3,
    "mid": (1e-2, 3e-3, 3e-3),
    "near": (3e-2, 1e-2, 3e-3),
    "grid best": (1e-1, 1e-2, 1e-1),
}


def _reach(values: list[float], target: float) -> int | None:
    """How many evaluations it took to reach ``target`` (None: never)."""
    return next((i + 1 for i, x in enumerate(values) if x <= target), None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--act", choices=("relu", "gelu"), default="relu")
    ap.add_argument("--train", choices=("adam", "sgdm"), default="adam")
    ap.add_argument("--truncate", type=int, default=None)
    ap.add_argument("--outer", type=int, default=25)
    ap.add_argument("--outer-lr", type=float, default=0.3)
    ap.add_argument("--polish", type=int, default=2000)
    ap.add_argument("--start", type=float, default=START, help="every starting strength")
    ap.add_argument("--damping", type=float, default=0.0, help="μ of the implicit route")
    ap.add_argument("--methods", default="grid,optuna,unrolled,implicit")
    ap.add_argument("--converged-optuna", action="store_true")
    ap.add_argument("--optuna-seed", type=int, default=0, help="seed of the TPE sampler")
    ap.add_argument("--check-fd", action="store_true")
    ap.add_argument("--check-smooth", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    X, y = make_data(0)
    X, y = X.double(), y.double()
    Xt, yt, Xv, yv = X[: args.n], y[: args.n], X[args.n : 2 * args.n], y[args.n : 2 * args.n]
    torch.manual_seed(0)
    h = args.hidden
    Act = nn.ReLU if args.act == "relu" else nn.GELU
    net = nn.Sequential(nn.Linear(32, h), Act(), nn.Linear(h, h), Act(), nn.Linear(h, 1))
    net = net.double()

    def loss(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(net, p, (X,)) - y) ** 2).mean()

    spec = fr.Spec({t: fr.L2(f"{t[-1]}.weight") for t in TERMS})
    opt = fr.optim.adam(1e-2) if args.train == "adam" else fr.optim.sgd(0.02, momentum=0.9)
    step = fr.train_step(loss, spec, opt)
    p0 = fr.params(net)
    F = fr.penalized(loss, spec)
    implicit_tr = Training(opt, args.steps, "implicit", polish=args.polish, damping=args.damping)
    inner = _Implicit(loss, spec, (Xt, yt), implicit_tr)
    start = {t: args.start for t in TERMS}
    scale = float(sum((g * g).sum() for g in grad(F)(p0, start, Xt, yt).values()) ** 0.5)
    tensors = lambda s: {t: torch.tensor(float(v), dtype=torch.float64) for t, v in s.items()}  # noqa: E731

    def trained(s: dict[str, float]) -> dict[str, torch.Tensor]:
        p, o = p0, opt.init(p0)
        with torch.no_grad():
            for _ in range(args.steps):
                p, o, _ = step(p, o, s, Xt, yt)
        return p

    def train(s: dict[str, float]) -> float:
        return float(loss(trained(s), Xv, yv))

    def converged(s: dict[str, float], w: dict | None = None) -> dict[str, torch.Tensor]:
        st = tensors(s)
        return inner.train(trained(s) if w is None else w, st, scale, first=False)

    print(
        f"MLP 32-{h}-{h}-1 ({args.act}), n = {args.n} train / {args.n} val, {args.steps} "
        f"full-batch {args.train} steps, float64"
    )
    if args.check_fd:
        c = dict(start)
        val, g_full, _ = unrolled_hypergrad(
            step, p0, opt.init(p0), c, [(Xt, yt)] * args.steps, loss, (Xv, yv)
        )
        cuts = [k for k in TRUNCATE if k < args.steps]
        g_cut = {
            k: unrolled_hypergrad(
                step, p0, opt.init(p0), c, [(Xt, yt)] * args.steps, loss, (Xv, yv), truncate=k
            )[1]
            for k in cuts
        }
        wc = converged(c)
        stat = float(sum((g * g).sum() for g in grad(F)(wc, tensors(c), Xt, yt).values()))
        _, g_imp = inner.hypergrad(wc, tensors(c), TERMS, loss, (Xv, yv))
        eps = (0.2, 0.05, 0.01, 0.002)
        print(f"dE/d log s at all strengths {args.start:.2e}; central FD at ±{eps} in log s")
        print(f"training map: val {float(val):.4f}; truncated: the last T = {cuts} steps")
        for t in TERMS:
            fd = [
                (train({**c, t: c[t] * math.exp(e)}) - train({**c, t: c[t] * math.exp(-e)}))
                / (2 * e)
                for e in eps
            ]
            print(
                f"  {t}: full unroll {float(g_full[t]):10.4g}   FD "
                + " ".join(f"{v:9.4f}" for v in fd)
                + "   truncated "
                + " ".join(f"{float(g_cut[k][t]):10.3g}" for k in cuts)
            )
        print(
            f"stationary-point map (L-BFGS from the trained weights; relative ‖∇F‖ "
            f"{stat**0.5 / scale:.1e}): val {float(loss(wc, Xv, yv)):.4f}"
        )
        for t in TERMS:
            fd = []
            for e in eps[1:3]:
                up, dn = (
                    float(loss(converged({**c, t: c[t] * math.exp(sg * e)}, wc), Xv, yv))
                    for sg in (1, -1)
                )
                fd.append((up - dn) / (2 * e))
            print(
                f"  {t}: implicit {float(g_imp[t]):10.4f}   FD " + " ".join(f"{v:9.4f}" for v in fd)
            )
        return

    if args.check_smooth:
        gen = torch.Generator().manual_seed(2)
        sigma, half = 0.15, 48
        print(
            f"trend: least-squares slope of E over {2 * half} trainings at log s + N(0, {sigma}²)"
        )
        for name, at in SMOOTH_AT.items():
            c = dict(zip(TERMS, at, strict=True))
            Z = torch.randn(half, 3, generator=gen, dtype=torch.float64) * sigma
            Z = torch.cat([Z, -Z])
            f = torch.tensor(
                [train({t: c[t] * math.exp(float(z[i])) for i, t in enumerate(TERMS)}) for z in Z],
                dtype=torch.float64,
            )
            A = torch.cat([torch.ones(len(Z), 1, dtype=torch.float64), Z], 1)
            coef = torch.linalg.lstsq(A, f[:, None]).solution[:, 0]
            res = f - A @ coef
            s2 = float(res @ res) / (len(f) - 4)
            se = (s2 * torch.linalg.inv(A.T @ A).diag()).sqrt()
            trend = coef[1:]
            print(
                f"{name} {at}: mean {float(coef[0]):.4f}, residual sd "
                f"{s2**0.5:.4f}, trend "
                + " ".join(
                    f"{float(v):+.3f}±{float(e):.3f}" for v, e in zip(trend, se[1:], strict=True)
                )
            )
            for k in (*TRUNCATE, args.steps):
                _, g, _ = unrolled_hypergrad(
                    step, p0, opt.init(p0), c, [(Xt, yt)] * args.steps, loss, (Xv, yv),
                    truncate=k,
                )  # fmt: skip
                gv = torch.stack([g[t] for t in TERMS])
                cos = float(gv @ trend / (gv.norm() * trend.norm()))
                agree = int((gv.sign() == trend.sign()).sum())
                print(
                    f"  T={k:3d}: " + " ".join(f"{float(v):+10.3g}" for v in gv)
                    + f"   signs {agree}/3, cosine {cos:+.2f}"
                )  # fmt: skip
        return

    methods = args.methods.split(",")
    fmt = lambda s: " ".join(f"{t}={s[t]:.2e}" for t in TERMS)  # noqa: E731
    print(f"{'method':22s} {'trainings':>9s} {'time s':>7s} {'best val loss':>13s}  strengths")
    if "grid" in methods:
        t0 = time.perf_counter()
        points = list(itertools.product(GRID, repeat=3))
        grid = {
            t: torch.tensor([pt[i] for pt in points], dtype=torch.float64)
            for i, t in enumerate(TERMS)
        }
        res = fr.sweep(
            net, loss, dict(spec), grid, train=(Xt, yt), val=(Xv, yv), optimizer=opt,
            steps=args.steps, progress=False,
        )  # fmt: skip
        best = res.best()
        t_grid = time.perf_counter() - t0
        print(f"{'4x4x4 grid':22s} {64:9d} {t_grid:7.1f} {best.value:13.5f}  {fmt(best.strengths)}")
    if "optuna" in methods:
        try:
            import optuna
        except ImportError:
            print("optuna: not installed, skipped (pip install optuna)")
        else:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            runs = [("optuna TPE", train)]
            if args.converged_optuna:
                runs.append(
                    ("optuna TPE (stationary)", lambda s: float(loss(converged(s), Xv, yv)))
                )
            for label, fn in runs:
                t0 = time.perf_counter()
                study = optuna.create_study(
                    sampler=optuna.samplers.TPESampler(seed=args.optuna_seed)
                )
                study.optimize(
                    lambda tr, fn=fn: fn(
                        {t: tr.suggest_float(t, 1e-4, 1e-1, log=True) for t in TERMS}
                    ),
                    n_trials=args.outer,
                )
                t_opt = time.perf_counter() - t0
                vals = [tr.value for tr in study.trials]
                print(
                    f"{label:22s} {args.outer:9d} {t_opt:7.1f} {study.best_value:13.5f}  "
                    f"{fmt(study.best_params)}"
                )
                print(f"{'':22s} trials to reach: " + ", ".join(
                    f"{v}: {_reach(vals, v)}" for v in REACH))  # fmt: skip
    for mode in ("unrolled", "implicit"):
        if mode not in methods:
            continue
        tr = (
            implicit_tr
            if mode == "implicit"
            else Training(opt, args.steps, "unrolled", truncate=args.truncate)
        )
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = fr.tune(
                loss, spec, p0, start, (Xt, yt), validation=(Xv, yv), training=tr,
                optimizer=fr.optim.adam(args.outer_lr), steps=args.outer, patience=args.outer,
            )  # fmt: skip
        t_tune = time.perf_counter() - t0
        n_tr = len(r.history["value"])
        label = f"fr.tune {mode}" + (
            f" T={args.truncate}" if mode == "unrolled" and args.truncate else ""
        )
        print(f"{label:22s} {n_tr:9d} {t_tune:7.1f} {r.value:13.5f}  {fmt(r.strengths)}")
        vals = r.history["value"]
        print(f"{'':22s} steps to reach: " + ", ".join(
            f"{v}: {_reach(vals, v)}" for v in REACH) + f"; stopped: {r.stopped}")  # fmt: skip
        print(f"{'':22s} values: " + " ".join(f"{v:.4f}" for v in vals))
        st = r.history["stationarity"]
        print(f"{'':22s} relative ‖∇F‖: min {min(st):.1e} max {max(st):.1e}")
        if mode == "implicit":
            print(f"{'  (retrained, grid way)':22s} {1:9d} {'':7s} {train(r.strengths):13.5f}")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
