"""The same numbers on a CUDA device as on the CPU (skipped where there is none).

Every test runs one computation on the CPU and on ``DEVICE`` in float64 and compares the
results; GPU kernels sum in another order, so the tolerances are float64 round-off, not
bit equality. The paths that only a GPU takes are all exercised here: the fused
``torch._foreach_norm`` reductions of ``funcreg._tree`` (the sweep's divergence guard),
whole-grid chunks, CUDA generator seeding, forking and checkpointing, CPU-held ``weight=``
and ``toward=`` tensors meeting device params, and results that live on the device
(``best``, ``module``, ``save``/``load``).

``FUNCREG_TEST_DEVICE`` picks the device (default ``cuda``). Every test is skipped when that
device is not a CUDA device or none is present: run on the CPU, each comparison would be the
CPU against itself, which checks nothing (the CPU numbers are checked against independent
references in the other test files).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_sweep import data, mlp, mse_of  # the small MLP task of the CPU sweep tests
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg import _tree as _flat
from funcreg.optim import adam, sgd

DEVICE = torch.device(os.environ.get("FUNCREG_TEST_DEVICE", "cuda"))
CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.skipif(
        DEVICE.type != "cuda",
        reason=f"FUNCREG_TEST_DEVICE={DEVICE.type}: the comparisons would be the CPU against "
        "itself; these tests compare a CUDA device with the CPU",
    ),
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
    ),
]
TOL: dict[str, float] = dict(rtol=1e-8, atol=1e-10)


@pytest.fixture(autouse=True)
def f64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def on(device: torch.device, *ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(device) for t in ts)


def assert_same(a: Any, b: Any, **tol: float) -> None:
    """``a`` (CPU) and ``b`` (any device) equal to float64 round-off, leaf by leaf."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k], **tol)
        return
    torch.testing.assert_close(b.cpu(), a, **(tol or TOL))


SPEC = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
TERMS = {
    "L1": fr.L1(),
    "L2": fr.L2(),
    "ElasticNet": fr.ElasticNet(l1_ratio=0.3),
    "GroupLasso": fr.GroupLasso(dim=1),
    "SparseGroupLasso": fr.SparseGroupLasso(dim=1, l1_ratio=0.4),
    "Nuclear": fr.Nuclear(),
    "SpectralNorm": fr.SpectralNorm(),
    "Orthogonal": fr.Orthogonal(),
    "MCP": fr.MCP(gamma=3.0),
    "SCAD": fr.SCAD(a=3.7),
    "NonNegative": fr.NonNegative(),
    "Box": fr.Box(lo=-0.5, hi=0.25),
    "MaxNorm": fr.MaxNorm(max_value=1.0),
}


# ------------------------------------------------------------------- penalties and prox


@pytest.mark.parametrize("name", list(TERMS))
def test_penalty_value_gradient_and_prox_match_the_cpu(name: str) -> None:
    pen = TERMS[name]
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    wd = w.to(DEVICE).requires_grad_()
    wc = w.clone().requires_grad_()
    vc, vd = pen.penalty(wc, 0.7), pen.penalty(wd, 0.7)
    assert vd.device.type == DEVICE.type
    assert_same(vc.detach(), vd.detach())
    if vc.requires_grad:
        (gc,) = torch.autograd.grad(vc, wc)
        (gd,) = torch.autograd.grad(vd, wd)
        assert_same(gc, gd)
    for t in (0.0, 0.05, 0.8) if pen.has_prox else ():
        if name in ("MCP", "SCAD") and t > 0.5:
            continue  # their prox needs t < gamma (resp. a - 1) at unit strength
        assert_same(pen.prox(w, t), pen.prox(w.to(DEVICE), t))


