"""Constraints: no strength, no value, only a projection. :class:`Constraint` (the base),
:class:`NonNegative`, :class:`Box`, and Keras' norm constraints :class:`MaxNorm`,
:class:`UnitNorm`, :class:`MinMaxNorm` (groups: all axes but 0 unless ``dim=``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from . import prox as P
from ._penalty_base import Dim, Penalty, as_dims, register_penalty


class Constraint(Penalty):
    """A constraint set ``C``: ``value`` is 0 (the indicator of ``C`` on feasible points),
    ``prox`` is the Euclidean projection onto ``C`` whatever the step. Needs no strength."""

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    is_constraint: ClassVar[bool] = True

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return d.new_zeros(())

    def penalty(self, w: Tensor, strength: Tensor | float, name: str | None = None) -> Tensor:
        return w.new_zeros(())

    def _project(self, d: Tensor) -> Tensor:
        raise NotImplementedError

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return self._project(d)

    def prox_step(
        self, w: Tensor, lr: Tensor | float, strength: Tensor | float, name: str | None = None
    ) -> Tensor:
        return self.prox(w, 0.0, name)


@register_penalty
class NonNegative(Constraint):
    """``w ≥ 0`` (with ``toward=``: ``w ≥ w_ref``); projection ``max(w, 0)``. Like Keras
    ``NonNeg`` and scikit-learn's ``positive=True``."""

    elementwise: ClassVar[bool] = True

    def _project(self, d: Tensor) -> Tensor:
        return P.project_nonnegative(d)


@register_penalty
class Box(Constraint):
    """``lo ≤ w ≤ hi`` elementwise (with ``toward=``: ``lo ≤ w − w_ref ≤ hi``);
    projection ``clamp(w, lo, hi)``."""

    lo: float = -1.0
    hi: float = 1.0

    elementwise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lo <= self.hi:
            raise ValueError(f"Box: needs lo <= hi, got lo={self.lo}, hi={self.hi}")

    def _project(self, d: Tensor) -> Tensor:
        return P.project_box(d, self.lo, self.hi)


@register_penalty
class MaxNorm(Constraint):
    """Keras ``MaxNorm``: ``‖w_g‖₂ ≤ max_value`` for every group, the norm over ``dim``.
    ``dim=None`` (default) means all axes but 0: each output unit's incoming weights for
    ``nn.Linear (out, in)`` and ``nn.Conv* (out, in, *k)`` — Keras' default ``axis=0`` on
    its ``(in, out)`` kernel. Projection ``w_g · min(1, max_value/‖w_g‖)``."""

    max_value: float = 2.0
    dim: Dim | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.max_value >= 0:
            raise ValueError(f"MaxNorm: max_value must be >= 0, got {self.max_value}")

    def _project(self, d: Tensor) -> Tensor:
        dims = (
            tuple(range(1, d.dim()))
            if self.dim is None
            else as_dims(self.dim, d.dim(), "MaxNorm", tuple(d.shape))
        )
        if not dims:
            dims = (0,)
        return P.project_max_norm(d, self.max_value, dims)


def _group_norm(d: Tensor, dim: Dim | None, owner: str) -> Tensor:
    """``‖d_g‖₂`` per group, kept as a broadcastable tensor: the norm over ``dim`` (``None``:
    all axes but 0, as :class:`MaxNorm`)."""
    dims = tuple(range(1, d.dim())) if dim is None else as_dims(dim, d.dim(), owner, tuple(d.shape))
    return torch.linalg.vector_norm(d, dim=dims or (0,), keepdim=True)


def _rescale(d: Tensor, norm: Tensor, target: Tensor) -> Tensor:
    """``d_g · target_g / ‖d_g‖`` where ``‖d_g‖ > 0``; a zero group stays zero."""
    positive = norm > 0
    safe = torch.where(positive, norm, torch.ones_like(norm))
    return d * torch.where(positive, target / safe, torch.zeros_like(norm))


@register_penalty
class UnitNorm(Constraint):
    """Keras ``UnitNorm``: each group (norm over ``dim``; ``None``: all axes but 0, each
    output unit's incoming weights, as :class:`MaxNorm`) rescaled to norm 1:
    ``w_g / ‖w_g‖`` (a zero group stays zero; Keras divides by ``ε + ‖w_g‖``, ``ε = 1e-7``).
    The projection onto the unit sphere."""

    dim: Dim | None = None

    def _project(self, d: Tensor) -> Tensor:
        norm = _group_norm(d, self.dim, "UnitNorm")
        return _rescale(d, norm, torch.ones_like(norm))


@register_penalty
class MinMaxNorm(Constraint):
    """Keras ``MinMaxNorm``: each group's norm pulled toward ``[min_value, max_value]``,
    ``w_g · (rate·clip(‖w_g‖, lo, hi) + (1 − rate)·‖w_g‖) / ‖w_g‖`` (a zero group stays
    zero; Keras divides by ``ε + ‖w_g‖``); ``rate=1`` is the projection onto the shell
    ``lo ≤ ‖w_g‖ ≤ hi``. Groups as :class:`UnitNorm`."""

    min_value: float = 0.0
    max_value: float = 1.0
    rate: float = 1.0
    dim: Dim | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(
                f"MinMaxNorm: needs 0 <= min_value <= max_value, got {self.min_value}, "
                f"{self.max_value}"
            )
        if not 0 <= self.rate <= 1:
            raise ValueError(f"MinMaxNorm: rate must be in [0, 1], got {self.rate}")

    def _project(self, d: Tensor) -> Tensor:
        norm = _group_norm(d, self.dim, "MinMaxNorm")
        clipped = torch.clamp(norm, self.min_value, self.max_value)
        return _rescale(d, norm, self.rate * clipped + (1 - self.rate) * norm)
