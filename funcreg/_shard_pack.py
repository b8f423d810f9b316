"""A shard's result as one flat byte tensor for a single collective, and the whole grid's
:class:`~funcreg.result.SweepResult` from the gathered shards (see
:mod:`funcreg.distributed`, "Gather"). No ``*_object`` collective: every rank packs the
same layout, padded to the largest shard, and checks it by a signature.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .result import SweepResult

_ALIGN = 16  # bytes; each packed leaf starts at a multiple of this


def _model_dim(top: str, t: Tensor) -> int | None:
    """The model axis of a leaf of the packed result (``None``: not per model)."""
    if top in ("stacked", "stacked_buffers", "diverged", "diverged_at", "opt_state"):
        return 0
    if top == "history":  # (steps or evaluations, K); 1-d entries (eval_step) are shared
        return 1 if t.ndim >= 2 else None
    return None


def _flatten(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Tensor]]:
    if isinstance(tree, Tensor):
        return [(path, tree)]
    if isinstance(tree, Mapping):
        return [leaf for k, v in tree.items() for leaf in _flatten(v, (*path, str(k)))]
    if isinstance(tree, list | tuple):
        return [leaf for i, v in enumerate(tree) for leaf in _flatten(v, (*path, str(i)))]
    return []  # plain values (numbers, strings, None) are the same on every rank: kept


def _rebuild(tree: Any, leaves: dict[tuple[str, ...], Tensor], path: tuple[str, ...] = ()) -> Any:
    if isinstance(tree, Tensor):
        return leaves[path]
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, leaves, (*path, str(k))) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_rebuild(v, leaves, (*path, str(i))) for i, v in enumerate(tree)]
    return tree


class Packed:
    """A shard's tensors as one flat byte tensor, each per-model leaf padded to
    ``k_max`` models (model axis first), with a signature of the layout that every rank
    must share."""

    def __init__(self, tree: dict[str, Any], k_local: int, k_max: int) -> None:
        self.tree = tree
        self.leaves = _flatten(tree)
        self.k_max = k_max
        self.layout: list[tuple[tuple[str, ...], torch.dtype, tuple[int, ...], int | None]] = []
        parts: list[Tensor] = []
        for path, t in self.leaves:
            dim = _model_dim(path[0], t)
            if dim is not None:
                if t.shape[dim] != k_local:
                    raise RuntimeError(
                        f"funcreg.distributed: {'/'.join(path)} has shape {tuple(t.shape)}, "
                        f"expected {k_local} models on axis {dim}"
                    )
                t = t.movedim(dim, 0)
                if k_max > k_local:
                    t = torch.cat([t, t.new_zeros(k_max - k_local, *t.shape[1:])])
            rest = tuple(t.shape[1:]) if dim is not None else tuple(t.shape)
            self.layout.append((path, t.dtype, rest, dim))
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            if raw.numel() % _ALIGN:  # every leaf starts aligned, so unpacking is a view
                raw = torch.cat([raw, raw.new_zeros(_ALIGN - raw.numel() % _ALIGN)])
            parts.append(raw)
        self.nbytes = sum(p.numel() for p in parts)
        self.parts = parts

    def buffer(self, device: torch.device) -> Tensor:
        if not self.parts:
            return torch.zeros(0, dtype=torch.uint8, device=device)
        return torch.cat([p.to(device) for p in self.parts])

    def signature(self) -> int:
        text = repr([(p, str(d), s, m) for p, d, s, m in self.layout]) + f"|{self.nbytes}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")

    def unpack(
        self, buffers: list[Tensor], sizes: list[int]
    ) -> dict[tuple[str, ...], Tensor | list[Tensor]]:
        """Per leaf: the models of every rank concatenated along the model axis (per-model
        leaves), or the list of every rank's value (the others)."""
        out: dict[tuple[str, ...], Tensor | list[Tensor]] = {}
        offset = 0
        for (path, dtype, shape, dim), (_, local) in zip(self.layout, self.leaves, strict=True):
            full = (self.k_max, *shape) if dim is not None else shape
            n = math.prod(full) * torch.empty((), dtype=dtype).element_size()
            per_rank = [
                b[offset : offset + n].view(dtype).reshape(full).to(local.device, copy=True)
                for b in buffers
            ]  # copies: each leaf owns its memory, as in a one-process result
            offset += -(-n // _ALIGN) * _ALIGN
            if dim is None:
                out[path] = per_rank
            else:
                out[path] = torch.cat(
                    [t[:k] for t, k in zip(per_rank, sizes, strict=True)]
                ).movedim(0, dim)
        return out


def shard_tree(res: SweepResult, k_local: int, k_max: int) -> dict[str, Any]:
    """The tensors of a shard's result that the merged result needs, first ``k_local``
    models only (a padded single-model shard drops its copy)."""

    def first(t: Tensor, dim: int) -> Tensor:
        return t.narrow(dim, 0, k_local)

    hist = {
        key: (
            {n: first(z, 1) for n, z in v.items()}
            if isinstance(v, Mapping)
            else (first(v, 1) if isinstance(v, Tensor) and v.ndim >= 2 else v)
        )
        for key, v in res.history.items()
    }
    chunks = torch.full((k_max, 2), -1, dtype=torch.int64)  # the same shape on every rank
    for i, (a, b) in enumerate(res.meta.get("chunks", [])[: chunks.shape[0]]):
        chunks[i] = torch.tensor([min(a, k_local), min(b, k_local)])
    tree: dict[str, Any] = {
        "stacked": {n: first(v, 0) for n, v in res.stacked.items()},
        "stacked_buffers": {n: first(v, 0) for n, v in res.stacked_buffers.items()},
        "history": hist,
        "diverged": first(res.diverged, 0),
        "diverged_at": first(res.diverged_at, 0),
        "chunks": chunks,
        "elapsed": torch.tensor([float(res.meta.get("elapsed_s", 0.0))], dtype=torch.float64),
    }
    if res.resume is not None:
        tree["opt_state"] = [first(t, 0) for t in res.resume["opt_state"]]
        tree["rng"] = res.resume["rng"]
    return tree


def merge(
    local: SweepResult,
    packed: Packed,
    merged: dict[tuple[str, ...], Tensor | list[Tensor]],
    g64: dict[str, Tensor],
    bounds: list[tuple[int, int]],
    world: int,
    gather_s: float,
) -> SweepResult:
    """The whole grid's SweepResult from the gathered leaves."""

    def cat(path: tuple[str, ...]) -> Tensor:
        v = merged[path]
        if isinstance(v, list):  # shared across ranks (eval steps, RNG state): rank 0's
            return v[0]
        return v

    leaves = {p: cat(p) for p, _ in packed.leaves}
    tree = _rebuild(packed.tree, leaves)
    chunks_of = merged[("chunks",)]
    elapsed_of = merged[("elapsed",)]
    assert isinstance(chunks_of, list) and isinstance(elapsed_of, list)
    chunks = [
        [a + lo, b + lo]
        for (lo, hi), rows in zip(bounds, chunks_of, strict=True)
        for a, b in rows.tolist()
        if a >= 0 and b > a
    ]
    meta = dict(local.meta)
    identity = dict(meta.get("identity") or {})
    identity["grid"] = {n: v.clone() for n, v in g64.items()}
    meta.update(
        identity=identity,
        chunks=chunks,
        elapsed_s=max(float(t[0]) for t in elapsed_of),
        distributed={
            "world_size": world,
            "shards": [list(b) for b in bounds],
            "backend": str(dist.get_backend()),
            "rank_elapsed_s": [float(t[0]) for t in elapsed_of],  # each shard's sweep
            "gather_s": gather_s,  # this rank: from its shard's end to the merged result
        },
    )
    resume = None
    if local.resume is not None:
        resume = {
            "opt_state": tree["opt_state"],
            "rng": tree["rng"],
            "cuda_rng": local.resume.get("cuda_rng"),
        }
    return SweepResult(
        grid={n: v.clone() for n, v in g64.items()},
        stacked=tree["stacked"],
        stacked_buffers=tree["stacked_buffers"],
        history=tree["history"],
        diverged=tree["diverged"],
        diverged_at=tree["diverged_at"],
        steps=local.steps,
        meta=meta,
        resume=resume,
        model=local.model,
    )
