"""Checkpoints detect damage and misuse: a checksum of the payload, an identity that covers the
data values, the loss and every spec field, errors that name the file for every kind of
damaged file, cleanup of interrupted writes, a lock against two sweeps on one path, and a
full disk reported as such with the previous checkpoint intact."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import funcreg as fr
from funcreg.result import SweepResult

D = 3


def task() -> tuple[nn.Module, Any, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, D, generator=g)
    y = x.sum(1, keepdim=True)
    torch.manual_seed(0)
    net = nn.Linear(D, 1)

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, p, (xb,), strict=True), yb)

    return net, loss, x, y


SPEC = fr.Spec(l1=fr.L1(), l2=fr.L2())
GRID = fr.grid(l1=[1e-3, 1e-2], l2=1e-3)
KW: dict[str, Any] = dict(optimizer=fr.optim.sgd(0.05), progress=False, checkpoint_every=2)


def run(path: Path, steps: int = 4, spec: Any = SPEC, **kw: Any) -> SweepResult:
    net, loss, x, y = task()
    args = {**KW, "train": (x, y), "steps": steps, "checkpoint": path, **kw}
    loss = args.pop("loss", loss)
    return fr.sweep(net, loss, spec, GRID, **args)


def fresh(tmp_path: Path) -> Path:
    path = tmp_path / "ck.pt"
    run(path)
    return path


# ------------------------------------------------------------------------ integrity


def test_a_checksum_is_stored_and_a_changed_byte_is_refused(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    data = torch.load(path, weights_only=True)
    assert isinstance(data["checksum"], str) and len(data["checksum"]) == 64
    raw = bytearray(path.read_bytes())
    weight = data["stacked"]["weight"].contiguous().view(torch.uint8).numpy().tobytes()
    at = bytes(raw).find(weight)
    assert at > 0  # the weights' storage, stored as is in the file
    raw[at + 3] ^= 0x40  # one flipped bit in the exponent of a weight
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is damaged: its checksum does "
                       r"not match its contents.*Delete it to start over"):  # fmt: skip
        run(path, steps=6)


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda raw: b"", r"it is empty \(0 bytes"),
        (lambda raw: raw[: len(raw) // 2], r"it cannot be read \("),
        (lambda raw: b"\x00garbage" * 100, r"it cannot be read \("),
    ],
    ids=["zero-length", "truncated", "garbage"],
)
def test_damaged_files_name_the_path_and_what_is_wrong(
    tmp_path: Path, damage: Any, what: str
) -> None:
    path = fresh(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is damaged: {what}"):
        run(path, steps=6)


def test_a_file_with_missing_keys_or_models_is_refused(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    data = torch.load(path, weights_only=True)
    del data["checksum"]
    torch.save({k: v for k, v in data.items() if k != "stacked"}, path)
    with pytest.raises(ValueError, match=rf"'{path}' is damaged: it lacks \['stacked'\]"):
        run(path, steps=6)
    torch.save({**data, "stacked": {"weight": data["stacked"]["weight"][:1]}}, path)
    with pytest.raises(ValueError, match=rf"'{path}' is damaged: stacked\['weight'\] does not "
                       r"hold K=2 models"):  # fmt: skip
        run(path, steps=6)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match=rf"'{path}' is damaged: it is not a funcreg sweep"):
        run(path, steps=6)


def test_a_result_saved_by_save_is_checksummed_and_resumes(tmp_path: Path) -> None:
    """SweepResult.save (e.g. of a merged distributed result) writes the same checksummed
    file as a checkpoint: it resumes, and a changed byte is refused by SweepResult.load too;
    a file without a checksum (an earlier version) is read unverified."""
    path = tmp_path / "ck.pt"
    first = run(path)
    first.save(path)
    data = torch.load(path, weights_only=True)
    assert "checksum" in data
    assert run(path, steps=6).steps == 6
    data["stacked"]["weight"][0, 0] += 1.0
    torch.save(data, path)
    with pytest.raises(ValueError, match=rf"result '{path}' is damaged: its checksum"):
        SweepResult.load(path)
    del data["checksum"]
    torch.save(data, path)
    assert SweepResult.load(path).K == first.K


# ------------------------------------------------------------------------- identity


def test_different_data_values_are_refused(tmp_path: Path) -> None:
    path = fresh(tmp_path)
    _, _, x, y = task()
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' belongs to a different sweep: "
                       r"the train differs.*sha256"):  # fmt: skip
        run(path, steps=6, train=(x, y + 1))


@pytest.mark.parametrize(
    ("first", "second"),
    [(fr.L2(weight=2.0), fr.L2(weight=3.0)), (fr.L2(weight={"weight": 1.0}),
                                              fr.L2(weight={"weight": 0.5}))],
    ids=["float", "dict-of-float"],
)  # fmt: skip
def test_weight_number_changes_are_refused(tmp_path: Path, first: Any, second: Any) -> None:
    path = tmp_path / "ck.pt"
    run(path, spec=fr.Spec(l1=fr.L1(), l2=first))
    with pytest.raises(ValueError, match=r"different sweep: the spec differs"):
        run(path, steps=6, spec=fr.Spec(l1=fr.L1(), l2=second))


def test_selector_from_a_set_resumes_whatever_its_order(tmp_path: Path) -> None:
    """A set's order of strings changes between processes (hash randomization): the
    identity sorts a selector's patterns, so any order resumes."""
    path = tmp_path / "ck.pt"
    run(path, spec=fr.Spec(l1=fr.L1(["weight", "bias"]), l2=fr.L2()))
    resumed = run(path, steps=6, spec=fr.Spec(l1=fr.L1(["bias", "weight"]), l2=fr.L2()))
    assert resumed.steps == 6