def test_fused_flat_reductions_match_the_cpu() -> None:
    """Lists above ``FLAT_MAX`` numbers take ``torch._foreach_norm`` on a GPU."""
    g = torch.Generator().manual_seed(2)
    small = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(())]
    big = [torch.randn(300, 200, generator=g), torch.randn(70_000, generator=g)]
    for ts in (small, big):
        td = [t.to(DEVICE) for t in ts]
        assert_same(_flat.sum_abs(ts), _flat.sum_abs(td))
        assert_same(_flat.sum_squares(ts), _flat.sum_squares(td))
        assert _flat.max_abs(td) == pytest.approx(_flat.max_abs(ts), rel=1e-12)
    bad = [t.to(DEVICE).clone() for t in big]
    bad[1][123] = float("nan")
    assert _flat.max_abs(bad) != _flat.max_abs(bad)  # NaN propagates
    bad[1][123] = float("inf")
    assert _flat.max_abs(bad) == float("inf")


# ---------------------------------------------------------------------------- the sweep


def sweep_on(device: torch.device, net: nn.Module, **kw: Any) -> fr.SweepResult:
    net = net.to(device)
    x, y = on(device, *data())
    kw.setdefault("progress", False)
    return fr.sweep(net, mse_of(net), kw.pop("spec", SPEC), kw.pop("grid"), train=(x, y), **kw)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("bn", [False, True])
def test_sweep_matches_the_cpu(k: int, bn: bool) -> None:
    """K = 1 takes the single-model step, K = 5 the vmapped one (on both devices; a CPU grid
    of up to 4 models trains one by one); BatchNorm's running stats are buffers updated per
    model."""
    g = fr.grid(l1=[1e-3, 1e-2, 3e-2, 0.1, 0.2][:k], l2=1e-3, dtype=torch.float64)
    kw: dict[str, Any] = dict(grid=g, optimizer=adam(0.03), steps=12, batch_size=16)
    cpu = sweep_on(CPU, mlp(bn=bn), **kw)
    dev = sweep_on(DEVICE, mlp(bn=bn), **kw)
    assert dev.stacked["0.weight"].device.type == DEVICE.type
    assert_same(cpu.stacked, dev.stacked)
    assert_same(cpu.history["loss"], dev.history["loss"])
    assert torch.equal(cpu.history["zeros"]["0.weight"], dev.history["zeros"]["0.weight"].cpu())
    for i in range(k):
        assert_same(cpu.buffers(i), dev.buffers(i))


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("bn", [False, True])
def test_cuda_graph_replay_matches_the_eager_device_sweep(k: int, bn: bool) -> None:
    """``plan={"cuda_graph": True}``: the eager steps captured once and replayed (the last
    minibatch of 40 samples in 16s is shorter: a second graph), one model and vmapped
    chunks, BatchNorm's buffers updated inside the graph; a diverging model still isolated."""
    g = fr.grid(l1=[1e-3, 1e-2, 3e-2, 0.1, 0.2][:k], l2=1e-3, dtype=torch.float64)
    kw: dict[str, Any] = dict(grid=g, optimizer=adam(0.03), steps=12, batch_size=16)
    eager = sweep_on(DEVICE, mlp(bn=bn), **kw)
    with warnings.catch_warnings():  # a capture that fails would run eagerly: same numbers
        warnings.filterwarnings("error", message=".*could not be captured in a CUDA graph")
        graphed = sweep_on(DEVICE, mlp(bn=bn), plan={"cuda_graph": True}, **kw)
    assert graphed.meta["plan"]["cuda_graph"] is True
    assert_same(eager.stacked, graphed.stacked)
    assert_same(eager.history["loss"], graphed.history["loss"])
    for i in range(k):
        assert_same(eager.buffers(i), graphed.buffers(i))
    spec = fr.Spec(l1=fr.L1("0.weight"))
    bad = sweep_on(
        DEVICE, mlp(), spec=spec, grid=fr.grid(lr=[0.05, 1e100], l1=[0.0, 1e-3, 1e-2]),
        optimizer=sgd(lr="lr"), steps=10, batch_size=16, plan={"cuda_graph": True},
    )  # fmt: skip
    assert bad.diverged.tolist() == [False] * 3 + [True] * 3


