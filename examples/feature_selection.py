"""Feature selection in a neural network: a group lasso on the first layer (LassoNet's use).

``GroupLasso("0.weight", dim=0)`` puts one group per *input feature* (a column of the first
``nn.Linear``'s weight): when a group is zero the network ignores that feature. ``fr.path``
trains the path between ``strength_max`` and ``0.01 · strength_max`` in vmapped chunks with
proximal SGD; as in LassoNet it runs dense to sparse, each chunk starting from the previous
chunk's last (less regularised) model. We read off which features survive at each strength.
Only features 0-3 drive the target; the rest is noise.

    python examples/feature_selection.py --out feature_selection.png
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg import path

INFORMATIVE = 4


def make_data(n: int, p: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g)
    f = torch.sin(2 * x[:, 0]) + x[:, 1] + torch.tanh(2 * x[:, 2]) + 0.5 * x[:, 3]
    y = f + 0.1 * torch.randn(n, generator=g)
    return x, ((y - y.mean()) / y.std()).unsqueeze(1)


def objective(r: fr.SweepResult) -> Tensor:
    """``(steps, K)`` training objective (loss + penalty) at every step."""
    return r.history["loss"] + r.history["penalty"]


def steps_to(obj: Tensor, target: Tensor) -> Tensor:
    """Per model, the steps taken until the objective is at most ``target`` (all of them
    when it never is)."""
    hit = obj <= target
    return torch.where(hit.any(0), hit.float().argmax(0) + 1, obj.shape[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="training samples")
    ap.add_argument("--p", type=int, default=10, help="input features")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--grid", type=int, default=10, help="strengths on the path")
    ap.add_argument("--chunk", type=int, default=2, help="models per vmapped chunk")
    ap.add_argument("--steps", type=int, default=200, help="proximal SGD steps per chunk")
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="feature_selection.png")
    args = ap.parse_args(argv)

    x, y = make_data(args.n + 200, args.p, args.seed)  # 200 validation samples
    train, val = (x[: args.n], y[: args.n]), (x[args.n :], y[args.n :])
    torch.manual_seed(args.seed)
    net = nn.Sequential(nn.Linear(args.p, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 1))

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (xb,)), yb)

    spec = fr.Spec(group=fr.GroupLasso("0.weight", dim=0))
    kw = dict(data=train, val=val, optimizer=fr.optim.sgd(args.lr), steps=args.steps)
    kw.update(n=args.grid, eps=0.01, chunk_size=args.chunk)
    warm = path(net, loss, spec, **kw)
    cold = path(net, loss, spec, warm_start=False, **kw)

    norms = torch.linalg.vector_norm(warm.stacked["0.weight"], dim=1)  # (K, p): per feature
    val_loss = warm.history["val_loss"][-1]
    print(f"group lasso on the first layer: {args.p} features, only 0-{INFORMATIVE - 1} matter")
    print(f"{'strength':>9} {'val mse':>8}  surviving features")
    survivors = []
    for k in range(warm.K):
        alive = (norms[k] > 0).nonzero().flatten().tolist()
        survivors.append(alive)
        print(f"{float(warm.grid['group'][k]):>9.4f} {float(val_loss[k]):>8.4f}  {alive}")
    best = warm.best()
    print(
        f"best by validation: strength {best.strengths['group']:.4f}, "
        f"features {survivors[best.index]}"
    )

    # warm vs cold at the same accuracy: steps until the training objective (loss +
    # penalty) first comes within 1% of what the cold start has after all its steps (the
    # first chunk is cold in both runs)
    ow, oc = objective(warm), objective(cold)
    target = oc[-1] * 1.01  # within 1% of the cold start's final objective
    sw, sc = steps_to(ow, target), steps_to(oc, target)
    print(
        f"\nsteps to within 1% of the cold start's final objective, summed over the "
        f"{warm.K} models (chunks of {args.chunk}): warm {int(sw.sum())}, cold {int(sc.sum())} "
        f"({100 * (1 - sw.sum() / sc.sum()):.0f}% fewer)"
    )

    ax = warm.plot_path("0.weight", kind="norm")
    for line, j in zip(ax.get_lines(), range(args.p), strict=False):
        line.set_label(f"feature {j}" + (" *" if j < INFORMATIVE else ""))
        line.set_linestyle("-" if j < INFORMATIVE else "--")
    ax.legend(fontsize="small", ncol=2)
    ax.set_title("first-layer group norms along the path (* informative)")
    ax.figure.tight_layout()
    ax.figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return {"survivors": survivors, "best": best, "steps_warm": sw, "steps_cold": sc, "ax": ax}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
