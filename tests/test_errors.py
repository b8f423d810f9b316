"""Bad input raises a clear ValueError/TypeError naming the term, the parameter and the fix."""

import functools
import inspect
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
    with pytest.raises(TypeError, match=r"L1\(3\): the first argument says which.*L1 takes no"):
        fr.L1(3)
    with pytest.raises(TypeError, match=r"MCP\(2.5\): .*e.g. MCP\(gamma=2.5\)"):
        fr.MCP(2.5)
    with pytest.raises(TypeError, match=r"Box\(0.0\): .*e.g. Box\(lo=0.0\)"):
        fr.Box(0.0)
    assert fr.MCP("w", 2.5).gamma == 2.5  # positional after the selector still works
    sig = inspect.signature(fr.MCP)  # help() and IDEs show the real fields
    assert list(sig.parameters) == ["select", "gamma", "toward", "weight"]


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


# ------------------------------------------------------------ shared checks (_checks)


def test_positive_int():
    from funcreg import _checks

    assert _checks.positive_int("steps", 3) == 3
    assert _checks.positive_int("chunk_size", None) is None
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"steps must be an int >= 1, got"):
            _checks.positive_int("steps", bad)
    with pytest.raises(ValueError, match=r"epochs must be an int >= 1, got None"):
        _checks.positive_int("epochs", None, allow_none=False)


def test_check_seed():
    import numpy as np

    from funcreg import _checks

    assert _checks.check_seed("sweep", np.int64(7)) == 7 and _checks.check_seed("cv", 0) == 0
    for bad in (-1, 1.0, True, "1", None):
        with pytest.raises(ValueError, match=r"cross_validate: seed must be an int >= 0, got"):
            _checks.check_seed("cross_validate", bad)


def test_check_optimizer_and_engine_args():
    from funcreg import _checks

    _checks.check_optimizer("sweep", fr.optim.sgd(0.1))
    with pytest.raises(TypeError, match=r"sweep: optimizer must be a functional optimizer such "):
        _checks.check_optimizer("sweep", torch.optim.SGD)
    _checks.check_engine_args("path", None, None)
    _checks.check_engine_args("path", fr.optim.sgd(0.1), 10)
    for opt, steps in ((fr.optim.sgd(0.1), None), (None, 10)):
        with pytest.raises(ValueError, match=r"path: give optimizer= and steps= together"):
            _checks.check_engine_args("path", opt, steps)


def test_no_prox_advice_is_one_rule(net):
    """A term without a prox goes through the (sub)gradient: train_step, Spec.prox and
    fr.prox_ give the same advice (no 'mark it smooth', which no user can do)."""

    @fr.penalties.register_penalty
    class Bumpy(fr.Penalty):
        smooth = False

        def _value(self, d, c):
            return d.abs().sqrt().sum()

    with pytest.raises(ValueError, match=r"term 'b': Bumpy is non-smooth .* train with prox=False"):
        fr.train_step(lambda p: p["w"].sum(), {"b": Bumpy()}, fr.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"term 'b': Bumpy is non-smooth .* fr\.penalty instead"):
        fr.prox_(net, {"b": Bumpy()}, {"b": 1.0}, lr=0.1)
    with pytest.raises(ValueError, match=r"term 'o': Orthogonal has no .* goes through the gradi"):
        fr.prox_(net, {"o": fr.Orthogonal()}, {"o": 1.0}, lr=0.1)


# ------------------------------------------------ eager misuse: one model's strengths


