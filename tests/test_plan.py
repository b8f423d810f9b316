"""The measured execution plan of fr.sweep (funcreg._plan): its mechanics with a fake clock
(no test depends on real timings), its record, replay and resume."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg import _plan
from funcreg._chunking import Footprint, auto_chunk_size, footprint
from funcreg.optim import adam
from funcreg.stack import grid

K = 6


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    _plan.CACHE.clear()
    yield
    _plan.CACHE.clear()


@pytest.fixture
def ticking(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: every reading is one second after the last, so every timed step of
    every candidate takes one second and the largest chunk is fastest per model."""
    now = [0.0]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(_plan, "clock", tick)


def wide() -> tuple[nn.Module, Callable[..., Tensor], tuple[Tensor, Tensor]]:
    """A float64 model with 1 MiB of parameters in one tensor (the static rule trains it
    model by model; a vmapped chunk of up to 16 stays under the byte cap), with dropout
    (the probes draw random numbers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Dropout(0.2), nn.Linear(512, 1)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 256, generator=g, dtype=torch.float64)
    y = torch.randn(32, 1, generator=g, dtype=torch.float64)

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, p, (xb,)), yb)

    return net, loss, (x, y)


SPEC = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())


def run(steps: int = 3, **kw: Any) -> fr.SweepResult:
    net, loss, data = wide()
    g = grid(l1=torch.logspace(-4, -2, K).tolist(), l2=1e-4)
    args: dict[str, Any] = dict(
        train=data, optimizer=adam(1e-3), steps=steps, batch_size=8, progress=False
    )
    return fr.sweep(net, loss, SPEC, g, **{**args, **kw})


def test_static_rule_counts_parameter_bytes() -> None:
    """A model with >= 1 MiB of parameters trains one by one; a stacked parameter counts
    against the 16 MiB temporary cap like a forward temporary."""
    net, loss, (x, y) = wide()
    p0 = dict(net.named_parameters())
    fwd = lambda: loss(p0, x, y)  # noqa: E731
    assert auto_chunk_size(fwd, 32) > 1  # without params: the forward alone is small
    assert auto_chunk_size(fwd, 32, params=p0) == 1
    small = {"w": torch.zeros(2**16, dtype=torch.float32)}  # 256 KiB
    assert footprint(lambda: torch.zeros(4) + 1, small).cap() == 64  # 16 MiB / 256 KiB
    assert auto_chunk_size(lambda: torch.zeros(4) + 1, 256, params=small) == 64


def test_plan_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"plan must be one of"):
        run(plan="fastest")
    with pytest.raises(ValueError, match=r'give chunk_size= or plan="measure"'):
        run(plan="measure", chunk_size=2)
    with pytest.raises(ValueError, match=r'recorded plan needs an int "chunk_size"'):
        run(plan={"how": "measured"})
    with pytest.raises(ValueError, match=r"plan has chunk_size 3, chunk_size= is 2"):
        run(plan={"chunk_size": 3}, chunk_size=2)
    with pytest.raises(TypeError, match=r"plan must be None, a str or a recorded plan dict"):
        run(plan=3)


def test_candidates_budget_and_choice() -> None:
    assert _plan.candidates(32, 1, 10) == [1, 10, 8, 5]
    assert _plan.candidates(6, 6, 100) == [6, 1, 3]
    assert _plan.candidates(128, 32, 1000) == [32, 1, 128, 8, 16, 64]
    assert _plan.candidates(128, 127, 127) == [127, 1, 8, 16, 63]
    assert _plan.candidates(3, 3, 100) == [3, 1]
    # probe model-steps (2 + PROBE_STEPS)·c within PROBE_BUDGET of K·steps; the first stays
    assert _plan.within_budget([32, 1, 128, 8], 128, 100) == [32, 1, 8]
    assert _plan.within_budget([32, 1, 128, 8], 128, 1000) == [32, 1, 128, 8]
    assert _plan.within_budget([32, 1], 2, 1) == [32]
    # the smallest chunk within MARGIN of the fastest: a larger one must be MARGIN faster
    assert _plan.choose({1: 1.0, 8: 0.97}, static=1) == 1
    assert _plan.choose({1: 1.0, 8: 0.90}, static=1) == 8
    assert _plan.choose({4: 0.5, 8: 0.5, 1: 1.0}, static=1) == 4
    # the static size gets no preference: as fast and smaller wins (less memory)
    assert _plan.choose({18: 2.65, 1: 2.15, 8: 2.10}, static=18) == 1
    assert _plan.choose({32: 0.57, 1: 0.79, 8: 0.603}, static=32) == 32


def test_memory_cap_formula() -> None:
    """``k·S + C·A <= r·(k·S + A)``: the largest such C, between 1 and k."""
    fp = Footprint(total=100, largest=10, params=20, largest_param=20)
    assert fp.memory_cap(32, 50, 1.5) == 9  # floor(1 + 0.5·(1600 + 100)/100) = floor(9.5)
    for c in (9, 10):  # 9 is within the bound, 10 is not
        assert (32 * 50 + c * 100 <= 1.5 * (32 * 50 + 100)) == (c == 9)
    assert fp.memory_cap(32, 50, 1.0) == 1
    assert fp.memory_cap(32, 50, 100.0) == 32


def test_max_memory_option_bounds_the_plan(ticking: None) -> None:
    """plan={"max_memory": r} caps the static size and every candidate; the record says
    so; its chunks give the numbers of the same chunks given; bad options are refused."""
    res = run(plan={"mode": "measure", "max_memory": 1.0})
    plan = res.meta["plan"]
    assert plan["how"] == "measured" and plan["memory_cap"] == 1 and plan["max_memory"] == 1.0
    assert plan["chunk_size"] == 1 and set(plan["per_model_s"]) == {"1"}
    loose = run(plan={"mode": "measure", "max_memory": 1e6})
    assert loose.meta["plan"]["chunk_size"] == K  # the fake clock favours the whole grid
    static = run(steps=3, plan={"max_memory": 1.0})
    assert static.meta["plan"] == {
        "how": "static", "chunk_size": 1, "max_memory": 1.0, "memory_cap": 1
    }  # fmt: skip
    given = run(chunk_size=1)
    for n, v in res.stacked.items():
        assert torch.equal(given.stacked[n], v), n
    with pytest.raises(ValueError, match=r'"max_memory" is the largest ratio'):
        run(plan={"max_memory": 0.5})
    with pytest.raises(ValueError, match=r'"max_memory" is the largest ratio'):
        run(plan={"max_memory": True})
    with pytest.raises(ValueError, match=r'plan: "mode" must be one of'):
        run(plan={"mode": "fastest"})


def test_measure_takes_the_fastest_step_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # two warm-up steps per candidate (the second timed: 1 s and 1 ms), then interleaved
    # rounds of one sample each: candidate 4 one step per sample (3, 2, 4 s), candidate 1
    # 20 steps per sample (2, 1, 3 ms per step)
    readings = iter(
        [0.0, 1.0, 0.0, 0.001] + [0.0, 3.0, 0.0, 0.04, 0.0, 2.0, 0.0, 0.02, 0.0, 4.0, 0.0, 0.06]
    )
    monkeypatch.setattr(_plan, "clock", lambda: next(readings))
    calls: list[int] = []
    out = _plan.measure([4, 1], lambda c: lambda: calls.append(c))
    assert out == pytest.approx({4: 2.0 / 4, 1: 0.001})
    reps = _plan.PROBE_MAX_REPS  # the 1 ms warm-up: 20 ms samples, 20 steps each
    assert calls == [4, 4, 1, 1] + ([4] + [1] * reps) * _plan.PROBE_STEPS


def test_short_runs_keep_the_static_plan(ticking: None) -> None:
    res = run(steps=3)
    assert res.meta["plan"] == {"how": "static", "chunk_size": 1}
    assert res.meta["chunks"] == [[a, a + 1] for a in range(K)]
    assert run(steps=3, plan="static").meta["plan"]["how"] == "static"


def test_measured_plan_recorded_cached_and_replayed(
    ticking: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = run(plan="measure")
    plan = res.meta["plan"]
    assert plan["how"] == "measured" and plan["static"] == 1
    assert plan["chunk_size"] == K  # the fake clock: one second per step of any chunk
    assert set(plan["per_model_s"]) == {"1", str(K), str(K // 2)}
    assert res.meta["chunks"] == [[0, K]]

    def no_probe(*a: Any, **k: Any) -> Any:
        raise AssertionError("probed again")

    monkeypatch.setattr(_plan, "measure", no_probe)
    again = run(plan="measure")  # the same problem in this process: the cached choice
    assert again.meta["plan"]["cached"] is True and again.meta["chunks"] == [[0, K]]
    replay = run(plan=plan)  # a recorded plan: the same chunks, the same numbers
    assert replay.meta["plan"] == {"how": "given", "chunk_size": K}
    for n, v in res.stacked.items():
        assert torch.equal(replay.stacked[n], v), n
        assert torch.equal(again.stacked[n], v), n
    assert torch.equal(replay.history["loss"], res.history["loss"])


def test_resume_keeps_the_measured_plan(
    ticking: None, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = run(steps=4, plan="measure")
    _plan.CACHE.clear()
    path = tmp_path / "ck.pt"
    first = run(steps=2, plan="measure", checkpoint=path)
    assert first.meta["plan"]["chunk_size"] == K
    _plan.CACHE.clear()
    monkeypatch.setattr(_plan, "choose", lambda per_model, static: 1)  # would now pick 1
    resumed = run(steps=4, plan="measure", checkpoint=path)
    assert resumed.meta["chunks"] == full.meta["chunks"] == [[0, K]]
    assert resumed.meta["plan"]["how"] == "measured"
    for n, v in full.stacked.items():
        assert torch.equal(resumed.stacked[n], v), n
    assert torch.equal(resumed.history["loss"], full.history["loss"])


def test_probe_leaves_the_run_unchanged(ticking: None) -> None:
    """The probes' random draws (dropout) are undone: a measured run equals the same chunks
    given."""
    measured = run(plan="measure")
    given = run(chunk_size=measured.meta["plan"]["chunk_size"])
    for n, v in measured.stacked.items():
        assert torch.equal(given.stacked[n], v), n


def test_guard_fast_check_falls_back_on_overflow() -> None:
    """The guard's one-sum check: finite entries whose sum overflows are still finite."""
    from funcreg._engine import _all_finite

    big = torch.full((4,), 3e38, dtype=torch.float32)  # sums to inf in float32
    assert _all_finite(torch.zeros(2), {"w": big})
    for bad in (math.inf, -math.inf, math.nan):
        w = big.clone()
        w[2] = bad
        assert not _all_finite(torch.zeros(2), {"w": w})
    assert not _all_finite(torch.tensor([0.0, math.nan]), {"w": torch.ones(3)})
    assert _all_finite(torch.zeros(2), {"w": torch.ones(3), "e": torch.ones(0)})


