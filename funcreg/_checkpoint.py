"""A sweep's checkpoint file: what identifies the sweep that wrote it, and the one place that
reads (:func:`read_checkpoint`, :func:`load_checkpoint`), writes (:func:`save_checkpoint`)
and locks (:class:`CheckpointLock`) it.

Identity (:func:`sweep_identity`) covers the model's parameter and buffer names, shapes and
dtypes; every field of every spec term (:func:`spec_identity`: selectors with their patterns
in sorted order, so that one built from a Python set is the same in every process; numbers,
dicts and tensors of ``toward=``/``weight=``); the grid's values; the optimizer's settings;
``prox``; the data (shapes, dtypes and a SHA-256 of the values of tensor data; an iterable by
its type and length, as it is not read ahead of training); whether there is a ``val_fn``;
the batch size and the seed. A checkpoint whose identity differs is refused, naming the first
difference (:func:`check_identity`). The loss and validation functions are identified by
qualified name and a hash of their bytecode (:func:`code_identity`): a difference is warned
about, not refused, so that a loss fixed after a crash can resume.

The file is a :meth:`SweepResult.to_dict <funcreg.result.SweepResult.to_dict>` with its
resume state and a SHA-256 of that payload (:func:`payload_checksum`), loaded with
``torch.load(weights_only=True)`` and verified: an empty, truncated, foreign or changed file
is refused with a ``ValueError`` naming it and what is wrong. Writes are atomic (temporary
file, ``fsync``, rename), and a full disk leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._data import Data
from ._files import (
    canonical,
    code_identity,
    damaged,
    digest,
    payload_checksum,
    read_verified,
    write_atomic,
)
from .optim import Optimizer
from .result import FORMAT, SweepResult

try:
    import fcntl
except ImportError:  # pragma: no cover - platforms without fcntl (Windows)
    fcntl = None  # type: ignore[assignment]
from .spec import Spec

__all__ = [
    "CheckpointLock",
    "check_identity",
    "code_identity",
    "data_identity",
    "describe_optimizer",
    "digest",
    "load_checkpoint",
    "payload_checksum",
    "read_checkpoint",
    "save_checkpoint",
    "spec_identity",
    "sweep_identity",
]


def describe_optimizer(opt: Optimizer) -> str:
    """A stable description of a functional optimizer: its settings as given
    (``Optimizer.config``), else what its ``step`` closes over, and the names it reads."""
    if opt.config:
        return "; ".join(
            [*(f"{k}={v!r}" for k, v in opt.config), f"hyperparams={sorted(opt.hyperparams)}"]
        )
    parts = [getattr(opt.step, "__qualname__", type(opt.step).__name__)]
    code = getattr(opt.step, "__code__", None)
    cells = getattr(opt.step, "__closure__", None) or ()
    if code is not None:
        for name, cell in zip(code.co_freevars, cells, strict=False):
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            plain = isinstance(v, bool | int | float | str | None) or (
                isinstance(v, tuple) and all(isinstance(x, int | float | str) for x in v)
            )
            if plain:
                parts.append(f"{name}={v!r}")
    parts.append(f"hyperparams={sorted(opt.hyperparams)}")
    return "; ".join(parts)


def spec_identity(spec: Spec) -> str:
    """Every field of every term of the spec (:func:`_canonical`: selectors, ``toward=``,
    ``weight=`` as a number, a dict of numbers or tensors, penalty settings), with a digest
    of the tensors it holds."""
    tensors: list[tuple[str, Tensor]] = []
    text = canonical(dict(spec.items()), tensors, "spec")
    return text + (f" tensors={digest(tensors)}" if tensors else "")


def data_identity(data: Data | None) -> dict[str, Any] | None:
    """The data's kind and shapes, and for tensor data a SHA-256 of the values (an iterable is
    not read ahead of training: it is identified by its type and length only)."""
    if data is None:
        return None
    out = data.identity()
    tensors = getattr(data, "tensors", None)
    if out.get("kind") == "tensors" and tensors is not None:
        out["sha256"] = digest((f"[{i}]", t) for i, t in enumerate(tensors))
    return out


def check_identity(old: Any, new: dict[str, Any], path: Path) -> None:
    """Refuse (``ValueError`` naming ``path`` and the first difference) a checkpoint whose
    identity ``old`` is not this run's ``new``. A different loss or validation function
    (``"functions"``: :func:`code_identity`) is warned about, not refused: after a crash in
    the loss, the fixed loss must be able to resume."""

    def refuse(what: str, a: Any, b: Any) -> ValueError:
        return ValueError(
            f"checkpoint {os.fspath(path)!r} belongs to a different sweep: the {what} differs "
            f"(checkpoint: {a!s:.200}; this run: {b!s:.200}). Use another checkpoint path, "
            "or delete the file to start over."
        )

    if not isinstance(old, dict):
        raise ValueError(f"{os.fspath(path)!r} holds no sweep identity; it is not a checkpoint")
    for key, b in new.items():
        a = old.get(key)
        if key == "grid":
            if not isinstance(a, dict) or list(a) != list(b):
                raise refuse("grid axes", list(a or {}), list(b))
            for axis, vb in b.items():
                va = a[axis]
                if va.shape != vb.shape or not torch.equal(va.double(), vb.double()):
                    raise refuse(
                        f"grid axis {axis!r}",
                        f"K={va.numel()} {va.tolist()[:6]}",
                        f"K={vb.numel()} {vb.tolist()[:6]}",
                    )
        elif key == "functions":
            for role, fb in b.items():
                fa = (a or {}).get(role)
                if fa != fb:
                    same = bool(fa and fb and fa["name"] == fb["name"])
                    warnings.warn(
                        f"checkpoint {os.fspath(path)!r} was written with {role} "
                        f"{(fa or {}).get('name')!r}, this run has {(fb or {}).get('name')!r}"
                        f"{' (same name, other code)' if same else ''}"
                        f"; resuming with this run's. If the {role}'s meaning changed, the "
                        "resumed models mix two objectives: delete the checkpoint to start over",
                        UserWarning,
                        stacklevel=4,
                    )
        elif a != b:
            raise refuse(key, a, b)


def sweep_identity(
    params0: Mapping[str, Tensor],
    fixed0: Mapping[str, Tensor],
    spec: Spec,
    grid: Mapping[str, Tensor],
    optimizer: Optimizer,
    prox: bool,
    train: Data,
    val: Data | None,
    loss_fn: Any,
    val_fn: Any,
    batch_size: int | None,
    seed: int,
    activity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this sweep (see the module docstring)."""
    return {
        "model": [[n, list(v.shape), str(v.dtype)] for n, v in {**params0, **fixed0}.items()],
        "spec": spec_identity(spec),
        "grid": {n: v.clone() for n, v in grid.items()},
        "optimizer": describe_optimizer(optimizer),
        "prox": bool(prox),
        "train": data_identity(train),
        "val": data_identity(val),
        "val_fn": val_fn is not None,
        "functions": {"loss_fn": code_identity(loss_fn), "val_fn": code_identity(val_fn)},
        "batch_size": batch_size,
        "seed": seed,
        "activity": canonical(dict(activity or {}), [], "activity"),
    }