def test_penalty_refuses_k_strengths(net):
    spec = fr.Spec(l1=fr.L1())
    with pytest.raises(ValueError, match=r"penalty: strength 'l1' has shape \(3,\).*fr\.sweep"):
        fr.penalty(net, spec, {"l1": torch.tensor([0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match=r"prox_: strength 'l1' has shape \(1,\).*fr\.sweep"):
        fr.prox_(net, spec, {"l1": torch.tensor([0.1])}, lr=0.1)


def test_unknown_strength_key_names_the_closest_term(net):
    spec = fr.Spec(l1=fr.L1(), l2=fr.L2())
    with pytest.raises(ValueError, match=r"strengths has 'l22'.*did you mean 'l2'\?"):
        fr.penalty(net, spec, {"l1": 0.1, "l2": 0.1, "l22": 0.3})
    with pytest.raises(ValueError, match=r"prox_: strengths has 'lr'.*drop the entry"):
        fr.prox_(net, spec.nonsmooth(), {"l1": 0.1, "l2": 0.1, "lr": 0.1}, lr=0.1)


def test_one_strengths_dict_serves_both_halves_of_a_spec(net):
    """The documented classic loop: the whole strengths dict goes to both halves."""
    spec = fr.Spec(l1=fr.L1(), l2=fr.L2())
    s = {"l1": 0.1, "l2": 0.2}
    assert spec.smooth().known_terms == spec.nonsmooth().known_terms == ("l1", "l2")
    fr.penalty(net, spec.smooth(), s)
    fr.prox_(net, spec.nonsmooth(), s, lr=0.1)


def test_numpy_scalar_strengths_and_tensor_lr_are_accepted(net):
    import numpy as np

    spec = fr.Spec(l1=fr.L1(), l2=fr.L2())
    plain = fr.penalty(net, spec, {"l1": 0.25, "l2": 0.5})
    got = fr.penalty(net, spec, {"l1": np.float32(0.25), "l2": np.float64(0.5)})
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, plain)
    twin = type(net)()
    twin.load_state_dict(net.state_dict())
    fr.prox_(net, spec.nonsmooth(), {"l1": np.float32(0.25)}, lr=torch.tensor(0.5))
    fr.prox_(twin, spec.nonsmooth(), {"l1": 0.25}, lr=0.5)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    fr.prox_(net, spec.nonsmooth(), {"l1": 0.25}, lr=np.float32(0.5))
    with pytest.raises(ValueError, match=r"prox_: lr must be a number or a 0-dim floating"):
        fr.prox_(net, spec.nonsmooth(), {"l1": 0.25}, lr=torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match=r"prox_: lr must be a number >= 0, got -0\.5"):
        fr.prox_(net, spec.nonsmooth(), {"l1": 0.25}, lr=torch.tensor(-0.5))
    with pytest.raises(TypeError, match=r"prox_: lr must be a number >= 0"):
        fr.prox_(net, spec.nonsmooth(), {"l1": 0.25}, lr="0.5")


def test_prox_checks_the_step_of_mcp(net):
    spec = fr.Spec(m=fr.MCP(gamma=3.0))
    with pytest.raises(ValueError, match=r"prox_: term 'm': MCP prox needs lr < gamma"):
        fr.prox_(net, spec, {"m": 0.1}, lr=5.0)


# ----------------------------------------------------------------- loss misuse


def _problem():
    torch.manual_seed(0)
    lin = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return lin, fr.params(lin), x, y


@pytest.mark.parametrize("autograd", [False, True], ids=["func", "autograd"])
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda out, y: float(((out - y) ** 2).mean().item()), r"returned a float; .*not \.item"),
        (lambda out, y: ((out - y) ** 2).mean().reshape(1), r"returned a tensor of shape \(1,\)"),
    ],
    ids=["item", "shape-1"],
)
def test_loss_that_is_not_one_tensor_is_named(autograd, make, match):
    from torch.func import functional_call

    lin, p, x, y = _problem()

    def my_loss(params, x, y):
        return make(functional_call(lin, params, (x,)), y)

    step = fr.train_step(my_loss, fr.Spec(l1=fr.L1()), fr.optim.sgd(0.1), autograd=autograd)
    with pytest.raises(ValueError, match=r"loss_fn .*my_loss " + match):
        step(p, fr.optim.sgd(0.1).init(p), {"l1": 0.1}, x, y)
    with pytest.raises(ValueError, match=r"loss_fn .*my_loss " + match):
        fr.penalized(my_loss, fr.Spec(l1=fr.L1()))(p, {"l1": 0.1}, x, y)


def test_eager_step_refuses_a_loss_that_ignores_params():
    """train_step(autograd=True) (fr.sweep's single-model chunks): a loss computed from the
    module's own weights, or detached, trained nothing before; now it is named."""
    lin, p, x, y = _problem()

    def module_loss(params, x, y):
        return ((lin(x) - y) ** 2).mean()

    def detached_loss(params, x, y):
        return ((x @ params["weight"].t() + params["bias"] - y) ** 2).mean().detach()

    @functools.wraps(module_loss)
    def wrapper(*args):  # the message names the user's loss through functools.wraps
        return module_loss(*args)

    for loss in (module_loss, detached_loss, wrapper):
        step = fr.train_step(loss, fr.Spec(l2=fr.L2()), fr.optim.sgd(0.1), autograd=True)
        name = getattr(loss, "__wrapped__", loss).__name__
        with pytest.raises(ValueError, match=name + r" returned a loss that does not depend on"):
            step(p, fr.optim.sgd(0.1).init(p), {"l2": 0.1}, x, y)


def test_solve_with_no_models_says_so():
    X = torch.randn(20, 3, dtype=torch.float64)
    ls = fr.solvers.least_squares(X, X[:, 0])
    with pytest.raises(ValueError, match="no models to solve"):
        fr.solve(ls, fr.Spec(l1=fr.L1()), ls.init(), {"l1": torch.zeros(0, dtype=torch.float64)})
