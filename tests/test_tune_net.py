"""fr.tune's network route (training=fr.Training(...)): implicit hypergradients at a
stationary point equal central finite differences of the stationary-point map (float64),
tuning lowers the validation loss, and bad input is named."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import funcreg as fr
from funcreg._tune_net import _Implicit

D = torch.float64


def _setup(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(D)
    X = torch.randn(40, 3, dtype=D, generator=g)
    y = torch.sin(2 * X[:, :1]) + 0.3 * torch.randn(40, 1, dtype=D, generator=g)
    Xv = torch.randn(40, 3, dtype=D, generator=g)
    yv = torch.sin(2 * Xv[:, :1])

    def loss(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(net, p, (X,), strict=True) - y) ** 2).mean()

    spec = fr.Spec(a=fr.L2("0.weight"), b=fr.L2("2.weight"))
    return net, loss, spec, (X, y), (Xv, yv)


def test_implicit_hypergradient_equals_finite_differences_at_a_stationary_point() -> None:
    net, loss, spec, data, val = _setup()
    tr = fr.Training(fr.optim.adam(1e-2), steps=200, polish=3000, gtol=1e-12)
    inner = _Implicit(loss, spec, data, tr)
    s = {"a": torch.tensor(3e-2, dtype=D), "b": torch.tensor(1e-2, dtype=D)}
    w = inner.train(fr.params(net), s, 1.0, first=True)
    assert inner.grad_norm(w, s) < 1e-7  # a stationary point of the penalized loss
    value, g = inner.hypergrad(w, s, ("a", "b"), loss, val)
    assert value == pytest.approx(float(loss(w, *val)), rel=1e-12)

    def E(term: str, t: float) -> float:  # the stationary point near w at s_term · e^t
        st = dict(s)
        st[term] = s[term] * math.exp(t)
        return float(loss(inner.train(w, st, 1.0, first=False), *val))

    for term in ("a", "b"):
        h = 2e-2  # Richardson: the inner solves' residue limits smaller steps
        d1 = (E(term, h) - E(term, -h)) / (2 * h)
        d2 = (E(term, h / 2) - E(term, -h / 2)) / h
        fd = (4 * d2 - d1) / 3
        assert float(g[term]) == pytest.approx(fd, rel=1e-3, abs=1e-7), (term, g[term], fd)


@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_network_tune_lowers_the_validation_loss(mode: str) -> None:
    net, loss, spec, data, val = _setup()
    optimizer = fr.optim.adam(1e-2) if mode == "implicit" else fr.optim.sgd(0.1, momentum=0.9)
    tr = fr.Training(optimizer, steps=100, hypergrad=mode)
    r = fr.tune(
        loss,
        spec,
        fr.params(net),
        {"a": 1e-3, "b": 1e-3},
        data,
        validation=val,
        training=tr,
        optimizer=fr.optim.adam(0.3),
        steps=8,
    )
    values = r.history["value"]
    assert r.value == min(values) < values[0] - 1e-3
    best = r.best()
    assert best.value == r.value and best.strengths == r.strengths
    assert float(loss(r.params, *val)) == pytest.approx(r.value, rel=1e-10)
    assert set(r.history) >= {"step", "strengths", "value", "grad_norm", "stationarity"}
    if mode == "implicit":
        assert max(r.history["stationarity"]) < 1e-3


def test_network_tune_warns_when_training_is_not_stationary() -> None:
    net, loss, spec, data, val = _setup()
    tr = fr.Training(fr.optim.adam(1e-2), steps=5, polish=1)  # one L-BFGS iteration: not stationary
    with pytest.warns(RuntimeWarning, match="did not reach a stationary point"):
        fr.tune(
            loss, spec, fr.params(net), {"a": 1e-2, "b": 1e-2}, data, validation=val,
            training=tr, steps=2,
        )  # fmt: skip


def test_network_tune_bad_input_is_named() -> None:
    net, loss, spec, data, val = _setup()
    p0 = fr.params(net)
    s = {"a": 1e-2, "b": 1e-2}
    tr = fr.Training(fr.optim.adam(1e-2), steps=5)

    def run(**kw):  # type: ignore[no-untyped-def]
        args = {"validation": val, "training": tr, "steps": 2}
        args.update(kw)
        strengths = args.pop("strengths", s)
        sp = args.pop("spec", spec)
        return fr.tune(loss, sp, p0, strengths, data, **args)

    with pytest.raises(TypeError, match="training= must be a funcreg.Training"):
        run(training={"steps": 5})
    with pytest.raises(TypeError, match="Training.optimizer must be a funcreg.optim"):
        run(training=fr.Training("adam", steps=5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Training.steps must be an integer >= 1, got 0"):
        run(training=fr.Training(fr.optim.adam(1e-2), steps=0))
    with pytest.raises(ValueError, match="Training.hypergrad must be 'implicit' or 'unrolled'"):
        run(training=fr.Training(fr.optim.adam(1e-2), steps=5, hypergrad="fd"))
    with pytest.raises(ValueError, match="polish=0\\) would train only at the first"):
        run(training=fr.Training(fr.optim.adam(1e-2), steps=5, polish=0))
    with pytest.raises(ValueError, match="Training.damping must be a finite number >= 0"):
        run(training=fr.Training(fr.optim.adam(1e-2), steps=5, damping=-1.0))
    with pytest.raises(ValueError, match="Training.truncate must be None or an integer in"):
        run(training=fr.Training(fr.optim.adam(1e-2), steps=5, hypergrad="unrolled", truncate=6))
    with pytest.raises(ValueError, match="with training= give a validation split"):
        run(validation=None)
    with pytest.raises(ValueError, match="with training= give a validation split"):
        run(folds=5)
    with pytest.raises(ValueError, match="weights= is not supported with training="):
        run(weights=["a"])
    with pytest.raises(ValueError, match="starting strength of 'a' must be > 0 and finite"):
        run(strengths={"a": 0.0, "b": 1e-2})
    with pytest.raises(ValueError, match="several starting points are not supported"):
        run(strengths={"a": [1e-2, 1e-1], "b": 1e-2})
    with pytest.raises(ValueError, match="cannot tune 'c'"):
        run(terms=["c"])
    with pytest.raises(ValueError, match="no starting strength for term 'b'"):
        run(strengths={"a": 1e-2})
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        run(steps=0)
    with pytest.raises(ValueError, match="optimizer must be a funcreg.optim optimizer or"):
        run(optimizer="newton")
    l1 = fr.Spec(a=fr.L1("0.weight"), b=fr.L2("2.weight"))
    with pytest.raises(ValueError, match="'a' \\(L1\\) is not; use hypergrad='unrolled'"):
        run(spec=l1)
