"""fr.sweep on the models of benchmarks/models.py at small sizes: a CNN and a Transformer
encoder (LayerNorm; dropout layers present, rate 0) train to the numbers of a loop of plain
``torch.optim.Adam`` models (float64), on the per-model and the vmapped route; a measured
plan is recorded and a resume under it ends bit for bit where the uninterrupted run does.
Vmapped attention runs without torch's vmap fallback (a test failure here, see conftest):
the engine's vmapped steps use the math attention kernel."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg import _plan
from funcreg.optim import adam

STRENGTHS = [1e-4, 1e-2, 1e-1]
STEPS, BATCH, LR = 6, 8, 1e-2


@pytest.fixture(autouse=True)
def _f64_one_thread(one_thread: None) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    _plan.CACHE.clear()
    yield
    torch.set_default_dtype(old)
    _plan.CACHE.clear()


class Encoder(nn.Module):
    """Two post-norm encoder layers (LayerNorm, dropout modules at rate 0), mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
    )  # fmt: skip


def problem(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    net = Encoder() if kind == "transformer" else cnn()
    g = torch.Generator().manual_seed(1)
    shape = (24, 5, 8) if kind == "transformer" else (24, 1, 12, 12)
    x = torch.randn(*shape, generator=g)
    return net, x, torch.randint(0, 3, (24,), generator=g)


def loss_of(net: nn.Module) -> Callable[..., Tensor]:
    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, p, (xb,)), yb)

    return loss


def run(kind: str, **kw: Any) -> fr.SweepResult:
    net, x, y = problem(kind)
    args: dict[str, Any] = dict(
        train=(x, y), optimizer=adam(LR), steps=STEPS, batch_size=BATCH, progress=False
    )
    spec, g = fr.Spec(l2=fr.L2()), fr.grid(l2=STRENGTHS)
    return fr.sweep(net, loss_of(net), spec, g, **{**args, **kw})


def loop(kind: str, batches: list[Tensor]) -> list[dict[str, Tensor]]:
    """One ``nn.Module`` per strength with ``torch.optim.Adam``, ``s·½Σ‖W‖²`` over the
    weights (``ndim >= 2``: ``fr.L2()``'s default selection) in its loss."""
    net, x, y = problem(kind)
    out = []
    for s in STRENGTHS:
        m = copy.deepcopy(net)
        opt = torch.optim.Adam(m.parameters(), lr=LR)
        for idx in batches:
            opt.zero_grad()
            penalty = 0.5 * sum(p.square().sum() for p in m.parameters() if p.ndim >= 2)
            (F.cross_entropy(m(x[idx]), y[idx]) + s * penalty).backward()
            opt.step()
        out.append({n: p.detach() for n, p in m.named_parameters()})
    return out


def batches() -> list[Tensor]:
    """The batch order of fr.sweep (seed 0): one seeded permutation per epoch."""
    from funcreg._data import batch_order

    out: list[Tensor] = []
    epoch = 0
    while len(out) < STEPS:
        perm = batch_order(24, BATCH, 0, epoch)
        assert perm is not None
        out.extend(perm[i : i + BATCH] for i in range(0, 24, BATCH))
        epoch += 1
    return out[:STEPS]


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_equals_a_loop_of_torch_optim_models(kind: str, chunk_size: int) -> None:
    res = run(kind, chunk_size=chunk_size)
    ref = loop(kind, batches())
    assert not res.diverged.any()
    for k, params in enumerate(ref):
        for n, v in params.items():
            torch.testing.assert_close(res.stacked[n][k], v, rtol=1e-9, atol=1e-11, msg=n)
    # the models differ: the strengths reached the weights
    w = res.stacked["head.weight" if kind == "transformer" else "6.weight"]
    assert not torch.equal(w[0], w[2])


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_measured_plan_recorded_and_resume_identical(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]

    def tick() -> float:  # a fake clock: every step takes one second, any chunk
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(_plan, "clock", tick)
    full = run(kind, plan="measure")
    plan = full.meta["plan"]
    assert plan["how"] == "measured" and full.meta["chunks"] == [[0, 3]]
    _plan.CACHE.clear()
    path = tmp_path / "ck.pt"
    first = run(kind, steps=2, plan="measure", checkpoint=path)
    assert first.meta["plan"]["chunk_size"] == 3
    monkeypatch.setattr(_plan, "choose", lambda per_model, static: 1)  # would pick 1 now
    _plan.CACHE.clear()
    resumed = run(kind, plan="measure", checkpoint=path)
    assert resumed.meta["chunks"] == full.meta["chunks"]
    assert resumed.meta["plan"]["chunk_size"] == plan["chunk_size"]
    for n, v in full.stacked.items():
        assert torch.equal(resumed.stacked[n], v), n
    assert torch.equal(resumed.history["loss"], full.history["loss"])


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_l1_l2_sgd_task_equals_a_loop_of_torch_optim_sgd(chunk_size: int) -> None:
    """The task of the tiny-sgd rows (benchmarks/models.py): ``λ·Σ|W1| + λ·Σ‖W‖²`` with
    ``prox=False`` (``l1 = λ``, ``l2 = 2λ``) and SGD is what a loop of ``torch.optim.SGD``
    models with the penalty in the loss trains."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=g), torch.randn(24, 1, generator=g)

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, p, (xb,)), yb)

    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
    lam = STRENGTHS
    grid = fr.grid(l1=lam, l2=[2 * v for v in lam], product=False)
    res = fr.sweep(
        net, loss, spec, grid, train=(x, y), optimizer=fr.optim.sgd(0.05), steps=STEPS,
        batch_size=BATCH, prox=False, progress=False, chunk_size=chunk_size,
    )  # fmt: skip
    for k, s in enumerate(lam):
        m = copy.deepcopy(net)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for idx in batches():
            opt.zero_grad()
            penalty = sum(p.pow(2).sum() for p in m.parameters() if p.ndim > 1)
            out = F.mse_loss(m(x[idx]), y[idx]) + s * penalty + s * m[0].weight.abs().sum()
            out.backward()
            opt.step()
        for n, v in m.named_parameters():
            torch.testing.assert_close(res.stacked[n][k], v.detach(), rtol=1e-9, atol=1e-11)
