"""fr.sweep: equivalence with per-model training, chunking, buffers, divergence, resume."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

import funcreg as fr
from funcreg import sweep
from funcreg._chunking import auto_chunk_size
from funcreg._chunking import plan_chunks as _plan_chunks
from funcreg._data import batch_order
from funcreg.optim import adam, sgd
from funcreg.result import SweepResult
from funcreg.stack import grid, stack
from funcreg.train import eager_step, train_step

N, D = 48, 5


@pytest.fixture
def f64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def data(seed: int = 0, n: int = N) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = torch.sin(x[:, :2].sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def mlp(bn: bool = False, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(D, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, 1))
    return nn.Sequential(*layers)


def mse_of(net: nn.Module) -> Callable[..., Tensor]:
    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (x,), strict=True), y)

    return loss


SPEC = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())


def batches(steps: int, bs: int, seed: int = 0) -> list[Tensor]:
    """The sample indices of each step's minibatch, by the documented seeding rule."""
    return [torch.tensor(b) for b in _documented_order(N, bs, seed, steps)]


# ------------------------------------------------------------------------- equivalence


def test_equals_separate_functional_runs(f64: None) -> None:
    x, y = data()
    net = mlp().double()
    g = grid(l1=[0.0, 1e-3, 1e-2, 0.5], l2=1e-3)
    opt = adam(0.05)
    steps, bs = 9, 16
    r = sweep(
        net,
        mse_of(net),
        SPEC,
        g,
        train=(x, y),
        optimizer=opt,
        steps=steps,
        batch_size=bs,
        progress=False,
    )
    assert r.steps == steps and r.history["loss"].shape == (steps, 4)
    step = train_step(mse_of(net), SPEC, opt, prox=True)
    for k in range(4):
        p = fr.params(net)
        s = opt.init(p)
        strengths = {n: v[k] for n, v in g.items()}
        losses = []
        for idx in batches(steps, bs):
            p, s, m = step(p, s, strengths, x[idx], y[idx])
            losses.append(m["loss"])
        for n in p:
            torch.testing.assert_close(r.stacked[n][k], p[n], rtol=0, atol=1e-12)
        torch.testing.assert_close(r.history["loss"][:, k], torch.stack(losses), rtol=0, atol=1e-12)
    zeros = r.history["zeros"]["0.weight"][-1]
    assert zeros[0] == 0 and zeros[-1] > 0  # prox gives exact zeros, more with strength


def _documented_order(n: int, bs: int, seed: int, steps: int) -> list[list[int]]:
    """The minibatches of the first ``steps`` steps by the seeding rule, written out here
    (not through ``batch_order``): epoch ``e`` is ``torch.randperm(n)`` drawn from a
    generator seeded with ``seed * 1_000_003 + e``, cut into batches of ``bs`` (the last one
    shorter). The rule is part of a run's identity: changing it changes every seeded run."""
    per_epoch = -(-n // bs)
    out = []
    for t in range(steps):
        epoch, i = divmod(t, per_epoch)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(torch.randperm(n, generator=gen)[i * bs : (i + 1) * bs].tolist())
    return out


@pytest.mark.parametrize("seed", [0, 5])
def test_the_minibatches_fed_to_the_loss_follow_the_seeded_epoch_order(seed: int) -> None:
    """The batches the loss actually sees (one model, no vmap: the loss logs the sample
    indices it gets) over three epochs: each epoch is a permutation of the samples, every
    epoch has its own order, and they are the documented seeded permutations."""
    x, y = data()
    idx = torch.arange(N)
    net = mlp()
    seen: list[list[int]] = []

    def logging_loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor, ib: Tensor) -> Tensor:
        seen.append(ib.tolist())
        return mse_of(net)(params, xb, yb)

    bs, steps = 20, 7  # 3 batches per epoch (20, 20, 8): epochs 0, 1 and one batch of 2
    sweep(net, logging_loss, SPEC, grid(l1=[1e-3], l2=1e-3), train=(x, y, idx),
          optimizer=sgd(0.01), steps=steps, batch_size=bs, chunk_size=1, seed=seed,
          progress=False)  # fmt: skip
    check, seen = seen[0], seen[1:]  # the up-front check reads the first batch once
    assert check == seen[0]
    assert seen == _documented_order(N, bs, seed, steps)
    assert [len(b) for b in seen] == [20, 20, 8] * 2 + [20]
    epochs = [sum(seen[3 * e : 3 * e + 3], []) for e in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(N))  # every sample once per epoch
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert seen[6] != seen[0] and seen[6] != seen[3]
    assert batch_order(N, bs, seed, 1).tolist() == epochs[1]  # type: ignore[union-attr]


