"""Fine-tuning with L2-SP: stay close to the pretrained weights, strength chosen by CV.

A network pretrained on a large source task is fine-tuned on 40 samples of a related
target task. ``L2(toward=pretrained)`` penalises ``½‖w − w_pretrained‖²`` (L2-SP, Li et al.
2018): strength 0 is plain fine-tuning (overfits 40 samples), a large strength keeps the
pretrained network. ``fr.cross_validate`` trains 5 folds × 8 strengths — plus the 8 fits on
all the data — in one vmapped run with Adam, the ordinary mean-squared-error loss unchanged
(the folds reach it as per-sample weights), and picks the strength.

    python examples/finetune_l2sp.py --out finetune_l2sp.png
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg.selection import cross_validate


def task(n: int, shift: float, seed: int) -> tuple[Tensor, Tensor]:
    """``y = sin(x·a) + 0.5 (x·b)² / d + shift · tanh(2 x_0)`` plus noise; ``a``, ``b`` fixed."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(1234)
    d = 8
    a, b = torch.randn(d, generator=fixed), torch.randn(d, generator=fixed)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(x @ a) + 0.5 * (x @ b) ** 2 / d + shift * torch.tanh(2 * x[:, 0])
    return x, (y + 0.1 * torch.randn(n, generator=g)).unsqueeze(1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-source", type=int, default=2000)
    ap.add_argument("--n-target", type=int, default=40)
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps (Adam)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--grid", type=int, default=8, help="strengths, 1e-4 .. 10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="finetune_l2sp.png")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (xb,)), yb)

    xs, ys = task(args.n_source, 0.0, args.seed)  # source task
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(args.pretrain_steps):
        opt.zero_grad()
        F.mse_loss(net(xs), ys).backward()
        opt.step()
    pretrained = fr.params(net)

    xt, yt = task(args.n_target, 1.0, args.seed + 1)  # the target task: 40 samples
    x_test, y_test = task(2000, 1.0, args.seed + 2)
    spec = fr.Spec(sp=fr.L2(fr.everything(), toward=pretrained))
    strengths = torch.logspace(-4, 1, args.grid)
    cv = cross_validate(
        net, loss, spec, fr.grid(sp=strengths), (xt, yt), folds=args.folds,
        optimizer=fr.optim.adam(1e-2), steps=args.steps, seed=args.seed,
    )  # fmt: skip
    print(f"L2-SP fine-tuning on {args.n_target} target samples, {args.folds}-fold CV:")
    print(cv)

    def test_mse(model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.mse_loss(model(x_test), y_test))

    weakest = int(torch.argmin(cv.grid["sp"]))
    rows = [
        ("pretrained, not fine-tuned", test_mse(net)),
        (f"plain fine-tuning (strength {float(cv.grid['sp'][weakest]):.0e})",
         test_mse(cv.path.module(weakest))),
        (f"L2-SP, strength_min = {cv.strength_min:.3g}", test_mse(cv.refit("min"))),
        (f"L2-SP, strength_1se = {cv.strength_1se:.3g}", test_mse(cv.refit("1se"))),
    ]  # fmt: skip
    print("\ntest MSE on 2000 new target samples:")
    for name, v in rows:
        print(f"  {name:<40} {v:.4f}")
    ax = cv.plot(ylabel="CV mean squared error")
    ax.set_title(f"L2-SP strength by {args.folds}-fold CV ({args.n_target} samples)")
    ax.figure.tight_layout()
    ax.figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return {"cv": cv, "test": dict(rows), "ax": ax}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
