"""Activity regularization: Keras's formulas, hooks only inside the block, vmap-safe."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import funcreg as fr
from funcreg import activity


def _net() -> nn.Module:
    torch.manual_seed(0)
    hidden = activity.declare(nn.Linear(4, 3), activity.L1L2(l1=0.01, l2=0.02))
    return nn.Sequential(hidden, nn.ReLU(), nn.Linear(3, 1)).double()


def test_keras_formulas_and_per_batch():
    net = _net()
    x = torch.randn(5, 4, dtype=torch.float64)
    a = net[0](x).detach()
    with activity.collect(net) as acts:
        net(x)
    torch.testing.assert_close(acts.penalty(), 0.01 * a.abs().sum() + 0.02 * a.square().sum())
    per_batch = activity.L1L2(l1=0.01, l2=0.02, per_batch=True)
    torch.testing.assert_close(per_batch(a), (0.01 * a.abs().sum() + 0.02 * a.square().sum()) / 5)
    assert list(acts.parts()) == ["0"]


def test_hooks_only_inside_the_block_and_declaration_survives_copies():
    net = _net()
    with activity.collect(net):
        assert net[0]._forward_hooks
    assert not net[0]._forward_hooks
    assert "0" in dict(_declared(copy.deepcopy(net)))
    assert set(net.state_dict()) == set(
        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)).state_dict()
    )


def _declared(net: nn.Module):
    return [
        (p, m.__dict__["_funcreg_activity"])
        for p, m in net.named_modules()
        if "_funcreg_activity" in m.__dict__
    ]


def test_functional_loss_under_vmap_equals_a_loop():
    net = _net()
    params = {n: p.detach() for n, p in net.named_parameters()}
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)

    def objective(params, strength):
        with activity.collect(net) as acts:
            out = torch.func.functional_call(net, params, (x,))
        return ((out - y) ** 2).mean() + strength * acts.penalty()

    strengths = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    batched = torch.func.vmap(torch.func.grad(objective), in_dims=(None, 0))(params, strengths)
    for k, s in enumerate(strengths):
        one = torch.func.grad(objective)(params, s)
        for n in params:
            torch.testing.assert_close(batched[n][k], one[n])


def test_bad_input():
    with pytest.raises(TypeError, match=r"must be fr.activity.L1L2"):
        activity.declare(nn.Linear(2, 2), 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"l1"):
        activity.L1L2(l1=-1.0)


def _sub(params, prefix):
    return {n[len(prefix) + 1 :]: v for n, v in params.items() if n.startswith(prefix + ".")}


def _hook_free_loss(net, x, y):
    """The loss returns its activations itself: no forward hook anywhere."""

    def loss(params, x=x, y=y):
        assert not net[0]._forward_hooks
        h = torch.func.functional_call(net[0], _sub(params, "0"), (x,))
        out = torch.func.functional_call(net[2], _sub(params, "2"), (torch.relu(h),))
        return ((out - y) ** 2).mean(), {"0": h}

    return loss


def test_activity_terms_equal_keras_formulas_with_funcreg_strengths():
    net = _net()
    x = torch.randn(5, 4, dtype=torch.float64)
    a = net[0](x).detach()
    l1, l2 = 0.01, 0.02
    terms, strengths = activity.terms_of(net)  # from the L1L2(l1=0.01, l2=0.02) declaration
    assert strengths == {"0_l1": l1, "0_l2": 2 * l2}  # Keras l2·Σa² = L2 (½Σa²) at 2·l2
    assert list(terms) == ["0_l1", "0_l2"]
    assert all(t.modules == ("0",) and not t.per_batch for t in terms.values())
    assert type(terms["0_l1"].penalty) is fr.L1 and type(terms["0_l2"].penalty) is fr.L2
    values = {t: terms[t]({"0": a}, strengths[t], t) for t in terms}
    torch.testing.assert_close(values["0_l1"], l1 * a.abs().sum())
    torch.testing.assert_close(values["0_l2"], l2 * a.square().sum())
    per_batch = activity.Activity(fr.L1(), "0", per_batch=True)
    torch.testing.assert_close(per_batch({"0": [a, a]}, l1), 2 * l1 * a.abs().sum() / 5)
    with activity.collect(net) as acts:
        net(x)
    total = sum(terms[t](acts.outputs, strengths[t], t) for t in terms)
    torch.testing.assert_close(total, acts.penalty())  # the declared L1L2, same value


def test_activity_strengths_sweep_in_one_vmapped_run_equal_a_loop():
    """K activity strengths (and a spec term) in one vmapped training run, hook-free, equal K
    separate runs."""
    net = _net()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    spec = fr.Spec(l2=fr.L2("2.weight"))
    objective = activity.penalized(
        _hook_free_loss(net, x, y), spec, {"act": activity.Activity(fr.L1(), "0")}
    )
    params0 = {n: p.detach() for n, p in net.named_parameters()}

    def train(params, strengths):
        for _ in range(15):
            g = torch.func.grad(objective)(params, strengths)
            params = {n: p - 0.1 * g[n] for n, p in params.items()}
        return params

    k = 4
    grid = {
        "act": torch.tensor([0.0, 0.01, 0.05, 0.2], dtype=torch.float64),
        "l2": torch.full((k,), 0.1, dtype=torch.float64),
    }
    batched = torch.func.vmap(train, in_dims=(None, 0))(params0, grid)
    norms = []
    for i in range(k):
        one = train(params0, {t: v[i] for t, v in grid.items()})
        for n in params0:
            torch.testing.assert_close(batched[n][i], one[n], rtol=1e-10, atol=1e-12)
        norms.append(float(torch.func.functional_call(net[0], _sub(one, "0"), (x,)).abs().sum()))
    assert all(n < norms[0] for n in norms[1:])  # an activity strength shrinks the activations
    total, parts = activity.penalized(
        _hook_free_loss(net, x, y), spec, {"act": activity.Activity(fr.L1(), "0")}, True
    )(params0, {"act": 0.5, "l2": 0.1})
    h = net[0](x)
    torch.testing.assert_close(parts["act"], 0.5 * h.abs().sum())
    torch.testing.assert_close(parts["l2"], 0.1 * 0.5 * net[2].weight.square().sum())
    torch.testing.assert_close(total, parts["loss"] + parts["act"] + parts["l2"])


def test_activity_from_a_collect_block_inside_the_loss_equals_the_hook_free_loss():
    net = _net()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)

    def collected(params):
        with activity.collect(net) as acts:
            out = torch.func.functional_call(net, params, (x,))
        return ((out - y) ** 2).mean(), acts.outputs

    terms = {"act": activity.Activity(fr.L2(), "0")}
    params = {n: p.detach() for n, p in net.named_parameters()}
    a = torch.func.grad(activity.penalized(collected, {}, terms))(params, {"act": 0.3})
    b = torch.func.grad(activity.penalized(_hook_free_loss(net, x, y), {}, terms))(
        params, {"act": 0.3}
    )
    for n in params:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-12)


def test_activity_terms_bad_input():
    net = _net()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    params = {n: p.detach() for n, p in net.named_parameters()}
    terms = {"act": activity.Activity(fr.L1(), "1")}
    with pytest.raises(ValueError, match=r"term 'act' reads the output of module '1'.*\['0'\]"):
        activity.penalized(_hook_free_loss(net, x, y), {}, terms)(params, {"act": 0.1})
    with pytest.raises(TypeError, match=r"must return \(data loss, \{module path"):
        activity.penalized(lambda p: p["0.bias"].sum(), {}, terms)(params, {"act": 0.1})
    with pytest.raises(ValueError, match=r"'l1' names both a spec term and an activity term"):
        activity.penalized(_hook_free_loss(net, x, y), fr.Spec(l1=fr.L1()), {"l1": terms["act"]})
    with pytest.raises(ValueError, match=r"missing strength for term 'act'"):
        activity.penalized(
            _hook_free_loss(net, x, y), {}, {"act": activity.Activity(fr.L1(), "0")}
        )(params, {})
    with pytest.raises(TypeError, match=r"must be fr.activity.Activity"):
        activity.penalized(_hook_free_loss(net, x, y), {}, {"act": fr.L1()})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"a penalty such as fr.L1\(\)"):
        activity.Activity(fr.MaxNorm(), "0")
    with pytest.raises(ValueError, match=r"toward= as a \{name: tensor\} dict"):
        activity.Activity(fr.L2(toward={"0.weight": torch.zeros(1)}), "0")
    with pytest.raises(ValueError, match=r"reserved"):
        activity.penalized(_hook_free_loss(net, x, y), {}, {"loss": terms["act"]})


def test_collect_refuses_a_declared_module_in_a_plain_list():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = [activity.declare(nn.Linear(2, 2), activity.L1L2(l1=0.1))]

    with (
        pytest.raises(ValueError, match=r"plain list 'blocks'.*nn.ModuleList"),
        activity.collect(Net()),
    ):
        pass


def test_fr_sweep_with_activity_terms_equals_a_loop_of_train_step():
    """fr.sweep(activity=...) trains K activity strengths in one vmapped run (chunk_size=4)
    and one model at a time (chunk_size=1); both equal a plain loop of fr.train_step, and the
    history records each activity term's value."""
    net = _net()
    torch.manual_seed(1)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    spec = fr.Spec(l2=fr.L2("2.weight"))
    terms = {"act": activity.Activity(fr.L1(), "0")}
    loss = _hook_free_loss(net, x, y)
    strengths = [0.0, 0.01, 0.05, 0.2]
    grid = fr.grid(act=strengths, l2=0.1, dtype=torch.float64)
    opt = fr.optim.sgd(lr=0.1)
    kw = dict(train=(x, y), optimizer=opt, steps=6, progress=False, activity=terms)
    vm = fr.sweep(net, lambda p, xb, yb: loss(p, xb, yb), spec, grid, chunk_size=4, **kw)
    one = fr.sweep(net, lambda p, xb, yb: loss(p, xb, yb), spec, grid, chunk_size=1, **kw)
    step = fr.train_step(lambda p, xb, yb: loss(p, xb, yb), spec, opt, activity=terms)
    p0 = {n: v.detach() for n, v in net.named_parameters()}
    for i, s in enumerate(strengths):
        params, state = p0, opt.init(p0)
        acts = []
        for _ in range(6):
            params, state, metrics = step(params, state, {"act": s, "l2": 0.1}, x, y)
            acts.append(metrics["act"])
        for n in p0:
            torch.testing.assert_close(vm.stacked[n][i], params[n], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(one.stacked[n][i], params[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vm.history["act"][:, i], torch.stack(acts))
    h0 = torch.func.functional_call(net[0], _sub(vm.params(3), "0"), (x,)).abs().sum()
    hz = torch.func.functional_call(net[0], _sub(vm.params(0), "0"), (x,)).abs().sum()
    assert h0 < hz  # the activity strength shrinks the activations


def test_fr_sweep_activity_bad_input_is_named():
    net = _net()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    spec = fr.Spec(l2=fr.L2("2.weight"))
    terms = {"act": activity.Activity(fr.L1(), "0")}
    kw = dict(train=(x, y), optimizer=fr.optim.sgd(lr=0.1), steps=2, progress=False)

    def plain(p, xb, yb):
        return ((torch.func.functional_call(net, p, (xb,)) - yb) ** 2).mean()

    grid = fr.grid(act=[0.1, 0.2], l2=0.1, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"with activity= terms, loss_fn .*must return \(data loss"):
        fr.sweep(net, plain, spec, grid, activity=terms, **kw)
    with pytest.raises(ValueError, match=r"grid axis 'act' names no spec term"):
        fr.sweep(net, plain, spec, grid, **kw)
    with pytest.raises(TypeError, match=r"activity= must be a dict"):
        fr.sweep(net, plain, spec, grid, activity=[terms["act"]], **kw)


def test_fr_sweep_and_train_step_refuse_an_activation_that_ignores_the_params():
    """An activity term must penalize something the params move: an activation that is
    detached, or computed by the module with its own weights, is refused before training
    (fr.sweep) or on the first step (the eager fr.train_step(autograd=True)), naming the
    term and the module; a non-tensor activation is refused by type. Strength 0 is not
    mistaken for a detached activation."""
    net = _net()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    spec = fr.Spec(l2=fr.L2("2.weight"))
    terms = {"act": activity.Activity(fr.L1(), "0")}
    opt = fr.optim.sgd(lr=0.1)
    kw = dict(train=(x, y), optimizer=opt, steps=2, progress=False, activity=terms)
    grid = fr.grid(act=[0.0, 0.2], l2=0.1, dtype=torch.float64)

    def data(p, xb, yb):
        return ((torch.func.functional_call(net, p, (xb,)) - yb) ** 2).mean()

    def detached(p, xb, yb):
        return data(p, xb, yb), {
            "0": torch.func.functional_call(net[0], _sub(p, "0"), (xb,)).detach()
        }

    def own(p, xb, yb):
        return data(p, xb, yb), {"0": net[0](xb)}

    def number(p, xb, yb):
        return data(p, xb, yb), {"0": 1.0}

    for loss in (detached, own):
        with pytest.raises(
            ValueError,
            match=r"activity term 'act' penalizes the output of module '0'.*does not depend",
        ):
            fr.sweep(net, loss, spec, grid, **kw)
        step = fr.train_step(loss, spec, opt, activity=terms, autograd=True)
        p0 = {n: v.detach() for n, v in net.named_parameters()}
        with pytest.raises(ValueError, match=r"train_step: activity term 'act'"):
            step(p0, opt.init(p0), {"act": 0.1, "l2": 0.1}, x, y)
    with pytest.raises(
        TypeError, match=r"activity term 'act': the loss returned a float for module '0'"
    ):
        fr.sweep(net, number, spec, grid, **kw)
    loss = _hook_free_loss(net, x, y)
    step = fr.train_step(loss, spec, opt, activity=terms, autograd=True)
    p0 = {n: v.detach() for n, v in net.named_parameters()}
    step(p0, opt.init(p0), {"act": 0.0, "l2": 0.1}, x, y)  # strength 0: accepted
    with pytest.raises(ValueError, match=r"needs its activity terms declared"):
        fr.sweep(net, loss, spec, fr.grid(l2=0.1, dtype=torch.float64), **{**kw, "activity": None})
    with pytest.raises(ValueError, match=r"grid axis 'act'.*activity=\{'act'"):
        fr.sweep(net, data, spec, grid, **{**kw, "activity": None})
