"""fr.sweep checks its data, init and loss once, on the first batch, before training: misuses
that used to train nothing, report divergence of every model, or fail after the whole
training now fail at once, naming the argument, tensor or index and the fix."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr

D = 3


def make(n: int = 24) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    y = x.sum(1, keepdim=True)
    torch.manual_seed(0)
    return nn.Linear(D, 1), x, y


def good_loss(net: nn.Module) -> Any:
    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, p, (x,), strict=True), y)

    return loss


SPEC = fr.Spec(l2=fr.L2())
K8 = fr.grid(l2=torch.logspace(-4, -1, 8))  # vmapped chunks on every route
K2 = fr.grid(l2=[1e-3, 1e-2])  # one model at a time on CPU


def run(net: nn.Module, loss: Any, grid: Any = K8, **kw: Any) -> fr.SweepResult:
    kw = {"optimizer": fr.optim.sgd(0.05), "steps": 3, "progress": False, **kw}
    return fr.sweep(net, loss, SPEC, grid, **kw)


# ------------------------------------------------------------- a loss that ignores params


@pytest.mark.parametrize("grid", [K8, K2], ids=["vmapped", "one-by-one"])
def test_loss_through_the_modules_own_weights_is_refused_before_training(grid: Any) -> None:
    net, x, y = make()
    calls = [0]

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        calls[0] += 1
        return F.mse_loss(net(xb), yb)  # net(x), not functional_call(net, p, ...)

    with pytest.raises(ValueError, match=r"loss_fn .*loss that does not depend on its "
                       r"params.*functional_call\(net, params"):  # fmt: skip
        run(net, loss, grid, train=(x, y))
    assert calls[0] == 1  # refused on the first call, before any training step


def test_detached_loss_is_refused() -> None:
    net, x, y = make()

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return good_loss(net)(p, xb, yb).detach()

    with pytest.raises(ValueError, match=r"does not depend on its params.*functional_call"):
        run(net, loss, train=(x, y))


def test_zero_gradient_at_init_is_not_a_false_positive() -> None:
    """The rule is structural: a loss whose params are in its graph passes even when every
    gradient is exactly zero there (all-zero init of a ReLU net), and trains."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 4), nn.ReLU(), nn.Linear(4, 1))
    for p in net.parameters():
        nn.init.zeros_(p)
    _, x, y = make()
    r = run(net, good_loss(net), train=(x, y))
    assert r.steps == 3 and not bool(r.diverged.any())


# ------------------------------------------------------------------ NaN/inf up front


def test_nan_in_the_data_names_the_tensor_and_index() -> None:
    net, x, y = make()
    y = y.clone()
    y[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"train\[1\] contains NaN or inf \(first at index "
                       r"\[5, 0\]: nan\); every model would diverge"):  # fmt: skip
        run(net, good_loss(net), train=(x, y))
    xv = x.clone()
    xv[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"val\[0\] contains NaN or inf \(first at index \[2, 1\]"):
        run(net, good_loss(net), train=(x, y.nan_to_num()), val=(xv, y.nan_to_num()))


def test_nan_in_a_batch_of_an_iterable_names_the_batch() -> None:
    net, x, y = make()
    x = x.clone()
    x[1, 2] = float("inf")
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    with pytest.raises(ValueError, match=r"train batch 0, tensor \[0\] contains NaN or inf "
                       r"\(first at index \[1, 2\]: inf\)"):  # fmt: skip
        run(net, good_loss(net), train=batches)


def test_nan_in_the_init_names_the_parameter() -> None:
    net, x, y = make()
    with torch.no_grad():
        net.weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the model's parameter 'weight' contains NaN or inf "
                       r"\(first at index \[0, 1\].*reset_parameters"):  # fmt: skip
        run(net, good_loss(net), train=(x, y))
    net2, _, _ = make()
    init = fr.stack_modules([make()[0] for _ in range(8)])[0]
    init["bias"][3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"init\['bias'\] \(model axis first\) contains NaN or "
                       r"inf \(first at index \[3, 0\].*fix init="):  # fmt: skip
        run(net2, good_loss(net2), train=(x, y), init=init)


# ----------------------------------------------------- data and loss on the first batch


def test_a_list_x_y_is_refused_with_the_tuple_fix() -> None:
    net, x, y = make()
    with pytest.raises(TypeError, match=r"train= is a list of 2 tensors .* reads as 2 batches.*"
                       r"train=\(x, y\)"):  # fmt: skip
        run(net, good_loss(net), train=[x, y])


def test_val_with_too_few_tensors_fails_before_training() -> None:
    net, x, y = make()
    calls = [0]
    inner = good_loss(net)

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        calls[0] += 1
        return inner(p, xb, yb)

    with pytest.raises(
        ValueError, match=r"loss_fn .*cannot take a val batch.*val=\(x_val, y_val\)"
    ):
        run(net, loss, train=(x, y), val=(x,), steps=50)
    assert calls[0] == 1  # the first-batch check only


