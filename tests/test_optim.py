"""Tests for funcreg.optim: reference checks against torch.optim, vmap, compile, properties."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from funcreg import optim
from funcreg._foreach import donates, eager_update
from funcreg.optim import AdamState, MissingHyperparameterError, SGDState, adam, adamw, sgd

DTYPE = torch.float64
STEPS = 8


def make_params(seed: int = 0, dtype: torch.dtype = DTYPE) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=gen, dtype=dtype),
        "b": torch.randn(4, generator=gen, dtype=dtype),
    }


def grad_fn(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradient of a smooth non-quadratic objective, so trajectories depend on the params."""
    return {k: 0.7 * (p - 0.5) + 0.3 * torch.sin(3 * p) for k, p in params.items()}


# (factory, torch class, our kwargs, torch kwargs)
SGD_CASES: list[dict[str, Any]] = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"lr": 0.05, "momentum": 0.5, "nesterov": True, "weight_decay": 0.1},
    {"lr": 0.1, "momentum": 0.0, "dampening": 0.5, "weight_decay": 0.01},
    {"lr": 0.0, "momentum": 0.9},
]
ADAM_CASES: list[dict[str, Any]] = [
    {"lr": 0.05},
    {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
    {"lr": 0.02, "weight_decay": 0.1},
    {"lr": 0.1, "betas": (0.0, 0.5), "eps": 1e-3, "weight_decay": 0.01},
]
ADAMW_CASES: list[dict[str, Any]] = [
    {"lr": 0.05},
    {"lr": 0.05, "weight_decay": 0.3},
    {"lr": 0.1, "betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.0},
]
CASES = (
    [("sgd", kw) for kw in SGD_CASES]
    + [("adam", kw) for kw in ADAM_CASES]
    + [("adamw", kw) for kw in ADAMW_CASES]
)
FACTORIES: dict[str, tuple[Callable[..., optim.Optimizer], type[torch.optim.Optimizer]]] = {
    "sgd": (sgd, torch.optim.SGD),
    "adam": (adam, torch.optim.Adam),
    "adamw": (adamw, torch.optim.AdamW),
}


def as_names(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Replace every numeric hyperparameter by a name; return the kwargs and the hyper dict."""
    named: dict[str, Any] = {}
    hyper: dict[str, torch.Tensor] = {}
    for key, value in kwargs.items():
        if key == "betas":
            named[key] = ("beta1", "beta2")
            hyper["beta1"] = torch.tensor(value[0], dtype=DTYPE)
            hyper["beta2"] = torch.tensor(value[1], dtype=DTYPE)
        elif key == "nesterov":
            named[key] = value
        else:
            named[key] = key
            hyper[key] = torch.tensor(value, dtype=DTYPE)
    return named, hyper


def torch_trajectory(kind: str, kwargs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    tparams = {k: torch.nn.Parameter(v.clone()) for k, v in make_params().items()}
    opt = FACTORIES[kind][1](list(tparams.values()), **kwargs)
    out = []
    for _ in range(STEPS):
        grads = grad_fn({k: p.detach() for k, p in tparams.items()})
        for k, p in tparams.items():
            p.grad = grads[k]
        opt.step()
        out.append({k: p.detach().clone() for k, p in tparams.items()})
    return out


@pytest.mark.parametrize("by_name", [False, True], ids=["numbers", "names"])
@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=[f"{k}-{kw}" for k, kw in CASES])
def test_matches_torch_optim(kind: str, kwargs: dict[str, Any], by_name: bool) -> None:
    expected = torch_trajectory(kind, kwargs)
    ours_kwargs, hyper = as_names(kwargs) if by_name else (kwargs, {})
    opt = FACTORIES[kind][0](**ours_kwargs)
    assert opt.hyperparams == frozenset(hyper)
    params = make_params()
    state = opt.init(params)
    for t in range(STEPS):
        params, state = opt.step(grad_fn(params), state, params, hyper)
        for k in params:
            torch.testing.assert_close(params[k], expected[t][k], rtol=0, atol=1e-12)
    assert state.step.dtype.is_floating_point and state.step.ndim == 0
    assert float(state.step) == STEPS


def test_float32_close_to_torch() -> None:
    tparams = {k: torch.nn.Parameter(v) for k, v in make_params(dtype=torch.float32).items()}
    ref = torch.optim.Adam(list(tparams.values()), lr=0.05, weight_decay=0.1)
    opt = adam(lr=0.05, weight_decay=0.1)
    params = make_params(dtype=torch.float32)
    state = opt.init(params)
    for _ in range(STEPS):
        for k, p in tparams.items():
            p.grad = grad_fn({k: p.detach()})[k]
        ref.step()
        params, state = opt.step(grad_fn(params), state, params, {})
    for k, value in params.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, tparams[k].detach(), rtol=1e-5, atol=1e-5)


def test_step_is_pure() -> None:
    for opt in (sgd(0.1, momentum=0.9, weight_decay=0.1), adam(0.1), adamw(0.1)):
        params = make_params()
        grads = grad_fn(params)
        state = opt.init(params)
        snapshot = tree_map(torch.clone, (params, grads, state))
        opt.step(grads, state, params, {})
        for a, b in zip(
            tree_flatten((params, grads, state))[0], tree_flatten(snapshot)[0], strict=True
        ):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ step_eager (_foreach)


def _assert_same_tree(a: Any, b: Any, ulps: int = 0) -> None:
    """Same structure, dtypes and shapes; values bitwise equal (``ulps=0``) or within
    ``ulps`` machine epsilons, relative and absolute."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        if ulps == 0:
            assert torch.equal(x, y)
        else:
            eps = torch.finfo(x.dtype).eps
            torch.testing.assert_close(x, y, rtol=ulps * eps, atol=ulps * eps)


EAGER_CASES = CASES + [
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
    ("adamw", {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.2}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("by_name", [False, True], ids=["numbers", "names"])
@pytest.mark.parametrize(
    ("kind", "kwargs"), EAGER_CASES, ids=[f"{k}-{kw}" for k, kw in EAGER_CASES]
)
def test_step_eager_equals_step(
    kind: str, kwargs: dict[str, Any], by_name: bool, dtype: torch.dtype
) -> None:
    """The eager twin gives the pure step's numbers, states and key order included: SGD's
    _foreach ops bitwise (same ops on CPU); Adam/AdamW's fused kernel to rounding (it is
    torch.optim's arithmetic, see the next test). A third parameter of another dtype makes a
    second group."""
    ours_kwargs, hyper = as_names(kwargs) if by_name else (kwargs, {})
    opt = FACTORIES[kind][0](**ours_kwargs)
    assert eager_update(opt) is not None
    params = make_params(dtype=dtype)
    params["c"] = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    p1 = p2 = params
    s1 = s2 = opt.init(params)
    for _ in range(STEPS):
        g = grad_fn(p1)
        p1, s1 = opt.step(g, s1, p1, hyper)
        inputs = (g, s2, p2)
        snapshot = tree_map(torch.clone, inputs)
        p2, s2 = eager_update(opt)(g, s2, p2, hyper)
        _assert_same_tree(inputs, snapshot)  # pure: nothing passed in was modified
        assert list(p2) == list(params)
        if kind == "sgd":
            _assert_same_tree((p1, s1), (p2, s2))
        else:
            _assert_same_tree((p1, s1), (p2, s2), ulps=64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_step_eager_follows_torch_optim(kind: str, dtype: torch.dtype) -> None:
    """Adam/AdamW's eager step (fused kernel on CPU) tracks torch.optim's default path to
    a few ulps over 30 steps (the pure step agrees to ~1e-15 rel in float64, see above)."""
    opt = FACTORIES[kind][0](lr=0.05, weight_decay=0.2)
    ref_cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    params = make_params(dtype=dtype)
    leaves = [torch.nn.Parameter(v.clone()) for v in params.values()]
    ref = ref_cls(leaves, lr=0.05, weight_decay=0.2)
    state = opt.init(params)
    for i in range(30):
        grads = {k: torch.sin(3 * v) + 0.1 * i for k, v in params.items()}
        for leaf, g in zip(leaves, grads.values(), strict=True):
            leaf.grad = g.clone()
        ref.step()
        params, state = eager_update(opt)(grads, state, params, {})
    for v, leaf in zip(params.values(), leaves, strict=True):
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(v, leaf.detach(), rtol=8 * eps, atol=8 * eps)


def test_step_eager_is_pure_and_falls_back() -> None:
    for opt in (sgd(0.1, momentum=0.9, weight_decay=0.1), adam(0.1), adamw(0.1)):
        params = make_params()
        grads = grad_fn(params)
        state = opt.init(params)
        for _ in range(2):  # the first SGD step copies the gradient into the buffer
            snapshot = tree_map(torch.clone, (params, grads, state))
            new_p, state_2 = eager_update(opt)(grads, state, params, {})
            _assert_same_tree((params, grads, state), snapshot)
            state = state_2
        # results never alias the inputs
        inputs = {t.data_ptr() for t in tree_flatten((params, grads))[0]}
        assert not inputs & {t.data_ptr() for t in tree_flatten((new_p, state))[0]}
    # a hyperparameter that is not 0-dim (broadcast per element) goes through the pure step
    opt = sgd("lr", momentum=0.9)
    params = {"w": torch.ones(3, dtype=DTYPE)}
    lr = {"lr": torch.tensor([0.1, 0.2, 0.3], dtype=DTYPE)}
    state = opt.init(params)
    g = {"w": torch.ones(3, dtype=DTYPE)}
    _assert_same_tree(eager_update(opt)(g, state, params, lr), opt.step(g, state, params, lr))
    with pytest.raises(ValueError, match="same keys"):
        eager_update(opt)({}, state, params, lr)
    with pytest.raises(MissingHyperparameterError):
        eager_update(opt)(g, state, params, {})


def test_optimizer_without_step_eager_still_builds() -> None:
    base = adam(0.1)
    bare = optim.Optimizer(base.init, base.step, base.hyperparams, base.learning_rate)
    assert bare.step_eager is None and bare.config == ()


def test_state_is_a_tensor_pytree() -> None:
    params = make_params()
    s = sgd(0.1, momentum=0.9).init(params)
    assert isinstance(s, SGDState) and set(s.momentum_buffer) == set(params)
    assert sgd(0.1).init(params).momentum_buffer == {}
    a = adam().init(params)
    assert isinstance(a, AdamState)
    leaves = tree_flatten(a)[0]
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves) and len(leaves) == 5
    assert a.step.ndim == 0 and a.step.dtype.is_floating_point


# --------------------------------------------------------------------------- vmap


VMAP_CASES: list[tuple[str, dict[str, Any]]] = [
    ("adam", {"lr": "lr"}),
    ("adamw", {"lr": "lr", "weight_decay": "wd"}),
    ("sgd", {"lr": "lr", "momentum": "mom", "dampening": 0.2}),
    ("sgd", {"lr": "lr", "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": "lr", "weight_decay": "wd"}),
]


@pytest.mark.parametrize(("kind", "kwargs"), VMAP_CASES, ids=[f"{k}-{kw}" for k, kw in VMAP_CASES])
def test_vmap_over_named_hyper_equals_separate_runs(kind: str, kwargs: dict[str, Any]) -> None:
    k = 4
    hyper = {
        "lr": torch.tensor([0.0, 0.01, 0.05, 0.2], dtype=DTYPE),
        "wd": torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=DTYPE),
        "mom": torch.tensor([0.0, 0.5, 0.9, 0.99], dtype=DTYPE),
    }
    opt = FACTORIES[kind][0](**kwargs)
    hyper = {n: v for n, v in hyper.items() if n in opt.hyperparams}
    assert set(hyper) == opt.hyperparams
    singles = [make_params(seed=i) for i in range(k)]
    stacked = {n: torch.stack([p[n] for p in singles]) for n in singles[0]}
    state = vmap(opt.init)(stacked)
    assert state.step.shape == (k,)
    vstep = vmap(opt.step)
    for _step in range(5):
        stacked, state = vstep(grad_fn(stacked), state, stacked, hyper)
    for i in range(k):
        params = singles[i]
        s = opt.init(params)
        h = {n: v[i] for n, v in hyper.items()}
        for _step in range(5):
            params, s = opt.step(grad_fn(params), s, params, h)
        for n in params:
            torch.testing.assert_close(stacked[n][i], params[n], rtol=0, atol=1e-13)
    torch.testing.assert_close(vmap(opt.learning_rate)(hyper), hyper["lr"])


def test_hypergradient_through_step() -> None:
    opt = sgd("lr")
    params = make_params()
    grads = grad_fn(params)
    state = opt.init(params)

    def new_w_sum(lr: torch.Tensor) -> torch.Tensor:
        new, _ = opt.step(grads, state, params, {"lr": lr})
        return new["w"].sum()

    d = grad(new_w_sum)(torch.tensor(0.1, dtype=DTYPE))
    torch.testing.assert_close(d, -grads["w"].sum())


@pytest.mark.slow
def test_compile_fullgraph_vmapped_adam() -> None:
    opt = adam(lr="lr", weight_decay=0.01)
    stacked = {"w": torch.randn(3, 2, 2, dtype=DTYPE)}
    hyper = {"lr": torch.tensor([0.01, 0.1, 0.3], dtype=DTYPE)}
    state = vmap(opt.init)(stacked)
    compiled = torch.compile(vmap(opt.step), fullgraph=True)
    eager = vmap(opt.step)
    p_c, s_c, p_e, s_e = stacked, state, stacked, state
    for _ in range(3):
        p_c, s_c = compiled(grad_fn(p_c), s_c, p_c, hyper)
        p_e, s_e = eager(grad_fn(p_e), s_e, p_e, hyper)
    torch.testing.assert_close(p_c, p_e, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_c.step, s_e.step)


# --------------------------------------------------------------------------- names and errors


def test_hyperparams_lists_exactly_the_names() -> None:
    assert sgd(0.1).hyperparams == frozenset()
    assert sgd("lr", momentum="m", dampening=0.1, weight_decay="l2").hyperparams == {
        "lr",
        "m",
        "l2",
    }
    assert adam(lr="lr").hyperparams == {"lr"}
    assert adam(betas=("b1", 0.99), eps="eps").hyperparams == {"b1", "eps"}
    assert adamw(weight_decay="wd").hyperparams == {"wd"}
    assert adamw().hyperparams == frozenset()


def test_resolve_and_learning_rate() -> None:
    assert optim.resolve(0.5, {}) == 0.5
    lr = torch.tensor(0.3)
    assert optim.resolve("lr", {"lr": lr}) is lr
    assert adam(0.02).learning_rate({}) == 0.02
    assert adam("lr").learning_rate({"lr": lr}) is lr


def test_missing_name_raises_helpful_error() -> None:
    opt = adam(lr="lr")
    params = make_params()
    msg = (
        r"optimizer hyperparameter 'lr' is not in the hyperparameters dict "
        r"\(available: 'l1', 'l2'\); pass it in the grid/strengths or give a number"
    )
    with pytest.raises(MissingHyperparameterError, match=msg):
        opt.step(grad_fn(params), opt.init(params), params, {"l1": 1.0, "l2": 2.0})
    with pytest.raises(KeyError, match=msg):
        opt.learning_rate({"l1": 1.0, "l2": 2.0})
    with pytest.raises(ValueError, match="available: none"):
        optim.resolve("lr", {})
    with pytest.raises(ValueError, match="Did you mean 'lr'"):
        optim.resolve("Lr", {"lr": 0.1})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: sgd(-0.1), r"sgd: lr must be a finite number >= 0, got -0\.1"),
        (lambda: sgd(math.nan), r"sgd: lr must be a finite number >= 0, got nan"),
        (lambda: adam(math.inf), r"adam: lr must be a finite number >= 0, got inf"),
        (lambda: sgd(0.1, momentum=-0.5), r"momentum must be a finite number >= 0, got -0\.5"),
        (lambda: sgd(0.1, weight_decay=-1), r"weight_decay must be .*>= 0, got -1\.0"),
        (lambda: sgd(0.1, nesterov=True), r"nesterov=True requires momentum > 0"),
        (
            lambda: sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True),
            r"nesterov=True requires dampening == 0, got dampening=0\.1",
        ),
        (lambda: adam(betas=(1.0, 0.9)), r"adam: betas\[0\] must be a number in \[0, 1\)"),
        (lambda: adamw(betas=(0.9, -0.1)), r"adamw: betas\[1\] must be .*got -0\.1"),
        (lambda: adam(eps=0.0), r"adam: eps must be a finite number > 0, got 0\.0"),
        (lambda: adamw(weight_decay=-0.01), r"adamw: weight_decay must be .*got -0\.01"),
        (lambda: adam(lr=""), r"adam: lr is an empty string"),
    ],
)
def test_bad_numbers_raise_value_error(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match=r"lr must be a number or the name"):
        adam(lr=torch.tensor(0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lr must be a number or the name"):
        sgd(True)
    with pytest.raises(TypeError, match=r"betas must be a pair"):
        adam(betas=(0.9,))  # type: ignore[arg-type]


def test_bad_number_from_hyper_dict_and_key_mismatch() -> None:
    opt = sgd("lr")
    params = make_params()
    with pytest.raises(ValueError, match=r"lr must be .* got -1\.0 \(from hyperparameters\['lr'\]"):
        opt.step(grad_fn(params), opt.init(params), params, {"lr": -1.0})
    grads = grad_fn(params)
    del grads["b"]
    with pytest.raises(ValueError, match=r"same keys; missing from grads: \['b'\]"):
        opt.step(grads, opt.init(params), params, {"lr": 0.1})


# --------------------------------------------------------------------------- properties

finite = st.floats(-1e3, 1e3, allow_nan=False)
unit = st.floats(0.0, 0.999)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(finite, min_size=1, max_size=6),
    momentum=unit,
    weight_decay=st.floats(0.0, 10.0),
    nesterov=st.booleans(),
)
def test_sgd_lr_zero_is_identity(
    values: list[float], momentum: float, weight_decay: float, nesterov: bool
) -> None:
    opt = sgd(0.0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0)
    params = {"p": torch.tensor(values, dtype=DTYPE)}
    state = opt.init(params)
    for _ in range(2):
        new, state = opt.step(grad_fn(params), state, params, {})
        assert torch.equal(new["p"], params["p"])


@settings(max_examples=30, deadline=None)
@given(
    grads=st.lists(finite, min_size=1, max_size=6),
    lr=st.floats(1e-6, 1.0),
    beta1=unit,
    beta2=unit,
    decoupled=st.booleans(),
)
def test_adam_first_step_bounded_by_lr(
    grads: list[float], lr: float, beta1: float, beta2: float, decoupled: bool
) -> None:
    # at t = 1 the bias-corrected moments are g and g², so |Δw| = lr |g| / (|g| + eps) <= lr
    opt = (adamw if decoupled else adam)(lr="lr", betas=(beta1, beta2), weight_decay=0.0)
    params = {"p": torch.zeros(len(grads), dtype=DTYPE)}
    g = {"p": torch.tensor(grads, dtype=DTYPE)}
    new, _ = opt.step(g, opt.init(params), params, {"lr": torch.tensor(lr, dtype=DTYPE)})
    assert torch.all(new["p"].abs() <= lr * (1 + 1e-12))
    # the move is against the gradient (or zero when |g| underflows against eps)
    assert torch.all(new["p"] * g["p"] <= 0)
    moved = g["p"].abs() > 1e-300
    assert torch.all(
        torch.sign(new["p"][moved & (new["p"] != 0)])
        == -torch.sign(g["p"][moved & (new["p"] != 0)])
    )


def test_config_records_settings_for_checkpoint_identity() -> None:
    assert dict(sgd(0.1, momentum="m").config) == {
        "name": "sgd",
        "lr": 0.1,
        "momentum": "m",
        "dampening": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
    }
    assert dict(adam(lr="lr").config)["betas"] == (0.9, 0.999)
    assert adam(1e-3).config != adam(2e-3).config
    assert dict(adamw().config)["name"] == "adamw"


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_grid_betas_of_another_dtype_under_vmap(kind: str) -> None:
    """Named betas from a float64 grid with float32 params, vmapped: each model steps as
    alone with its numbers, and the params keep their dtype (a batched tensor weight of
    ``torch.lerp`` must have the params' dtype, so a grid's β1 does not go through it)."""
    opt = FACTORIES[kind][0](lr=0.01, betas=("b1", "b2"))
    gen = torch.Generator().manual_seed(3)
    k = 3
    params = {"w": torch.randn(k, 3, 4, generator=gen), "b": torch.randn(k, 4, generator=gen)}
    hyper = {
        "b1": torch.tensor([0.8, 0.9, 0.95], dtype=torch.float64),
        "b2": torch.tensor([0.99, 0.995, 0.999], dtype=torch.float64),
    }
    state = vmap(opt.init)(params)
    for _ in range(3):
        grads = {n: torch.randn(v.shape, generator=gen) for n, v in params.items()}
        new, new_state = vmap(opt.step)(grads, state, params, hyper)
        for i in range(k):
            one = {n: v[i] for n, v in params.items()}
            s_i = tree_map(lambda t, i=i: t[i], state)
            h_i = {n: float(v[i]) for n, v in hyper.items()}
            want, _ = opt.step({n: g[i] for n, g in grads.items()}, s_i, one, h_i)
            for n in want:
                assert new[n].dtype == torch.float32
                torch.testing.assert_close(new[n][i], want[n], rtol=1e-6, atol=1e-7)
        params, state = new, new_state


def test_eager_update_only_for_the_built_in_steps() -> None:
    """The twin is found from ``config`` for the steps the factories built; an optimizer
    without config, or one that keeps a built-in config with its own step, gets none; a
    builder's own ``step_eager`` is used as given."""
    base = sgd(0.1)
    assert eager_update(base) is not None
    assert eager_update(base._replace(config=())) is None

    def own_step(grads: Any, state: Any, params: Any, hyper: Any = None) -> Any:
        return base.step(grads, state, params, hyper)

    assert eager_update(base._replace(step=own_step)) is None
    assert eager_update(base._replace(step_eager=own_step)) is own_step


def test_missing_fused_kernel_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A (device, dtype) whose fused Adam kernel raises "not implemented" is recorded once
    in ``_NO_FUSED`` and never tried again; the _foreach fallback gives the step's numbers."""
    from funcreg import _foreach

    calls = []

    def missing(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(torch, "_fused_adam_", missing)
    _foreach._NO_FUSED.clear()
    try:
        opt = adam(0.1)
        params = make_params()
        grads = grad_fn(params)
        state = opt.init(params)
        for _ in range(2):
            fast = eager_update(opt)(grads, state, params, {})
            _assert_same_tree(fast, opt.step(grads, state, params, {}), ulps=64)
        assert calls == [1] and ("cpu", DTYPE) in _foreach._NO_FUSED
    finally:
        _foreach._NO_FUSED.clear()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "opt",
    [adam(0.05, weight_decay=0.1), adamw(0.05, weight_decay=0.1), sgd(0.1, momentum=0.9)],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_donated_step_updates_the_state_in_place_with_the_same_numbers(
    opt: optim.Optimizer, dtype: torch.dtype
) -> None:
    """``eager_update(opt, donate=True)``: bitwise the copying twin's params and state, the
    state's tensors updated in place (the same storage; SGD's first step creates the
    momentum buffer), the params it is given never modified."""
    assert donates(opt)
    params = make_params(dtype=dtype)
    p1 = p2 = params
    s1 = opt.init(params)
    s2 = tree_map(torch.clone, s1)
    for i in range(STEPS):
        g = grad_fn(p1)
        p1, s1 = eager_update(opt)(g, s1, p1, {})
        given, snapshot = p2, tree_map(torch.clone, p2)
        ptrs = [t.data_ptr() for t in tree_flatten(s2)[0] if t.ndim]
        p2, s2 = eager_update(opt, donate=True)(g, s2, p2, {})
        _assert_same_tree(given, snapshot)
        if i > 0 or dict(opt.config)["name"] != "sgd":
            assert [t.data_ptr() for t in tree_flatten(s2)[0] if t.ndim] == ptrs
        _assert_same_tree((p1, s1), (p2, s2))


def test_donation_only_where_a_built_in_twin_has_state() -> None:
    opt = adam(0.1)
    assert not donates(sgd(0.1))  # no state to update
    assert not donates(opt._replace(step_eager=eager_update(opt)))  # the user's own twin
    params, g = make_params(), grad_fn(make_params())
    state = sgd(0.1).init(params)
    new_p, new_s = eager_update(sgd(0.1), donate=True)(g, state, params, {})
    _assert_same_tree((new_p, new_s), sgd(0.1).step(g, state, params, {}))


def test_donated_adam_with_groups_of_two_dtypes_equals_the_copying_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Params of two dtypes make two groups; when the second has no fused kernel (known
    before, or found when it raises) the step takes the ``_foreach`` path, which must start
    from untouched moments (found in review: the first group's were updated twice)."""
    from funcreg import _foreach

    kernel = torch._fused_adam_

    def no_float64(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        if params[0].dtype == torch.float64:
            raise NotImplementedError("_fused_adam_ not implemented for Double (test)")
        kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", no_float64)
    monkeypatch.setattr(_foreach, "_NO_FUSED", _foreach._MissingKernels())
    params = {"a": torch.randn(3, dtype=torch.float32), "b": torch.randn(3, dtype=torch.float64)}
    opt = adam(0.1)
    s1, s2 = opt.init(params), tree_map(torch.clone, opt.init(params))
    p1 = p2 = params
    for _ in range(3):
        g = grad_fn(p1)
        p2, s2 = eager_update(opt, donate=True)(g, s2, p2, {})  # first: finds the missing kernel
        p1, s1 = eager_update(opt)(g, s1, p1, {})
        _assert_same_tree((p1, s1), (p2, s2))