def test_cuda_graph_with_dropout_resumes_to_the_same_numbers(tmp_path: Any) -> None:
    """Replayed dropout draws from the device generator as the checkpoint carries it: a run
    resumed at step 6 (captured again there) ends as the uninterrupted one."""
    kw: dict[str, Any] = dict(
        grid=fr.grid(l1=[1e-3, 1e-2, 1e-1], l2=1e-3),
        optimizer=adam(0.02),
        batch_size=16,
        plan={"cuda_graph": True},
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*could not be captured in a CUDA graph")
        full = sweep_on(DEVICE, mlp(dropout=0.2), steps=12, **kw)
        path = tmp_path / "ck.pt"
        sweep_on(DEVICE, mlp(dropout=0.2), steps=6, checkpoint=path, **kw)
        resumed = sweep_on(DEVICE, mlp(dropout=0.2), steps=12, checkpoint=path, **kw)
    for n in full.stacked:
        assert torch.equal(resumed.stacked[n], full.stacked[n]), n
    assert torch.equal(resumed.history["loss"], full.history["loss"])


def test_divergence_is_isolated_on_the_device() -> None:
    spec = fr.Spec(l1=fr.L1("0.weight"))
    kw: dict[str, Any] = dict(spec=spec, optimizer=sgd(lr="lr"), steps=10, batch_size=16)
    l1 = [0.0, 1e-3, 1e-2]
    bad = sweep_on(DEVICE, mlp(), grid=fr.grid(lr=[0.05, 1e100], l1=l1), **kw)
    good = sweep_on(DEVICE, mlp(), grid=fr.grid(lr=[0.05], l1=l1), **kw)
    assert bad.diverged.tolist() == [False] * 3 + [True] * 3
    assert good.diverged.sum() == 0
    # a vmapped product over 6 or over 3 models may pick another GPU kernel
    for n in good.stacked:
        assert_same(good.stacked[n].cpu(), bad.stacked[n][:3])
        assert torch.isfinite(bad.stacked[n]).all()
    for i in range(3, 6):
        t = int(bad.diverged_at[i])
        assert 0 <= t < 10 and torch.isnan(bad.history["loss"][t:, i].cpu()).all()
    assert bad.best(metric="loss").index < 3


def test_seeded_dropout_and_the_callers_cuda_rng() -> None:
    """``seed=`` fixes the device's dropout masks; the caller's generator of that device
    continues after the sweep as if the sweep had not run."""
    kw: dict[str, Any] = dict(grid=fr.grid(l1=[1e-3, 1e-3], l2=0.0), optimizer=adam(0.05), steps=3)
    net = mlp(dropout=0.5)  # mlp() seeds the global generators: build it first
    torch.manual_seed(123)
    expected = torch.rand(4, device=DEVICE)
    torch.manual_seed(123)
    a = sweep_on(DEVICE, net, seed=7, **kw)
    assert torch.equal(torch.rand(4, device=DEVICE), expected)
    torch.manual_seed(999)
    b = sweep_on(DEVICE, net, seed=7, **kw)
    c = sweep_on(DEVICE, net, seed=8, **kw)
    w = "0.weight"
    assert torch.equal(a.stacked[w], b.stacked[w])
    assert not torch.equal(a.stacked[w], c.stacked[w])
    assert not torch.equal(a.stacked[w][0], a.stacked[w][1])  # independent masks per model


def test_checkpoint_resume_on_the_device(tmp_path: Any) -> None:
    """Dropout draws from the device's generator, whose state the checkpoint carries."""
    kw: dict[str, Any] = dict(
        grid=fr.grid(l1=[1e-3, 1e-2, 1e-1], l2=1e-3), optimizer=adam(0.02), batch_size=16
    )
    full = sweep_on(DEVICE, mlp(dropout=0.2), steps=12, **kw)
    path = tmp_path / "ck.pt"
    sweep_on(DEVICE, mlp(dropout=0.2), steps=6, checkpoint=path, **kw)
    loaded = fr.SweepResult.load(path)
    assert loaded.steps == 6 and loaded.stacked["0.weight"].device.type == "cpu"
    resumed = sweep_on(DEVICE, mlp(dropout=0.2), steps=12, checkpoint=path, **kw)
    for n in full.stacked:
        assert torch.equal(resumed.stacked[n], full.stacked[n])
    assert torch.equal(resumed.history["loss"], full.history["loss"])


def test_device_result_best_module_and_save(tmp_path: Any) -> None:
    x, y = data(1)
    xv, yv = on(DEVICE, x, y)
    g = fr.grid(l1=[1e-4, 1e-2, 0.3], l2=1e-3)
    r = sweep_on(DEVICE, mlp(), grid=g, val=(xv, yv), optimizer=adam(0.03), steps=20, eval_every=5)
    best = r.best()
    assert 0 <= best.index < 3
    net = r.module(best.index)
    assert next(net.parameters()).device.type == DEVICE.type
    with torch.no_grad():
        torch.testing.assert_close(
            F.mse_loss(net(xv), yv).cpu(), r.history["val_loss"][-1, best.index].cpu()
        )
    back = fr.SweepResult.load(r.save(tmp_path / "r.pt"))
    assert_same(back.stacked, r.stacked, rtol=0, atol=0)
    assert back.best().index == best.index
    assert "l1" in r.table()


def test_compiled_sweep_on_the_device_matches_eager() -> None:
    kw: dict[str, Any] = dict(
        grid=fr.grid(l1=[1e-3, 1e-2], lr=[0.05, 1e100], l2=0.0, dtype=torch.float64),
        optimizer=sgd(lr="lr"),
        steps=4,
        batch_size=16,
    )
    eager = sweep_on(DEVICE, mlp(), **kw)
    comp = sweep_on(DEVICE, mlp(), compile=True, **kw)
    assert comp.diverged.tolist() == eager.diverged.tolist() == [False, True, False, True]
    for n in eager.stacked:
        torch.testing.assert_close(comp.stacked[n], eager.stacked[n], rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------- solvers and paths


def lasso_data(n: int = 80, p: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, p, generator=g)
    beta = torch.zeros(p)
    beta[:4] = torch.tensor([2.0, -1.5, 1.0, 0.5])
    return X, X @ beta + 0.3 * torch.randn(n, generator=g)


def test_solve_matches_the_cpu() -> None:
    X, y = lasso_data()
    spec = fr.Spec(l1=fr.L1("w"))
    lam = torch.logspace(-3, 0, 6)

    def loss(p: dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((X @ p["w"] + p["b"] - y) ** 2).mean()

    def run(dev: torch.device) -> fr.Solution:
        p0 = {"w": torch.zeros(X.shape[1], device=dev), "b": torch.zeros((), device=dev)}
        return fr.solve(loss, spec, p0, {"l1": lam.to(dev)}, *on(dev, X, y), tol=1e-10)

    cpu, dev = run(CPU), run(DEVICE)
    assert bool(cpu.converged.all()) and bool(dev.converged.cpu().all())
    assert_same(cpu.params, dev.params, rtol=1e-7, atol=1e-8)
    assert torch.equal(cpu.params["w"] == 0, dev.params["w"].cpu() == 0)  # same supports


def test_least_squares_path_matches_the_cpu() -> None:
    X, y = lasso_data()
    spec = fr.Spec(l1=fr.L1("weight"))

    def run(dev: torch.device) -> fr.SweepResult:
        ls = fr.least_squares(*on(dev, X, y))
        return fr.path(ls.init(), ls, spec, n=20, tol=1e-10)

    cpu, dev = run(CPU), run(DEVICE)
    assert_same(cpu.stacked, dev.stacked, rtol=1e-7, atol=1e-8)
    assert_same(cpu.grid["l1"], dev.grid["l1"])


def test_large_least_squares_path_with_a_partial_homotopy_start_matches_the_cpu() -> None:
    """From ``PARTIAL_MIN`` coordinates the path's sparse top starts at the homotopy's
    solutions, computed on the host: its bookkeeping meets device thresholds and params."""
    from funcreg._homotopy import PARTIAL_MIN

    gen = torch.Generator().manual_seed(5)
    X = torch.randn(3 * PARTIAL_MIN // 2, PARTIAL_MIN + 8, generator=gen, dtype=torch.float64)
    y = X[:, :20].sum(1) + torch.randn(X.shape[0], generator=gen, dtype=torch.float64)
    spec = fr.Spec(l1=fr.L1("weight"))

    def run(dev: torch.device) -> fr.SweepResult:
        ls = fr.least_squares(*on(dev, X, y))
        return fr.path(ls.init(), ls, spec, n=20, tol=1e-10)

    cpu, dev = run(CPU), run(DEVICE)
    assert int((cpu.meta["iterations"] == 1).sum()) >= 3  # the walk started some at the answer
    assert_same(cpu.stacked, dev.stacked, rtol=1e-7, atol=1e-8)


def test_cross_validation_and_strength_max_match_the_cpu() -> None:
    X, y = lasso_data()
    spec = fr.Spec(l1=fr.L1("0.weight"))

    def run(dev: torch.device) -> tuple[float, fr.CVResult]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(X.shape[1], 1)).to(dev)

        def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return 0.5 * F.mse_loss(functional_call(net, p, (x,)).squeeze(-1), y)

        xd, yd = on(dev, X, y)
        top = fr.strength_max(loss, spec, "l1", fr.params(net), xd, yd)
        grid = fr.geometric_grid(top, 1e-2, 8)
        return top, fr.cross_validate(net, loss, spec, grid, (xd, yd), folds=4, tol=1e-10)

    (top_c, cv_c), (top_d, cv_d) = run(CPU), run(DEVICE)
    assert top_d == pytest.approx(top_c, rel=1e-12)
    assert_same(cv_c.scores, cv_d.scores, rtol=1e-6, atol=1e-9)
    assert cv_d.best("min").index == cv_c.best("min").index
    assert_same(cv_c.path.stacked, cv_d.path.stacked, rtol=1e-6, atol=1e-8)


def test_network_path_with_an_optimizer_matches_the_cpu() -> None:
    """``fr.path(optimizer=...)``: chunks of ``fr.sweep`` runs, each from the last one's end."""

    def run(dev: torch.device) -> fr.SweepResult:
        net = mlp().to(dev)
        x, y = on(dev, *data())
        return fr.path(
            net, mse_of(net), fr.Spec(l1=fr.L1("0.weight")), data=(x, y),
            strengths=[0.3, 0.1, 0.03, 0.01], chunk_size=2, optimizer=adam(0.03), steps=10,
            batch_size=16,
        )  # fmt: skip

    cpu, dev = run(CPU), run(DEVICE)
    assert_same(cpu.stacked, dev.stacked)
    assert_same(cpu.grid["l1"], dev.grid["l1"])


def test_cpu_weight_and_reference_with_device_params() -> None:
    """``weight=`` factors and ``toward=`` references may stay on the CPU: penalties, prox
    and ``strength_max`` move them to the parameter's device."""
    X, y = lasso_data()
    c = torch.linspace(0.5, 2.0, X.shape[1])
    ref = 0.1 * torch.ones(1, X.shape[1])
    spec = fr.Spec(l1=fr.L1("weight", weight=c, toward=ref))

    def run(dev: torch.device) -> tuple[float, Tensor, Tensor]:
        ls = fr.least_squares(*on(dev, X, y))
        p0 = ls.init()
        top = fr.strength_max(ls, spec, "l1", p0)
        sol = fr.solve(ls, spec, p0, {"l1": torch.tensor([0.3 * top, 0.03 * top])}, tol=1e-10)
        w = torch.randn(1, X.shape[1], generator=torch.Generator().manual_seed(4)).to(dev)
        return top, sol.params["weight"], spec["l1"].prox(w, 0.2, "weight")

    (top_c, w_c, prox_c), (top_d, w_d, prox_d) = run(CPU), run(DEVICE)
    assert top_d == pytest.approx(top_c, rel=1e-12)
    assert_same(w_c, w_d, rtol=1e-7, atol=1e-8)
    assert_same(prox_c, prox_d)
    assert w_d.device.type == prox_d.device.type == DEVICE.type