# ----------------------------------------------------------------------------- the file


def read_checkpoint(path: Path, model: nn.Module | None = None) -> SweepResult:
    """The :class:`SweepResult` stored in ``path``, read and verified by
    :func:`funcreg._files.read_verified` (``weights_only=True``, checksum), and checked to
    hold the same number of models in every stacked tensor. A file that is empty,
    truncated, not a checkpoint, lacks a key, or whose bytes changed raises a ``ValueError``
    naming the file and what is wrong."""
    data = read_verified(path, FORMAT, _KEYS)
    k = int(data["diverged"].numel()) if isinstance(data["diverged"], Tensor) else -1
    for part in ("stacked", "stacked_buffers"):
        for n, v in data[part].items():
            if not isinstance(v, Tensor) or v.ndim == 0 or v.shape[0] != k:
                raise damaged(path, f"{part}[{n!r}] does not hold K={k} models")
    return SweepResult.from_dict(data, model)


_KEYS = (
    "format",
    "grid",
    "stacked",
    "stacked_buffers",
    "history",
    "diverged",
    "diverged_at",
    "steps",
    "meta",
    "resume",
)  # fmt: skip  (SweepResult.to_dict's keys)


def load_checkpoint(
    ckpt: Path, identity: dict[str, Any], steps: int, model: nn.Module
) -> SweepResult | None:
    """The run saved in ``ckpt`` (``None`` when there is no such file), refused with a
    ``ValueError`` naming the file when it is damaged (:func:`read_checkpoint`), belongs to
    another sweep, holds no resume state, or has more than ``steps`` steps done."""
    if not ckpt.exists():
        return None
    prev = read_checkpoint(ckpt, model)
    check_identity(prev.meta.get("identity"), identity, ckpt)
    if prev.resume is None:
        raise ValueError(f"checkpoint {os.fspath(ckpt)!r} holds no resume state")
    model_shapes = {n: tuple(shape) for n, shape, _ in identity["model"]}
    for part in (prev.stacked, prev.stacked_buffers):
        for n, v in part.items():
            if n in model_shapes and tuple(v.shape[1:]) != model_shapes[n]:
                raise damaged(
                    ckpt, f"{n!r} has shape {tuple(v.shape)}, not (K, *{model_shapes[n]})"
                )
    if prev.steps > steps:
        raise ValueError(
            f"checkpoint {os.fspath(ckpt)!r} has {prev.steps} steps done, more than "
            f"steps={steps}; ask for at least {prev.steps} steps or delete it"
        )
    return prev


