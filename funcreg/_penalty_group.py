"""Group penalties: :class:`GroupLasso` and :class:`SparseGroupLasso`, groups being the
slices of a parameter along the axes not in ``dim`` (norms taken over ``dim``)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from . import prox as P
from ._penalty_base import Dim, Penalty, as_dims, max_ratio, register_penalty, scaled, scaled_step


def _group_size(w: Tensor, dims: tuple[int, ...]) -> int:
    size = 1
    for d in dims:
        size *= int(w.shape[d])
    return size


@register_penalty
class GroupLasso(Penalty):
    """``Ω(w) = Σ_g c_g √|g| ‖w_g‖₂``; the norm is taken over ``dim``, so groups are indexed
    by the remaining axes. For an ``nn.Linear`` weight ``(out, in)``: ``dim=0`` (default)
    gives one group per *input feature* (feature selection, LassoNet), ``dim=1`` one group
    per output unit. ``|g|`` is the group size. Prox: block soft-thresholding
    ``w_g · max(1 − t c_g √|g| / ‖w_g‖, 0)``. ``weight=`` is per group (it broadcasts
    against the norms taken with ``keepdim=True``).
    """

    dim: Dim = 0

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    min_ndim: ClassVar[int] = 2
    min_ndim_reason: ClassVar[str] = "a group is a slice along the axes not in dim"

    def _dims(self, w: Tensor) -> tuple[int, ...]:
        """The axes of ``w`` the group norm runs over (checked against ``w``'s shape)."""
        return as_dims(self.dim, w.dim(), type(self).__name__, tuple(w.shape))

    def check(self, term: str, name: str, w: Tensor) -> None:
        super().check(term, name, w)
        try:
            self._dims(w)
        except ValueError as e:
            raise ValueError(f"term {term!r}, parameter {name!r}: {e}") from None

    def _factor_shape(self, w: Tensor) -> tuple[int, ...]:
        dims = self._dims(w)
        return tuple(1 if i in dims else s for i, s in enumerate(w.shape))

    def _group_scale(self, d: Tensor, c: Tensor | None) -> Tensor | float:
        root = math.sqrt(_group_size(d, self._dims(d)))
        return root if c is None else root * c

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        norms = torch.linalg.vector_norm(d, dim=self._dims(d), keepdim=True)
        return (self._group_scale(d, c) * norms).sum()

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.group_shrink(d, t * self._group_scale(d, c), self._dims(d))

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """``max_g ‖g_g‖₂ / (√|g| c_g)`` (over ``c_g > 0``)."""
        g = grad.detach()
        norms = torch.linalg.vector_norm(g, dim=self._dims(g), keepdim=True)
        return max_ratio(norms, self._group_scale(g, self._c(g, name)))

    def nonzero_groups(self, w: Tensor) -> Tensor | None:
        """The number of groups (slices along the axes not in ``dim``) with a nonzero entry
        (exact: no norm, so entries whose squares underflow still count)."""
        return ((w != 0).sum(dim=self._dims(w)) > 0).sum()


@register_penalty
class SparseGroupLasso(GroupLasso):
    """``Ω(w) = r Σ_i c|w_i| + (1 − r) Σ_g c_g √|g| ‖w_g‖₂`` (Simon et al. 2013), groups as
    in :class:`GroupLasso`. Prox: soft-threshold, then block-shrink (exact for this sum)."""

    l1_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ValueError(f"SparseGroupLasso: l1_ratio must be in [0, 1], got {self.l1_ratio}")

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        r = self.l1_ratio
        return r * scaled(d.abs(), c).sum() + (1 - r) * super()._value(d, c)

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        r = self.l1_ratio
        return super()._prox(P.soft_threshold(d, scaled_step(t * r, c)), t * (1 - r), c)

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """The smallest ``λ`` with ``‖soft(g_g, λ r c_g)‖₂ ≤ λ (1 − r) √|g| c_g`` for every
        group ``g`` with ``c_g > 0`` (``r = l1_ratio``): per group the left side decreases and
        the right increases in ``λ``, so it is found by bisection (200 halvings of
        ``[0, max|g_g|/(r c_g) + ‖g_g‖/((1 − r)√|g| c_g)]``, all groups at once; norms in
        ``grad``'s dtype, ``λ`` in float64). ``r = 1``: ``max|g_g|/c_g`` (lasso); ``r = 0``:
        the group lasso bound."""
        g = grad.detach()
        dims = self._dims(g)
        if g.numel() == 0:
            return 0.0
        size = _group_size(g, dims)
        groups = g.movedim(dims, tuple(range(len(dims)))).reshape(size, -1).abs()
        c = self._c(g, name)
        cg = torch.ones((), dtype=g.dtype) if c is None else c
        cflat = torch.broadcast_to(cg, self._factor_shape(g)).reshape(-1).double()
        penalised = cflat > 0
        c1 = torch.where(penalised, cflat, torch.ones_like(cflat))
        r, root = self.l1_ratio, math.sqrt(size)
        gmax = groups.amax(0).double()
        gnorm = torch.linalg.vector_norm(groups, dim=0).double()
        if r >= 1.0:
            bound = gmax / c1
        elif r <= 0.0:
            bound = gnorm / (root * c1)
        else:
            lo = torch.zeros_like(c1)
            hi = gmax / (r * c1) + gnorm / ((1 - r) * root * c1) + 1e-300
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                shrunk = torch.clamp(groups - (mid * r * c1).to(g.dtype), min=0)
                ok = torch.linalg.vector_norm(shrunk, dim=0).double() <= mid * (1 - r) * root * c1
                hi = torch.where(ok, mid, hi)
                lo = torch.where(ok, lo, mid)
            bound = hi
        return float(torch.where(penalised, bound, torch.zeros_like(bound)).max())
