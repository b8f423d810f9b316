"""A sweep's checkpoint file: what identifies the sweep that wrote it, and the one place that
reads (:func:`load_checkpoint`) and writes (:func:`save_checkpoint`) it.

Identity (:func:`sweep_identity`) covers the model's parameter and buffer names, shapes and
dtypes, the spec (its repr and a digest of the tensors it holds), the grid's values, the
optimizer's settings, ``prox``, the data's shapes and dtypes (or kind and length for an
iterable), whether there is a ``val_fn``, the batch size and the seed. A checkpoint whose
identity differs from the run's is refused, naming the first difference
(:func:`check_identity`). The payload itself is a :class:`~funcreg.result.SweepResult` with
its resume state, written atomically by :meth:`SweepResult.save`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._data import Data
from .optim import Optimizer
from .result import SweepResult
from .spec import Spec

__all__ = [
    "check_identity",
    "describe_optimizer",
    "digest",
    "load_checkpoint",
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


def digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A SHA-256 of labelled tensors: each label, dtype, shape and the bytes."""
    h = hashlib.sha256()
    for label, t in tensors:
        h.update(f"{label}:{t.dtype}{tuple(t.shape)}:".encode())
        if t.layout != torch.strided or t.device.type == "meta":
            h.update(repr(t).encode())  # no plain bytes to hash
            continue
        c = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
        h.update(c.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def spec_identity(spec: Spec) -> str:
    """``repr(spec)``, plus a digest of the tensors it holds (``toward=``, ``weight=``), which
    its repr only names."""
    found: list[tuple[str, Tensor]] = []
    for term, pen in spec.items():
        for f in fields(pen):
            v = getattr(pen, f.name)
            if isinstance(v, Tensor):
                found.append((f"{term}.{f.name}", v))
            elif isinstance(v, Mapping):
                found += [(f"{term}.{f.name}[{key}]", v[key]) for key in sorted(v)
                          if isinstance(v[key], Tensor)]  # fmt: skip
    return repr(spec) + (f" tensors={digest(found)}" if found else "")


def check_identity(old: Any, new: dict[str, Any], path: Path) -> None:
    """Refuse (``ValueError`` naming ``path`` and the first difference) a checkpoint whose
    identity ``old`` is not this run's ``new``."""

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
    has_val_fn: bool,
    batch_size: int | None,
    seed: int,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this sweep (see the module docstring)."""
    return {
        "model": [[n, list(v.shape), str(v.dtype)] for n, v in {**params0, **fixed0}.items()],
        "spec": spec_identity(spec),
        "grid": {n: v.clone() for n, v in grid.items()},
        "optimizer": describe_optimizer(optimizer),
        "prox": bool(prox),
        "train": train.identity(),
        "val": None if val is None else val.identity(),
        "val_fn": has_val_fn,
        "batch_size": batch_size,
        "seed": seed,
    }


def load_checkpoint(
    ckpt: Path, identity: dict[str, Any], steps: int, model: nn.Module
) -> SweepResult | None:
    """The run saved in ``ckpt`` (``None`` when there is no such file), refused with a
    ``ValueError`` naming the file when it belongs to another sweep, holds no resume state,
    or has more than ``steps`` steps done."""
    if not ckpt.exists():
        return None
    prev = SweepResult.load(ckpt, model=model)
    check_identity(prev.meta.get("identity"), identity, ckpt)
    if prev.resume is None:
        raise ValueError(f"checkpoint {os.fspath(ckpt)!r} holds no resume state")
    if prev.steps > steps:
        raise ValueError(
            f"checkpoint {os.fspath(ckpt)!r} has {prev.steps} steps done, more than "
            f"steps={steps}; ask for at least {prev.steps} steps or delete it"
        )
    return prev


def save_checkpoint(result: SweepResult, ckpt: Path) -> None:
    """Write ``result`` (with its resume state) to ``ckpt``, atomically."""
    result.save(ckpt)
