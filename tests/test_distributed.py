"""funcreg.distributed: a grid sharded over 2 CPU processes (gloo on loopback) gives the
single-process result bit for bit; a failing rank fails the job quickly; shards resume."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
import funcreg.distributed as frd
from funcreg import sweep
from funcreg.result import SweepResult

STEPS = 12
LAUNCH_LIMIT_S = 60.0


# ---------------------------------------------------------------------------- the task


class Scale(nn.Module):
    """Multiplies by a constant buffer; an int64 buffer rides along (buffers of every dtype
    travel through the gather)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, n))
        self.register_buffer("version", torch.tensor(3))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.get_buffer("scale")


def make_task(
    k: int, bn: bool = False
) -> tuple[nn.Module, Any, fr.Spec, dict[str, Tensor], dict[str, Any]]:
    """A tiny MLP with buffers, Adam with a swept lr, validation with an extra metric: every
    kind of tensor a SweepResult holds. ``bn=True``: a BatchNorm MLP instead."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = torch.sin(x[:, :2].sum(1, keepdim=True))
    xv = torch.randn(24, 4, generator=g)
    yv = torch.sin(xv[:, :2].sum(1, keepdim=True))
    torch.manual_seed(0)
    if bn:
        net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU())
    else:
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Scale(8))
    net.append(nn.Linear(8, 1))

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, p, (x,), strict=True), y)

    def mae(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (functional_call(net, p, (x,), strict=True) - y).abs().mean()

    spec = fr.Spec(l1=fr.L1("0.weight"), l2=fr.L2())
    lam = torch.logspace(-4, -1, k)
    grid = fr.grid(l1=lam, l2=2 * lam, lr=torch.linspace(5e-3, 2e-2, k), product=False)
    kwargs: dict[str, Any] = dict(
        train=(x, y),
        val=(xv, yv),
        val_fn=mae,
        optimizer=fr.optim.adam(lr="lr"),
        steps=STEPS,
        batch_size=16,
        seed=7,
        progress=False,
        eval_every=3,
        checkpoint_every=4,
    )
    return net, loss, spec, grid, kwargs


def assert_same(a: SweepResult, b: SweepResult, exact: bool = True) -> None:
    """Equality of everything per model: bit for bit (torch.equal) where both runs compute
    each model in calls of the same shapes, else to float32 rounding (ATen evaluates
    pow/exp/log with vector code on a tensor's leading blocks and libm on its tail, so a
    per-model value can move by one ulp with the number of models in a call)."""
    assert a.K == b.K and a.steps == b.steps
    for n in b.grid:
        assert torch.equal(a.grid[n], b.grid[n]), n
    if not exact:
        for n in b.stacked:
            torch.testing.assert_close(a.stacked[n], b.stacked[n], rtol=1e-4, atol=1e-5)
        assert torch.equal(a.diverged, b.diverged)
        return
    for part in ("stacked", "stacked_buffers"):
        da, db = getattr(a, part), getattr(b, part)
        assert list(da) == list(db)
        for n in db:
            assert torch.equal(da[n], db[n]), (part, n)
    assert list(a.history) == list(b.history)
    for key, v in b.history.items():
        if isinstance(v, dict):
            for n in v:
                assert torch.equal(a.history[key][n], v[n]), (key, n)
        else:
            assert torch.equal(a.history[key], v), key
    assert torch.equal(a.diverged, b.diverged) and torch.equal(a.diverged_at, b.diverged_at)
    assert a.resume is not None and b.resume is not None
    assert len(a.resume["opt_state"]) == len(b.resume["opt_state"])
    for ta, tb in zip(a.resume["opt_state"], b.resume["opt_state"], strict=True):
        assert torch.equal(ta, tb)
    assert a.meta["identity"]["grid"].keys() == b.meta["identity"]["grid"].keys()


# --------------------------------------------------------------------------- launching
# Starting a process costs seconds here (importing torch), so one launch of 2 processes
# runs every scenario in turn; each writes its results, errors and timings to files.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        _scenarios(rank, Path(out))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _record(out: Path, name: str, rank: int, *args: Any, **kwargs: Any) -> None:
    """Run ``frd.sweep(*args, **kwargs)``; save its result, or the text of its error, and
    the seconds it took."""
    t0 = time.perf_counter()
    try:
        res = frd.sweep(*args, **kwargs)
    except Exception as e:
        text = "".join(traceback.format_exception_only(type(e), e))
        (out / f"{name}.rank{rank}.err").write_text(text)
    else:
        if res is None:
            (out / f"{name}.rank{rank}.none").touch()
        else:
            res.save(out / f"{name}.rank{rank}.result.pt")
    (out / f"{name}.rank{rank}.seconds").write_text(str(time.perf_counter() - t0))


def _scenarios(rank: int, out: Path) -> None:
    # 1. exact equality: even and uneven grids, a lone-model shard, gather to one rank
    for name, k, gather_to in (("k4", 4, "all"), ("k5", 5, 0), ("k3", 3, "all"), ("bn", 4, 1)):
        net, loss, spec, grid, kw = make_task(k, bn=name == "bn")
        ckpt = out / f"{name}.pt"
        _record(out, name, rank, net, loss, spec, grid, gather_to=gather_to, checkpoint=ckpt, **kw)
    # 2. rank 1 raises at its 10th step: every rank raises, soon
    net, loss, spec, grid, kw = make_task(4)
    bad = _failing(loss, after=9, hard=False) if rank == 1 else loss
    job = out / "job.pt"
    _record(out, "raise", rank, net, bad, spec, grid, checkpoint=job, **kw)
    steps = SweepResult.load(frd.checkpoint_path(job, rank, 2)).steps
    (out / f"raise.rank{rank}.ckpt_steps").write_text(str(steps))
    # 3. the job run again resumes both shards from their checkpoints
    _record(out, "resume", rank, net, loss, spec, grid, checkpoint=job, **kw)
    # 4. rank 1 dies outright at its 10th step (no status exchange): rank 0 must not hang
    bad = _failing(loss, after=9, hard=True) if rank == 1 else loss
    job = out / "job2.pt"
    _record(out, "die", rank, net, bad, spec, grid, checkpoint=job, timeout=30, **kw)


def _failing(loss: Any, after: int, hard: bool) -> Any:
    """``loss`` that fails at training step ``after + 1`` (each step's batch is one new
    tensor, seen once per chunk of models)."""
    calls = [0]
    last: list[Tensor | None] = [None]

    def wrapped(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # training steps (validation runs under no_grad)
            if x is not last[0]:
                last[0] = x
                calls[0] += 1
            if calls[0] > after:
                if hard:
                    os._exit(17)  # dies without a word: no status exchange
                raise ValueError(f"boom at training step {calls[0]}")
        return loss(p, x, y)

    return wrapped


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, os.fspath(out))) for r in range(2)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, LAUNCH_LIMIT_S - (time.perf_counter() - t0)))
    hung = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not any(hung), f"workers still running after {LAUNCH_LIMIT_S} s: {hung}"
    # rank 1 died on purpose in the last scenario; rank 0 finished every scenario
    assert [p.exitcode for p in procs] == [0, 17], [p.exitcode for p in procs]
    return out


def err(out: Path, name: str) -> str:
    f = out / f"{name}.err"
    return f.read_text() if f.exists() else "<no error>"


def seconds(out: Path, name: str) -> float:
    return float((out / f"{name}.seconds").read_text())


# -------------------------------------------------------------------------------- tests


def test_shard_bounds_cover_the_grid_contiguously() -> None:
    for k in range(1, 12):
        for world in range(1, k + 1):
            bounds = [frd.shard_bounds(k, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == k
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert frd.shard_bounds(5, 2, 0) == (0, 3) and frd.shard_bounds(5, 2, 1) == (3, 5)
    with pytest.raises(ValueError, match="K=2 models for 3 processes"):
        frd.shard_bounds(2, 3, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        frd.shard_bounds(4, 2, 2)


def test_checkpoint_path() -> None:
    assert frd.checkpoint_path("out/ckpt.pt", 1, 4) == Path("out/ckpt.rank1-of-4.pt")
    assert frd.checkpoint_path("ckpt", 0, 2) == Path("ckpt.rank0-of-2")


def test_without_a_process_group_it_is_the_plain_sweep() -> None:
    assert not torch.distributed.is_initialized()
    net, loss, spec, grid, kw = make_task(3)
    assert_same(frd.sweep(net, loss, spec, grid, **kw), sweep(net, loss, spec, grid, **kw))
    with pytest.raises(ValueError, match="only one process"):
        frd.sweep(net, loss, spec, grid, gather_to=1, **kw)


@pytest.mark.parametrize("k", [4, 5, 3])
def test_two_processes_equal_one_process_exactly(
    launched: Path, one_thread: None, k: int, tmp_path: Path
) -> None:
    name = f"k{k}"
    assert err(launched, f"{name}.rank0") == err(launched, f"{name}.rank1") == "<no error>"
    net, loss, spec, grid, kw = make_task(k)
    ref = sweep(net, loss, spec, grid, **kw)
    for r in (0,) if k == 5 else (0, 1):  # K=5: gather_to=0
        got = SweepResult.load(launched / f"{name}.rank{r}.result.pt", model=net)
        # K=5 runs vmapped in one process but model by model in the shards (3 and 2 <= 4)
        assert_same(got, ref, exact=k != 5)
        bounds = [list(frd.shard_bounds(k, 2, q)) for q in (0, 1)]
        assert got.meta["distributed"]["world_size"] == 2
        assert got.meta["distributed"]["shards"] == bounds
        assert got.best().index == ref.best().index
    if k == 5:
        assert (launched / "k5.rank1.none").exists()  # gather_to=0: rank 1 got None
    # one checkpoint per rank, each holding its shard (K=3: rank 1's lone model trained
    # beside a copy of itself)
    for r in (0, 1):
        shard = SweepResult.load(frd.checkpoint_path(launched / f"{name}.pt", r, 2))
        a, b = frd.shard_bounds(k, 2, r)
        assert shard.steps == STEPS and max(b - a, 2) == shard.K
        assert torch.equal(shard.stacked["0.weight"][: b - a], ref.stacked["0.weight"][a:b])
    if k in (3, 4):  # a merged result is also a one-process checkpoint: it continues, with
        # the one-process chunk plan (K=3's shards were [0, 2) and a lone model)
        longer = {**kw, "steps": STEPS + 4}
        ckpt = tmp_path / "merged.pt"
        ckpt.write_bytes((launched / f"{name}.rank0.result.pt").read_bytes())
        cont = sweep(net, loss, spec, grid, checkpoint=ckpt, **longer)
        assert_same(cont, sweep(net, loss, spec, grid, **longer))


def test_batchnorm_agrees_to_rounding(launched: Path, one_thread: None) -> None:
    """vmapped batch_norm rounds differently with other models in the batch, so a sharded
    BatchNorm sweep agrees with the one-process sweep to float rounding only."""
    net, loss, spec, grid, kw = make_task(4, bn=True)
    ref = sweep(net, loss, spec, grid, **kw)
    assert (launched / "bn.rank0.none").exists()  # gather_to=1
    got = SweepResult.load(launched / "bn.rank1.result.pt")
    for part in ("stacked", "stacked_buffers"):
        for n, v in getattr(ref, part).items():
            torch.testing.assert_close(getattr(got, part)[n], v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.history["loss"], ref.history["loss"], rtol=1e-4, atol=1e-5)


def test_a_failing_rank_fails_every_rank_fast(launched: Path) -> None:
    own, other = err(launched, "raise.rank1"), err(launched, "raise.rank0")
    assert "ValueError: boom at training step 10" in own
    assert "DistributedSweepError" in other and "rank 1 (models 2..3 of K=4)" in other
    assert "boom at training step 10" in other and "job.rank0-of-2.pt" in other
    assert max(seconds(launched, "raise.rank0"), seconds(launched, "raise.rank1")) < 30
    # rank 0 finished and saved its shard; rank 1 kept its last periodic checkpoint
    assert (launched / "raise.rank0.ckpt_steps").read_text() == str(STEPS)
    assert (launched / "raise.rank1.ckpt_steps").read_text() == "8"


def test_the_job_run_again_resumes_every_shard(launched: Path, one_thread: None) -> None:
    net, loss, spec, grid, kw = make_task(4)
    ref = sweep(net, loss, spec, grid, **kw)
    for r in (0, 1):
        assert err(launched, f"resume.rank{r}") == "<no error>"
        assert_same(SweepResult.load(launched / f"resume.rank{r}.result.pt"), ref)
    assert SweepResult.load(launched / "job.rank1-of-2.pt").steps == STEPS


def test_a_rank_that_dies_does_not_hang_the_others(launched: Path) -> None:
    text = err(launched, "die.rank0")
    assert "DistributedSweepError: rank 0 of 2: rank 1 (models 2..3 of K=4) never reached" in text
    assert "it died (its connection closed); see its log" in text
    assert "job2.rank0-of-2.pt' and resumes when the job is rerun" in text
    assert seconds(launched, "die.rank0") < 30  # the timeout; gloo notices the death at once
    assert SweepResult.load(launched / "job2.rank0-of-2.pt").steps == STEPS


def _hang_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 hangs in its first training step; rank 0 sweeps with timeout=2 s."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    net, loss, spec, grid, kw = make_task(4)

    def hang(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            time.sleep(LAUNCH_LIMIT_S)
        return loss(p, x, y)

    kw = {**kw, "steps": 2, "checkpoint": None}
    torch.distributed.init_process_group("gloo")  # the user's group, torch's default timeout
    try:
        _record(Path(out), "hang", rank, net, hang if rank == 1 else loss, spec, grid,
                timeout=2, **kw)  # fmt: skip
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_hung_rank_is_named_and_the_others_exit_cleanly(tmp_path: Path) -> None:
    """With timeout=, the healthy rank raises an error naming the hung rank, then its
    process ends normally (before: the abandoned collective of the user's process group,
    whose own timeout is torch's 30 minutes, blocked the process at exit)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_hang_worker, args=(r, 2, port, os.fspath(tmp_path)))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    procs[0].join(LAUNCH_LIMIT_S / 2)
    alive = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not alive and procs[0].exitcode == 0, procs[0].exitcode
    text = err(tmp_path, "hang.rank0")
    assert "rank 1 (models 2..3 of K=4) never reached the result exchange: it hangs " in text
    assert "waited 0:00:02, the timeout" in text
    assert seconds(tmp_path, "hang.rank0") < LAUNCH_LIMIT_S / 2


def test_the_default_timeout_is_ten_minutes() -> None:
    """Not torch's 30 minutes: shards differ by at most one model, so healthy ranks reach
    the exchange close together; README's distributed section states it."""
    assert timedelta(minutes=10) == frd.DEFAULT_TIMEOUT
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "DEFAULT_TIMEOUT" in readme and "10 minutes" in readme


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_sweep.py"


def test_example_under_torchrun() -> None:
    """The README's command, small: torchrun initialises the group from its environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [os.fspath(EXAMPLE), "--strengths", "5", "--steps", "20", "--check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_LIMIT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es), shards [[0, 3], [3, 5]]" in done.stdout
    assert "one-process sweep: agrees=True" in done.stdout


def test_example_as_one_plain_process(
    one_thread: None, capsys: pytest.CaptureFixture[str], load_example: Any
) -> None:
    module = load_example("distributed_sweep")
    result = module.main(["--strengths", "3", "--steps", "10"])
    assert result.K == 3 and "distributed" not in result.meta
    assert "1 process(es), shards [[0, 3]]" in capsys.readouterr().out


def test_fr_sweep_distributed_flag_without_process_group_is_the_plain_sweep():
    """fr.sweep(..., distributed=True) outside torchrun runs the one-process sweep."""
    import funcreg as fr

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def loss(p, x, y):
        return ((torch.func.functional_call(net, p, (x,)) - y) ** 2).mean()

    kw = dict(train=(x, y), optimizer=fr.optim.sgd(0.1), steps=5, progress=False)
    grid = fr.grid(l1=[0.0, 0.01, 0.1])
    plain = fr.sweep(net, loss, {"l1": fr.L1()}, grid, **kw)
    dist = fr.sweep(net, loss, {"l1": fr.L1()}, grid, distributed=True, **kw)
    for name, value in plain.stacked.items():
        assert torch.equal(dist.stacked[name], value)
