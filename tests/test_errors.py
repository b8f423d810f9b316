"""Bad input raises a clear ValueError/TypeError naming the term, the parameter and the fix."""

import math

import pytest
import torch
from torch import nn

import funcreg as fr


@pytest.fixture
def net():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(3, 4)
            self.predict = nn.Linear(4, 1)

    return Net()


def test_selector_matching_nothing_names_term_and_closest(net):
    with pytest.raises(
        ValueError, match=r"term 'l1'.*by_name\('hiden\.weight'\).*Closest names: 'hidden\.weight'"
    ):
        fr.penalty(net, {"l1": fr.L1("hiden.weight")}, {"l1": 1.0})


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, torch.tensor([0.1, -0.2])])
def test_negative_or_nonfinite_strength(net, bad):
    with pytest.raises(ValueError, match=r"strength 'l1' must be finite and >= 0"):
        fr.penalty(net, fr.Spec(l1=fr.L1()), {"l1": bad})


def test_strength_wrong_type(net):
    with pytest.raises(TypeError, match=r"strength 'l1' must be a number"):
        fr.penalty(net, fr.Spec(l1=fr.L1()), {"l1": "big"})


def test_missing_strength(net):
    with pytest.raises(ValueError, match=r"missing strength for term 'l2'; strengths has 'l1'"):
        fr.penalty(net, fr.Spec(l1=fr.L1(), l2=fr.L2()), {"l1": 1.0})


def test_constraint_needs_no_strength(net):
    assert float(fr.penalty(net, fr.Spec(nn=fr.NonNegative()), {})) == 0.0


def test_toward_wrong_shape_and_names(net):
    with pytest.raises(ValueError, match=r"term 'sp'.*'hidden\.weight' has shape \(2,\).*\(4, 3\)"):
        fr.penalty(net, {"sp": fr.L2("hidden.weight", toward=torch.zeros(2))}, {"sp": 1.0})
    with pytest.raises(ValueError, match=r"term 'sp': toward= has no reference.*'predict\.weight'"):
        fr.penalty(net, {"sp": fr.L2(toward={"hidden.weight": torch.zeros(4, 3)})}, {"sp": 1.0})


def test_weight_wrong_shape_or_negative(net):
    with pytest.raises(
        ValueError, match=r"term 'a': weight= factor for parameter 'hidden\.weight'"
    ):
        fr.penalty(net, {"a": fr.L1("hidden.weight", weight=torch.ones(5))}, {"a": 1.0})
    with pytest.raises(ValueError, match=r"L1: weight= factors must be finite and >= 0"):
        fr.L1(weight=torch.tensor([-1.0]))


def test_group_penalty_on_too_few_dims(net):
    with pytest.raises(
        ValueError, match=r"term 'g': GroupLasso needs .* at least 2 dim.*'hidden\.bias'"
    ):
        fr.penalty(net, {"g": fr.GroupLasso("hidden.*")}, {"g": 1.0})
    with pytest.raises(ValueError, match=r"term 'n': Nuclear needs .*'hidden\.bias'"):
        fr.penalty(net, {"n": fr.Nuclear(fr.everything())}, {"n": 1.0})


def test_unknown_keyword_and_strength_keyword():
    with pytest.raises(
        TypeError, match=r"L1 got an unexpected keyword 'towards'; did you mean 'toward'"
    ):
        fr.L1(towards=torch.zeros(1))
    with pytest.raises(TypeError, match=r"L2 takes no strength"):
        fr.L2(strength=0.1)
    with pytest.raises(ValueError, match=r"l1_ratio must be in \[0, 1\]"):
        fr.ElasticNet(l1_ratio=1.5)
    with pytest.raises(ValueError, match=r"mode must be 'rows' or 'columns'"):
        fr.Orthogonal(mode="diag")


def test_bad_spec_entries():
    with pytest.raises(TypeError, match=r"term 'a' must be a penalty"):
        fr.Spec(a=0.1)
    with pytest.raises(ValueError, match=r"term name 'loss' is reserved"):
        fr.Spec(loss=fr.L1())
    with pytest.raises(TypeError, match=r"expected a selector"):
        fr.L1(3)


def test_prox_of_term_without_prox(net):
    with pytest.raises(ValueError, match=r"term 'o': Orthogonal has no proximal operator"):
        fr.prox_(net, {"o": fr.Orthogonal()}, {"o": 1.0}, lr=0.1)


def test_params_not_a_dict():
    with pytest.raises(TypeError, match=r"params must be a dict"):
        fr.penalty([torch.zeros(2)], fr.Spec(l1=fr.L1()), {"l1": 1.0})
    with pytest.raises(TypeError, match=r"params\['w'\] must be a tensor"):
        fr.penalty({"w": [1.0]}, fr.Spec(l1=fr.L1()), {"l1": 1.0})


def test_mcp_prox_step_checks_lr():
    with pytest.raises(ValueError, match=r"MCP prox needs lr < gamma"):
        fr.MCP(gamma=2.0).prox_step(torch.ones(2, 2), 3.0, 0.1)


def test_weight_factor_must_broadcast_to_the_parameter(net):
    with pytest.raises(
        ValueError, match=r"weight= factor for parameter 'hidden\.weight' has shape"
    ):
        fr.penalty(net, {"a": fr.L1("hidden.weight", weight=torch.ones(2, 4, 3))}, {"a": 1.0})
    with pytest.raises(ValueError, match=r"does not broadcast to \(1, 3\)"):
        fr.penalty(net, {"g": fr.GroupLasso("hidden.weight", weight=torch.ones(4, 1))}, {"g": 1.0})


def test_sweep_checks_mcp_step_for_every_grid_lr(net):
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def loss(p, x, y):
        h = torch.relu(x @ p["hidden.weight"].T + p["hidden.bias"])
        return ((h @ p["predict.weight"].T + p["predict.bias"] - y) ** 2).mean()

    grid = fr.grid(mcp=[0.1], lr=[0.5, 4.0])
    with pytest.raises(ValueError, match=r"sweep: term 'mcp': MCP prox needs lr < gamma.*lr=4\.0"):
        fr.sweep(net, loss, {"mcp": fr.MCP(gamma=3.0)}, grid, train=(x, y),
                 optimizer=fr.optim.sgd("lr"), steps=1, progress=False)  # fmt: skip
