"""train_step: proximal SGD equals ISTA written out, prox=False equals the hand-written
subgradient loop with torch.optim, vmap over strengths and learning rates equals a loop."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import funcreg as fr
from funcreg import optim
from funcreg._foreach import eager_update

DT = torch.float64


@pytest.fixture
def problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(40, 4, dtype=DT)
    y = torch.randn(40, 1, dtype=DT)

    def loss(p, x, y):
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    return net, loss, x, y


def test_prox_sgd_is_ista(problem):
    net, loss, x, y = problem
    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2(), gl=fr.GroupLasso("2.weight", dim=1))
    s = {"l1": 0.05, "l2": 0.01, "gl": 0.02}
    step = fr.train_step(loss, spec, optim.sgd(0.1))
    p = fr.params(net)
    state = optim.sgd(0.1).init(p)
    q = {k: v.clone() for k, v in p.items()}
    for _ in range(20):
        p, state, m = step(p, state, s, x, y)
        # ISTA by hand: gradient of loss + smooth part, then the two prox operators
        leaves = {k: v.clone().requires_grad_() for k, v in q.items()}
        obj = loss(leaves, x, y) + s["l2"] * 0.5 * sum(
            leaves[k].pow(2).sum() for k in ("0.weight", "2.weight")
        )
        obj.backward()
        q = {k: (leaves[k] - 0.1 * leaves[k].grad).detach() for k in q}
        w = q["0.weight"]
        q["0.weight"] = torch.sign(w) * (w.abs() - 0.1 * 0.05).clamp(min=0)
        v = q["2.weight"]
        norm = v.norm(dim=1, keepdim=True)
        q["2.weight"] = v * (1 - 0.1 * 0.02 * v.shape[1] ** 0.5 / norm).clamp(min=0)
    for k in p:
        torch.testing.assert_close(p[k], q[k], rtol=1e-12, atol=1e-13)
    assert int((p["0.weight"] == 0).sum()) > 0
    assert set(m) == {"loss", "l1", "l2", "gl", "penalty"}


def test_subgradient_mode_equals_torch_optim_loop(problem):
    net, loss, x, y = problem
    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
    s = {"l1": 0.01, "l2": 0.02}
    opt = optim.adam(1e-2)
    step = fr.train_step(loss, spec, opt, prox=False)
    p = fr.params(net)
    state = opt.init(p)
    ref = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    ref.load_state_dict(net.state_dict())
    topt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(15):
        p, state, m = step(p, state, s, x, y)
        w1, w2 = ref[0].weight, ref[2].weight
        total = nn.functional.mse_loss(ref(x), y) + 0.01 * w1.abs().sum()
        total = total + 0.02 * 0.5 * (w1.pow(2).sum() + w2.pow(2).sum())
        topt.zero_grad()
        total.backward()
        topt.step()
        assert float(m["loss"] + m["penalty"]) == pytest.approx(float(total.detach()), rel=1e-12)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(p[k], v.detach(), rtol=1e-11, atol=1e-12)


def test_vmap_over_strengths_and_lr_equals_loop(problem):
    net, loss, x, y = problem
    spec = fr.Spec(l1=fr.L1("0.weight"), box=fr.Box("2.bias", lo=-0.05, hi=0.05))
    opt = optim.adam(lr="lr")
    step = fr.train_step(loss, spec, opt)
    K = 4
    s = {
        "l1": torch.tensor([0.0, 1e-3, 1e-2, 1e-1], dtype=DT),
        "lr": torch.tensor([1e-3, 1e-2, 1e-2, 3e-2], dtype=DT),
    }
    p0 = fr.params(net)
    P = {k: v.expand(K, *v.shape).clone() for k, v in p0.items()}
    S = vmap(opt.init)(P)
    vstep = vmap(step, in_dims=(0, 0, 0, None, None))
    for _ in range(10):
        P, S, M = vstep(P, S, s, x, y)
    for k in range(K):
        p, st = dict(p0), opt.init(p0)
        sk = {n: v[k] for n, v in s.items()}
        for _ in range(10):
            p, st, m = step(p, st, sk, x, y)
        for n in p:
            torch.testing.assert_close(P[n][k], p[n], rtol=1e-12, atol=1e-13)
        assert float(M["l1"][k]) == pytest.approx(float(m["l1"]), rel=1e-12)
    assert float(P["2.bias"].abs().max()) <= 0.05


def test_constraints_projected_even_without_prox(problem):
    net, loss, x, y = problem
    spec = fr.Spec(l1=fr.L1(), nn=fr.NonNegative("0.weight"))
    grad_part, prox_part = fr.split_spec(spec, prox=False)
    assert list(grad_part) == ["l1"] and list(prox_part) == ["nn"]
    step = fr.train_step(loss, spec, optim.sgd(0.1), prox=False)
    p, _, _ = step(fr.params(net), optim.sgd(0.1).init(fr.params(net)), {"l1": 0.1}, x, y)
    assert float(p["0.weight"].min()) >= 0.0


def test_prox_for_term_without_prox_is_refused(problem):
    net, loss, x, y = problem

    @fr.penalties.register_penalty
    class Bumpy(fr.Penalty):
        smooth = False

        def _value(self, d, c):
            return d.abs().sqrt().sum()

    with pytest.raises(ValueError, match=r"term 'b': Bumpy is non-smooth but has no proximal"):
        fr.train_step(loss, {"b": Bumpy()}, optim.sgd(0.1))
    fr.train_step(loss, {"b": Bumpy()}, optim.sgd(0.1), prox=False)  # subgradient is fine


EAGER_OPTIMIZERS = {
    "sgd-momentum-wd": lambda: optim.sgd(0.05, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": lambda: optim.sgd(0.05, momentum=0.8, nesterov=True),
    "sgd-named": lambda: optim.sgd("lr", momentum="mom", dampening=0.1),
    "adam": lambda: optim.adam(0.02, weight_decay=0.01),
    "adamw-named": lambda: optim.adamw("lr", weight_decay=0.1),
}


@pytest.mark.parametrize("prox", [True, False], ids=["prox", "subgradient"])
@pytest.mark.parametrize("name", list(EAGER_OPTIMIZERS))
def test_autograd_step_equals_pure_step(problem, name, prox):
    """train_step(autograd=True) (torch.autograd + the optimizer's eager step)
    gives train_step()'s params, state and metrics, in float64, over 15 steps."""
    net, loss, x, y = problem
    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2(), box=fr.Box("2.bias", lo=-0.5, hi=0.5))
    opt = EAGER_OPTIMIZERS[name]()
    s = {
        "l1": torch.tensor(0.02, dtype=DT),
        "l2": torch.tensor(0.01, dtype=DT),
        "lr": torch.tensor(0.03, dtype=DT),
        "mom": torch.tensor(0.9, dtype=DT),
    }
    calls = []
    eager = eager_update(opt)

    def counted(*args):
        calls.append(1)
        return eager(*args)

    pure = fr.train_step(loss, spec, opt, prox=prox)
    fast = fr.train_step(loss, spec, opt._replace(step_eager=counted), prox=prox, autograd=True)
    p1 = fr.params(net)
    p2 = dict(p1)
    s1 = s2 = opt.init(p1)
    for _ in range(15):
        p1, s1, m1 = pure(p1, s1, s, x, y)
        p2, s2, m2 = fast(p2, s2, s, x, y)
        assert list(m1) == list(m2)
        torch.testing.assert_close(m2, m1, rtol=0, atol=1e-13)
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-13)
        torch.testing.assert_close(tuple(s2), tuple(s1), rtol=0, atol=1e-13)
    assert len(calls) == 15


