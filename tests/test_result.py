"""SweepResult: best(), params/module, the table, save/load."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg import sweep
from funcreg.optim import sgd
from funcreg.result import Best, SweepResult
from funcreg.stack import grid


def _setup() -> tuple[nn.Module, Any, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    y = x[:, :1] * 2 + 0.1 * torch.randn(40, 1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, p, (xb,)), yb)

    return net, loss, (x[:30], y[:30]), (x[30:], y[30:])


SPEC = fr.Spec(l1=fr.L1("0.weight"))


@pytest.fixture(scope="module")
def result() -> SweepResult:
    net, loss, train, val = _setup()
    g = grid(l1=[0.0, 1e-2, 3.0], lr=[0.1, 1e6])  # K = 6, three diverge

    def neg_mse(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return -loss(p, xb, yb)

    return sweep(
        net,
        loss,
        SPEC,
        g,
        train=train,
        val=val,
        val_fn=neg_mse,
        optimizer=sgd(lr="lr"),
        steps=20,
        eval_every=5,
        progress=False,
    )


def test_best_by_val_skips_diverged(result: SweepResult) -> None:
    assert result.diverged.tolist() == [False, True] * 3
    best = result.best()
    assert isinstance(best, Best) and best.metric == "val_loss" and not best.note
    assert best.index % 2 == 0 and best.strengths["lr"] == pytest.approx(0.1)
    val = result.history["val_loss"][-1]
    assert best.value == pytest.approx(float(val[best.index]))
    assert float(val[best.index]) == pytest.approx(float(val[0::2].min()))
    # an "accuracy-like" metric: highest is best
    hi = result.best("val_metric", mode="max")
    assert hi.index == best.index
    assert torch.equal(result.params(best)["0.weight"], result.stacked["0.weight"][best.index])
    assert "model" in str(best) and "val_loss" in str(best)


def test_best_falls_back_to_train_loss_with_a_note() -> None:
    net, loss, train, _ = _setup()
    r = sweep(
        net,
        loss,
        SPEC,
        grid(l1=[0.0, 3.0], lr=0.1),
        train=train,
        optimizer=sgd(lr="lr"),
        steps=10,
        progress=False,
    )
    with pytest.warns(UserWarning, match="no validation data: chose by training loss"):
        best = r.best()
    assert best.metric == "loss" and "pass val=" in best.note and best.index == 0
    with pytest.raises(ValueError, match="no val_metric recorded"):
        r.best("val_metric")
    with pytest.raises(KeyError, match="unknown metric 'acc'"):
        r.best("acc")
    with pytest.raises(ValueError, match="mode must be"):
        r.best("loss", mode="lowest")


def test_module_is_a_fresh_copy_with_the_weights(result: SweepResult) -> None:
    m = result.module(2)
    assert m is not result.model
    assert torch.equal(m[0].weight.detach(), result.stacked["0.weight"][2])
    x = torch.randn(3, 4)
    p = {**result.params(2)}
    assert result.model is not None
    torch.testing.assert_close(m(x), functional_call(result.model, p, (x,)))
    with pytest.raises(IndexError, match="out of range for a sweep of K=6"):
        result.params(6)


def test_table(result: SweepResult) -> None:
    text = result.table()
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:3] == ["#", "l1", "lr"]
    assert {"train_loss", "val_loss", "val_metric", "zeros[0.weight]", "status"} <= set(header)
    assert len(lines) == 2 + 6 + 1 and lines[-1] == "6 models, 20 steps, 3 diverged"
    best = result.best().index
    assert lines[2 + best].split()[0] == f"{best}*"
    assert sum("diverged@" in line for line in lines) == 3
    short = result.table(max_rows=2)
    assert "..." in short and len(short.splitlines()) == 2 + 3 + 1
    assert str(result).startswith(lines[0])
    assert "K=6" in repr(result)


def test_save_load_roundtrip(result: SweepResult, tmp_path: Any) -> None:
    path = result.save(tmp_path / "sub" / "r.pt")
    # stored form is tensors and plain containers only
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "funcreg.SweepResult/1"
    loaded = SweepResult.load(path)
    for n in result.stacked:
        assert torch.equal(loaded.stacked[n], result.stacked[n])
    torch.testing.assert_close(
        loaded.history["val_loss"], result.history["val_loss"], rtol=0, atol=0, equal_nan=True
    )
    assert torch.equal(loaded.diverged, result.diverged)
    assert loaded.steps == result.steps and loaded.best().index == result.best().index
    assert loaded.table() == result.table()
    with pytest.raises(ValueError, match="no model to copy"):
        loaded.module(0)
    assert isinstance(SweepResult.load(path, model=result.model).module(0), nn.Module)
    assert [p.name for p in path.parent.iterdir()] == ["r.pt"]  # no temporary left


def test_saved_file_gets_the_umask_mode(result: SweepResult, tmp_path: Any) -> None:
    """Like any new file (``open``), not the 0600 of a ``mkstemp`` temporary."""
    old = os.umask(0o022)
    try:
        path = result.save(tmp_path / "r.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_save_is_atomic(result: SweepResult, tmp_path: Any, monkeypatch: Any) -> None:
    path = result.save(tmp_path / "r.pt")
    before = path.read_bytes()

    def broken(obj: Any, f: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        result.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.pt"]


def test_load_rejects_other_files(tmp_path: Any) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="is not a saved funcreg SweepResult"):
        SweepResult.load(tmp_path / "w.pt")


def test_one_se_rule_needs_standard_errors(result: SweepResult) -> None:
    with pytest.raises(
        ValueError, match=r"rule='1se' needs the standard error .*fr.cross_validate"
    ):
        result.best(rule="1se")
    assert result.best(rule="min").index == result.best().index
