"""Spec and penalized(): composition with torch.func and torch.compile, selection, describe."""

import copy
import pickle
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jacrev, vmap

import funcreg as fr
from funcreg.spec import _LIVE

DT = torch.float64


class Net(nn.Module):
    def __init__(self, n_feature=3, n_hidden=5, n_output=1):
        super().__init__()
        self.hidden = nn.Linear(n_feature, n_hidden)
        self.predict = nn.Linear(n_hidden, n_output)

    def forward(self, x):
        return self.predict(torch.relu(self.hidden(x)))


@pytest.fixture
def setup():
    net = Net().double()
    x = torch.randn(16, 3, dtype=DT)
    y = torch.randn(16, 1, dtype=DT)

    def loss(p, x, y):
        return ((functional_call(net, p, (x,), strict=True) - y) ** 2).mean()

    spec = fr.Spec(l1=fr.L1("hidden.weight"), l2=fr.L2(), gl=fr.GroupLasso("hidden.weight"))
    return net, fr.params(net), loss, spec, x, y


def manual_objective(net, p, s, x, y):
    out = ((functional_call(net, p, (x,)) - y) ** 2).mean()
    w1, w2 = p["hidden.weight"], p["predict.weight"]
    out = out + s["l1"] * w1.abs().sum()
    out = out + s["l2"] * 0.5 * (w1.pow(2).sum() + w2.pow(2).sum())
    out = out + s["gl"] * (w1.shape[0] ** 0.5) * torch.linalg.vector_norm(w1, dim=0).sum()
    return out


def test_penalized_equals_formula_and_grad_matches_autograd(setup):
    net, p, loss, spec, x, y = setup
    s = {"l1": 0.01, "l2": 0.1, "gl": 0.02}
    obj = fr.penalized(loss, spec)
    assert float(obj(p, s, x, y)) == pytest.approx(
        float(manual_objective(net, p, s, x, y)), rel=1e-12
    )
    g = grad(obj)(p, s, x, y)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    manual_objective(net, leaves, s, x, y).backward()
    for k in p:
        torch.testing.assert_close(g[k], leaves[k].grad, rtol=1e-12, atol=1e-12)


def test_grad_and_value_with_parts(setup):
    net, p, loss, spec, x, y = setup
    s = {"l1": 0.01, "l2": 0.1, "gl": 0.0}
    obj = fr.penalized(loss, spec, return_parts=True)
    g, (total, parts) = grad_and_value(obj, has_aux=True)(p, s, x, y)
    assert set(parts) == {"loss", "l1", "l2", "gl"}
    assert float(total) == pytest.approx(float(sum(parts.values())))
    assert float(parts["gl"]) == 0.0
    assert float(parts["l1"]) == pytest.approx(0.01 * float(p["hidden.weight"].abs().sum()))


def test_vmap_over_stacked_params_and_strengths_equals_loop(setup):
    net, p, loss, spec, x, y = setup
    K = 6
    stacked = {
        k: v.expand(K, *v.shape).clone() + 0.01 * torch.randn(K, *v.shape, dtype=DT)
        for k, v in p.items()
    }
    s = {
        "l1": torch.logspace(-4, -1, K, dtype=DT),
        "l2": torch.full((K,), 1e-3, dtype=DT),
        "gl": torch.linspace(0, 0.1, K, dtype=DT),
    }
    obj = fr.penalized(loss, spec)
    gs = vmap(grad(obj), in_dims=(0, 0, None, None))(stacked, s, x, y)
    for k in range(K):
        pk = {n: v[k] for n, v in stacked.items()}
        sk = {n: v[k] for n, v in s.items()}
        gk = grad(obj)(pk, sk, x, y)
        for n in p:
            torch.testing.assert_close(gs[n][k], gk[n], rtol=1e-12, atol=1e-14)


