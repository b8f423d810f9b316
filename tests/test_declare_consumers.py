"""The declared spec (fr.spec_of) is accepted by everything that takes a spec: penalty,
prox_, penalized, train_step, sweep, solve, path and cross_validate give what the same
terms written as an explicit Spec give, and solve reaches scikit-learn's Lasso."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import Lasso
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


class Linear(nn.Module):
    def __init__(self, p: int) -> None:
        super().__init__()
        self.lin = fr.regularize(nn.Linear(p, 1), l1=fr.L1("weight"))
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).squeeze(-1)


def _problem() -> tuple[Linear, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g, dtype=DT)
    w = torch.tensor([2.0, -1.5, 1.0, 0, 0, 0, 0, 0], dtype=DT)
    return Linear(8).double(), x, x @ w + 0.5 * torch.randn(60, generator=g, dtype=DT)


def test_every_consumer_takes_the_declared_spec():
    net, x, y = _problem()
    declared = fr.spec_of(net)
    explicit = fr.Spec(l1=fr.L1("lin.weight"))
    assert declared.selection(fr.params(net)) == explicit.selection(fr.params(net))

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return 0.5 * F.mse_loss(functional_call(net, params, (xb,)), yb)

    strength = 0.1
    params = fr.params(net)
    # solve: equal to the explicit spec's and to scikit-learn's Lasso (centred intercept)
    sol = fr.solve(loss, declared, params, {"l1": strength}, x, y, tol=1e-12)
    ref = Lasso(alpha=strength, tol=1e-12, max_iter=100_000).fit(x.numpy(), y.numpy())
    w = sol.params["lin.weight"].reshape(-1).numpy()
    np.testing.assert_array_equal(w != 0, ref.coef_ != 0)
    np.testing.assert_allclose(w, ref.coef_, atol=1e-6, rtol=0)
    again = fr.solve(loss, explicit, params, {"l1": strength}, x, y, tol=1e-12)
    assert torch.equal(sol.params["lin.weight"], again.params["lin.weight"])
    # penalized, penalty, prox_
    s = {"l1": 0.3}
    wt = net.lin.weight.detach()
    torch.testing.assert_close(
        fr.penalized(loss, declared)(params, s, x, y), loss(params, x, y) + 0.3 * wt.abs().sum()
    )
    torch.testing.assert_close(fr.penalty(net, declared, s), 0.3 * wt.abs().sum())
    # train_step, sweep, path and cross_validate: the declared spec equals the explicit one
    opt = fr.optim.sgd(lr=0.1)
    stepped = [
        fr.train_step(loss, spec_, opt)(params, opt.init(params), s, x, y)[0]
        for spec_ in (declared, explicit)
    ]
    for n in params:
        assert torch.equal(stepped[0][n], stepped[1][n])
    grid = {"l1": [0.01, 0.1, 0.5]}
    runs = [
        fr.sweep(net, loss, spec_, grid, train=(x, y), optimizer=opt, steps=20, progress=False)
        for spec_ in (declared, explicit)
    ]
    assert torch.equal(runs[0].stacked["lin.weight"], runs[1].stacked["lin.weight"])
    paths = [
        fr.path(net, loss, spec_, data=(x, y), n=4, eps=1e-2, tol=1e-10)
        for spec_ in (declared, explicit)
    ]
    assert torch.equal(paths[0].stacked["lin.weight"], paths[1].stacked["lin.weight"])
    cvs = [
        fr.cross_validate(net, loss, spec_, fr.grid(l1=[0.05, 0.2]), (x, y), folds=3, tol=1e-10)
        for spec_ in (declared, explicit)
    ]
    assert cvs[0].strength_min == cvs[1].strength_min
    prox_net = Linear(8).double()
    with torch.no_grad():
        prox_net.lin.weight.copy_(torch.linspace(-1, 1, 8, dtype=DT))
    fr.prox_(prox_net, fr.spec_of(prox_net), {"l1": 0.3}, lr=1.0)
    expected = torch.linspace(-1, 1, 8, dtype=DT)
    expected = expected.sign() * (expected.abs() - 0.3).clamp(min=0)
    torch.testing.assert_close(prox_net.lin.weight.detach().reshape(-1), expected)
