"""Sweep 48 L1 strengths of an MLP at once and pick one on validation data.

The data: 40 inputs, of which only the first 5 matter (a smooth nonlinear target plus
noise). The model: a 40-16-1 MLP with an L1 penalty on its first layer, trained by
proximal Adam (exact zeros). Weak strengths overfit the noise in all 40 inputs, strong
ones zero the whole layer; in between, the best validation loss comes with a sparse first
layer whose weight sits on the 5 inputs that matter. One ``fr.sweep`` call trains every
strength in a single vectorized run; we print the table and the best strength and plot
the validation loss and the first-layer nonzero fraction against the strength.

    python examples/sweep_mlp.py --out sweep_mlp.png     # a few seconds on a laptop CPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg import sweep
from funcreg.result import SweepResult
from funcreg.stack import grid

N_FEATURES, N_USEFUL = 40, 5


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    u = x[:, :N_USEFUL]
    y = torch.sin(2 * u[:, 0]) + u[:, 1] * u[:, 2] + u[:, 3] ** 2 / 2 - u[:, 4]
    y = y + 0.3 * torch.randn(n, generator=g)
    return x, ((y - y.mean()) / y.std()).unsqueeze(1)


def main(argv: list[str] | None = None) -> SweepResult:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strengths", type=int, default=48, help="number of L1 strengths")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--out", default="sweep_mlp.png", help="where to write the plot (PNG)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    x, y = make_data(args.n_train, seed=0)
    xv, yv = make_data(1024, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, 1))

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (xb,)), yb)

    spec = fr.Spec(l1=fr.L1("0.weight"))  # L1 on the first layer only
    strengths = grid(l1=torch.logspace(-3.5, 0.3, args.strengths))

    t0 = time.perf_counter()
    result = sweep(
        net,
        loss,
        spec,
        strengths,
        train=(x, y),
        val=(xv, yv),
        optimizer=fr.optim.adam(1e-2),
        steps=args.steps,
        batch_size=args.batch_size,
        prox=True,
        progress=not args.quiet,
    )
    elapsed = time.perf_counter() - t0

    print(result)
    best = result.best()
    w1 = result.stacked["0.weight"].abs()  # (K, 16, 40)
    total = w1.sum((1, 2))
    useful = torch.where(total > 0, w1[:, :, :N_USEFUL].sum((1, 2)) / total, torch.nan)
    nonzero = 1 - result.history["zeros"]["0.weight"][-1]
    print(f"\n{result.K} strengths x {result.steps} steps in {elapsed:.1f} s")
    print(f"best: {best}")
    i = best.index
    print(
        f"first layer of the best model: {float(nonzero[i]):.0%} of weights nonzero, "
        f"{float(useful[i]):.0%} of |W1| on the {N_USEFUL} inputs that matter "
        f"(weakest strength: {float(nonzero[0]):.0%} nonzero, {float(useful[0]):.0%})"
    )

    plot(result, useful, best.index, args.out)
    print(f"plot written to {args.out}")
    return result


def plot(result: SweepResult, useful: Tensor, best: int, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = result.grid["l1"].numpy()
    val = result.history["val_loss"][-1].numpy()
    nonzero = 1 - result.history["zeros"]["0.weight"][-1].numpy()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    a1.semilogx(lam, val, "o-", ms=3)
    a1.axvline(lam[best], color="k", ls="--", lw=1, label=f"best l1 = {lam[best]:.3g}")
    a1.set_ylabel("validation MSE")
    a1.legend()
    a2.semilogx(lam, nonzero, "o-", ms=3, label="nonzero fraction of layer 1")
    a2.semilogx(
        lam, useful.numpy(), "s-", ms=3, label=f"share of |W1| on the {N_USEFUL} useful inputs"
    )
    a2.axvline(lam[best], color="k", ls="--", lw=1)
    a2.set_xlabel("L1 strength")
    a2.legend()
    fig.suptitle(f"fr.sweep: {result.K} L1 strengths of a 40-16-1 MLP in one run")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
