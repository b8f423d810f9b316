"""Separable convex penalties, ``Ω(w) = Σ_i p(w_i)`` at unit strength: :class:`L1`,
:class:`L2`, :class:`ElasticNet`. Their prox acts coordinate by coordinate
(``elementwise``), and the plain :class:`L1` and :class:`L2` have fused closed forms
(:meth:`~funcreg.penalties.Penalty.closed_form`) for eager steps."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from . import _tree as _flat
from . import prox as P
from ._penalty_base import ClosedForm, Penalty, max_ratio, register_penalty, scaled, scaled_step


def _l1_closed_form(
    ws: list[Tensor], s: Tensor | float, gs: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    value = s * _flat.sum_abs(ws)
    return value, _add_scaled(gs, list(torch._foreach_sign(ws)), s)


def _l2_closed_form(
    ws: list[Tensor], s: Tensor | float, gs: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    value = s * (0.5 * _flat.sum_squares(ws))
    return value, _add_scaled(gs, ws, s)


def _add_scaled(gs: list[Tensor], xs: list[Tensor], s: Tensor | float) -> list[Tensor]:
    """``[g + s·x]`` (new tensors): one ``_foreach_add`` when ``s`` is a number or a 0-dim
    CPU tensor."""
    if isinstance(s, Tensor):
        if s.ndim or s.device.type != "cpu":
            return [g + s * x for g, x in zip(gs, xs, strict=True)]
        s = float(s)
    return list(torch._foreach_add(gs, xs, alpha=s))


@register_penalty
class L1(Penalty):
    """Lasso: ``Ω(w) = Σ_i c_i |w_i|``; prox: soft-thresholding ``sign(w)·max(|w| − t c, 0)``.

    Equivalents: Keras ``L1(l)`` = strength ``l``; the hand-written ``l * p.abs().sum()``
    = strength ``l``; scikit-learn ``Lasso(alpha)`` with data term ``1/(2n)‖y − Xw‖²``
    = strength ``alpha``.
    """

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return scaled(d.abs(), c).sum()

    def closed_form(self) -> ClosedForm | None:
        """``s Σ‖p‖₁`` and the subgradient ``s·sign(p)`` (0 at 0, as autograd's)."""
        plain = type(self) is L1 and self.toward is None and self.weight is None
        return _l1_closed_form if plain else None

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.soft_threshold(d, scaled_step(t, c))

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """``max_i |g_i| / c_i`` (over ``c_i > 0``)."""
        return _l1_threshold(grad, self._c(grad, name), 1.0)


def _l1_threshold(grad: Tensor, c: Tensor | None, r: float) -> float:
    """``max_i |g_i| / (r c_i)`` over ``c_i > 0``: zero is stationary for ``s r Σ c|w|``
    (plus any term smooth at 0) iff ``|g_i| ≤ s r c_i`` for every ``i``."""
    return max_ratio(grad.detach().abs(), r if c is None else r * c)


@register_penalty
class L2(Penalty):
    """Ridge / weight decay: ``Ω(w) = ½ Σ_i c_i w_i²``, gradient ``c·w``; prox ``w/(1 + t c)``.

    Strength ``λ`` is exactly ``torch.optim.SGD(weight_decay=λ)``. Keras ``L2(l)`` and the
    hand-written ``l * p.pow(2).sum()`` are strength ``2l`` (see :func:`fr.from_keras`);
    scikit-learn ``Ridge(alpha)`` (``‖y − Xw‖² + alpha‖w‖²``) is strength ``alpha`` with the
    data term ``½‖y − Xw‖²`` (the same objective halved).
    """

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return 0.5 * scaled(d.square(), c).sum()

    def closed_form(self) -> ClosedForm | None:
        """``s · ½ Σ‖p‖²`` and the gradient ``s·p``."""
        plain = type(self) is L2 and self.toward is None and self.weight is None
        return _l2_closed_form if plain else None

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.ridge_shrink(d, scaled_step(t, c))

    has_prox: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True


@register_penalty
class ElasticNet(Penalty):
    """``Ω(w) = r Σ c|w| + (1 − r)/2 Σ c w²`` with ``r = l1_ratio``;
    prox ``soft(w, t r c) / (1 + t (1 − r) c)``.

    With data term ``1/(2n)‖y − Xw‖²`` and strength ``α`` its minimiser is
    ``sklearn.linear_model.ElasticNet(alpha=α, l1_ratio=r)``.
    """

    l1_ratio: float = 0.5

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ValueError(f"ElasticNet: l1_ratio must be in [0, 1], got {self.l1_ratio}")

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """``max_i |g_i| / (r c_i)`` with ``r = l1_ratio`` (the ridge part is smooth at 0);
        ``l1_ratio = 0`` is ridge, which makes no zeros: ``ValueError``."""
        if self.l1_ratio == 0:
            raise ValueError(
                "ElasticNet with l1_ratio=0 is ridge: no sparsity, so no strength makes zero "
                "stationary; use l1_ratio > 0, or choose ridge strengths with a grid"
            )
        return _l1_threshold(grad, self._c(grad, name), self.l1_ratio)

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        r = self.l1_ratio
        return scaled(r * d.abs() + 0.5 * (1 - r) * d.square(), c).sum()

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.elastic_net_prox(d, scaled_step(t, c), self.l1_ratio)
