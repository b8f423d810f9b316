"""Keras parity: UnitNorm, MinMaxNorm (Keras's formulas), and the layer-argument converter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import funcreg as fr
from funcreg import MinMaxNorm, UnitNorm, activity
from funcreg.keras import from_layer

EPS = 1e-7  # Keras's backend.epsilon()


def _keras_min_max(w, lo, hi, rate):  # Keras on the (in, out) kernel, axis=0
    k = w.T
    norms = k.square().sum(0, keepdim=True).sqrt()
    desired = rate * norms.clamp(lo, hi) + (1 - rate) * norms
    return (k * (desired / (EPS + norms))).T


def test_unit_and_min_max_norm_match_keras_up_to_its_epsilon():
    w = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keras_unit = (w.T / (EPS + w.T.square().sum(0, keepdim=True).sqrt())).T
    torch.testing.assert_close(UnitNorm().prox(w, 0.1), keras_unit, rtol=1e-6, atol=0)
    for lo, hi, rate in [(0.0, 1.0, 1.0), (1.5, 3.0, 0.5), (0.5, 0.7, 1.0)]:
        got = MinMaxNorm(min_value=lo, max_value=hi, rate=rate).prox(w, 0.1)
        torch.testing.assert_close(got, _keras_min_max(w, lo, hi, rate), rtol=1e-6, atol=0)
    zero = torch.zeros(2, 3)
    assert torch.equal(UnitNorm().prox(zero, 1.0), zero)  # no NaN at a zero group


def test_from_layer_declares_terms_with_keras_strengths():
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    strengths = from_layer(
        net[0],
        "hidden",
        kernel_regularizer={"class_name": "L1L2", "config": {"l1": 0.01, "l2": 0.02}},
        bias_regularizer={"l2": 0.5},
        activity_regularizer={"class_name": "L1", "config": {"l1": 0.1}},
        kernel_constraint={"class_name": "MaxNorm", "config": {"max_value": 2, "axis": 0}},
    )
    assert strengths == {"hidden_kernel_l1": 0.01, "hidden_kernel_l2": 0.04, "hidden_bias_l2": 1.0}
    spec = fr.spec_of(net)
    w, b = net[0].weight, net[0].bias
    keras = 0.01 * w.abs().sum() + 0.02 * w.square().sum() + 0.5 * b.square().sum()
    torch.testing.assert_close(fr.penalty(net, spec, strengths), keras)
    assert isinstance(spec["hidden_kernel_constraint"], fr.MaxNorm)
    x = torch.randn(5, 3)
    with activity.collect(net) as acts:
        net(x)
    torch.testing.assert_close(acts.penalty(), 0.1 * net[0](x).abs().sum())


def test_from_layer_bad_input():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"kernel_regularizer: unsupported regularizer"):
        from_layer(layer, "h", kernel_regularizer={"class_name": "Foo", "config": {}})
    with pytest.raises(ValueError, match=r"axis=1 is not the per-output-unit norm"):
        from_layer(layer, "h", kernel_constraint={"class_name": "MaxNorm", "config": {"axis": 1}})
    with pytest.raises(TypeError, match=r"bias_regularizer must be a dict"):
        from_layer(layer, "h", bias_regularizer=0.1)
    with pytest.raises(ValueError, match=r"MinMaxNorm: rate"):
        MinMaxNorm(rate=2.0)


def test_unit_and_min_max_norm_live_with_the_other_constraints():
    import funcreg.keras
    import funcreg.penalties

    assert fr.UnitNorm is funcreg.penalties.UnitNorm is funcreg.keras.UnitNorm  # old name kept
    assert fr.MinMaxNorm is funcreg.penalties.MinMaxNorm is funcreg.keras.MinMaxNorm
    for con in (fr.UnitNorm(), fr.MinMaxNorm(min_value=0.5, max_value=2.0)):
        assert isinstance(con, fr.Constraint) and con.is_constraint
        assert "UnitNorm" in fr.__all__ and "MinMaxNorm" in fr.__all__


@pytest.mark.parametrize(
    "con",
    [fr.UnitNorm(), fr.UnitNorm(dim=0), fr.MinMaxNorm(min_value=0.5, max_value=0.8)],
    ids=["unit", "unit-dim0", "minmax"],
)
def test_norm_constraints_project(con):
    """rate=1 is a projection: the result is in the set, and projecting again changes
    nothing; an empty tensor stays empty; vmap equals a loop."""
    w = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = con.prox(w, 0.1)
    dims = (1,) if con.dim is None else (0,)
    norms = torch.linalg.vector_norm(y, dim=dims)
    lo, hi = (1.0, 1.0) if isinstance(con, fr.UnitNorm) else (con.min_value, con.max_value)
    assert bool((norms >= lo - 1e-12).all() and (norms <= hi + 1e-12).all())
    torch.testing.assert_close(con.prox(y, 0.1), y, rtol=1e-12, atol=1e-12)
    assert con.prox(torch.zeros(0, 3), 1.0).shape == (0, 3)
    ws = torch.randn(3, 4, 6, dtype=torch.float64)
    batched = torch.vmap(lambda v: con.prox(v, 0.1))(ws)
    for k in range(3):
        torch.testing.assert_close(batched[k], con.prox(ws[k], 0.1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=rf"{type(con).__name__}: dim=3 is out of range"):
        type(con)(dim=3).prox(w, 0.1)


def test_norm_constraint_declared_and_attached_projects_each_step():
    net = nn.Sequential(fr.regularize(nn.Linear(3, 4), unit=fr.UnitNorm()), nn.Linear(4, 1))
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    fr.attach(sgd, None, {}, model=net)
    sgd.zero_grad()
    net(torch.randn(8, 3)).pow(2).mean().backward()
    sgd.step()
    norms = torch.linalg.vector_norm(net[0].weight.detach(), dim=1)
    torch.testing.assert_close(norms, torch.ones(4))