def test_sgd_equals_torch_optim_loop_with_handwritten_penalty(f64: None) -> None:
    x, y = data()
    net = mlp().double()
    lams, lrs = [0.0, 3e-3, 3e-2], [0.05, 0.2]
    g = grid(lam=lams, lr=lrs)
    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
    grid_ = {"l1": g["lam"], "l2": 2 * g["lam"], "lr": g["lr"]}  # funcreg L2 is ½Σw²
    steps, bs = 8, 12
    r = sweep(
        net,
        mse_of(net),
        spec,
        grid_,
        train=(x, y),
        optimizer=sgd(lr="lr"),
        steps=steps,
        batch_size=bs,
        prox=False,
        progress=False,
    )
    for k in range(len(g["lam"])):
        lam, lr = float(g["lam"][k]), float(g["lr"][k])
        m = copy.deepcopy(net)
        o = torch.optim.SGD(m.parameters(), lr=lr)
        for idx in batches(steps, bs):
            weights = [m[0].weight, m[2].weight]
            loss = F.mse_loss(m(x[idx]), y[idx]) + lam * m[0].weight.abs().sum()
            loss = loss + lam * sum(w.pow(2).sum() for w in weights)
            o.zero_grad()
            loss.backward()
            o.step()
        for n, p in m.named_parameters():
            torch.testing.assert_close(r.stacked[n][k], p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_chunking_matches_unchunked(f64: None, chunk_size: int) -> None:
    x, y = data()
    net = mlp().double()
    g = grid(l1=[0.0, 1e-3, 1e-2, 3e-2, 1e-1], l2=1e-3)  # K = 5
    kw: dict[str, Any] = dict(
        train=(x, y), val=data(1), optimizer=adam(0.05), steps=6, batch_size=16, progress=False
    )
    full = sweep(net, mse_of(net), SPEC, g, chunk_size=5, **kw)
    part = sweep(net, mse_of(net), SPEC, g, chunk_size=chunk_size, **kw)
    plans = {1: [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]], 2: [[0, 2], [2, 4], [4, 5]],
             3: [[0, 3], [3, 5]]}  # fmt: skip
    assert part.meta["chunks"] == plans[chunk_size]  # balanced: sizes differ by at most one
    sizes = [b - a for a, b in plans[chunk_size]]
    for n in full.stacked:
        if min(sizes) >= 2:  # vmapped chunks: bit for bit
            assert torch.equal(part.stacked[n], full.stacked[n])
        else:  # chunks of one model run without vmap: float rounding
            torch.testing.assert_close(part.stacked[n], full.stacked[n], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        part.history["val_loss"], full.history["val_loss"], rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_batchnorm_equals_module_loop(f64: None, chunk_size: int) -> None:
    x, y = data()
    xv, yv = data(1)
    net = mlp(bn=True).double()
    g = grid(l2=[0.0, 1e-2, 1e-1])
    spec = fr.Spec(l2=fr.L2())
    steps, bs = 7, 16
    r = sweep(
        net,
        mse_of(net),
        spec,
        g,
        train=(x, y),
        val=(xv, yv),
        optimizer=sgd(0.1, momentum=0.5),
        steps=steps,
        batch_size=bs,
        prox=False,
        chunk_size=chunk_size,
        progress=False,
    )
    assert net.training  # the swept module's mode is untouched
    for k, lam in enumerate(g["l2"].tolist()):
        m = copy.deepcopy(net)
        o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5)
        for idx in batches(steps, bs):
            loss = F.mse_loss(m(x[idx]), y[idx])
            loss = loss + lam / 2 * (m[0].weight.pow(2).sum() + m[3].weight.pow(2).sum())
            o.zero_grad()
            loss.backward()
            o.step()
        for n, p in m.named_parameters():
            torch.testing.assert_close(r.stacked[n][k], p.detach(), rtol=0, atol=1e-12)
        for n, b in m.named_buffers():
            torch.testing.assert_close(r.stacked_buffers[n][k], b, rtol=0, atol=1e-12)
        m.eval()
        with torch.no_grad():
            val = F.mse_loss(m(xv), yv)
        torch.testing.assert_close(r.history["val_loss"][-1, k], val, rtol=0, atol=1e-12)
        m2 = r.module(k).eval()
        with torch.no_grad():
            torch.testing.assert_close(m2(xv), m(xv), rtol=0, atol=1e-12)


def test_iterable_data_equals_tensor_data(f64: None) -> None:
    x, y = data()
    net = mlp().double()
    g = grid(l1=[1e-3, 1e-2], l2=0.0)
    steps, bs = 5, 16
    kw: dict[str, Any] = dict(optimizer=adam(0.05), steps=steps, progress=False)
    a = sweep(net, mse_of(net), SPEC, g, train=(x, y), batch_size=bs, **kw)
    loader = [(x[idx], y[idx]) for idx in batches(steps, bs)]
    b = sweep(net, mse_of(net), SPEC, g, train=loader, **kw)
    for n in a.stacked:
        assert torch.equal(a.stacked[n], b.stacked[n])
    # epochs= with tensor data: ceil(48 / 20) = 3 steps per epoch
    c = sweep(
        net,
        mse_of(net),
        SPEC,
        g,
        train=(x, y),
        batch_size=20,
        epochs=2,
        optimizer=adam(0.05),
        progress=False,
    )
    assert c.steps == 6


