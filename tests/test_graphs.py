"""``plan={"cuda_graph": True}``: the eager chunk step replayed from a graph.

A CUDA graph replays recorded kernels on static buffers: inputs are copied in, outputs are
overwritten by the next replay. These tests drive :class:`funcreg._graphs.GraphedStep` on
the CPU with :func:`funcreg._graphs.replay_capture`, which has exactly those memory
semantics, and check that a sweep through it equals the eager sweep to the bit (float64):
vmapped and one-model chunks, BatchNorm buffers updated in place, a diverging model, a short
last minibatch (a second signature), the signature cap, and a capture that fails. The real
capture runs in ``tests/test_cuda.py`` on a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_sweep import SPEC, data, mlp, mse_of  # the small MLP task of the CPU sweep tests
from test_sweep_stacked import _f64  # noqa: F401 - float64, one thread (autouse)
from torch import Tensor

import funcreg as fr
from funcreg import _engine, _graphs
from funcreg.result import SweepResult


def _counting(captures: list[int], fail: bool = False) -> _graphs.Capture:
    def capture(fn: Callable[..., Any], static: tuple[Any, ...]) -> Any:
        captures.append(1)
        if fail:
            raise _graphs.CaptureFailed("operation not permitted when stream is capturing")
        return _graphs.replay_capture(fn, static)

    return capture


def run(
    graph: bool,
    captures: list[int] | None = None,
    fail: bool = False,
    said: list[str] | None = None,
    **kw: Any,
) -> Any:
    """A sweep on the CPU; ``graph=True`` wraps its eager steps as on a CUDA device, with
    :func:`replay_capture` in place of the device capture (``said``: the warnings)."""
    x, y = kw.pop("data", data())
    net = mlp(bn=kw.pop("bn", False))
    grid = kw.pop("grid", fr.grid(l1=[1e-3, 1e-2, 3e-2, 0.1], l2=1e-3))
    args: dict[str, Any] = dict(
        train=(x, y), steps=12, batch_size=16, chunk_size=2, progress=False,
        optimizer=fr.optim.adam(0.05),
    )  # fmt: skip
    args.update(kw)
    seen = captures if captures is not None else []

    def wrap(fns: dict[bool, Callable[..., Any]], dev: torch.device) -> Any:
        return {b: _graphs.GraphedStep(f, _counting(seen, fail)) for b, f in fns.items()}

    with pytest.MonkeyPatch.context() as mp:
        if graph:
            mp.setattr(_engine, "graphed", wrap)
            args["plan"] = {"cuda_graph": True}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fr.sweep(net, mse_of(net), SPEC, grid, **args)
    messages = [str(w.message) for w in caught]
    if said is not None:
        said.extend(messages)
    assert any("applies on CUDA devices" in m for m in messages) == graph
    return result


def same(a: SweepResult, b: SweepResult) -> None:
    for n in a.stacked:
        assert torch.equal(a.stacked[n], b.stacked[n]), n
    for n in a.stacked_buffers:
        assert torch.equal(a.stacked_buffers[n], b.stacked_buffers[n]), n
    assert torch.equal(a.diverged, b.diverged)
    assert torch.equal(a.diverged_at, b.diverged_at)
    for key, v in a.history.items():
        if isinstance(v, Tensor):
            assert torch.equal(v.nan_to_num(7.0), b.history[key].nan_to_num(7.0)), key


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
@pytest.mark.parametrize("bn", [False, True])
def test_replayed_steps_equal_the_eager_sweep_bit_for_bit(chunk_size: int, bn: bool) -> None:
    captures: list[int] = []
    graphed = run(True, captures, chunk_size=chunk_size, bn=bn)
    same(graphed, run(False, chunk_size=chunk_size, bn=bn))
    assert captures == [1]  # one signature (40 samples, batches of 16: the last one too)
    assert graphed.meta["plan"]["cuda_graph"] is True


def test_a_short_last_batch_is_a_second_signature_and_the_cap_holds() -> None:
    x, y = data(n=37)  # batches of 16, 16, 5
    captures: list[int] = []
    same(run(True, captures, data=(x, y)), run(False, data=(x, y)))
    assert len(captures) == 2
    captures.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_graphs, "MAX_GRAPHS", 1)
        same(run(True, captures, data=(x, y)), run(False, data=(x, y)))
    assert len(captures) == 1  # the short batch runs eagerly


def test_a_diverging_model_is_restored_and_the_others_are_untouched() -> None:
    g = fr.grid(
        l1=[1e-3, 1e-2, 3e-2, 0.1], l2=[1e-3] * 4, lr=[0.01, 0.01, 1e6, 0.01], product=False
    )
    kw = dict(grid=g, optimizer=fr.optim.sgd("lr"))
    graphed, eager = run(True, **kw), run(False, **kw)
    assert graphed.diverged.tolist() == [False, False, True, False]
    same(graphed, eager)


def test_a_failed_capture_warns_and_runs_eagerly() -> None:
    captures: list[int] = []
    said: list[str] = []
    graphed = run(True, captures, fail=True, said=said)
    assert sum("could not be captured in a CUDA graph" in m for m in said) == 1
    same(graphed, run(False))


def test_plan_checks() -> None:
    x, y = data()
    net = mlp()
    args: dict[str, Any] = dict(train=(x, y), steps=2, progress=False, optimizer=fr.optim.sgd(0.1))
    g = fr.grid(l1=[1e-3, 1e-2], l2=1e-3)
    with pytest.raises(TypeError, match='"cuda_graph" must be True or False'):
        fr.sweep(net, mse_of(net), SPEC, g, plan={"cuda_graph": "yes"}, **args)
    with pytest.raises(ValueError, match="compile=True compiles it instead"):
        fr.sweep(net, mse_of(net), SPEC, g, plan={"cuda_graph": True}, compile=True, **args)
    with pytest.warns(UserWarning, match="applies on CUDA devices; on cpu the steps run eagerly"):
        r = fr.sweep(net, mse_of(net), SPEC, g, plan={"cuda_graph": True}, **args)
    assert r.meta["plan"]["cuda_graph"] is True
    plain = fr.sweep(net, mse_of(net), SPEC, g, **args)
    same(r, plain)
    with pytest.warns(UserWarning, match="applies on CUDA devices"):  # a recorded plan keeps it
        again = fr.sweep(net, mse_of(net), SPEC, g, plan=r.meta["plan"], **args)
    assert again.meta["plan"]["cuda_graph"] is True


def test_graphed_step_returns_copies_that_the_next_replay_leaves_alone() -> None:
    def step(p: Any, st: Any, bufs: Any, hp: Any, b: Any) -> Any:
        return {"w": p["w"] * 2}, st, torch.stack([p["w"].sum()])

    g = _graphs.GraphedStep(step, _graphs.replay_capture)
    p1 = {"w": torch.ones(3)}
    out1 = g(p1, (), {}, {}, (torch.zeros(1),))
    out2 = g(out1[0], (), {}, {}, (torch.zeros(1),))
    assert out1[0]["w"].tolist() == [2.0, 2.0, 2.0]  # not overwritten by the second replay
    assert out2[0]["w"].tolist() == [4.0, 4.0, 4.0]
    assert p1["w"].tolist() == [1.0, 1.0, 1.0]
    assert isinstance(out2[2], Tensor)


def test_a_resume_alone_does_not_turn_graphs_on(tmp_path: Any) -> None:
    """The checkpoint's plan record says what the earlier run did; this call's ``plan=``
    decides (a resume with ``compile=True`` would otherwise record graphs it never ran)."""
    x, y = data()
    net = mlp()
    path = tmp_path / "ck.pt"
    args: dict[str, Any] = dict(train=(x, y), progress=False, optimizer=fr.optim.sgd(0.1))
    g = fr.grid(l1=[1e-3, 1e-2], l2=1e-3)
    with pytest.warns(UserWarning, match="applies on CUDA devices"):
        first = fr.sweep(
            net, mse_of(net), SPEC, g, steps=3, checkpoint=path, plan={"cuda_graph": True}, **args
        )
    assert first.meta["plan"]["cuda_graph"] is True
    resumed = fr.sweep(net, mse_of(net), SPEC, g, steps=6, checkpoint=path, **args)
    assert resumed.steps == 6 and "cuda_graph" not in resumed.meta["plan"]