def test_val_targets_of_another_shape_fail_before_training() -> None:
    net, x, y = make()
    with pytest.raises(ValueError, match=r"val\[1\] holds samples of shape \(\).*train\[1\] of "
                       r"shape \(1,\).*same kind of tensors"):  # fmt: skip
        run(net, good_loss(net), train=(x, y), val=(x, y[:, 0]))


def test_params_batch_signature_is_refused_with_the_fix() -> None:
    net, x, y = make()

    def loss(p: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        return good_loss(net)(p, *batch)

    with pytest.raises(ValueError, match=r"loss_fn .*loss\(p: .*batch: .*cannot take a train "
                       r"batch.*loss_fn\(params, x, y\)"):  # fmt: skip
        run(net, loss, train=(x, y))


def test_broadcast_target_shape_is_refused() -> None:
    net, x, y = make()
    with pytest.raises(ValueError, match=r"broadcasts its target.*y\.view\(-1, 1\)"):
        run(net, good_loss(net), train=(x, y[:, 0]))  # (N,) target for an (N, 1) output


@pytest.mark.parametrize("grid", [K8, K2], ids=["vmapped", "one-by-one"])
def test_item_and_shape_one_losses_are_refused_on_every_route(grid: Any) -> None:
    net, x, y = make()

    def item(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Any:
        return good_loss(net)(p, xb, yb).item()

    def shape_one(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return good_loss(net)(p, xb, yb).reshape(1)

    with pytest.raises(ValueError, match=r"loss_fn .*item.* returned a float.*not \.item"):
        run(net, item, grid, train=(x, y))
    with pytest.raises(ValueError, match=r"returned a tensor of shape \(1,\).*\.squeeze"):
        run(net, shape_one, grid, train=(x, y))


def test_the_first_batch_check_reads_the_batch_the_run_trains_on() -> None:
    """The check reads the first batch as the run does (a shuffling DataLoader draws its
    order from the seeded RNG), so the first step trains on the very batch it checked."""
    net, x, y = make(40)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )
    seen: list[Tensor] = []
    inner = good_loss(net)

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        seen.append(xb)
        return inner(p, xb, yb)

    run(net, loss, K2, train=loader, steps=2, seed=5)
    # the checked batch is the one the first step trains on (reproducible from the seed)
    assert torch.equal(seen[0], seen[1])
    r1 = run(net, good_loss(net), K2, train=loader, steps=4, seed=5)
    r2 = run(net, good_loss(net), K2, train=loader, steps=4, seed=5)
    assert torch.equal(r1.stacked["weight"], r2.stacked["weight"])


def test_one_shot_iterator_is_not_read_twice() -> None:
    net, x, y = make()
    gen = ((x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4))
    r = run(net, good_loss(net), K2, train=gen, steps=6)
    assert r.steps == 6


def test_the_check_leaves_the_global_rng_as_it_was() -> None:
    """Dropout in the checked forward draws from a forked RNG."""
    _, x, y = make()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run(net, good_loss(net), K2, train=(x, y), steps=2)
    assert torch.equal(torch.get_rng_state(), before)


def test_other_warnings_of_the_loss_are_passed_on() -> None:
    net, x, y = make()
    inner = good_loss(net)

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        warnings.warn("my loss says hello", UserWarning, stacklevel=1)
        return inner(p, xb, yb)

    with pytest.warns(UserWarning, match="my loss says hello"):
        run(net, loss, K2, train=(x, y), steps=1)


# ------------------------------------------------------------ one list of sweep options


def test_sweep_args_is_the_one_list_of_sweep_options() -> None:
    """fr.sweep spells its keyword arguments out for its readers; SweepArgs is their one
    list (prepare and every shard of funcreg.distributed.sweep read it): same names, same
    defaults."""
    import inspect

    from funcreg._setup import SweepArgs
    from funcreg._sweep import sweep

    params = inspect.signature(sweep).parameters
    public = {
        n: p.default
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "distributed"
    }
    fields = {
        f.name: (f.default if f.default is not inspect.Parameter.empty else None)
        for f in __import__("dataclasses").fields(SweepArgs)
        if f.name in SweepArgs.keywords()
    }
    assert list(public) == sorted(public, key=list(public).index)
    assert set(public) == set(fields)
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert SweepArgs.names()[:4] == positional == ["model", "loss_fn", "spec", "grid"]
    for n, default in public.items():
        want = fields[n] if default is not inspect.Parameter.empty else None
        assert (default if default is not inspect.Parameter.empty else None) == want, n


def test_distributed_sweep_refuses_a_misspelled_option() -> None:
    import funcreg.distributed as frd

    net, x, y = make()
    with pytest.raises(TypeError, match=r"unexpected keyword 'step'; did you mean 'steps'"):
        frd.sweep(net, good_loss(net), SPEC, K2, train=(x, y), optimizer=fr.optim.sgd(0.1),
                  step=3)  # fmt: skip
