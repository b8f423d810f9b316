"""Nonconvex separable penalties whose strength is the λ inside the formula: :class:`MCP`
and :class:`SCAD` (they override ``penalty`` and ``prox_step``, and check the training
step with ``check_step``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from . import prox as P
from ._penalty_base import Penalty, register_penalty, scaled_step


class _Nonconvex(Penalty):
    """Elementwise nonconvex penalty ``Σ_i p(w_i; λ_i)``, ``λ_i = strength · c_i``, whose
    strength is the λ inside the formula; subclasses give ``_p`` and its prox ``_prox_lam``."""

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True

    def _p(self, d: Tensor, lam: Tensor | float) -> Tensor:
        raise NotImplementedError

    def _prox_lam(self, d: Tensor, t: Tensor | float, lam: Tensor | float) -> Tensor:
        raise NotImplementedError

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return self._p(d, 1.0 if c is None else c).sum()

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        # prox of t·Ω with Ω at λ = 1: step t, λ = c (or 1)
        return self._prox_lam(d, t, 1.0 if c is None else c)

    def penalty(self, w: Tensor, strength: Tensor | float, name: str | None = None) -> Tensor:
        lam = scaled_step(strength, self._c(w, name))
        return self._p(self._shift(w, name), lam).sum()

    def prox_step(
        self, w: Tensor, lr: Tensor | float, strength: Tensor | float, name: str | None = None
    ) -> Tensor:
        if isinstance(lr, (int, float)):
            self.check_step(lr)
        ref = self.reference(name)
        lam = scaled_step(strength, self._c(w, name))
        out = self._prox_lam(self._shift(w, name), lr, lam)
        return out if ref is None else out + ref.to(w)


@register_penalty
class MCP(_Nonconvex):
    """Minimax concave penalty (Zhang 2010), strength ``λ``, concavity ``γ > 1``:

    ``p(w) = λ|w| − w²/(2γ)`` if ``|w| ≤ γλ``, else ``γλ²/2``; ``Ω = Σ_i p(w_i)`` with
    ``λ_i = λ c_i``. ``value(w)`` is at ``λ = 1``. Computed as ``|w|·(λ − |w|/(2γ))`` (both
    factors ≥ 0, so a huge ``λ`` overflows to ``inf``, never ``inf − inf``) and exactly 0 at
    ``w = 0`` whatever ``λ``.

    Prox (:func:`funcreg.prox.mcp_prox`, the global minimiser for every step ``t``): firm
    thresholding ``soft(w, tλ)/(1 − t/γ)`` inside ``|w| ≤ γλ`` and ``w`` outside when
    ``t < γ``; hard thresholding at ``√(tγ)·λ`` when ``t ≥ γ``. Training steps
    (:meth:`prox_step`, ``fr.sweep``) keep ``lr < γ`` (:meth:`check_step`), where the step is
    the unique, continuous firm-thresholding map.
    """

    gamma: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gamma > 1:
            raise ValueError(f"MCP: gamma must be > 1, got {self.gamma}")

    def _p(self, d: Tensor, lam: Tensor | float) -> Tensor:
        a = d.abs()
        nonzero = a > 0
        a1 = torch.where(nonzero, a, torch.ones_like(a))  # no 0·inf when λ overflows
        inside = torch.where(nonzero, a1 * (lam - a1 / (2 * self.gamma)), torch.zeros_like(a))
        return torch.where(a <= self.gamma * lam, inside, (0.5 * self.gamma * lam) * lam)

    def _prox_lam(self, d: Tensor, t: Tensor | float, lam: Tensor | float) -> Tensor:
        return P.mcp_prox(d, t, lam, self.gamma)

    def check_step(self, lr: float) -> None:
        """Training keeps ``lr < γ`` (firm thresholding; beyond it the step is hard
        thresholding, which jumps)."""
        if not lr < self.gamma:
            raise ValueError(
                f"MCP prox needs lr < gamma, got lr={lr}, gamma={self.gamma}: lower the "
                "learning rate or raise gamma (MCP.prox(w, t) itself is exact for any t)"
            )


@register_penalty
class SCAD(_Nonconvex):
    """Smoothly clipped absolute deviation (Fan & Li 2001), strength ``λ``, ``a > 2``:

    ``p(w) = λ|w|`` if ``|w| ≤ λ``; ``(2aλ|w| − w² − λ²) / (2(a − 1))`` if ``λ < |w| ≤ aλ``;
    ``λ²(a + 1)/2`` otherwise. ``value(w)`` is at ``λ = 1``. The middle piece is computed as
    ``|w|(λ − v) + λv`` with ``v = (|w| − λ)/(2(a − 1)) ≤ λ/2`` (terms ≥ 0: a huge ``λ``
    overflows to ``inf``, never ``inf − inf``), and ``p(0) = 0`` whatever ``λ``.

    Prox (:func:`funcreg.prox.scad_prox`, the global minimiser for every step ``t``): the
    three-piece closed form when ``a > 1 + t``, else the better of the minimisers on
    ``|y| ≤ λ`` and ``|y| ≥ aλ``. Training steps keep ``a > 1 + lr`` (:meth:`check_step`).
    """

    a: float = 3.7

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.a > 2:
            raise ValueError(f"SCAD: a must be > 2, got {self.a}")

    def _p(self, d: Tensor, lam: Tensor | float) -> Tensor:
        x = d.abs()
        a = self.a
        nonzero = x > 0
        x1 = torch.where(nonzero, x, torch.ones_like(x))  # no 0·inf when λ overflows
        small = torch.where(nonzero, lam * x1, torch.zeros_like(x))
        v = (x - lam) / (2 * (a - 1))
        mid = x * (lam - v) + lam * v
        big = (0.5 * (a + 1) * lam) * lam
        return torch.where(x <= lam, small, torch.where(x <= a * lam, mid, big))

    def _prox_lam(self, d: Tensor, t: Tensor | float, lam: Tensor | float) -> Tensor:
        return P.scad_prox(d, t, lam, self.a)

    def check_step(self, lr: float) -> None:
        """Training keeps ``a > 1 + lr`` (the three-piece closed form, continuous in ``w``)."""
        if not self.a > 1 + lr:
            raise ValueError(
                f"SCAD prox needs a > 1 + lr, got lr={lr}, a={self.a}: lower the learning "
                "rate or raise a (SCAD.prox(w, t) itself is exact for any t)"
            )
