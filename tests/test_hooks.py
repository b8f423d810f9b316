"""fr.attach: a spec on a stock torch.optim optimizer, equal to the functional step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso
from torch import nn

import funcreg as fr


def _data(n: int = 64, p: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, dtype=torch.float64, generator=g)
    w = torch.zeros(p, dtype=torch.float64)
    w[:3] = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
    return x, x @ w + 0.3 * torch.randn(n, dtype=torch.float64, generator=g)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    fr.regularize(net[0], l1=fr.L1(), l2=fr.L2())
    return net


def _functional_loss(net: nn.Module):
    def loss(params, x, y):
        out = torch.func.functional_call(net, params, (x,)).squeeze(-1)
        return ((out - y) ** 2).mean()

    return loss


def _stock_steps(net, optimizer, x, y, steps, scheduler=None):
    for t in range(steps):
        optimizer.zero_grad()
        ((net(x[8 * t % 64 :][:8]).squeeze(-1) - y[8 * t % 64 :][:8]) ** 2).mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_attach_sgd_equals_train_step_step_for_step():
    x, y = _data()
    net = _net()
    spec = fr.spec_of(net)
    strengths = {"l1": 0.5, "l2": 0.1}
    params = fr.params(net)
    opt = fr.optim.sgd(lr="lr", momentum=0.9)
    step = fr.train_step(_functional_loss(net), spec, opt, prox=True)
    state = opt.init(params)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=3, gamma=0.5)
    handle = fr.attach(sgd, spec, strengths, model=net)
    for t in range(12):
        lr = sgd.param_groups[0]["lr"]  # the scheduled lr: thresholds follow it
        xb, yb = x[8 * t % 64 :][:8], y[8 * t % 64 :][:8]
        params, state, _ = step(params, state, {**strengths, "lr": lr}, xb, yb)
        _stock_steps(net, sgd, xb, yb, 1)
        scheduler.step()
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), params[n], rtol=1e-12, atol=1e-12)
    assert handle.step == 12
    assert handle.zeros()["0.weight"] > 0  # exact zeros in the declared layer


def test_remove_restores_stock_behaviour():
    x, y = _data()
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = fr.attach(sgd, None, {"l1": 0.05, "l2": 0.1}, model=net)
    _stock_steps(net, sgd, x, y, 2)
    handle.remove()
    stock = copy.deepcopy(net)
    stock_sgd = torch.optim.SGD(stock.parameters(), lr=0.1)
    _stock_steps(net, sgd, x, y, 3)
    _stock_steps(stock, stock_sgd, x, y, 3)
    for a, b in zip(net.parameters(), stock.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["adam", "adamw"])
def test_attach_adam_reaches_sklearn_lasso(cls):
    x, y = _data(80, 10)
    strength = 0.1
    model = nn.Linear(10, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    optimizer = cls(model.parameters(), lr=0.05, weight_decay=0.0)
    steps = 1500
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=1e-4 ** (1 / steps))
    fr.attach(optimizer, fr.Spec(l1=fr.L1("weight")), {"l1": strength}, model=model)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * ((model(x).squeeze(-1) - y) ** 2).mean()).backward()
        optimizer.step()
        scheduler.step()
    ref = Lasso(alpha=strength, fit_intercept=False, tol=1e-12, max_iter=100_000)
    coef = ref.fit(x.numpy(), y.numpy()).coef_
    w = model.weight.detach().reshape(-1).numpy()
    np.testing.assert_array_equal(w != 0, coef != 0)
    np.testing.assert_allclose(w, coef, atol=1e-3, rtol=0)


def test_schedule_penalty_and_zeros_for_logging():
    x, y = _data()
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []

    def schedule(step: int) -> dict[str, float]:
        seen.append(step)
        return {"l1": 0.01 * step, "l2": 0.0}

    handle = fr.attach(sgd, None, schedule, model=net)
    _stock_steps(net, sgd, x, y, 3)
    assert seen[-3:] == [0, 1, 2] and handle.strengths == {"l1": 0.02, "l2": 0.0}
    values = handle.penalty()
    w = net[0].weight.detach()
    torch.testing.assert_close(values["l1"], 0.02 * w.abs().sum())
    torch.testing.assert_close(values["penalty"], values["l1"] + values["l2"])
    assert handle.zeros() == {"0.weight": int((w == 0).sum())}
    assert 0 <= handle.zero_fraction() <= 1


def test_attach_errors_name_the_fix():
    net = _net()
    other = nn.Linear(2, 2)
    strengths = {"l1": 0.1, "l2": 0.1}
    with pytest.raises(ValueError, match=r"none of the optimizer's parameters is a parameter"):
        fr.attach(torch.optim.SGD(other.parameters(), lr=0.1), None, strengths, model=net)
    with pytest.raises(ValueError, match=r"selects '0.weight', which the optimizer does not"):
        fr.attach(torch.optim.SGD(net[2].parameters(), lr=0.1), None, strengths, model=net)
    with pytest.raises(ValueError, match=r"'l3', which names no term.*did you mean 'l2'"):
        fr.attach(
            torch.optim.SGD(net.parameters(), lr=0.1), None, {**strengths, "l3": 1.0}, model=net
        )
    with pytest.raises(ValueError, match=r"missing strength for term 'l2'"):
        fr.attach(torch.optim.SGD(net.parameters(), lr=0.1), None, {"l1": 0.1}, model=net)
    with pytest.raises(ValueError, match=r"capturable=True.*use capturable=False"):
        fr.attach(torch.optim.Adam(net.parameters(), capturable=True), None, strengths, model=net)
    with pytest.raises(ValueError, match=r"'m' \(MCP\).*metric='decoupled'"):
        fr.attach(torch.optim.Adam(net.parameters()), {"m": fr.MCP()}, {"m": 0.1}, model=net)
    with pytest.raises(TypeError, match=r"torch.optim.Optimizer.*fr.train_step"):
        fr.attach(fr.optim.sgd(lr=0.1), None, strengths, model=net)  # type: ignore[arg-type]


def test_frozen_or_deleted_after_attach_is_named():
    x, y = _data()
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = fr.attach(sgd, None, {"l1": 0.1, "l2": 0.1}, model=net)
    net[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0.weight', which was frozen.*handle.remove\(\)"):
        _stock_steps(net, sgd, x, y, 1)
    handle.remove()
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    fr.attach(sgd, None, {"l1": 0.1, "l2": 0.1}, model=net)
    net[0].weight = nn.Parameter(net[0].weight.detach().clone())
    with pytest.raises(ValueError, match=r"parameter '0.weight', which is no longer a parameter"):
        _stock_steps(net, sgd, x, y, 1)


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((net(x).squeeze(-1) - y) ** 2).mean()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, **kw: torch.optim.Adam(ps, lr=0.05, **kw),
        lambda ps, **kw: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01, **kw),
        lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9, **kw),
    ],
    ids=["adam", "adamw", "sgd"],
)
@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_foreach_and_fused_steps_run_the_hooks_and_equal_the_default(make, flag):
    """foreach/fused change how step() computes the update, not that it runs: the step hooks
    fire, the state (Adam's exp_avg_sq, step) has the same keys, so the prox, in the same
    metric, gives the for-loop implementation's result (to rounding: other op order)."""
    x, y = _data()
    nets = [_net(), _net()]
    handles = []
    for net, kw in zip(nets, ({"foreach": False}, {flag: True}), strict=True):
        optimizer = make(net.parameters(), **kw)
        handles.append(fr.attach(optimizer, None, {"l1": 0.3, "l2": 0.1}, model=net))
        for t in range(10):
            xb, yb = x[8 * t % 64 :][:8], y[8 * t % 64 :][:8]
            optimizer.zero_grad()
            _loss(net, xb, yb).backward()
            optimizer.step()
    assert handles[0].step == handles[1].step == 10
    assert handles[1].zeros()["0.weight"] > 0
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(a == 0, b == 0)


def test_grad_scaler_with_fused_adam_scales_the_smooth_gradient_and_skips_with_the_step():
    """A GradScaler hands a fused optimizer still-scaled gradients (its kernel unscales them)
    and a ``found_inf`` flag (its kernel skips the update): the attached smooth gradient is
    scaled alike, and the prox is skipped when the step is."""
    x, y = _data()
    nets = [_net().float(), _net().float()]
    scale = 2.0**10  # a power of two: scaling and unscaling are exact
    handles, optimizers, scalers = [], [], []
    for net, fused in zip(nets, (False, True), strict=True):
        optimizer = torch.optim.Adam(net.parameters(), lr=0.05, fused=fused)
        handles.append(fr.attach(optimizer, None, {"l1": 0.3, "l2": 0.5}, model=net))
        optimizers.append(optimizer)
        scalers.append(torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6))

    def step(i: int, factor: float = 1.0) -> None:
        optimizers[i].zero_grad()
        scalers[i].scale(factor * _loss(nets[i], x.float(), y.float())).backward()
        scalers[i].step(optimizers[i])
        scalers[i].update()

    for _ in range(8):
        for i in (0, 1):
            step(i)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in nets[1].parameters()]
    step(1, float("inf"))  # an overflow: the fused kernel skips the update, the prox too
    assert handles[1].step == 8
    for a, b in zip(before, nets[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_spec_of_a_submodule_or_another_model_is_named():
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"by_name\('weight'\) matches no.*fr.spec_of\(model\)"):
        fr.attach(sgd, fr.spec_of(net[0]), {"l1": 0.1, "l2": 0.1}, model=net)


@pytest.mark.parametrize(
    "cls", [torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam, torch.optim.Rprop]
)
def test_other_optimizers_need_an_explicit_prox_metric(cls):
    """metric='auto' knows SGD's and Adam/AdamW's metric only: another optimizer with a prox
    term is refused, naming metric='decoupled'; a constraint (a projection) needs no metric."""
    net = _net()
    with pytest.raises(ValueError, match=rf"not of {cls.__name__}.*metric='decoupled'"):
        fr.attach(cls(net.parameters(), lr=0.01), None, {"l1": 0.1, "l2": 0.1}, model=net)
    handle = fr.attach(
        cls(net.parameters(), lr=0.01), None, {"l1": 0.1, "l2": 0.1}, model=net, metric="decoupled"
    )
    handle.remove()
    fr.attach(cls(net.parameters(), lr=0.01), {"box": fr.Box()}, {}, model=net).remove()
