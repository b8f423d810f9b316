"""fr.sweep's vmapped chunks with the optimizer update outside vmap (funcreg._stacked): the
same numbers, to the bit, as the fully vmapped step (the route before it), and to rounding as
a per-model loop of fr.train_step; per-model hyperparameters (lr, betas, step counts) reach
their own model whatever the parameter shapes; divergence stays isolated; a resumed run ends
where the uninterrupted one does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

import funcreg as fr
from funcreg import _engine, _stacked, sweep
from funcreg._data import batch_order
from funcreg._foreach import stacks
from funcreg.optim import Optimizer, adam, adamw, sgd
from funcreg.result import SweepResult
from funcreg.stack import grid
from funcreg.train import train_step

N, D, H = 40, 5, 6  # H = K of the grids below: a (K,) count against a (K, H) bias would broadcast

SPEC = fr.Spec(l2=fr.L2())  # smooth: nothing after the update, the stacked route applies


@pytest.fixture(autouse=True)
def _f64(one_thread: None) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    return x, torch.sin(x[:, :2].sum(1, keepdim=True)) + 0.1 * torch.randn(N, 1, generator=g)


def mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(D, H), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(H, 1))


def mse_of(net: nn.Module) -> Callable[..., Tensor]:
    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (x,), strict=True), y)

    return loss


def spied(opt: Optimizer, seen: list[tuple[str, ...]]) -> Optimizer:
    """``opt`` recording the keys of the params each of its steps is given: a step of its
    own under its own name, declared elementwise as ``opt`` is (a step swapped into a
    built-in optimizer's config does not stack: see the clip test below)."""

    def step(g: Any, s: Any, p: Any, h: Any = None) -> Any:
        seen.append(tuple(p))
        return opt.step(g, s, p, h)

    config = (("name", "spied"), *((k, v) for k, v in opt.config if k != "name"))
    return opt._replace(step=step, config=config)


def run(
    opt: Optimizer, g: dict[str, Tensor], vmapped_update: bool = False, **kw: Any
) -> SweepResult:
    """A sweep in one vmapped chunk of all K models (unless ``chunk_size=``);
    ``vmapped_update``: the update under vmap, as before the stacked route (``stacked_step``
    declines)."""
    x, y = data()
    net = mlp(kw.pop("dropout", 0.0))
    k = len(next(iter(g.values())))
    args: dict[str, Any] = dict(train=(x, y), steps=9, batch_size=16, chunk_size=k, progress=False)
    spec = kw.pop("spec", SPEC)
    with pytest.MonkeyPatch.context() as mp:
        if vmapped_update:
            mp.setattr(_engine, "stacked_step", lambda *a: None)
        return sweep(net, mse_of(net), spec, g, optimizer=opt, **{**args, **kw})


OPTIMIZERS = {
    "sgd": lambda: sgd(lr="lr", momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": lambda: sgd(lr=0.05, momentum="mu", nesterov=True),
    "adam": lambda: adam(lr="lr", betas=("b1", 0.99)),
    "adamw": lambda: adamw(lr="lr", weight_decay=0.1),
}
HYPER = {
    "sgd": {"lr": [0.01, 0.02, 0.05]},
    "sgd-nesterov": {"mu": [0.0, 0.5, 0.9]},
    "adam": {"lr": [0.01, 0.03, 0.1], "b1": [0.0, 0.5, 0.9]},
    "adamw": {"lr": [0.01, 0.03, 0.1]},
}


def the_grid(name: str) -> dict[str, Tensor]:
    hyper = {k: v * 2 for k, v in HYPER[name].items()}  # K = 6 = H
    return grid(l2=[0.0, 1e-3, 1e-2, 0.0, 1e-3, 1e-2], **hyper, product=False)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equals_the_vmapped_update_bit_for_bit_and_a_per_model_loop(name: str) -> None:
    g = the_grid(name)
    seen: list[tuple[str, ...]] = []
    new = run(spied(OPTIMIZERS[name](), seen), g)
    assert seen and all(keys == ("stacked",) for keys in seen)  # one update per step, stacked
    assert new.meta["chunks"] == [[0, 6]]
    old = run(OPTIMIZERS[name](), g, vmapped_update=True)
    for n in old.stacked:
        assert torch.equal(new.stacked[n], old.stacked[n]), n
    assert torch.equal(new.history["loss"], old.history["loss"])
    assert new.resume is not None and old.resume is not None
    for a, b in zip(new.resume["opt_state"], old.resume["opt_state"], strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    # a loop of one model at a time through the pure step, with the batches of the run
    opt, net, (x, y) = OPTIMIZERS[name](), mlp(), data()
    step = train_step(mse_of(net), SPEC, opt)
    for k in range(6):
        p = fr.params(net)
        s = opt.init(p)
        hyper = {n: v[k] for n, v in g.items()}
        for t in range(9):
            epoch, i = divmod(t, 3)  # 3 batches of at most 16 per epoch of 40
            perm = batch_order(N, 16, 0, epoch)
            assert perm is not None
            idx = perm[i * 16 : (i + 1) * 16]
            p, s, m = step(p, s, hyper, x[idx], y[idx])
            torch.testing.assert_close(new.history["loss"][t, k], m["loss"], rtol=0, atol=1e-13)
        for n in p:
            torch.testing.assert_close(new.stacked[n][k], p[n], rtol=0, atol=1e-13)


def test_subgradient_terms_and_other_chunks_take_the_stacked_route_too() -> None:
    """``prox=False`` (L1 by subgradient) has nothing after the update either; chunks of
    several sizes (3 + 3) each step on their own rows."""
    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
    g = grid(l1=[0.0, 1e-3, 1e-2], l2=[0.0, 1e-2], lr=[0.01], product=True)
    seen: list[tuple[str, ...]] = []
    kw: dict[str, Any] = dict(spec=spec, prox=False, chunk_size=3)
    new = run(spied(adam(lr="lr"), seen), g, **kw)
    assert seen and all(keys == ("stacked",) for keys in seen)
    old = run(adam(lr="lr"), g, vmapped_update=True, **kw)
    for n in old.stacked:
        assert torch.equal(new.stacked[n], old.stacked[n]), n
    assert torch.equal(new.history["penalty"], old.history["penalty"])


PROX_CASES = {
    "adam-l1": (lambda: adam(lr="lr"), fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())),
    "decoupled-group": (
        lambda: fr.optim.decoupled(adamw(0.05)),
        fr.Spec(g=fr.GroupLasso("0.weight", dim=1), l2=fr.L2()),
    ),
    "sgd-named-lr-l1": (lambda: sgd(lr="lr"), fr.Spec(l1=fr.L1(), box=fr.Box(lo=-0.3, hi=0.3))),
    "sgd-lr-nuclear": (lambda: sgd(0.05, momentum=0.9), fr.Spec(nuc=fr.Nuclear("0.weight"))),
}


@pytest.mark.parametrize("case", list(PROX_CASES))
def test_prox_terms_follow_the_stacked_update_bit_for_bit(case: str) -> None:
    """The prox steps (``lr`` by name or a number, or Adam's per-coordinate ``lr / d``)
    are computed on the stacked state, the prox of each model runs under vmap."""
    make, spec = PROX_CASES[case]
    strengths = {t: [0.0, 1e-3, 1e-2, 1e-1, 3e-1, 1.0] for t in spec if t != "box"}
    opt = make()
    if opt.hyperparams:
        strengths["lr"] = [0.01, 0.02, 0.05, 0.01, 0.02, 0.05]
    g = grid(**strengths, product=False)
    seen: list[tuple[str, ...]] = []
    new = run(spied(opt, seen), g, spec=spec)
    assert seen and all(keys == ("stacked",) for keys in seen)
    old = run(make(), g, spec=spec, vmapped_update=True)
    for n in old.stacked:
        assert torch.equal(new.stacked[n], old.stacked[n]), n
    for key in ("loss", "penalty"):
        assert torch.equal(new.history[key], old.history[key])
    assert torch.equal(new.history["zeros"]["0.weight"], old.history["zeros"]["0.weight"])
    assert new.resume is not None and old.resume is not None
    for a, b in zip(new.resume["opt_state"], old.resume["opt_state"], strict=True):
        assert torch.equal(a, b)


def test_optimizers_not_elementwise_keep_the_vmapped_step() -> None:
    seen: list[tuple[str, ...]] = []
    bare = adam(0.01)._replace(elementwise=False)
    g = grid(l2=[0.0, 1e-2, 1e-1])
    new = run(spied(bare, seen), g)
    assert seen and ("stacked",) not in seen  # one model's step, under vmap
    old = run(adam(0.01), g, vmapped_update=True)
    for n in old.stacked:
        assert torch.equal(new.stacked[n], old.stacked[n]), n


def test_a_step_swapped_into_a_built_in_optimizer_does_not_stack() -> None:
    """A per-model gradient clip swapped in with ``_replace`` keeps ``elementwise=True`` but
    is not elementwise across models: the chunk keeps the vmapped step, so the results equal
    a per-model loop and a diverging model stays alone."""
    base = sgd("lr")

    def clipped(g: Any, s: Any, p: Any, h: Any = None) -> Any:
        norm = torch.sqrt(sum((v * v).sum() for v in g.values()))
        scale = torch.clamp(1.0 / (norm + 1e-12), max=1.0)
        return base.step({n: v * scale for n, v in g.items()}, s, p, h)

    opt = base._replace(step=clipped)
    assert opt.elementwise and not stacks(opt) and stacks(base)
    l2 = [0.0, 1e-3]
    mixed = run(opt, grid(lr=[0.05, 1e300], l2=l2), steps=6)
    alone = run(opt, grid(lr=[0.05], l2=l2), steps=6)
    assert mixed.diverged.tolist() == [False, False, True, True]
    for i in range(2):
        for n, v in alone.params(i).items():
            assert torch.allclose(mixed.params(i)[n], v, rtol=1e-12, atol=1e-14), n


def test_optimizers_declare_elementwise() -> None:
    assert sgd(0.1).elementwise and adam().elementwise and adamw().elementwise
    assert fr.optim.decoupled(adam()).elementwise
    base = adam()
    assert not Optimizer(base.init, base.step, base.hyperparams, base.learning_rate).elementwise


def test_divergence_is_isolated_bit_for_bit() -> None:
    """Half the models blow up (lr 1e15): the others end as in a sweep without them, and the
    blown-up ones keep the params and momentum state of their last finite step."""
    l2 = [0.0, 1e-3, 1e-2]
    opt = sgd(lr="lr", momentum=0.5)
    bad = run(opt, grid(lr=[0.01, 1e15], l2=l2), steps=7)
    good = run(opt, grid(lr=[0.01], l2=l2), steps=7)
    assert bad.diverged.tolist() == [False] * 3 + [True] * 3
    assert bad.resume is not None and good.resume is not None
    for n in good.stacked:
        assert torch.equal(bad.stacked[n][:3], good.stacked[n])
        assert torch.isfinite(bad.stacked[n]).all()
    assert torch.equal(bad.history["loss"][:, :3], good.history["loss"])
    for sb, sg in zip(bad.resume["opt_state"], good.resume["opt_state"], strict=True):
        assert torch.equal(sb[:3], sg)
        assert torch.isfinite(sb).all()
    for k in range(3, 6):
        t = int(bad.diverged_at[k])
        assert 1 <= t < 7
        assert float(bad.resume["opt_state"][0][k]) == float(t)  # its count froze
        stopped = run(opt, grid(lr=[0.01, 1e15], l2=l2), steps=t)
        assert stopped.resume is not None
        for n in stopped.stacked:
            assert torch.equal(bad.stacked[n][k], stopped.stacked[n][k]), n
        for sb, ss in zip(bad.resume["opt_state"], stopped.resume["opt_state"], strict=True):
            assert torch.equal(sb[k], ss[k])


def test_checkpoint_resume_equals_uninterrupted(tmp_path: Any) -> None:
    g = grid(l2=[0.0, 1e-3, 1e-2, 1e-1], lr=[0.02, 0.05], product=True)
    kw: dict[str, Any] = dict(val=data(1), eval_every=3, dropout=0.2)
    full = run(adam(lr="lr"), g, steps=12, **kw)
    path = tmp_path / "ck.pt"
    first = run(adam(lr="lr"), g, steps=6, checkpoint=path, **kw)
    assert first.steps == 6
    resumed = run(adam(lr="lr"), g, steps=12, checkpoint=path, **kw)
    for n in full.stacked:
        assert torch.equal(resumed.stacked[n], full.stacked[n])
    for key in ("loss", "val_loss"):
        assert torch.equal(resumed.history[key], full.history[key])
    assert full.resume is not None and resumed.resume is not None
    for a, b in zip(full.resume["opt_state"], resumed.resume["opt_state"], strict=True):
        assert torch.equal(a, b)
    # the result's tensors are plain (contiguous) tensors, not views of the run's buffers
    leaves = tree_flatten((full.stacked, full.resume["opt_state"]))[0]
    assert all(t.is_contiguous() for t in leaves)


def test_join_finds_the_tensor_behind_its_views_and_concatenates_anything_else() -> None:
    params = {"a": torch.randn(4, 3, 2), "b": torch.randn(4), "c": torch.randn(4, 5)}
    layout = _stacked._Layout(params)
    flat = layout.join(params)
    assert flat is not None and flat.shape == (4, 6 + 1 + 5)
    views = layout.split(flat)
    for n in params:
        assert torch.equal(views[n], params[n])
    assert layout.join(views) is flat  # no copy
    swapped = {"a": views["a"], "b": views["b"], "c": views["c"].clone()}
    again = layout.join(swapped)
    assert again is not flat and again is not None and torch.equal(again, flat)
    assert layout.join({"a": views["a"], "c": views["c"], "b": views["b"]}) is None
    assert layout.join({**views, "b": views["b"].float()}) is None


def test_tiled_proves_the_views_cover_their_tensor_exactly() -> None:
    flat = torch.randn(3, 10)
    layout = _stacked._Layout({"a": torch.zeros(3, 2, 2), "b": torch.zeros(3, 6)})
    views = layout.split(flat)
    assert _stacked.tiled(list(views.values())) is flat
    assert _stacked.finite_check_tensors(views) == [flat]
    assert _stacked.tiled([views["b"], views["a"]]) is None  # out of order
    assert _stacked.tiled([views["a"]]) is None  # part of the row only
    assert _stacked.tiled([flat[:, :4].view(3, 2, 2), flat[:, 5:].reshape(3, 5)]) is None
    assert _stacked.tiled([flat[:2, :4].view(2, 2, 2), flat[:2, 4:]]) is None  # rows missing
    plain = {"a": torch.zeros(3, 2, 2), "b": torch.zeros(3, 6)}
    assert _stacked.finite_check_tensors(plain) == list(plain.values())