def test_different_inits_equal_single_model_sweeps(f64: None) -> None:
    from funcreg.stack import stack_modules

    x, y = data()
    nets = [mlp(bn=True).double()]
    torch.manual_seed(1)
    nets.append(nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)))
    nets[1].double()[1].running_mean.fill_(0.5)
    g = grid(l1=[1e-2, 1e-2], l2=1e-3)
    # SGD: Adam would blow up the rounding noise in the gradient of 0.bias (zero before BN)
    kw: dict[str, Any] = dict(train=(x, y), optimizer=sgd(0.1), steps=4, batch_size=16)
    both = sweep(nets[0], mse_of(nets[0]), SPEC, g, init=stack_modules(nets), progress=False, **kw)
    for k, net in enumerate(nets):  # K = 1: one model, no vmap
        one = sweep(net, mse_of(net), SPEC, grid(l1=1e-2, l2=1e-3), progress=False, **kw)
        assert one.K == 1 and one.meta["chunks"] == [[0, 1]]
        for n in one.stacked:
            torch.testing.assert_close(both.stacked[n][k], one.stacked[n][0], rtol=0, atol=1e-12)
        for n in one.stacked_buffers:
            torch.testing.assert_close(
                both.stacked_buffers[n][k], one.stacked_buffers[n][0], rtol=0, atol=1e-12
            )


def test_dataloader_train_and_val(f64: None) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data()
    xv, yv = data(1)
    net = mlp().double()
    g = grid(l1=[1e-3, 1e-2], l2=0.0)
    kw: dict[str, Any] = dict(optimizer=adam(0.05), epochs=2, progress=False)
    a = sweep(net, mse_of(net), SPEC, g, train=(x, y), val=(xv, yv), batch_size=N, **kw)
    # full-batch loader for training, a 3-batch loader for validation (weighted mean)
    b = sweep(
        net,
        mse_of(net),
        SPEC,
        g,
        train=DataLoader(TensorDataset(x, y), batch_size=N),
        val=DataLoader(TensorDataset(xv, yv), batch_size=16),
        **kw,
    )
    assert b.steps == 2
    for n in a.stacked:
        assert torch.equal(a.stacked[n], b.stacked[n])
    torch.testing.assert_close(b.history["val_loss"], a.history["val_loss"], rtol=1e-12, atol=0)


def test_dropout_models_get_independent_masks() -> None:
    x, y = data()
    net = mlp(dropout=0.5)
    g = grid(l1=[1e-3, 1e-3], l2=0.0)
    r = sweep(
        net, mse_of(net), SPEC, g, train=(x, y), optimizer=adam(0.05), steps=3, progress=False
    )
    assert not torch.equal(r.stacked["0.weight"][0], r.stacked["0.weight"][1])
    again = sweep(
        net, mse_of(net), SPEC, g, train=(x, y), optimizer=adam(0.05), steps=3, progress=False
    )
    assert torch.equal(r.stacked["0.weight"], again.stacked["0.weight"])  # seeded


def test_sweep_seeds_dropout_and_restores_the_callers_rng() -> None:
    """``seed=`` fixes the dropout masks whatever the global RNG holds, and the caller's RNG
    stream continues after the sweep as if it had not run."""
    x, y = data()
    net = mlp(dropout=0.5)
    g = grid(l1=[1e-3], l2=0.0)
    kw: dict[str, Any] = dict(train=(x, y), optimizer=adam(0.05), steps=3, progress=False)
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    a = sweep(net, mse_of(net), SPEC, g, seed=7, **kw)
    assert torch.equal(torch.rand(4), expected_next)
    torch.manual_seed(999)
    b = sweep(net, mse_of(net), SPEC, g, seed=7, **kw)
    c = sweep(net, mse_of(net), SPEC, g, seed=8, **kw)
    assert torch.equal(a.stacked["0.weight"], b.stacked["0.weight"])
    assert not torch.equal(a.stacked["0.weight"], c.stacked["0.weight"])


# --------------------------------------------------------------------------- divergence


def test_divergence_is_isolated_bit_for_bit() -> None:
    x, y = data()
    net = mlp()
    spec = fr.Spec(l1=fr.L1("0.weight"))
    kw: dict[str, Any] = dict(
        train=(x, y), optimizer=sgd(lr="lr"), steps=12, batch_size=16, progress=False
    )
    l1 = [0.0, 1e-3, 3e-3, 1e-2, 3e-2]  # K = 5 and 10: both grids run vmapped, in one chunk
    bad = sweep(net, mse_of(net), spec, grid(lr=[0.05, 1e5], l1=l1), **kw)
    good = sweep(net, mse_of(net), spec, grid(lr=[0.05], l1=l1), **kw)
    assert bad.diverged.tolist() == [False] * 5 + [True] * 5
    assert good.diverged.sum() == 0 and (good.diverged_at == -1).all()
    for n in good.stacked:  # the healthy models do not notice
        assert torch.equal(bad.stacked[n][:5], good.stacked[n])
        assert torch.isfinite(bad.stacked[n]).all()  # frozen at their last finite values
    assert torch.equal(bad.history["loss"][:, :5], good.history["loss"])
    for k in range(5, 10):
        t = int(bad.diverged_at[k])
        assert 0 <= t < 12
        assert torch.isnan(bad.history["loss"][t:, k]).all()
        assert torch.isfinite(bad.history["loss"][:t, k]).all()
    assert "diverged@" in bad.table()
    assert bad.best(metric="loss").index < 5


