"""Exact zeros need a proximal step: L1 and group lasso on a small regression network.

The network is the classic two-layer example (``Net`` with ``hidden`` and ``predict``, ReLU,
MSE loss, SGD with lr = 0.2). The target depends on 3 of the 10 inputs. We penalise
``hidden.weight`` (shape ``(n_hidden, n_feature)``) two ways and train each spec two ways:

* ``prox=True``  — gradient step on the loss, then the penalty's proximal operator
  (soft-thresholding for L1, block soft-thresholding for GroupLasso): weights land on
  exactly 0.0, and GroupLasso(dim=0) switches whole input features off;
* ``prox=False`` — the penalty's (sub)gradient added to the loss's gradient, i.e. the
  hand-written ``loss + λ·|w|.sum()`` loop: weights oscillate around 0 and none is exactly 0.

Both use ``funcreg.train.train_step`` with ``funcreg.optim.sgd`` (a pure step). The same in a
classic loop: ``opt.step(); fr.prox_(net, spec.nonsmooth(), strengths, lr=0.2)``.

    python examples/exact_zeros.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import funcreg as fr
from funcreg.optim import sgd
from funcreg.train import train_step

LR = 0.2


class Net(nn.Module):
    def __init__(self, n_feature: int, n_hidden: int, n_output: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_feature, n_hidden)
        self.predict = nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(F.relu(self.hidden(x)))


def make_data(n: int, n_feature: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs uniform on [-1, 1]; the target uses inputs 0, 1 and 2 only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, n_feature, generator=g) * 2 - 1
    y = torch.sin(torch.pi * x[:, 0]) + x[:, 1] ** 2 + 0.5 * x[:, 2]
    y = y + 0.1 * torch.randn(n, generator=g)
    return x, y[:, None]


def train(
    spec: fr.Spec,
    strength: float,
    prox: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    n_hidden: int,
    steps: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # same init for every run
    net = Net(x.shape[1], n_hidden, 1)

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        return F.mse_loss(functional_call(net, params, (x,), strict=True), y)

    opt = sgd(LR)
    step = train_step(loss_fn, spec, opt, prox=prox)
    params = fr.params(net)
    state = opt.init(params)
    strengths = {name: strength for name in spec}
    for _ in range(steps):
        params, state, metrics = step(params, state, strengths, x, y)
    return params | {"loss": metrics["loss"]}


def main(
    n: int = 512, n_feature: int = 10, n_hidden: int = 20, steps: int = 600, seed: int = 0
) -> dict[str, int]:
    """Train the four variants; print and return the exact zeros of each.

    L1 counts zero weights; GroupLasso counts inputs whose whole column is zero (its
    structural zeros: the prox scales a column as a block). Under GroupLasso's
    subgradient the weights into a dead ReLU unit shrink by a constant factor every step
    and a few underflow to 0.0 in float32 after some hundred steps; that is rounding, not
    sparsity, and it never zeroes a whole column."""
    x, y = make_data(n, n_feature, seed)
    runs = {
        "L1": (fr.Spec(l1=fr.L1("hidden.weight")), 0.01),
        "GroupLasso(dim=0)": (fr.Spec(group=fr.GroupLasso("hidden.weight", dim=0)), 0.013),
    }
    counts: dict[str, int] = {}
    print(f"hidden.weight is {n_hidden} x {n_feature}; the target uses inputs 0, 1, 2 only\n")
    print(f"{'penalty':<18} {'training':<22} {'exact zeros':<22} final loss")
    for name, (spec, strength) in runs.items():
        for prox in (True, False):
            w_loss = train(spec, strength, prox, x, y, n_hidden, steps, seed)
            w = w_loss["hidden.weight"]
            if name == "L1":
                zeros, what = int((w == 0).sum()), f"/ {w.numel()} weights"
            else:
                dead = (w == 0).all(dim=0)  # an input whose whole column is zero
                zeros, what = int(dead.sum()), f"/ {n_feature} inputs"
            mode = "prox" if prox else "subgradient"
            counts[f"{name} {mode}"] = zeros
            label = "prox (proximal SGD)" if prox else "subgradient (no prox)"
            print(f"{name:<18} {label:<22} {zeros:>4} {what:<17} {float(w_loss['loss']):.4f}")
            if name != "L1" and prox:
                print(f"{'':<18} {'':<22} inputs kept: {(~dead).nonzero().squeeze(1).tolist()}")
    return counts


if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and immune to contention
    main()
