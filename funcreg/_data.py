"""Data feeding for :func:`fr.sweep <funcreg._sweep.sweep>`: tensors minibatched by funcreg
in a seeded order (:func:`batch_order`), or batches from any re-iterable (a list, a
``DataLoader``), both read by step number so that a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ._checks import check_finite

__all__ = ["Batch", "Data", "batch_order", "make_data"]

Batch = tuple[Tensor, ...]

# data with NaN/inf would make every model diverge, and look like a learning-rate problem
_FINITE_FIX = "every model would diverge at once; remove or impute those samples before the sweep"


def batch_order(n: int, batch_size: int | None, seed: int, epoch: int) -> Tensor | None:
    """The sample permutation ``fr.sweep`` uses for ``epoch`` (``None`` for full batch):
    ``torch.randperm(n)`` from a generator seeded by ``(seed, epoch)``; batch ``i`` of the
    epoch is ``perm[i*batch_size:(i+1)*batch_size]`` (the last one may be shorter)."""
    if batch_size is None or batch_size >= n:
        return None
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**63)
    return torch.randperm(n, generator=g)


def _as_batch(b: Any, what: str) -> Batch:
    if isinstance(b, Tensor):
        return (b,)
    if isinstance(b, tuple | list) and b and all(isinstance(t, Tensor) for t in b):
        return tuple(b)
    raise TypeError(
        f"{what} batches must be a tensor or a tuple of tensors, got {type(b).__name__}"
        + (f" of {[type(t).__name__ for t in b][:4]}" if isinstance(b, tuple | list) else "")
    )


class _TensorData:
    """A dataset of tensors sharing their first dimension, minibatched by funcreg."""

    def __init__(
        self, tensors: Batch, what: str, batch_size: int | None, seed: int, device: torch.device
    ) -> None:
        sizes = [t.shape[0] if t.ndim else None for t in tensors]
        if None in sizes or len(set(sizes)) != 1:
            raise ValueError(
                f"{what} tensors must share their first (sample) dimension, got shapes "
                f"{[tuple(t.shape) for t in tensors]}"
            )
        for i, t in enumerate(tensors):
            check_finite("sweep", f"{what}[{i}]", t, _FINITE_FIX)
        self.n = int(sizes[0])  # type: ignore[arg-type]
        if self.n == 0:
            raise ValueError(f"{what} data is empty (0 samples)")
        self.what, self.seed = what, seed
        self.tensors = tuple(t.detach().to(device) for t in tensors)
        self.bs = None if batch_size is None or batch_size >= self.n else batch_size
        self.per_epoch = 1 if self.bs is None else -(-self.n // self.bs)
        self._epoch = -1
        self._perm: Tensor | None = None
        self._cache: tuple[int, Batch] | None = None

    def __len__(self) -> int:
        return self.per_epoch

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "tensors",
            "shapes": [list(t.shape) for t in self.tensors],
            "dtypes": [str(t.dtype) for t in self.tensors],
        }

    def batch(self, step: int) -> Batch:
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        if self.bs is None:
            return self.tensors
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            perm = batch_order(self.n, self.bs, self.seed, epoch)
            assert perm is not None
            self._perm, self._epoch = perm.to(self.tensors[0].device), epoch
        assert self._perm is not None
        idx = self._perm[i * self.bs : (i + 1) * self.bs]
        out = tuple(t.index_select(0, idx) for t in self.tensors)
        self._cache = (step, out)
        return out

    def check_batch(self, batch: Batch, step: int) -> None:
        """Nothing to do: every tensor was checked for NaN/inf when the data was made."""

    def iter_batches(self) -> Iterator[Batch]:
        if self.bs is None:
            yield self.tensors
            return
        for i in range(0, self.n, self.bs):
            yield tuple(t[i : i + self.bs] for t in self.tensors)


class _IterData:
    """Batches from an iterable (list of batches, DataLoader, ...), re-iterated when done."""

    def __init__(self, src: Iterable[Any], what: str, device: torch.device) -> None:
        self.src, self.what, self.device = src, what, device
        self.one_shot = iter(src) is src
        try:
            self.len: int | None = len(src)  # type: ignore[arg-type]
        except TypeError:
            self.len = None
        if self.len == 0:
            raise ValueError(f"{what} data is empty (an iterable of length 0)")
        self._it: Iterator[Any] | None = None
        self._next = -1
        self._cache: tuple[int, Batch] | None = None

    def __len__(self) -> int:
        if self.len is None:
            raise TypeError(
                f"{self.what} data has no len(); give steps= instead of epochs= for iterators"
            )
        return self.len

    def identity(self) -> dict[str, Any]:
        return {"kind": type(self.src).__name__, "len": -1 if self.len is None else self.len}

    def _pull(self) -> Batch:
        for attempt in range(2):
            if self._it is None:
                self._it = iter(self.src)
            try:
                return self._move(next(self._it))
            except StopIteration:
                self._it = None
                if self.one_shot or attempt:
                    raise ValueError(
                        f"{self.what} data ran out of batches"
                        + (
                            " (a one-shot iterator: pass a list or a DataLoader, or fewer steps)"
                            if self.one_shot
                            else " (it yielded none)"
                        )
                    ) from None
        raise AssertionError("unreachable")

    def _move(self, b: Any) -> Batch:
        return tuple(t.to(self.device) for t in _as_batch(b, self.what))

    def check_batch(self, batch: Batch, step: int) -> None:
        """No NaN/inf in one batch (the iterable is not read through ahead of training)."""
        for i, t in enumerate(batch):
            check_finite("sweep", f"{self.what} batch {step}, tensor [{i}]", t, _FINITE_FIX)

    def batch(self, step: int) -> Batch:
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        if step != self._next:  # (re)position: a fresh pass, skipping what came before
            self._it = None
            skip = step % self.len if self.len else step
            if self.one_shot:
                skip = max(0, step - max(self._next, 0))
                self._it = iter(self.src)
            for _ in range(skip):
                self._pull()
        out = self._pull()
        self._next = step + 1
        self._cache = (step, out)
        return out

    def iter_batches(self) -> Iterator[Batch]:
        if self.one_shot:
            raise TypeError(f"{self.what} data must be re-iterable (a list or a DataLoader)")
        n = 0
        for b in self.src:
            n += 1
            yield self._move(b)
        if n == 0:
            raise ValueError(f"{self.what} data is empty (it yielded no batches)")


Data = _TensorData | _IterData


def make_data(obj: Any, what: str, batch_size: int | None, seed: int, device: torch.device) -> Data:
    if isinstance(obj, Tensor):
        return _TensorData((obj,), what, batch_size, seed, device)
    if isinstance(obj, tuple) and all(isinstance(t, Tensor) for t in obj):
        if not obj:
            raise ValueError(f"{what} data is empty (an empty tuple)")
        return _TensorData(obj, what, batch_size, seed, device)
    if isinstance(obj, list) and len(obj) >= 2 and all(isinstance(t, Tensor) for t in obj):
        kinds = {(tuple(t.shape[1:]), t.dtype) for t in obj}
        if len({t.shape[0] if t.ndim else -1 for t in obj}) == 1 and len(kinds) > 1:
            raise TypeError(
                f"{what}= is a list of {len(obj)} tensors of shapes "
                f"{[tuple(t.shape) for t in obj]}, which funcreg reads as {len(obj)} batches "
                f"of one tensor each; pass one dataset as a tuple, {what}=(x, y), or a list "
                f"of batches as [(x0, y0), (x1, y1), ...]"
            )
    if isinstance(obj, str | bytes | Mapping) or not isinstance(obj, Iterable):
        raise TypeError(
            f"{what}= must be a tensor, a tuple of tensors (x, y) or an iterable of batches "
            f"(a list or a DataLoader), got {type(obj).__name__}"
        )
    if batch_size is not None and what == "train":
        raise TypeError(
            "batch_size= applies to tensor data; an iterable (DataLoader) sets its own batches"
        )
    return _IterData(obj, what, device)