@pytest.mark.parametrize(
    ("chunk_size", "donate_min"),
    [(None, None), (1, None), (1, 0)],
    ids=["vmapped", "one-by-one", "one-by-one-donated"],
)
def test_diverged_models_keep_their_last_finite_params_and_optimizer_state(
    chunk_size: int | None, donate_min: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that diverges at step ``t`` ends with the params AND the Adam state (step
    count, first and second moments) it had after step ``t - 1``: those of the same sweep
    stopped after ``t`` steps. The healthy models end as in a sweep without the bad ones.
    Also where a lone model's step updates its state in place (``DONATE_MIN_NUMEL``)."""
    if donate_min is not None:
        monkeypatch.setattr(fr.train, "DONATE_MIN_NUMEL", donate_min)
    x, y = data()
    net = mlp()
    spec = fr.Spec(l1=fr.L1("0.weight"))
    kw: dict[str, Any] = dict(
        train=(x, y), optimizer=adam(lr="lr"), batch_size=16, chunk_size=chunk_size,
        progress=False,
    )  # fmt: skip
    l1 = [0.0, 1e-3, 1e-2, 3e-2, 1e-1]  # K = 5 and 10: both grids in one vmapped chunk
    steps = 7
    bad = sweep(net, mse_of(net), spec, grid(lr=[0.01, 1e15], l1=l1), steps=steps, **kw)
    good = sweep(net, mse_of(net), spec, grid(lr=[0.01], l1=l1), steps=steps, **kw)
    assert bad.diverged.tolist() == [False] * 5 + [True] * 5
    assert bad.resume is not None and good.resume is not None
    state_bad, state_good = bad.resume["opt_state"], good.resume["opt_state"]
    assert len(state_bad) == 1 + 2 * len(good.stacked)  # Adam: step count, m and v per param
    for n in good.stacked:
        assert torch.equal(bad.stacked[n][:5], good.stacked[n])
    for sb, sg in zip(state_bad, state_good, strict=True):
        assert torch.equal(sb[:5], sg)
    assert state_bad[0][:5].tolist() == [float(steps)] * 5  # the healthy ones took every step
    stopped_at: dict[int, SweepResult] = {}
    for k in range(5, 10):
        t = int(bad.diverged_at[k])
        assert 1 <= t < steps
        # Adam's step count froze at the t steps taken before the one that diverged
        assert float(state_bad[0][k]) == float(t)
        if t not in stopped_at:
            stopped_at[t] = sweep(
                net, mse_of(net), spec, grid(lr=[0.01, 1e15], l1=l1), steps=t, **kw
            )
        stopped = stopped_at[t]
        assert not bool(stopped.diverged[k])
        assert stopped.resume is not None
        for n in stopped.stacked:
            assert torch.equal(bad.stacked[n][k], stopped.stacked[n][k]), n
        for j, (sb, ss) in enumerate(zip(state_bad, stopped.resume["opt_state"], strict=True)):
            assert torch.isfinite(sb[k]).all(), j
            assert torch.equal(sb[k], ss[k]), j


def test_a_lone_model_that_overflows_from_finite_gradients_keeps_its_params_and_frozen_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Donated state (forced on a small model): a learning rate near float32's range
    overflows the params from finite gradients. The model keeps its last finite params
    (bitwise those of the copying run); its optimizer state is that of the overflowing
    step (documented on ``eager_step``) and then stays frozen: a dead model steps on copies
    (found in review: its moments drifted every step)."""
    x, y = data()
    net = mlp()
    kw: dict[str, Any] = dict(
        train=(x, y), optimizer=adam(lr="lr"), batch_size=16, chunk_size=1, progress=False
    )
    g = grid(lr=[0.01, 3e38], l1=1e-3)  # the prox's step overflows at step 0
    spec = fr.Spec(l1=fr.L1("0.weight"))
    runs = {}
    for donate_min, steps in ((10**12, 6), (0, 6), (0, 3)):
        monkeypatch.setattr(fr.train, "DONATE_MIN_NUMEL", donate_min)
        runs[donate_min, steps] = sweep(net, mse_of(net), spec, g, steps=steps, **kw)
    copying, donated, early = runs[10**12, 6], runs[0, 6], runs[0, 3]
    assert donated.diverged.tolist() == copying.diverged.tolist() == [False, True]
    assert int(donated.diverged_at[1]) == int(copying.diverged_at[1]) < 3
    for n in copying.stacked:
        assert torch.equal(donated.stacked[n], copying.stacked[n])
    torch.testing.assert_close(
        donated.history["loss"], copying.history["loss"], rtol=0, atol=0, equal_nan=True
    )
    assert donated.resume is not None and early.resume is not None and copying.resume is not None
    late, soon = donated.resume["opt_state"], early.resume["opt_state"]
    ref = copying.resume["opt_state"]
    assert torch.equal(late[0], ref[0])  # the step counts froze where the copying run's did
    for a, b, r in zip(late, soon, ref, strict=True):
        assert torch.equal(a[0], r[0])  # the healthy model: untouched by donation
        assert torch.equal(a[1], b[1]) and torch.isfinite(a[1]).all()  # no drift once dead


# ------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["auto", "one-by-one-donated"])
def test_checkpoint_resume_equals_uninterrupted(
    tmp_path: Any, chunk_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = data()
    net = mlp(dropout=0.2)  # exercises the saved RNG state too
    g = grid(l1=[1e-3, 1e-2, 1e-1], l2=1e-3)
    kw: dict[str, Any] = dict(
        train=(x, y), val=data(1), optimizer=adam(0.02), batch_size=16, eval_every=3,
        progress=False, chunk_size=chunk_size,
    )  # fmt: skip
    if chunk_size == 1:  # a lone model's state updated in place: its checkpoints copy it
        monkeypatch.setattr(fr.train, "DONATE_MIN_NUMEL", 0)
    full = sweep(net, mse_of(net), SPEC, g, steps=12, **kw)
    path = tmp_path / "ck.pt"
    first = sweep(net, mse_of(net), SPEC, g, steps=6, checkpoint=path, **kw)
    assert first.steps == 6 and SweepResult.load(path).steps == 6
    resumed = sweep(net, mse_of(net), SPEC, g, steps=12, checkpoint=path, **kw)
    for n in full.stacked:
        assert torch.equal(resumed.stacked[n], full.stacked[n])
    assert torch.equal(resumed.history["loss"], full.history["loss"])
    assert torch.equal(resumed.history["val_loss"], full.history["val_loss"])
    assert resumed.history["eval_step"].tolist() == [3, 6, 9, 12]
    with pytest.raises(ValueError, match="has 12 steps done, more than steps=8"):
        sweep(net, mse_of(net), SPEC, g, steps=8, checkpoint=path, **kw)


@pytest.mark.parametrize("chunk_size", [1, 2], ids=["one-by-one", "vmapped"])
def test_resume_runs_only_the_remaining_steps_from_the_checkpoints_values(
    tmp_path: Any, chunk_size: int
) -> None:
    """Resuming is not recomputing: a loss that counts its calls sees only the steps left
    after the checkpoint, and a marker planted in the checkpoint's weights (a value no run
    computes) is what a resumed run continues from."""
    x, y = data()
    net = mlp()
    g = grid(l1=[1e-3, 1e-2], l2=1e-3)
    calls = [0]

    def counting(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        calls[0] += 1
        return mse_of(net)(params, xb, yb)

    kw: dict[str, Any] = dict(
        train=(x, y), optimizer=adam(0.02), batch_size=16, chunk_size=chunk_size, progress=False
    )
    check = 1  # every run first calls model 0's loss once on its first batch (the check)
    full11 = sweep(net, counting, SPEC, g, steps=11, **kw)
    per_step = (calls[0] - check) // 11
    assert per_step >= 1 and calls[0] == check + 11 * per_step
    path = tmp_path / "ck.pt"
    calls[0] = 0
    sweep(net, counting, SPEC, g, steps=6, checkpoint=path, **kw)
    assert calls[0] == check + 6 * per_step
    calls[0] = 0
    sweep(net, counting, SPEC, g, steps=10, checkpoint=path, **kw)
    assert calls[0] == check + 4 * per_step  # steps 7..10 only
    # plant a marker only the checkpoint holds
    saved = SweepResult.load(path)
    assert saved.steps == 10
    marker = torch.full_like(saved.stacked["0.weight"], 0.125)
    saved.stacked["0.weight"] = marker.clone()
    saved.save(path)
    calls[0] = 0
    done = sweep(net, counting, SPEC, g, steps=10, checkpoint=path, **kw)
    assert calls[0] == 0  # nothing left to run
    assert torch.equal(done.stacked["0.weight"], marker)
    more = sweep(net, counting, SPEC, g, steps=11, checkpoint=path, **kw)
    assert calls[0] == check + per_step
    # one step from the marker, not the 11th step of a run from the model's init
    assert not torch.equal(more.stacked["0.weight"], full11.stacked["0.weight"])


def test_resume_after_crash(tmp_path: Any) -> None:
    x, y = data()
    net = mlp()
    g = grid(l1=[1e-3, 1e-2], l2=1e-3)
    kw: dict[str, Any] = dict(
        train=(x, y), optimizer=adam(0.02), steps=10, batch_size=16, chunk_size=2, progress=False
    )
    full = sweep(net, mse_of(net), SPEC, g, **kw)
    calls = [0]

    def flaky(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt("simulated crash")
        return mse_of(net)(params, xb, yb)

    path = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        sweep(net, flaky, SPEC, g, checkpoint=path, checkpoint_every=2, **kw)
    assert SweepResult.load(path).steps == 6
    resumed = sweep(net, mse_of(net), SPEC, g, checkpoint=path, **kw)
    for n in full.stacked:
        assert torch.equal(resumed.stacked[n], full.stacked[n])
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_of_another_sweep_is_refused(tmp_path: Any) -> None:
    x, y = data()
    net = mlp()
    g = grid(l1=[1e-3, 1e-2], l2=1e-3)
    kw: dict[str, Any] = dict(train=(x, y), optimizer=adam(0.02), steps=2, progress=False)
    path = tmp_path / "ck.pt"
    sweep(net, mse_of(net), SPEC, g, checkpoint=path, **kw)
    other_spec = fr.Spec(l1=fr.L1(), l2=fr.L2())
    with pytest.raises(ValueError, match=r"belongs to a different sweep: the spec differs"):
        sweep(net, mse_of(net), other_spec, g, checkpoint=path, **kw)
    with pytest.raises(ValueError, match=r"different sweep: the grid axis 'l1' differs"):
        sweep(net, mse_of(net), SPEC, grid(l1=[1e-3, 2e-2], l2=1e-3), checkpoint=path, **kw)
    with pytest.raises(ValueError, match=r"different sweep: the seed differs"):
        sweep(net, mse_of(net), SPEC, g, checkpoint=path, seed=1, **kw)
    with pytest.raises(ValueError, match=r"different sweep: the optimizer differs"):
        sweep(
            net,
            mse_of(net),
            SPEC,
            g,
            checkpoint=path,
            train=(x, y),
            steps=2,
            optimizer=adam(0.03),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"different sweep: the train differs"):
        sweep(
            net,
            mse_of(net),
            SPEC,
            g,
            checkpoint=path,
            train=data(n=40),
            steps=2,
            optimizer=adam(0.02),
            progress=False,
        )


def test_checkpoint_identity_covers_spec_tensors_not_the_starting_weights(tmp_path: Any) -> None:
    """toward=/weight= tensors (their repr only names them, dict keys included) are part of
    a checkpoint's identity. The starting weights are not: a resumed run continues from the
    checkpoint's, so a model rebuilt without a seed after a crash resumes."""
    x, y = data()
    net = mlp()
    g = grid(l1=[1e-3, 1e-2], l2=1e-3)
    kw: dict[str, Any] = dict(train=(x, y), optimizer=adam(0.02), steps=2, progress=False)
    zeros = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    ones = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    path = tmp_path / "ck.pt"
    sweep(net, mse_of(net), fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2(toward=zeros)), g,
          checkpoint=path, **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"the spec differs"):
        sweep(net, mse_of(net), fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2(toward=ones)), g,
              checkpoint=path, **kw)  # fmt: skip
    w = torch.ones(8, D)
    path_w = tmp_path / "w.pt"
    g1 = grid(l1=[1e-3, 1e-2])
    sweep(net, mse_of(net), fr.Spec(l1=fr.L1("0.weight", weight={"0.weight": w})), g1,
          checkpoint=path_w, **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"the spec differs"):
        sweep(net, mse_of(net), fr.Spec(l1=fr.L1("0.weight", weight={"0.weight": 2 * w})),
              g1, checkpoint=path_w, **kw)  # fmt: skip
    path2 = tmp_path / "ck2.pt"
    full = sweep(net, mse_of(net), SPEC, g, **{**kw, "steps": 4})
    sweep(net, mse_of(net), SPEC, g, checkpoint=path2, **kw)
    other = mlp()
    with torch.no_grad():
        other[0].weight.mul_(10)
    resumed = sweep(other, mse_of(other), SPEC, g, checkpoint=path2, **{**kw, "steps": 4})
    assert torch.equal(resumed.stacked["0.weight"], full.stacked["0.weight"])


