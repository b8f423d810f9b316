"""fr.regularize / fr.spec_of: terms declared in the model, one Spec with dotted names."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import funcreg as fr
from funcreg.declare import declared, unregularize


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = fr.regularize(nn.Linear(4, 3), l1=fr.L1(), l2=fr.L2())
        self.block = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
        fr.regularize(self.block, l2=fr.L2())
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(torch.relu(self.hidden(x))))


def _selected(spec: fr.Spec, model: nn.Module) -> dict[str, tuple[str, ...]]:
    return spec.selection(dict(model.named_parameters()))


def test_spec_of_collects_dotted_names():
    net = Net()
    spec = fr.spec_of(net)
    assert list(spec) == ["l1", "l2"]
    assert _selected(spec, net) == {
        "l1": ("hidden.weight",),
        "l2": ("hidden.weight", "block.0.weight"),
    }
    assert isinstance(spec["l1"], fr.L1) and isinstance(spec["l2"], fr.L2)


def test_shared_module_counted_once():
    shared = fr.regularize(nn.Linear(3, 3), l1=fr.L1())
    net = nn.Sequential(shared, nn.ReLU(), shared)
    assert _selected(fr.spec_of(net), net) == {"l1": ("0.weight",)}


def test_declarations_survive_copies_and_state_dicts(tmp_path):
    net = Net()
    for other in (copy.deepcopy(net), _roundtrip(net)):
        assert _selected(fr.spec_of(other), other) == _selected(fr.spec_of(net), net)
    # a state dict holds tensors only: weights_only=True loads it into a fresh Net
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    fresh = Net()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert set(net.state_dict()) == set(fresh.state_dict())
    assert _selected(fr.spec_of(fresh), fresh) == _selected(fr.spec_of(net), net)


def _roundtrip(net: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_forward_unchanged():
    torch.manual_seed(0)
    plain = nn.Linear(4, 3)
    declared_ = copy.deepcopy(plain)
    fr.regularize(declared_, l1=fr.L1())
    x = torch.randn(5, 4)
    assert torch.equal(plain(x), declared_(x))
    assert set(plain.state_dict()) == set(declared_.state_dict())
    assert not declared_._forward_hooks and not declared_._forward_pre_hooks


def test_declared_spec_drives_penalty():
    net = Net()
    spec = fr.spec_of(net)
    strengths = {"l1": 0.1, "l2": 0.2}
    w, v = net.hidden.weight, net.block[0].weight
    expected = 0.1 * w.abs().sum() + 0.2 * 0.5 * (w.square().sum() + v.square().sum())
    torch.testing.assert_close(fr.penalty(net, spec, strengths), expected)


def test_dict_toward_is_rekeyed_to_dotted_names():
    layer = nn.Linear(2, 2)
    ref = torch.ones(2, 2)
    fr.regularize(layer, sp=fr.L2(toward={"weight": ref}))
    net = nn.Sequential(nn.Identity(), layer)
    spec = fr.spec_of(net)
    torch.testing.assert_close(spec["sp"].reference("1.weight"), ref)


def test_unregularize_and_declared():
    layer = fr.regularize(nn.Linear(2, 2), l1=fr.L1(), l2=fr.L2())
    unregularize(layer, "l1")
    assert list(declared(layer)) == ["l2"]
    with pytest.raises(ValueError, match=r"term 'l1' is not declared"):
        unregularize(layer, "l1")


def test_errors_name_module_parameter_and_fix():
    with pytest.raises(TypeError, match=r"first argument must be an nn.Module"):
        fr.regularize(torch.zeros(2), l1=fr.L1())  # type: ignore[type-var]
    with pytest.raises(ValueError, match=r"reserved"):
        fr.regularize(nn.Linear(2, 2), loss=fr.L1())
    net = Net()
    net.hidden.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'hidden.weight', which is frozen"):
        fr.spec_of(net)
    net = Net()
    del net.hidden.weight  # a declared parameter deleted
    net.hidden.weight = torch.zeros(3, 4)  # now a plain tensor attribute
    with pytest.raises(
        ValueError, match=r"term 'l1' \(L1\) declared on module 'hidden' selects none"
    ):
        fr.spec_of(net)
    a = fr.regularize(nn.Linear(2, 2), g=fr.GroupLasso(dim=0))
    b = fr.regularize(nn.Linear(2, 2), g=fr.GroupLasso(dim=1))
    with pytest.raises(ValueError, match=r"term 'g' is declared as .* different term names"):
        fr.spec_of(nn.Sequential(a, b))


def test_declared_module_in_a_plain_list_is_named():
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [fr.regularize(nn.Linear(3, 3), l1=fr.L1())]  # not registered
            self.out = nn.Linear(3, 1)

    with pytest.raises(
        ValueError, match=r"held in the plain list 'layers' \(item 0\).*hold it in an nn.ModuleList"
    ):
        fr.spec_of(Hidden())
    net = nn.Sequential(nn.Linear(2, 2))
    net[0].extra = {"head": fr.regularize(nn.Linear(2, 2), l2=fr.L2())}
    with pytest.raises(ValueError, match=r"plain dict '0.extra' \(item 'head'\).*nn.ModuleDict"):
        fr.spec_of(net)
    with pytest.raises(ValueError, match=r"plain dict '0.extra'"):
        fr.attach(torch.optim.SGD(net.parameters(), lr=0.1), None, {"l2": 0.1}, model=net)


def test_strengths_for_undeclared_terms_are_named_everywhere():
    net = Net()
    spec = fr.spec_of(net)
    extra = {"l1": 0.1, "l2": 0.1, "l3": 0.1}
    for call in (
        lambda: fr.penalty(net, spec, extra),
        lambda: fr.prox_(net, spec, extra, lr=0.1),
        lambda: fr.attach(torch.optim.SGD(net.parameters(), lr=0.1), None, extra, model=net),
    ):
        with pytest.raises(ValueError, match=r"'l3', which names no term.*did you mean 'l2'"):
            call()
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def loss(params, x, y):
        return ((torch.func.functional_call(net, params, (x,)) - y) ** 2).mean()

    with pytest.raises(ValueError, match=r"grid axis 'l3' names no spec term"):
        fr.sweep(
            net, loss, spec, {k: [v, v] for k, v in extra.items()}, train=(x, y),
            optimizer=fr.optim.sgd(0.1), steps=1, progress=False,
        )  # fmt: skip
