"""Resuming from a checkpoint is not recomputing: a warm-started network path with an
optimizer (``fr.path(optimizer=..., checkpoint=...)``, one file per chunk) continues from what
each chunk's file holds. A loss that counts its calls sees no step when every chunk is done,
and a marker planted in a chunk's file (a value no run computes) comes back in the result."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import funcreg as fr
from funcreg.result import SweepResult


def test_path_resumes_each_chunk_from_its_file(tmp_path: Any) -> None:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(32, 4, generator=g)
    y = X[:, :1] * 2 + 0.1 * torch.randn(32, 1, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    calls = [0]

    def loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        return ((torch.func.functional_call(net, p, (x,)) - t) ** 2).mean()

    kw: dict[str, Any] = dict(
        data=(X, y), strengths=[0.1, 0.01, 0.001, 1e-4], chunk_size=2,
        optimizer=fr.optim.sgd(0.1), steps=6,
    )  # fmt: skip
    spec = fr.Spec(l1=fr.L1("weight"))
    ckpt = tmp_path / "p.pt"
    first = fr.path(net, loss, spec, checkpoint=ckpt, **kw)
    ran = calls[0]
    assert ran >= 12  # two chunks of six steps
    calls[0] = 0
    again = fr.path(net, loss, spec, checkpoint=ckpt, **kw)
    assert calls[0] == 0  # every chunk was done: nothing recomputed
    assert torch.equal(again.stacked["weight"], first.stacked["weight"])
    # plant a marker in the second chunk's file: with an optimizer the path runs ascending,
    # so it holds the two largest strengths, the first two models of the (descending) result
    chunk1 = tmp_path / "p.chunk1.pt"
    saved = SweepResult.load(chunk1)
    marker = torch.full_like(saved.stacked["weight"], 0.375)
    saved.stacked["weight"] = marker.clone()
    saved.save(chunk1)
    marked = fr.path(net, loss, spec, checkpoint=ckpt, **kw)
    assert calls[0] == 0
    assert marked.grid["l1"].tolist() == [0.1, 0.01, 0.001, 1e-4]
    assert torch.equal(marked.stacked["weight"][:2], marker.flip(0))
    assert torch.equal(marked.stacked["weight"][2:], first.stacked["weight"][2:])