def test_resume_keeps_the_automatic_chunk_plan(tmp_path: Any) -> None:
    """The automatic chunk size comes from a probe forward; a resumed run reuses the plan it
    started with, even when its first batch (the short last one of an epoch) would probe
    differently, and so ends with the uninterrupted run's numbers, BatchNorm included."""
    g0 = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 16, generator=g0), torch.randn(300, 1, generator=g0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4096), nn.BatchNorm1d(4096), nn.ReLU(), nn.Linear(4096, 1))
    spec = fr.Spec(l2=fr.L2())
    g = grid(l2=[1e-4, 1e-3, 1e-2, 1e-1])
    kw: dict[str, Any] = dict(train=(x, y), optimizer=adam(1e-3), batch_size=256, progress=False)
    full = sweep(net, mse_of(net), spec, g, steps=4, **kw)
    path = tmp_path / "ck.pt"
    sweep(net, mse_of(net), spec, g, steps=1, checkpoint=path, **kw)
    resumed = sweep(net, mse_of(net), spec, g, steps=4, checkpoint=path, **kw)
    assert resumed.meta["chunks"] == full.meta["chunks"]
    for part in ("stacked", "stacked_buffers"):
        for n, v in getattr(full, part).items():
            assert torch.equal(getattr(resumed, part)[n], v), n


