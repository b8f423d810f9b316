"""Activity regularization: Keras's ``activity_regularizer``, penalties on module outputs.

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = fr.activity.declare(nn.Linear(8, 16), fr.activity.L1L2(l1=1e-3))
            ...

    with fr.activity.collect(net) as acts:        # eager, or inside a functional loss
        out = net(x)                              # or functional_call(net, params, (x,))
    loss = loss_fn(out, y) + acts.penalty()

A declaration is plain data in the module's ``__dict__`` (survives ``copy.deepcopy`` and
``torch.save``, outside ``state_dict``); :func:`collect` installs forward hooks only for the
duration of its ``with`` block and removes them on exit, so the module's forward is unchanged
outside it. The hooks only compute on the outputs the forward produces, so the same block
works inside a loss given to ``torch.func.grad``/``vmap`` (under ``vmap`` each model's
activations and penalty are its own).

Formulas (Keras): ``l1·Σ|a| + l2·Σa²`` over the whole output (batch included);
``per_batch=True`` divides by the batch size ``a.shape[0]`` (``tf.keras`` 2's
``activity_loss / batch_size``; Keras 3 does not divide).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor, nn

from . import _checks

__all__ = ["Collected", "L1L2", "collect", "declare"]

_ATTR = "_funcreg_activity"
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class L1L2:
    """Keras ``L1L2`` as an activity regularizer: ``l1·Σ|a| + l2·Σa²`` (``/ a.shape[0]``
    with ``per_batch=True``)."""

    l1: float = 0.0
    l2: float = 0.0
    per_batch: bool = False

    def __post_init__(self) -> None:
        _checks.check_strength_value("l1", self.l1)
        _checks.check_strength_value("l2", self.l2)

    def __call__(self, a: Tensor) -> Tensor:
        value = a.new_zeros(())
        if self.l1:
            value = value + self.l1 * a.abs().sum()
        if self.l2:
            value = value + self.l2 * a.square().sum()
        return value / a.shape[0] if self.per_batch and a.dim() > 0 else value


def declare(module: M, regularizer: L1L2, /) -> M:
    """Declare an activity regularizer on ``module``'s output (in place); returns it."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"fr.activity.declare: the first argument must be an nn.Module, "
            f"got {type(module).__name__}"
        )
    if not isinstance(regularizer, L1L2):
        raise TypeError(
            "fr.activity.declare: the regularizer must be fr.activity.L1L2(l1=..., l2=...), "
            f"got {type(regularizer).__name__}"
        )
    module.__dict__[_ATTR] = regularizer
    return module


class Collected:
    """The activity penalties of one ``with collect(...)`` block, per module path."""

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor]] = {}

    def penalty(self) -> Tensor | float:
        """Sum over the collected outputs of their regularizer's value (0.0 when none)."""
        total: Tensor | float = 0.0
        for values in self.values.values():
            for v in values:
                total = total + v
        return total

    def parts(self) -> dict[str, Tensor | float]:
        """``{module path: its summed penalty}``, for logging."""
        out: dict[str, Tensor | float] = {}
        for path, values in self.values.items():
            part: Tensor | float = 0.0
            for v in values:
                part = part + v
            out[path] = part
        return out


@contextmanager
def collect(model: nn.Module) -> Iterator[Collected]:
    """Collect the declared activity penalties of ``model``'s modules while the block runs
    (forward hooks, removed on exit). A module called several times adds one value per
    call; a shared module is hooked once."""
    collected = Collected()
    handles = []
    for path, module in model.named_modules():
        reg = module.__dict__.get(_ATTR)
        if reg is None:
            continue

        def hook(mod: nn.Module, args: Any, output: Any, path: str = path, reg: L1L2 = reg) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"fr.activity: module {path!r} returned {type(output).__name__}; an "
                    "activity regularizer needs a module whose output is one tensor"
                )
            collected.values.setdefault(path, []).append(reg(output))

        handles.append(module.register_forward_hook(hook))
    try:
        yield collected
    finally:
        for h in handles:
            h.remove()
