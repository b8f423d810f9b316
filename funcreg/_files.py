"""Files funcreg writes: content hashes and the one atomic, checksummed write and verified read.

* :func:`digest`, :func:`code_identity`, :func:`canonical` — hashes and texts that are the same
  for equal values in every process (tensors by bytes, floats exactly, sets sorted, functions
  by their bytecode);
* :func:`payload_checksum` — a SHA-256 of a stored dict (every key but ``"checksum"``);
* :func:`write_atomic` — ``torch.save`` of a dict and its checksum to a temporary file in the
  same folder, ``fsync``, then ``os.replace``: a crash or a full disk leaves the previous file
  as it was (a full disk is reported as such);
* :func:`read_verified` — ``torch.load(weights_only=True)`` and the checks: an empty,
  truncated, foreign or changed file is a ``ValueError`` naming it and what is wrong.

Used by :meth:`funcreg.result.SweepResult.save`/``load`` and by the sweep's checkpoints
(``_checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import io
import os
import re
import secrets
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "canonical",
    "code_identity",
    "damaged",
    "digest",
    "payload_checksum",
    "read_verified",
    "write_atomic",
]


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


def code_identity(fn: Any) -> dict[str, str] | None:
    """A function's qualified name and a SHA-256 of its code: the bytecode, constants and
    names of its code object and of the code objects nested in it (through
    ``functools.wraps``/``partial`` and a callable object's ``__call__``). The values it
    closes over are not covered (the model, the data and the spec have their own entries).
    Stable across processes for the same source and Python version; ``None`` for ``None``."""
    if fn is None:
        return None
    with contextlib.suppress(ValueError):
        fn = inspect.unwrap(fn)
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    h = hashlib.sha256()

    def walk(c: Any) -> None:
        if isinstance(c, types.CodeType):
            h.update(c.co_code)
            h.update(repr(c.co_names).encode())
            for const in c.co_consts:
                walk(const)
        elif isinstance(c, tuple):
            for item in c:
                walk(item)
        elif isinstance(c, frozenset):  # `x in {"a", "b"}`: its order changes between processes
            h.update(repr(sorted(map(repr, c))).encode())
        else:
            h.update(repr(c).encode())

    if code is not None:
        walk(code)
    return {"name": str(name), "code": h.hexdigest() if code is not None else "?"}


def canonical(obj: Any, tensors: list[tuple[str, Tensor]], label: str) -> str:
    """A text that is the same for equal values in any process: dataclasses field by field
    (all fields, also those their repr hides: float and dict-of-float ``weight=``), sets and
    selector patterns sorted (a Python set's order of strings changes between processes),
    floats exactly, callables by :func:`code_identity`; tensors are collected for a
    digest."""
    if isinstance(obj, Tensor):
        tensors.append((label, obj))
        return f"<tensor {label}>"
    if is_dataclass(obj) and not isinstance(obj, type):
        parts = []
        for f in fields(obj):
            v = getattr(obj, f.name)
            text = canonical(v, tensors, f"{label}.{f.name}")
            if f.name == "patterns" and isinstance(v, tuple):  # by_name: any match, order-free
                text = repr(sorted(canonical(p, tensors, label) for p in v))
            parts.append(f"{f.name}={text}")
        return f"{type(obj).__qualname__}({', '.join(parts)})"
    if isinstance(obj, Mapping):
        keys = sorted(obj, key=repr)
        return (
            "{"
            + ", ".join(f"{k!r}: {canonical(obj[k], tensors, f'{label}[{k}]')}" for k in keys)
            + "}"
        )
    if isinstance(obj, set | frozenset):
        return "{" + ", ".join(sorted(canonical(v, tensors, label) for v in obj)) + "}"
    if isinstance(obj, list | tuple):
        inner = ", ".join(canonical(v, tensors, f"{label}[{i}]") for i, v in enumerate(obj))
        return f"({inner})" if isinstance(obj, tuple) else f"[{inner}]"
    if isinstance(obj, re.Pattern):
        return f"re.compile({obj.pattern!r}, {int(obj.flags)})"
    if isinstance(obj, float):
        return float.hex(obj)
    if isinstance(obj, bool | int | str | bytes | None | torch.dtype):
        return repr(obj)
    if callable(obj) and not is_dataclass(obj):
        return repr(code_identity(obj))
    return f"{type(obj).__qualname__}:{obj!r}"


def payload_checksum(data: Mapping[str, Any]) -> str:
    """A SHA-256 of a checkpoint's payload (every key but ``"checksum"``): its structure,
    plain values and every tensor's dtype, shape and bytes, in order."""
    tensors: list[tuple[str, Tensor]] = []
    text = canonical({k: v for k, v in data.items() if k != "checksum"}, tensors, "")
    return hashlib.sha256((text + digest(tensors)).encode()).hexdigest()


def damaged(path: Path, what: str, kind: str = "checkpoint") -> ValueError:
    """The error for a file that cannot be used: names it, what is wrong and the fix."""
    fix = (
        "Delete it to start over, or restore a good copy"
        if kind == "checkpoint"
        else ("Restore a good copy")
    )
    return ValueError(f"{kind} {os.fspath(path)!r} is damaged: {what}. {fix}")


def write_atomic(path: Path, data: dict[str, Any], kind: str = "checkpoint") -> None:
    """Write ``data`` with its :func:`payload_checksum` under ``"checksum"`` to ``path``
    atomically: serialised in memory (so that a full disk is an ``OSError`` ``ENOSPC``,
    reported as such), written to ``.NAME.<random>.tmp`` in the same folder, flushed to disk,
    renamed over ``path``; the temporary file never outlives the call."""
    data = {**data, "checksum": payload_checksum(data)}
    buf = io.BytesIO()
    torch.save(data, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise OSError(
                e.errno,
                f"no space left while writing {os.fspath(path)!r}; the previous {kind} is "
                "intact. Free disk space (or write to another disk) and try again",
            ) from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_verified(
    path: Path,
    fmt: str,
    keys: Sequence[str],
    kind: str = "checkpoint",
    name: str = "funcreg sweep checkpoint",
) -> dict[str, Any]:
    """The dict stored in ``path`` by :func:`write_atomic` (``torch.load(weights_only=True)``:
    no code is run), after checking that it is readable, has format ``fmt`` (else: "not a
    ``name``") and every key of ``keys``, and matches its checksum (a file without one, from
    an earlier version, is read unverified). Anything else is a ``ValueError`` from
    :func:`damaged`."""
    if path.stat().st_size == 0:  # FileNotFoundError passes as is
        raise damaged(path, "it is empty (0 bytes; an interrupted copy?)", kind)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # OSError, EOFError, pickle, zip and Unicode errors, RuntimeError...
        raise damaged(path, f"it cannot be read ({type(e).__name__}: {e!s:.200})", kind) from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        what = f"it is not a {name} (format {found!r}, expected {fmt!r})"
        raise damaged(path, what, kind)
    missing = [k for k in keys if k not in data]
    if missing:
        raise damaged(path, f"it lacks {missing}", kind)
    if "checksum" in data and data["checksum"] != payload_checksum(data):
        raise damaged(path, "its checksum does not match its contents (changed bytes)", kind)
    return data