def test_jacrev_with_respect_to_strengths(setup):
    net, p, loss, spec, x, y = setup
    obj = fr.penalized(loss, spec)
    s = {
        "l1": torch.tensor(0.01, dtype=DT),
        "l2": torch.tensor(0.1, dtype=DT),
        "gl": torch.tensor(0.0, dtype=DT),
    }
    d = jacrev(lambda s: obj(p, s, x, y))(s)
    # the objective is linear in every strength: d/ds_k = Ω_k(params)
    assert float(d["l1"]) == pytest.approx(float(fr.L1().value(p["hidden.weight"])))
    assert float(d["l2"]) == pytest.approx(
        float(fr.L2().value(p["hidden.weight"]) + fr.L2().value(p["predict.weight"]))
    )

    # and a hypergradient through one gradient step matches finite differences
    def after_step(s):
        g = grad(obj)(p, s, x, y)
        q = {k: p[k] - 0.1 * g[k] for k in p}
        return loss(q, x, y)

    h = jacrev(after_step)(s)["l2"]
    eps = 1e-6
    up = {**s, "l2": s["l2"] + eps}
    dn = {**s, "l2": s["l2"] - eps}
    assert float(h) == pytest.approx(float((after_step(up) - after_step(dn)) / (2 * eps)), rel=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph(setup):
    """Also for a copied spec: copies are rebuilt through ``__init__``, which registers them
    for the selection the tracer takes as a constant (a plain copy was unknown to it)."""
    net, p, loss, spec, x, y = setup
    obj = fr.penalized(loss, copy.deepcopy(spec))
    K = 4
    stacked = {k: v.expand(K, *v.shape).clone() for k, v in p.items()}
    s = {
        "l1": torch.logspace(-3, -1, K, dtype=DT),
        "l2": torch.full((K,), 1e-3, dtype=DT),
        "gl": torch.full((K,), 1e-2, dtype=DT),
    }
    f = vmap(grad(obj), in_dims=(0, 0, None, None))
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(stacked, s, x, y)
    want = f(stacked, s, x, y)
    for n in p:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


def test_copies_and_pickles_are_equal_registered_specs(setup):
    net, p, loss, spec, x, y = setup
    for twin in (copy.copy(spec), copy.deepcopy(spec), pickle.loads(pickle.dumps(spec))):
        assert type(twin) is fr.Spec and twin is not spec and repr(twin) == repr(spec)
        assert _LIVE[id(twin)] is twin
        assert twin.selection(p) == spec.selection(p)


def test_live_specs_hold_no_spec_alive():
    """A spec is registered when built and leaves the table when garbage-collected."""
    import gc

    spec = fr.Spec(l1=fr.L1())
    key = id(spec)
    assert key in _LIVE and _LIVE[key] is spec
    del spec
    gc.collect()
    assert key not in _LIVE


def test_selection_is_cached_and_skips_non_float(setup):
    net, p, loss, spec, x, y = setup
    p2 = {**p, "step": torch.tensor(3)}
    sel = spec.selection(p2)
    assert sel == {
        "l1": ("hidden.weight",),
        "l2": ("hidden.weight", "predict.weight"),
        "gl": ("hidden.weight",),
    }
    assert spec.selection(p2) is sel
    assert fr.Spec(a=fr.L2(fr.everything())).selection(p2)["a"] == tuple(p)


def test_smooth_nonsmooth_split_and_prox(setup):
    net, p, loss, spec, x, y = setup
    assert list(spec.smooth()) == ["l2"]
    assert list(spec.nonsmooth()) == ["l1", "gl"]
    s = {"l1": 0.5, "l2": 0.0, "gl": 0.0}
    out = spec.nonsmooth().prox(p, s, lr=1.0)
    w = p["hidden.weight"]
    torch.testing.assert_close(out["hidden.weight"], torch.sign(w) * (w.abs() - 0.5).clamp(min=0))
    assert out["predict.weight"] is p["predict.weight"]


def test_describe_lists_every_parameter(setup):
    net, p, loss, spec, x, y = setup
    text = spec.describe(p)
    lines = text.splitlines()
    assert lines[0].split() == ["parameter", "shape", "terms"]
    row = next(line for line in lines if line.startswith("hidden.weight"))
    assert "l1: L1" in row and "l2: L2" in row and "gl: GroupLasso" in row
    assert re.search(r"hidden\.bias\s+\(5,\)\s+-", text)


def test_plain_dict_spec_and_extra_strengths(setup):
    net, p, loss, spec, x, y = setup
    obj = fr.penalized(loss, {"l2": fr.L2()})
    v = obj(p, {"l2": 0.1, "lr": 0.3}, x, y)
    assert float(v) == pytest.approx(
        float(loss(p, x, y) + 0.1 * fr.Spec(l2=fr.L2())(p, {"l2": 1.0}))
    )


def test_selectors():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    p = dict(net.named_parameters())
    assert fr.weights().select(p) == ["0.weight", "2.weight"]
    assert fr.biases().select(p) == ["0.bias", "1.weight", "1.bias", "2.bias"]
    assert fr.by_name("0.*").select(p) == ["0.weight", "0.bias"]
    assert fr.by_name(re.compile(r"\d\.bias")).select(p) == ["0.bias", "1.bias", "2.bias"]
    assert fr.by_name(["0.weight", "2.*"]).select(p) == ["0.weight", "2.weight", "2.bias"]
    assert fr.by_ndim(1).select(p) == ["0.bias", "1.weight", "1.bias", "2.bias"]
    assert fr.by_module(net, nn.Linear).select(p) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert fr.norm_layers(net).select(p) == ["1.weight", "1.bias"]
    both = fr.by_module(net, nn.Linear) & ~fr.biases()
    assert both.select(p) == ["0.weight", "2.weight"]
    either = fr.by_name("0.weight") | "2.bias"
    assert either.select(p) == ["0.weight", "2.bias"]
    assert repr(both) == "(by_module(Linear) & ~biases())"
    assert fr.L1("0.*").selector == fr.by_name("0.*")


def test_strength_term():
    spec = fr.Spec(l1=fr.L1(), l2=fr.L2(), box=fr.Box(lo=-1, hi=1))
    assert spec.strength_term("l2", "path") == "l2"
    assert fr.Spec(l1=fr.L1(), box=fr.Box(lo=-1, hi=1)).strength_term(None, "path") == "l1"
    with pytest.raises(ValueError, match=r"path: the spec has 2 terms with a strength .*term="):
        spec.strength_term(None, "path")
    with pytest.raises(ValueError, match=r"cross_validate: term 'box' is not a spec term with a"):
        spec.strength_term("box", "cross_validate")


def test_split_specs_know_their_family_through_copies():
    spec = fr.Spec(l1=fr.L1(), l2=fr.L2())
    part = spec.smooth()
    for twin in (part, copy.deepcopy(part), pickle.loads(pickle.dumps(part))):
        assert list(twin) == ["l2"] and twin.known_terms == ("l1", "l2")


def test_numpy_scalar_strengths_under_vmap():
    """A numpy scalar strength (as numbers from numpy code come) works in the pure penalty
    under vmap and grad, with the params' dtype (0.5 and 0.25 are exact in float32)."""
    import numpy as np

    spec = fr.Spec(l1=fr.L1(), l2=fr.L2())
    p = {"w": torch.randn(4, 3, 2, dtype=torch.float64)}
    s_np = {"l1": np.float32(0.5), "l2": np.float64(0.25)}
    s_py = {"l1": 0.5, "l2": 0.25}
    for f in (spec, grad(spec)):
        got, want = vmap(f, in_dims=(0, None))(p, s_np), vmap(f, in_dims=(0, None))(p, s_py)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
