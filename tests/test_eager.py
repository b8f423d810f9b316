"""Classic-loop helpers: fr.penalty, fr.prox_, fr.param_groups and the converters,
checked against torch.optim and hand-written penalties."""

import pathlib

import pytest
import torch
from torch import nn

import funcreg as fr

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_seed_question_example(load_example):
    out = load_example("seed_question").main(["--steps", "150"])
    assert out["max_diff"] < 1e-6  # same losses step by step
    assert out["zeros_subgradient"] == 0
    assert out["zeros_prox"] > 0


def test_seed_network_same_losses_as_hand_written_in_float64(load_example):
    mod = load_example("seed_question")
    torch.manual_seed(3)
    base = mod.Net(2, 8, 1).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    y = torch.randn(64, 1, dtype=torch.float64)
    l1, l2 = 0.02, 0.003
    spec, s = fr.from_keras(l1=l1, l2=l2, select="hidden.*")
    nets = [mod.Net(2, 8, 1).double() for _ in range(2)]
    for n in nets:
        n.load_state_dict(base.state_dict())
    opts = [torch.optim.SGD(n.parameters(), lr=0.2) for n in nets]
    for _ in range(25):
        losses = []
        for i, (net, opt) in enumerate(zip(nets, opts, strict=True)):
            if i == 0:
                reg = sum(l1 * p.abs().sum() + l2 * p.pow(2).sum() for p in net.hidden.parameters())
            else:
                reg = fr.penalty(net, spec, s)
            loss = nn.functional.mse_loss(net(x), y) + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[0] == pytest.approx(losses[1], rel=1e-13)


def test_l2_equals_sgd_weight_decay_trajectory():
    torch.manual_seed(0)
    net_a = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    net_b = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    net_b.load_state_dict(net_a.state_dict())
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    lam = 0.05
    opt_a = torch.optim.SGD(net_a.parameters(), lr=0.1, momentum=0.9, weight_decay=lam)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.1, momentum=0.9)
    spec, s = fr.from_weight_decay(lam, select=fr.everything())
    for _ in range(30):
        for net, opt, reg in ((net_a, opt_a, False), (net_b, opt_b, True)):
            loss = nn.functional.mse_loss(net(x), y)
            if reg:
                loss = loss + fr.penalty(net, spec, s)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_prox_in_place_gives_exact_zeros_and_matches_pure_prox():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    before = fr.params(net)
    spec = fr.Spec(l1=fr.L1(), box=fr.Box("bias", lo=-0.1, hi=0.1))
    fr.prox_(net, spec, {"l1": 0.3}, lr=0.5)
    # written out, not through the library's prox: soft-threshold the weight at lr·s = 0.15,
    # clamp the bias to the box
    w0, b0 = before["weight"], before["bias"]
    expect_w = torch.sign(w0) * torch.clamp(w0.abs() - 0.15, min=0)
    torch.testing.assert_close(net.weight.detach(), expect_w, rtol=0, atol=0)
    torch.testing.assert_close(net.bias.detach(), b0.clamp(-0.1, 0.1), rtol=0, atol=0)
    assert int((net.weight == 0).sum()) > 0
    assert float(net.bias.detach().abs().max()) <= float(torch.tensor(0.1))  # float32 bound
    assert net.weight.requires_grad  # still a trainable leaf


def test_param_groups_excludes_biases_and_norm_layers():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    decay, no_decay = fr.param_groups(net, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[2].weight)}
    assert len(no_decay["params"]) == 4
    torch.optim.AdamW(fr.param_groups(net, 0.1), lr=1e-3)  # accepted by torch.optim


def test_converters():
    spec, s = fr.from_keras(l1=0.01, l2=0.02)
    assert s == {"l1": 0.01, "l2": 0.04}
    w = {"w": torch.randn(3, 3, dtype=torch.float64)}
    keras = 0.01 * w["w"].abs().sum() + 0.02 * w["w"].pow(2).sum()
    assert float(spec(w, s)) == pytest.approx(float(keras))
    spec, s = fr.from_sklearn(alpha=0.3, l1_ratio=0.7)
    assert isinstance(spec["elastic_net"], fr.ElasticNet) and s == {"elastic_net": 0.3}
    expect = 0.3 * (0.7 * w["w"].abs().sum() + 0.15 * w["w"].pow(2).sum())
    assert float(spec(w, s)) == pytest.approx(float(expect))


def test_params_are_detached_float_copies():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    p = fr.params(net)
    assert list(p) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert all(not v.requires_grad for v in p.values())
    p["0.weight"].add_(1.0)
    assert not torch.equal(p["0.weight"], net[0].weight)
    assert set(fr.buffers(net)) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_prox_writes_only_the_selected_parameters():
    net = nn.Linear(4, 3)
    bias = net.bias.detach().clone()
    version = net.bias._version
    fr.prox_(net, fr.Spec(l1=fr.L1("weight")), {"l1": 0.1}, lr=1.0)
    assert net.bias._version == version and torch.equal(net.bias.detach(), bias)