def test_a_failing_candidate_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate that raises (or warns) while probed is dropped; the static size stays
    when nothing ran."""
    monkeypatch.setattr(_plan, "clock", iter(range(100)).__next__)

    def make(c: int) -> Callable[[], None]:
        def step() -> None:
            warnings.warn("probe noise", UserWarning, stacklevel=1)
            if c == 8:
                raise RuntimeError("this model cannot be vmapped")

        return step

    assert set(_plan.measure([1, 8], make)) == {1}
    assert _plan.choose({}, static=4) == 4
    assert _plan.choose({1: 2.0}, static=8) == 1


def test_unsplit_release_joins_the_same_tensors_and_empties_the_chunks() -> None:
    """The run's last result: the same values as a copying join, and the chunks' own
    references dropped (a lone chunk's tensors are taken, not copied)."""
    from funcreg._chunking import Chunk, unsplit

    def chunks() -> list[Chunk]:
        g = torch.Generator().manual_seed(0)
        out = []
        for a, b in ((0, 2), (2, 3)):
            batched = b - a > 1
            shape = (b - a, 3) if batched else (3,)
            p = {"w": torch.randn(shape, generator=g)}
            z = torch.zeros(b - a, dtype=torch.bool)
            out.append(Chunk(a, b, batched, p, None, {}, {}, z, z.long(), torch.zeros(1)))
        return out

    ref = unsplit(chunks(), lambda ch: ch.params)
    chs = chunks()
    got = unsplit(chs, lambda ch: ch.params, lambda ch: setattr(ch, "params", {}))
    assert torch.equal(got["w"], ref["w"]) and got["w"].shape == (3, 3)
    assert all(ch.params == {} for ch in chs)
    one = chunks()[:1]
    w = one[0].params["w"]
    assert unsplit(one, lambda ch: ch.params, lambda ch: setattr(ch, "params", {}))["w"] is w