def test_init_from_stack_modules_with_a_frozen_parameter() -> None:
    x, y = data()
    nets = [mlp(), mlp()]
    with torch.no_grad():
        nets[1][0].weight.mul_(2)
    for n in nets:
        n[-1].bias.requires_grad_(False)
    g = grid(l1=[1e-3, 1e-2], l2=1e-3)
    r = sweep(nets[0], mse_of(nets[0]), SPEC, g, train=(x, y), optimizer=adam(0.02), steps=2,
              init=fr.stack_modules(nets), progress=False)  # fmt: skip
    assert "2.bias" not in r.stacked and "2.bias" in r.stacked_buffers
    assert torch.equal(r.stacked_buffers["2.bias"][1], nets[1][-1].bias)


# ------------------------------------------------------------------------- bad input


def _bad_cases() -> list[tuple[dict[str, Any], type, str]]:
    x, y = data()
    net = mlp()
    return [
        (
            {"init": stack(fr.params(net), 3)},
            ValueError,
            r"init\['0.weight'\] has leading size 3, but the grid has K=4",
        ),
        (
            {"grid": grid(l3=[1.0], l2=1.0)},
            ValueError,
            r"grid axis 'l3' names no spec term and no optimizer hyperparameter",
        ),
        ({"grid": grid(l1=[1.0], lr=[0.1])}, ValueError, r"grid axis 'lr' names no spec term"),
        ({"grid": grid(l1=[1.0, 2.0])}, ValueError, r"the grid has no value for \['l2'\]"),
        ({"grid": {"l1": [1.0, -2.0], "l2": 0.0}}, ValueError, r"'l1' must be finite and >= 0"),
        ({"grid": {"l1": [1.0, 2.0], "l2": [1.0, 2.0, 3.0]}}, ValueError, r"same length"),
        ({"train": (x[:0], y[:0])}, ValueError, r"train data is empty \(0 samples\)"),
        ({"train": []}, ValueError, r"train data is empty"),
        ({"train": ()}, ValueError, r"train data is empty"),
        ({"val": (x[:0], y[:0])}, ValueError, r"val data is empty"),
        ({"train": (x, y[:10])}, ValueError, r"share their first \(sample\) dimension"),
        ({"train": "data.csv"}, TypeError, r"train= must be a tensor"),
        ({"train": [(x, y)], "batch_size": 4}, TypeError, r"batch_size= applies to tensor"),
        ({"epochs": 2}, ValueError, r"exactly one of steps= or epochs="),
        ({"steps": 0}, ValueError, r"steps must be an int >= 1"),
        ({"val_fn": lambda p, a, b: a.sum()}, ValueError, r"val_fn= needs validation data"),
        ({"optimizer": torch.optim.SGD}, TypeError, r"functional optimizer"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be an int >= 1"),
    ]


@pytest.mark.parametrize(("override", "err", "match"), _bad_cases())
def test_bad_input(override: dict[str, Any], err: type, match: str) -> None:
    x, y = data()
    net = mlp()
    kw: dict[str, Any] = dict(
        grid=grid(l1=[1e-3, 1e-2, 0.1, 1.0], l2=1e-3),
        train=(x, y),
        optimizer=adam(0.01),
        steps=2,
        progress=False,
    )
    kw.update(override)
    g = kw.pop("grid")
    with pytest.raises(err, match=match):
        sweep(net, mse_of(net), SPEC, g, **kw)


def test_data_runs_out() -> None:
    x, y = data()
    net = mlp()
    one_shot = iter([(x, y), (x, y)])
    with pytest.raises(ValueError, match="one-shot iterator"):
        sweep(
            net,
            mse_of(net),
            SPEC,
            grid(l1=[1e-3, 1e-2], l2=0.0),
            train=one_shot,
            optimizer=adam(0.01),
            steps=3,
            progress=False,
        )


# ------------------------------------------------------------------ progress, chunks


def test_progress_plain_fallback_and_silence(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = data()
    net = mlp()
    g = grid(l1=[1e-3], lr=[0.05, 1e5], l2=0.0)
    kw: dict[str, Any] = dict(
        train=(x, y), val=data(1), optimizer=sgd(lr="lr"), steps=4, eval_every=2
    )
    sweep(net, mse_of(net), SPEC, g, progress=False, **kw)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    sweep(net, mse_of(net), SPEC, g, **kw)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "step 4/4" in err[-1] and "best_val" in err[-1]
    assert "diverged 1/2" in err[-1]
    monkeypatch.delitem(sys.modules, "tqdm.auto")
    pytest.importorskip("tqdm")
    sweep(net, mse_of(net), SPEC, g, **kw)
    bar = capsys.readouterr().err
    assert "4/4" in bar and "diverged=1/2" in bar and "best_val=" in bar


def test_auto_chunk_size() -> None:
    mib = 2**20
    assert auto_chunk_size(lambda: torch.zeros(mib // 4) + 1, 256) == 16  # 1 MiB temporaries
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 256) == 256
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 7) == 7
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 5) == 5
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 4) == 1  # too few models for vmap
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 4, device="meta") == 4
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 4, compiled=True) == 4
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 2, whole_k=8) == 2  # a shard of 8
    assert auto_chunk_size(lambda: torch.zeros(16) + 1, 8, whole_k=4) == 1
    assert auto_chunk_size(lambda: torch.zeros(mib) + 1, 8) == 1  # 8 MiB: one by one
    assert auto_chunk_size(lambda: torch.zeros(mib // 4) + 1, 1) == 1
    assert auto_chunk_size(lambda: torch.zeros(mib) + 1, 64, device="meta") == 64
    assert [b - a for a, b in _plan_chunks(10, 4)] == [4, 3, 3]
    assert [b - a for a, b in _plan_chunks(7, 7)] == [7]


@pytest.mark.parametrize("prox", [True, False])
def test_eager_step_matches_train_step(f64: None, prox: bool) -> None:
    x, y = data()
    net = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1), nn.Linear(1, 1))
    net = net.double()

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:  # "3.*" unused
        h = functional_call(net[:3], {k: v for k, v in p.items() if k[0] != "3"}, (xb,))
        return F.mse_loss(h, yb)

    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2(), pos=fr.NonNegative("2.bias"))
    opt = adam(lr="lr")
    hp = {"l1": torch.tensor(0.05), "l2": torch.tensor(1e-2), "lr": torch.tensor(0.05)}
    ref, fast = train_step(loss, spec, opt, prox=prox), eager_step(loss, spec, opt, prox=prox)
    p1 = p2 = fr.params(net)
    s1 = s2 = opt.init(p1)
    for _ in range(4):
        p1, s1, m1 = ref(p1, s1, hp, x, y)
        p2, s2, m2 = fast(p2, s2, hp, x, y)
        torch.testing.assert_close(m2, m1, rtol=0, atol=1e-14)
    torch.testing.assert_close(p2, p1, rtol=0, atol=1e-14)
    torch.testing.assert_close(s2, s1, rtol=0, atol=1e-14)
    assert not any(v.requires_grad for v in p2.values())


