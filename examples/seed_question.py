"""The question funcreg started from: "how do I add L1/L2 regularization to the weights of one
layer in PyTorch?" — answered for the classic training loop.

1. The hand-written answer, ``l1 * Σ|w| + l2 * Σw²`` added to the loss, and funcreg's
   ``fr.penalty`` with the converted strengths give the same losses, step by step.
2. With the non-smooth L1 term applied by its proximal operator (``fr.prox_``) instead of its
   subgradient, the L1-penalised weights reach exact zeros; the subgradient loop never does.

The same network with its terms declared in ``__init__`` (``fr.regularize``), a stock
``torch.optim`` loop plus one ``fr.attach`` line, and a 16-strength ``fr.sweep`` of the
declared spec: ``examples/keras_style.py``.

Run: ``python examples/seed_question.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import funcreg as fr


class Net(torch.nn.Module):
    def __init__(self, n_feature: int, n_hidden: int, n_output: int) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(n_feature, n_hidden)
        self.predict = torch.nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(F.relu(self.hidden(x)))


def data(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.unsqueeze(torch.linspace(-1, 1, n), dim=1)
    return x, x.pow(2) + 0.2 * torch.rand(x.size(), generator=g)


def train(mode: str, steps: int, l1_weight: float, l2_weight: float) -> tuple[list[float], Net]:
    """``mode``: 'hand' (hand-written penalty), 'funcreg' (fr.penalty) or 'prox' (fr.prox_)."""
    torch.manual_seed(1)
    net = Net(n_feature=1, n_hidden=10, n_output=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    loss_func = torch.nn.MSELoss()
    x, y = data()
    # Keras/hand-written `l2 * Σw²` is funcreg's L2 (½Σw²) with strength 2·l2
    spec, strengths = fr.from_keras(l1=l1_weight, l2=l2_weight, select="hidden.weight")
    losses = []
    for _ in range(steps):
        if mode == "hand":
            w = net.hidden.weight
            reg = l1_weight * w.abs().sum() + l2_weight * w.pow(2).sum()
        elif mode == "funcreg":
            reg = fr.penalty(net, spec, strengths)
        else:  # smooth part by gradient, L1 by its prox
            reg = fr.penalty(net, spec.smooth(), strengths)
        loss = loss_func(net(x), y) + reg
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if mode == "prox":
            fr.prox_(net, spec.nonsmooth(), strengths, lr=0.2)
        losses.append(float(loss.detach()))
    return losses, net


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--l1", type=float, default=0.01)
    parser.add_argument("--l2", type=float, default=0.001)
    args = parser.parse_args(argv)

    hand, net_hand = train("hand", args.steps, args.l1, args.l2)
    ours, net_ours = train("funcreg", args.steps, args.l1, args.l2)
    prox, net_prox = train("prox", args.steps, args.l1, args.l2)
    diff = max(abs(a - b) for a, b in zip(hand, ours, strict=True))
    zeros_sub = int((net_hand.hidden.weight == 0).sum())
    zeros_prox = int((net_prox.hidden.weight == 0).sum())
    n = net_prox.hidden.weight.numel()
    print(f"hand-written vs fr.penalty: max loss difference over {args.steps} steps = {diff:.2e}")
    print(f"final loss: hand-written {hand[-1]:.5f}, fr.penalty {ours[-1]:.5f}")
    print(f"final loss with L1 by prox (L1 term not in the loss): {prox[-1]:.5f}")
    print(f"exact zeros in hidden.weight: subgradient {zeros_sub}/{n}, prox {zeros_prox}/{n}")
    print(
        fr.Spec(l1=fr.L1("hidden.weight"), l2=fr.L2("hidden.weight")).describe(fr.params(net_prox))
    )
    return {"max_diff": diff, "zeros_subgradient": zeros_sub, "zeros_prox": zeros_prox}


if __name__ == "__main__":
    main()
