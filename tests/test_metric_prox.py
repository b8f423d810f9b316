"""Prox in the optimizer's metric: Adam/AdamW + prox minimise ``loss + s·Ω`` (the Lasso)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

import funcreg as fr
from funcreg.optim import decoupled, prox_steps
from funcreg.spec import metric_step

STEPS = 1500


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, p = 80, 12
    x = torch.randn(n, p, dtype=torch.float64, generator=g)
    w = torch.zeros(p, dtype=torch.float64)
    w[:4] = torch.tensor([2.0, -1.5, 1.0, 0.5], dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n, dtype=torch.float64, generator=g)
    return x, y


def _lasso(x: torch.Tensor, y: torch.Tensor, strength: float) -> np.ndarray:
    model = Lasso(alpha=strength, fit_intercept=False, tol=1e-12, max_iter=100_000)
    return model.fit(x.numpy(), y.numpy()).coef_


def _assert_lasso(w: torch.Tensor, ref: np.ndarray) -> None:
    w_np = w.detach().reshape(-1).numpy()
    np.testing.assert_array_equal(w_np != 0, ref != 0)  # the same support, exact zeros
    np.testing.assert_allclose(w_np, ref, atol=1e-3, rtol=0)


def _half_mse(params, x, y):  # sklearn's data term: 1/(2n)·‖y − Xw‖²
    return 0.5 * ((y - x @ params["w"]) ** 2).mean()


@pytest.mark.parametrize("make", [fr.optim.adam, fr.optim.adamw], ids=["adam", "adamw"])
def test_train_step_adam_prox_reaches_sklearn_lasso(make):
    x, y = _problem()
    strength = 0.1
    opt = make(lr="lr", weight_decay=0.0)
    step = fr.train_step(_half_mse, fr.Spec(l1=fr.L1("w")), opt, prox=True)
    params = {"w": torch.zeros(12, dtype=torch.float64)}
    state = opt.init(params)
    for t in range(STEPS):  # a decaying learning rate, 0.05 -> 5e-6
        lr = torch.tensor(0.05 * 1e-4 ** (t / STEPS), dtype=torch.float64)
        params, state, _ = step(params, state, {"l1": strength, "lr": lr}, x, y)
    _assert_lasso(params["w"], _lasso(x, y, strength))


@pytest.mark.parametrize("make", [fr.optim.adam, fr.optim.adamw], ids=["adam", "adamw"])
@pytest.mark.parametrize(
    "strengths", [[0.1, 0.3], [0.05, 0.1, 0.2, 0.3, 0.5]], ids=["eager", "vmap"]
)
def test_sweep_adam_prox_reaches_sklearn_lasso(strengths, make):
    """K <= 4 trains each model alone (eager route), K = 5 vmaps: both use the metric."""
    x, y = _problem()
    model = torch.nn.Linear(12, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)

    def loss(params, x, y):
        out = torch.func.functional_call(model, params, (x,)).squeeze(-1)
        return 0.5 * ((y - out) ** 2).mean()

    k = len(strengths)
    result = fr.sweep(
        model,
        loss,
        fr.Spec(l1=fr.L1("weight")),
        {"l1": strengths, "lr": [0.01] * k},
        train=(x, y),
        optimizer=make(lr="lr", weight_decay=0.0),
        steps=STEPS,
        progress=False,
    )
    for i, strength in enumerate(strengths):
        _assert_lasso(result.stacked["weight"][i], _lasso(x, y, strength))


def test_decoupled_prox_thresholds_at_lr_times_strength():
    """``decoupled(adam)`` is the former rule: prox step lr whatever the second moments."""
    x, y = _problem()
    params = {"w": torch.zeros(12, dtype=torch.float64)}
    hyper = {"l1": 0.1, "lr": 0.01}
    for opt, expected in [
        (fr.optim.adam(lr="lr"), None),
        (decoupled(fr.optim.adam(lr="lr")), 0.01),
    ]:
        state = opt.init(params)
        _, state = opt.step({"w": torch.ones(12, dtype=torch.float64)}, state, params, hyper)
        steps = prox_steps(opt, state, hyper)
        if expected is None:  # v̂ = 1 after one step with g = 1: step lr / (1 + eps)
            torch.testing.assert_close(
                steps["w"], torch.full((12,), 0.01 / (1 + 1e-8), dtype=torch.float64)
            )
        else:
            assert steps == expected


def test_sgd_prox_step_is_the_learning_rate():
    opt = fr.optim.sgd(lr=0.1, momentum=0.9)
    params = {"w": torch.zeros(3)}
    assert opt.metric is None
    assert prox_steps(opt, opt.init(params), None) == 0.1


def test_metric_step_is_one_value_per_group_and_per_matrix():
    step = torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    w = torch.ones(2, 3)
    # GroupLasso(dim=0): one group per column, metric mean(d) = mean(1/step) per column
    group = metric_step(fr.GroupLasso(dim=0), step, w)
    expected = 1 / torch.tensor([[1.0, 0.75, 0.625]])
    torch.testing.assert_close(group, expected)
    assert metric_step(fr.Nuclear(), step, w).shape == ()
    torch.testing.assert_close(metric_step(fr.L1(), step, w), step)


def test_group_prox_with_constant_metric_is_the_scalar_prox():
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    spec = fr.Spec(g=fr.GroupLasso(dim=1))
    by_dict = spec.prox({"w": w}, {"g": 0.3}, {"w": torch.full((4, 5), 0.5)})
    torch.testing.assert_close(by_dict["w"], spec.prox({"w": w}, {"g": 0.3}, 0.5)["w"])


def test_mcp_prox_under_adam_asks_for_decoupled():
    spec = fr.Spec(mcp=fr.MCP("w"))
    with pytest.raises(ValueError, match=r"'mcp'.*fr\.optim\.decoupled"):
        fr.train_step(_half_mse, spec, fr.optim.adam(lr=0.01), prox=True)
    fr.train_step(_half_mse, spec, decoupled(fr.optim.adam(lr=0.01)), prox=True)  # accepted


def _misses(w: torch.Tensor, ref: np.ndarray) -> bool:
    w_np = w.detach().reshape(-1).numpy()
    return bool(np.any((w_np != 0) != (ref != 0)) or np.abs(w_np - ref).max() > 1e-3)


def test_the_former_decoupled_prox_misses_the_lasso():
    """The Lasso tests above fail with the former rule (prox step lr under Adam): in
    train_step (decoupled(adam)) and in attach (metric='decoupled'), same loops."""
    x, y = _problem()
    strength = 0.1
    ref = _lasso(x, y, strength)
    opt = decoupled(fr.optim.adam(lr="lr"))
    step = fr.train_step(_half_mse, fr.Spec(l1=fr.L1("w")), opt, prox=True)
    params = {"w": torch.zeros(12, dtype=torch.float64)}
    state = opt.init(params)
    for t in range(STEPS):
        lr = torch.tensor(0.05 * 1e-4 ** (t / STEPS), dtype=torch.float64)
        params, state, _ = step(params, state, {"l1": strength, "lr": lr}, x, y)
    assert _misses(params["w"], ref)
    model = torch.nn.Linear(12, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(adam, gamma=1e-4 ** (1 / STEPS))
    spec = fr.Spec(l1=fr.L1("weight"))
    fr.attach(adam, spec, {"l1": strength}, model=model, metric="decoupled")
    for _ in range(STEPS):
        adam.zero_grad()
        (0.5 * ((model(x).squeeze(-1) - y) ** 2).mean()).backward()
        adam.step()
        scheduler.step()
    assert _misses(model.weight, ref)
