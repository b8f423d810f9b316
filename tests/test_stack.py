"""fr.grid, fr.stack / unstack, stack_modules, load_."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from funcreg.stack import (
    build_grid,
    check_stacked,
    grid,
    grid_size,
    load_,
    stack,
    stack_modules,
    unstack,
)


def test_grid_product_order_and_broadcast() -> None:
    g = grid(l1=[1.0, 2.0, 3.0], lr=np.array([0.1, 0.2]), l2=1e-4)
    assert list(g) == ["l1", "lr", "l2"]
    assert all(v.shape == (6,) and v.dtype == torch.get_default_dtype() for v in g.values())
    expected = list(itertools.product([1.0, 2.0, 3.0], [0.1, 0.2]))
    got = torch.stack([g["l1"], g["lr"]], 1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype))
    assert torch.all(g["l2"] == torch.tensor(1e-4))


def test_grid_zipped_and_dtype() -> None:
    lam = torch.logspace(-5, -1, 7, dtype=torch.float64)
    g = grid(l1=lam, l2=2 * lam, lr=1e-3, product=False, dtype=torch.float64)
    assert grid_size(g) == 7
    assert torch.equal(g["l1"], lam) and torch.equal(g["l2"], 2 * lam)
    assert g["lr"].dtype == torch.float64 and torch.all(g["lr"] == 1e-3)
    assert grid(a=3, product=False)["a"].shape == (1,)
    assert grid(a=torch.tensor(2), b=[1, 2])["a"].tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    ("axes", "kwargs", "err", "match"),
    [
        ({"l1": [1e-3, -1.0]}, {}, ValueError, r"'l1' must be finite and >= 0.*-1\.0"),
        ({"l1": [1e-3, float("nan")]}, {}, ValueError, r"'l1' must be finite"),
        ({"lr": float("inf")}, {}, ValueError, r"'lr' must be finite"),
        ({"l1": []}, {}, ValueError, r"'l1' is empty"),
        ({"l1": [[1.0, 2.0]]}, {}, ValueError, r"scalar or 1-d"),
        ({"l1": "big"}, {}, TypeError, r"must be a number"),
        ({"l1": [True, False]}, {}, TypeError, r"real numbers"),
        ({"l1": [True, 0.5]}, {}, TypeError, r"not booleans"),
        ({"l1": [1, 2], "lr": [1, 2, 3]}, {"product": False}, ValueError, r"l1: 2, lr: 3"),
        ({}, {}, ValueError, r"at least one axis"),
        ({"l1": [1.0]}, {"dtype": torch.int64}, TypeError, r"floating dtype"),
    ],
)
def test_grid_errors(axes: dict, kwargs: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        build_grid(axes, **kwargs)


def test_grid_size_errors() -> None:
    with pytest.raises(ValueError, match=r"different lengths \(a: 2, b: 3\)"):
        grid_size({"a": torch.ones(2), "b": torch.ones(3)})
    with pytest.raises(TypeError, match="1-d tensor"):
        grid_size({"a": [1.0, 2.0]})


def test_stack_copies_and_detaches() -> None:
    w = torch.randn(3, 2, requires_grad=True)
    stacked = stack({"w": w, "b": torch.zeros(3)}, grid(l1=[1.0, 2.0, 3.0, 4.0]))
    assert stacked["w"].shape == (4, 3, 2) and stacked["b"].shape == (4, 3)
    assert not stacked["w"].requires_grad
    stacked["w"][0].add_(1.0)  # in place on one model: the others keep the init
    assert torch.equal(stacked["w"][1], w.detach()) and torch.equal(stacked["w"][0], w.detach() + 1)
    net = nn.Linear(2, 3)
    assert set(stack(net, 2)) == {"weight", "bias"}
    with pytest.raises(ValueError, match="K must be >= 1"):
        stack({"w": w}, 0)


def test_unstack_and_check_stacked() -> None:
    stacked = {"w": torch.arange(12.0).reshape(4, 3), "b": torch.arange(4.0)}
    one = unstack(stacked, -1)
    assert torch.equal(one["w"], torch.tensor([9.0, 10.0, 11.0])) and one["b"].item() == 3.0
    one["w"].zero_()
    assert stacked["w"][3, 0] == 9.0  # a copy
    with pytest.raises(IndexError, match="index 4 is out of range for K=4"):
        unstack(stacked, 4)
    with pytest.raises(TypeError, match="must be an int, got a bool"):
        unstack(stacked, True)
    with pytest.raises(ValueError, match="stacked params are empty"):
        unstack({}, 0)
    with pytest.raises(ValueError, match=r"init\['w'\] has leading size 4, but the grid has K=3"):
        check_stacked(stacked, 3, "init")


def test_stack_modules_different_inits() -> None:
    torch.manual_seed(0)
    ms = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    params, bufs = stack_modules(ms)
    assert params["0.weight"].shape == (3, 4, 3) and not params["0.weight"].requires_grad
    assert torch.equal(params["0.weight"][2], ms[2][0].weight.detach())
    assert not torch.equal(params["0.weight"][0], params["0.weight"][1])
    assert bufs["1.running_var"].shape == (3, 4) and bufs["1.num_batches_tracked"].shape == (3,)
    with pytest.raises(ValueError, match=r"'0.weight' of model 1 is \(4, 2\)"):
        stack_modules([nn.Sequential(nn.Linear(3, 4)), nn.Sequential(nn.Linear(2, 4))])
    with pytest.raises(ValueError, match="share one architecture"):
        stack_modules([nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4))])


def test_load_roundtrip_and_strict_errors() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    new = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    new["1.running_mean"] = torch.full((4,), 5.0)
    assert load_(net, new) is net
    assert torch.equal(net[0].weight.detach(), new["0.weight"])
    assert torch.equal(net[1].running_mean, new["1.running_mean"])
    with pytest.raises(ValueError, match=r"'0.wieght'.*not in the module.*'0.weight'"):
        load_(net, {**new, "0.wieght": torch.zeros(4, 3)})
    missing = dict(new)
    del missing["1.bias"]
    with pytest.raises(ValueError, match=r"no value for parameter\(s\) '1.bias'"):
        load_(net, missing)
    stacked = {**new, "0.weight": torch.zeros(2, 4, 3)}
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(2, 4, 3\).*looks stacked"):
        load_(net, stacked)