def test_donated_eager_step_keeps_the_state_of_a_non_finite_step(
    f64: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eager_step(..., donate_state=True)``: finite steps update the state in place with
    the copying step's numbers; a step whose gradient is not finite leaves the state it was
    given untouched (what ``fr.sweep``'s divergence guard keeps), and the params always."""
    x, y = data()
    net = mlp().double()
    monkeypatch.setattr(fr.train, "DONATE_MIN_NUMEL", 0)  # a small model donates too
    spec, opt = fr.Spec(l2=fr.L2()), adam(lr=0.05)
    hp = {"l2": torch.tensor(1e-2)}
    plain = eager_step(mse_of(net), spec, opt)
    donated = eager_step(mse_of(net), spec, opt, donate_state=True)
    p1 = p2 = fr.params(net)
    s1, s2 = opt.init(p1), tree_map(torch.clone, opt.init(p1))
    for _ in range(3):
        p1, s1, _m = plain(p1, s1, hp, x, y)
        ptr = s2.exp_avg["0.weight"].data_ptr()
        p2, s2, _m = donated(p2, s2, hp, x, y)
        assert s2.exp_avg["0.weight"].data_ptr() == ptr  # updated in place
    torch.testing.assert_close((p2, s2), (p1, s1), rtol=0, atol=0)
    before = tree_map(torch.clone, (p2, s2))
    bad_x = x.clone()
    bad_x[0, 0] = math.inf
    p3, s3, m3 = donated(p2, s2, hp, bad_x, y)
    assert not torch.isfinite(m3["loss"])
    torch.testing.assert_close((p2, s2), before, rtol=0, atol=0, equal_nan=True)
    assert s3.exp_avg["0.weight"].data_ptr() != s2.exp_avg["0.weight"].data_ptr()


@pytest.mark.slow
def test_compiled_sweep_matches_eager() -> None:
    x, y = data()
    net = mlp()
    g = grid(l1=[1e-3, 1e-2], lr=[0.05, 1e5], l2=0.0)
    kw: dict[str, Any] = dict(
        train=(x, y), optimizer=sgd(lr="lr"), steps=4, batch_size=16, progress=False
    )
    loss = mse_of(net)
    eager = sweep(net, loss, SPEC, g, **kw)
    comp = sweep(net, loss, SPEC, g, compile=True, **kw)
    assert comp.diverged.tolist() == eager.diverged.tolist() == [False, True, False, True]
    assert comp.diverged_at.tolist() == eager.diverged_at.tolist()
    alive = ~eager.diverged  # a diverged model's frozen weights are ~1e11: chaos amplified
    for n in eager.stacked:
        torch.testing.assert_close(
            comp.stacked[n][alive], eager.stacked[n][alive], rtol=1e-5, atol=1e-6
        )
        assert bool(torch.isfinite(comp.stacked[n]).all())
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    again = sweep(net, loss, SPEC, g, compile=True, **kw)  # same objects: cached
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again.stacked["0.weight"], comp.stacked["0.weight"])


def test_example_sweep_mlp_runs_small(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], load_example: Any
) -> None:
    pytest.importorskip("matplotlib")
    mod = load_example("sweep_mlp")
    out = tmp_path / "plot.png"
    r = mod.main(
        ["--strengths", "4", "--steps", "10", "--n-train", "128", "--quiet", "--out", str(out)]
    )
    assert r.K == 4 and r.steps == 10
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "best: model" in printed and "4 models, 10 steps" in printed


def test_divergence_guard_sees_inf_and_nan_but_not_large_finite_values():
    """The common-path guard (largest magnitude over metrics and params) flags an inf or a
    NaN anywhere, but not finite values whose sum would overflow float32."""
    from funcreg._engine import _all_finite, _finite

    big = torch.full((4, 3), 3e38)  # Σ overflows float32, max does not
    ok = {"w": big, "b": torch.zeros(3), "empty": torch.zeros(0)}
    assert _all_finite(torch.tensor([1.0, 2.0]), ok)
    assert not _all_finite(torch.tensor([1.0, float("nan")]), ok)
    assert not _all_finite(torch.tensor([1.0]), {**ok, "b": torch.tensor([0.0, -float("inf")])})
    nan_w = big.clone()
    nan_w[2, 1] = float("nan")
    assert not _all_finite(torch.tensor([1.0]), {**ok, "w": nan_w})
    # the per-model check (used once something is not finite) agrees, model by model
    stacked = {"w": torch.stack([big, nan_w]), "b": torch.zeros(2, 3)}
    assert _finite(torch.ones(2, 2), stacked, batched=True).tolist() == [True, False]
    assert _finite(torch.ones(2), ok, batched=False).tolist() == [True]
