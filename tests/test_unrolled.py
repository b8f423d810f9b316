"""Unrolled hypergradients through fr.train_step equal finite differences through the same
steps (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import funcreg as fr
from funcreg.unrolled import unrolled_hypergrad

D = torch.float64


def _setup(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    net = net.to(D)
    X = torch.randn(64, 4, dtype=D, generator=g)
    y = torch.sin(X[:, :1]) + 0.1 * torch.randn(64, 1, dtype=D, generator=g)
    Xv = torch.randn(32, 4, dtype=D, generator=g)
    yv = torch.sin(Xv[:, :1])

    def loss(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(net, p, (X,)) - y) ** 2).mean()

    # one L2 strength per layer, and an L1 on the first layer trained by prox steps
    spec = {
        "l2_0": fr.L2("0.weight"),
        "l2_2": fr.L2("2.weight"),
        "l2_4": fr.L2("4.weight"),
        "l1": fr.L1("0.weight"),
    }
    batches = [(X[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)] * 3  # 12 steps
    return net, loss, spec, batches, (Xv, yv)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("truncate", [None, 5])
def test_unrolled_equals_finite_differences_through_the_same_steps(opt: str, truncate) -> None:
    net, loss, spec, batches, val = _setup()
    optimizer = fr.optim.sgd(0.1) if opt == "sgd" else fr.optim.adam(0.01)
    step = fr.train_step(loss, spec, optimizer)
    p0 = fr.params(net)
    s = {"l2_0": 1e-2, "l2_2": 3e-2, "l2_4": 1e-3, "l1": 1e-3}
    value, g, trained = unrolled_hypergrad(
        step, p0, optimizer.init(p0), s, batches, loss, val, truncate=truncate
    )
    T = len(batches) if truncate is None else truncate
    with torch.no_grad():  # the same first N - T steps, held fixed
        p, o = p0, optimizer.init(p0)
        for b in batches[: len(batches) - T]:
            p, o, _ = step(p, o, s, *b)

    def E(term: str, t: float) -> float:
        st = dict(s)
        st[term] = s[term] * math.exp(t)
        q, oq = p, o
        for b in batches[len(batches) - T :]:
            q, oq, _ = step(q, oq, st, *b)
        return float(loss(q, *val))

    assert float(value) == pytest.approx(E("l1", 0.0), rel=1e-12)
    for term in s:
        h = 1e-4
        d1 = (E(term, h) - E(term, -h)) / (2 * h)
        d2 = (E(term, h / 2) - E(term, -h / 2)) / h
        fd = (4 * d2 - d1) / 3
        assert float(g[term]) == pytest.approx(fd, rel=1e-6, abs=1e-12), (term, g[term], fd)
    with torch.no_grad():  # the trained params are those of all N steps
        q, oq = p, o
        for b in batches[len(batches) - T :]:
            q, oq, _ = step(q, oq, s, *b)
    for n in q:
        torch.testing.assert_close(trained[n], q[n], rtol=1e-12, atol=1e-14)


def test_unrolled_bad_input_is_named() -> None:
    net, loss, spec, batches, val = _setup()
    optimizer = fr.optim.sgd(0.1)
    step = fr.train_step(loss, spec, optimizer)
    p0 = fr.params(net)
    s = {"l2_0": 1e-2, "l2_2": 3e-2, "l2_4": 1e-3, "l1": 1e-3}
    st = optimizer.init(p0)
    with pytest.raises(ValueError, match="strength 'l1' is 0.0; in log space"):
        unrolled_hypergrad(step, p0, st, {**s, "l1": 0.0}, batches, loss, val)
    with pytest.raises(ValueError, match="term 'l3' is not in strengths"):
        unrolled_hypergrad(step, p0, st, s, batches, loss, val, terms=["l3"])
    with pytest.raises(ValueError, match="truncate must be an integer in \\[1, 12\\]"):
        unrolled_hypergrad(step, p0, st, s, batches, loss, val, truncate=0)

    def blind(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y**2).mean()

    with pytest.raises(ValueError, match="outer_fn does not depend on the params"):
        unrolled_hypergrad(step, p0, st, s, batches, blind, val)