def test_autograd_step_without_step_eager(problem):
    """An Optimizer built without step_eager still works with autograd=True (pure step)."""
    net, loss, x, y = problem
    base = optim.adam(0.05)
    bare = optim.Optimizer(base.init, base.step, base.hyperparams, base.learning_rate)
    spec = fr.Spec(l2=fr.L2())
    p = fr.params(net)
    a = fr.train_step(loss, spec, base, autograd=True)(p, base.init(p), {"l2": 0.1}, x, y)
    b = fr.train_step(loss, spec, bare, autograd=True)(p, base.init(p), {"l2": 0.1}, x, y)
    # Adam's eager step is torch's fused kernel: equal to the pure step up to rounding
    torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


def test_autograd_step_with_shared_and_strided_gradients():
    """Closed-form terms add their gradient out of place: autograd may hand one tensor to
    two params (``w = a + b``), and gradients may be transposed views (``v.t()``); the
    eager step still equals the pure one (fused Adam gets contiguous copies)."""
    torch.manual_seed(1)
    x = torch.randn(30, 3, dtype=DT)
    y = torch.randn(30, 2, dtype=DT)
    p = {
        "a": torch.randn(3, 2, dtype=DT),
        "b": torch.randn(3, 2, dtype=DT),
        "v": torch.randn(2, 3, dtype=DT),
    }

    def loss(q, x, y):
        return ((x @ (q["a"] + q["b"]) - y) ** 2).mean() + (x @ q["v"].t()).square().mean()

    spec = fr.Spec(l2=fr.L2("b"), l1=fr.L1("v"))
    opt = optim.adam(0.05)
    s = {"l2": 0.3, "l1": 0.1}
    pure = fr.train_step(loss, spec, opt, prox=False)
    eager = fr.train_step(loss, spec, opt, prox=False, autograd=True)
    p1, p2 = p, dict(p)
    s1 = s2 = opt.init(p)
    for _ in range(10):
        p1, s1, m1 = pure(p1, s1, s, x, y)
        p2, s2, m2 = eager(p2, s2, s, x, y)
        torch.testing.assert_close(p2, p1, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(m2, m1, rtol=1e-13, atol=1e-13)


def test_eager_adam_runs_the_fused_kernel(monkeypatch):
    """On CPU, Adam's eager step goes through torch's fused kernel (not silently the
    fallback) and gives the pure step's numbers."""
    calls = []
    kernel = torch._fused_adam_

    def spy(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", spy)
    opt = optim.adam(0.1)
    params = {"w": torch.randn(4, 3, dtype=DT), "b": torch.randn(3, dtype=DT)}
    grads = {"w": torch.randn(3, 4, dtype=DT).t(), "b": torch.randn(3, dtype=DT)}  # strided
    state = opt.init(params)
    fast = eager_update(opt)(grads, state, params, {})
    slow = opt.step(grads, state, params, {})
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-15, atol=1e-15)
