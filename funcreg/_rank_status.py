"""What the ranks of a sharded sweep tell each other around the result gather (see
:mod:`funcreg.distributed`, "Failures"): a fixed-size status exchange (a failure flag, the
error text, the layout signature of the shard's packed result), arrival counters in the
rendezvous store, and the text naming a rank that died or hung.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

MESSAGE_BYTES = 4096  # room for a failing rank's error text in the status exchange


def arrivals(rank: int, world: int, arrive: bool) -> list[int] | None:
    """Counters in the rendezvous store, one per rank, +1 as the rank reaches a sweep's
    result exchange (``arrive=True``). Returns the ranks behind this one (not arrived in
    this call), or ``None`` when the store cannot tell (e.g. the rank hosting it died)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        mine = store.add(f"funcreg/sweep/arrived/{rank}", int(arrive))
        return [r for r in range(world) if store.add(f"funcreg/sweep/arrived/{r}", 0) < mine]
    except Exception:
        return None


def exchange_status(
    error: BaseException | None, signature: int, nbytes: int, comm: torch.device, group: Any
) -> list[tuple[bool, int, int, str]]:
    """Every rank's ``(failed, signature, nbytes, message)``: fixed-size tensors only."""
    head = torch.tensor([int(error is not None), signature, nbytes], dtype=torch.int64)
    msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        raw = text.encode("utf-8", "replace")[:MESSAGE_BYTES]
        msg[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    mine = torch.cat([head.view(torch.uint8), msg]).to(comm)
    world = dist.get_world_size()
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    out = []
    for t in got:
        t = t.cpu()
        failed, sig, nb = t[:24].view(torch.int64).tolist()
        text = bytes(t[24:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
        out.append((bool(failed), int(sig), int(nb), text))
    return out


def lost_message(
    rank: int, world: int, bounds: Any, k: int, td: timedelta, e: Exception, saved: str
) -> str:
    """The error text of a rank whose status exchange failed: the ranks that never arrived
    (dead: their connections closed; or hung past ``td``) and their models; ``saved`` says
    where this rank's finished shard is (empty without a checkpoint)."""
    missing, text = arrivals(rank, world, arrive=False), str(e)
    died = "closed" in text.lower() or "reset" in text.lower()
    how = "died (its connection closed)" if died else f"hangs (waited {td}, the timeout)"
    who = ", ".join(f"rank {r} (models {span(bounds, r, k)})" for r in missing or [])
    what = f"{who} never reached the result exchange: it {how}; see its log" if missing else (
        f"another rank {how}; the store cannot tell which")  # fmt: skip
    return f"rank {rank} of {world}: {what}{saved} (the collective reported: {text:.300})"


def span(bounds: list[tuple[int, int]], r: int, k: int) -> str:
    """Rank ``r``'s models, ``"a..b of K=k"`` (``"?"`` before the bounds are known)."""
    return f"{bounds[r][0]}..{bounds[r][1] - 1} of K={k}" if bounds else "?"
