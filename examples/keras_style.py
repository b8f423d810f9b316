"""Regularization declared in the network definition, Keras-style, trained by a stock loop.

1. The seed network declares L1 + L2 on its hidden layer in ``__init__`` with
   ``fr.regularize``; a plain ``torch.optim.SGD`` loop plus one ``fr.attach`` line trains it
   and ends with exact zeros in ``hidden.weight``.
2. The same declared spec (``fr.spec_of(net)``) drives ``fr.sweep`` over 16 L1 strengths
   with no other change.
3. With ``torch.optim.Adam`` the prox is taken in Adam's own metric, so the L1 strength means
   what it means under SGD and in the exact solvers.

Run: ``python examples/keras_style.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import funcreg as fr


class Net(torch.nn.Module):
    def __init__(self, n_feature: int = 1, n_hidden: int = 10, n_output: int = 1) -> None:
        super().__init__()
        # Keras: Dense(10, kernel_regularizer=L1L2(l1, l2)); the strengths come at training
        self.hidden = fr.regularize(torch.nn.Linear(n_feature, n_hidden), l1=fr.L1(), l2=fr.L2())
        self.predict = torch.nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(F.relu(self.hidden(x)))


def data(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.unsqueeze(torch.linspace(-1, 1, n), dim=1)
    return x, x.pow(2) + 0.2 * torch.rand(x.size(), generator=g)


def train_stock(optimizer_name: str, steps: int, strengths: dict[str, float]) -> Net:
    """A stock loop; the only funcreg line is ``fr.attach``."""
    torch.manual_seed(1)
    net = Net()
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    handle = fr.attach(optimizer, None, strengths, model=net)  # the declared terms
    x, y = data()
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(net(x), y).backward()
        optimizer.step()
        scheduler.step()
    values = {k: round(float(v), 5) for k, v in handle.penalty().items()}
    print(f"{optimizer_name}: penalty {values}, exact zeros {handle.zeros()}")
    handle.remove()
    return net


def sweep_declared(steps: int) -> fr.SweepResult:
    """The declared spec, 16 L1 strengths in one vectorised run."""
    torch.manual_seed(1)
    net = Net()
    spec = fr.spec_of(net)

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    k = 16
    grid = {"l1": torch.logspace(-4, -1, k), "l2": [1e-3] * k}
    return fr.sweep(
        net,
        loss,
        spec,
        grid,
        train=data(),
        optimizer=fr.optim.sgd(lr=0.2),
        steps=steps,
        progress=False,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--l1", type=float, default=0.01)
    parser.add_argument("--l2", type=float, default=0.002)
    args = parser.parse_args(argv)
    strengths = {"l1": args.l1, "l2": args.l2}
    print(fr.spec_of(Net()))
    out: dict[str, float] = {}
    for name in ("sgd", "adam"):
        net = train_stock(name, args.steps, strengths)
        out[f"{name}_zero_fraction"] = float((net.hidden.weight == 0).float().mean())
    result = sweep_declared(args.steps)
    weights = result.stacked["hidden.weight"]
    zeros = (weights == 0).flatten(1).float().mean(1)
    print("sweep: exact-zero fraction of hidden.weight per L1 strength:")
    for s, z in zip(result.grid["l1"].tolist(), zeros.tolist(), strict=True):
        print(f"  l1={s:.1e}  zeros={z:.2f}")
    out["sweep_max_zero_fraction"] = float(zeros.max())
    out["sweep_models"] = float(weights.shape[0])
    return out


if __name__ == "__main__":
    main()