def test_selector_set_resumes_in_a_new_process(tmp_path: Path) -> None:
    script = f"""
import sys
sys.path.insert(0, {os.getcwd()!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
import funcreg as fr
from test_checkpoint_integrity import run
from pathlib import Path
spec = fr.Spec(l1=fr.L1({{"weight", "bias", "w2", "w3", "w4"}}), l2=fr.L2())
print(run(Path({str(tmp_path / "ck.pt")!r}), steps=int(sys.argv[1]), spec=spec).steps)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = []
    for seed, steps in (("1", "2"), ("2", "4")):
        env["PYTHONHASHSEED"] = seed
        done = subprocess.run(
            [sys.executable, "-c", script, steps], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        out.append(done.stdout.split()[-1])
    assert out == ["2", "4"]


def test_a_different_loss_function_is_warned_about(tmp_path: Path) -> None:
    """A resume with another loss (by qualified name and bytecode) warns: after a crash in
    the loss, the fixed loss must be able to resume, so it is not refused."""
    path = fresh(tmp_path)
    net, loss, x, y = task()

    def other(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.l1_loss(functional_call(net, p, (xb,), strict=True), yb)

    with pytest.warns(UserWarning, match=r"was written with loss_fn 'task.<locals>.loss', this "
                      r"run has '.*other'; resuming.*delete the checkpoint"):  # fmt: skip
        run(path, steps=6, loss=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(path, steps=8, loss=other)  # now recorded: the same function again is silent


# --------------------------------------------------------------- writes, lock, disk


def test_interrupted_writes_leave_no_tmp_files_behind(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    stale = tmp_path / ".ck.pt.0123456789abcdef.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.0123456789abcdef.tmp"
    other.write_bytes(b"not ours")
    run(path)
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.0123456789abcdef.tmp",
                                                         "ck.pt"]  # fmt: skip


def test_a_second_sweep_on_a_locked_path_refuses_naming_the_process(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(path) + '.lock'!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = rf"'{path}' is in use by another sweep: process {holder.pid} holds .*another"
        with pytest.raises(RuntimeError, match=busy):
            run(path)
    finally:
        holder.kill()
        holder.wait()
    assert run(path).steps == 4  # the holder is gone: its lock went with it
    assert not (tmp_path / "ck.pt.lock").exists()  # released at the end of the sweep


def test_the_lock_is_released_when_the_sweep_fails(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    net, loss, x, y = task()
    with pytest.raises(ValueError, match="steps must be an int"):
        fr.sweep(net, loss, SPEC, GRID, train=(x, y), steps=0, checkpoint=path, **KW)
    calls = [0]

    def crashing(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return loss(p, xb, yb)

    with pytest.raises(KeyboardInterrupt):
        fr.sweep(net, crashing, SPEC, GRID, train=(x, y), steps=4, checkpoint=path, **KW)
    assert run(path).steps == 4


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: Any) -> None:
    import funcreg._checkpoint as ck

    path = fresh(tmp_path)
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", full)
    with pytest.raises(OSError, match=rf"no space left while writing '{path}'; the previous "
                       r"checkpoint is intact"):  # fmt: skip
        run(path, steps=6)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    monkeypatch.undo()
    assert run(path, steps=6).steps == 6


def test_code_identity_is_the_same_in_every_process_and_follows_the_code() -> None:
    """The loss's identity is its qualified name and a hash of its code: the same for a
    re-created closure and in a new process (set literals hashed in sorted order), another
    for an edited body."""
    from funcreg._checkpoint import code_identity

    def make(scale: float) -> Any:
        def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return scale * x.sum()

        return loss

    def edited(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return 2 * x.sum()

    assert code_identity(make(1.0)) == code_identity(make(2.0))  # closed-over values: not covered
    assert code_identity(make(1.0))["code"] != code_identity(edited)["code"]
    script = (
        f"import sys; sys.path.insert(0, {os.getcwd()!r})\n"
        "from funcreg._checkpoint import code_identity\n"
        "def loss(p, x):\n"
        "    return 1.0 if x in {'alpha', 'beta', 'gamma', 'delta', 'eps'} else 2.0\n"
        "print(code_identity(loss)['code'])\n"
    )
    codes = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        codes.add(done.stdout.strip())
    assert len(codes) == 1


def test_any_flipped_byte_is_refused_as_damage_or_changes_nothing(tmp_path: Path) -> None:
    """Every byte of a saved result, flipped in turn (a sample of 120 positions spread over
    the file: zip headers, pickle, tensor storage): SweepResult.load either refuses the file
    as damaged, naming it, or (a byte no reader uses, e.g. zip padding) reads the very same
    result; never a raw UnicodeDecodeError, pickle or zip error."""
    path = tmp_path / "r.pt"
    first = run(tmp_path / "ck.pt")
    first.save(path)
    raw = path.read_bytes()
    for i in sorted({int(j * len(raw) / 120) for j in range(120)}):
        bad = bytearray(raw)
        bad[i] ^= 0xFF
        path.write_bytes(bytes(bad))
        try:
            got = SweepResult.load(path)
        except ValueError as e:
            assert f"'{path}' is damaged" in str(e), (i, e)
            continue
        for n, v in first.stacked.items():
            assert torch.equal(got.stacked[n], v), i