def _tmp_files(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))


def save_checkpoint(result: SweepResult, ckpt: Path) -> None:
    """Write ``result`` (with its resume state) and its checksum to ``ckpt`` atomically
    (:func:`funcreg._files.write_atomic`): a crash or a full disk leaves the previous
    checkpoint as it was, and a full disk is reported as such."""
    write_atomic(ckpt, result.to_dict())


# ----------------------------------------------------------------------------- the lock


class CheckpointLock:
    """An advisory lock on a checkpoint path, held by one sweep while it runs, so that two
    sweeps started on the same path refuse instead of overwriting each other's file.

    The lock is ``fcntl.flock`` on a sidecar file ``PATH.lock`` holding the owner's process
    id (released by the kernel when the process dies, so a crash leaves no stale lock; the
    file itself is removed on release, and a taker checks that the file it locked is still
    the one at the path). Where ``fcntl`` is missing, the sidecar is created exclusively and
    a file whose process is gone is taken over. Taking the lock also removes the temporary
    files of writes that were interrupted (``.PATH.*.tmp``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            self._flock()
        else:  # pragma: no cover - platforms without fcntl
            self._exclusive()
        for stale in _tmp_files(self.path):  # no writer can own them now: we hold the lock
            with contextlib.suppress(OSError):
                stale.unlink()

    def _busy(self) -> RuntimeError:
        try:
            holder = self.lock_path.read_text().strip() or "?"
        except OSError:
            holder = "?"
        return RuntimeError(
            f"checkpoint {os.fspath(self.path)!r} is in use by another sweep: process "
            f"{holder} holds {os.fspath(self.lock_path)!r}. Wait for it to finish, stop it, "
            "or give this sweep another checkpoint path"
        )

    def _flock(self) -> None:
        assert fcntl is not None
        for _ in range(100):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
                raise
            try:  # the holder before us may have removed the file we opened: lock the new one
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise self._busy()

    def _exclusive(self) -> None:  # pragma: no cover - platforms without fcntl
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.lock_path.read_text().strip())
                    os.kill(pid, 0)
                except (ValueError, OSError):  # unreadable, or its process is gone: stale
                    with contextlib.suppress(OSError):
                        self.lock_path.unlink()
                    continue
                raise self._busy() from None
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return
        raise self._busy()

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):  # removed while held: a waiter re-checks the inode
            self.lock_path.unlink()
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __del__(self) -> None:
        self.release()
