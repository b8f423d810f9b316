"""Activity regularization: Keras's formulas, hooks only inside the block, vmap-safe."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from funcreg import activity


def _net() -> nn.Module:
    torch.manual_seed(0)
    hidden = activity.declare(nn.Linear(4, 3), activity.L1L2(l1=0.01, l2=0.02))
    return nn.Sequential(hidden, nn.ReLU(), nn.Linear(3, 1)).double()


def test_keras_formulas_and_per_batch():
    net = _net()
    x = torch.randn(5, 4, dtype=torch.float64)
    a = net[0](x).detach()
    with activity.collect(net) as acts:
        net(x)
    torch.testing.assert_close(acts.penalty(), 0.01 * a.abs().sum() + 0.02 * a.square().sum())
    per_batch = activity.L1L2(l1=0.01, l2=0.02, per_batch=True)
    torch.testing.assert_close(per_batch(a), (0.01 * a.abs().sum() + 0.02 * a.square().sum()) / 5)
    assert list(acts.parts()) == ["0"]


def test_hooks_only_inside_the_block_and_declaration_survives_copies():
    net = _net()
    with activity.collect(net):
        assert net[0]._forward_hooks
    assert not net[0]._forward_hooks
    assert "0" in dict(_declared(copy.deepcopy(net)))
    assert set(net.state_dict()) == set(
        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)).state_dict()
    )


def _declared(net: nn.Module):
    return [
        (p, m.__dict__["_funcreg_activity"])
        for p, m in net.named_modules()
        if "_funcreg_activity" in m.__dict__
    ]


def test_functional_loss_under_vmap_equals_a_loop():
    net = _net()
    params = {n: p.detach() for n, p in net.named_parameters()}
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)

    def objective(params, strength):
        with activity.collect(net) as acts:
            out = torch.func.functional_call(net, params, (x,))
        return ((out - y) ** 2).mean() + strength * acts.penalty()

    strengths = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    batched = torch.func.vmap(torch.func.grad(objective), in_dims=(None, 0))(params, strengths)
    for k, s in enumerate(strengths):
        one = torch.func.grad(objective)(params, s)
        for n in params:
            torch.testing.assert_close(batched[n][k], one[n])


def test_bad_input():
    with pytest.raises(TypeError, match=r"must be fr.activity.L1L2"):
        activity.declare(nn.Linear(2, 2), 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"l1"):
        activity.L1L2(l1=-1.0)
