"""Matrix penalties: :class:`Nuclear`, :class:`SpectralNorm`, :class:`Orthogonal` (tensors
with more than 2 dims are seen as ``w.reshape(w.shape[0], -1)``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from . import prox as P
from ._penalty_base import Penalty, register_penalty, scaled, scaled_step


def _matrix(w: Tensor) -> Tensor:
    """``w`` as a matrix (also with 0 rows), in float32 if it is float16/bfloat16 (torch's
    SVD and matrix norms refuse low precision); values are cast back by the callers."""
    m = P.matrix(w)
    return m.float() if m.dtype in (torch.float16, torch.bfloat16) else m


class _MatrixPenalty(Penalty):
    min_ndim: ClassVar[int] = 2
    min_ndim_reason: ClassVar[str] = "it is a matrix penalty"

    def _factor_shape(self, w: Tensor) -> tuple[int, ...]:
        return ()


@register_penalty
class Nuclear(_MatrixPenalty):
    """Nuclear (trace) norm ``Ω(W) = c Σ_i σ_i(W)``, a convex low-rank penalty; prox:
    singular value thresholding ``U diag(max(σ − t c, 0)) Vᵀ``. Costs an SVD (~40× an L1)."""

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return scaled(torch.linalg.matrix_norm(_matrix(d), ord="nuc").to(d.dtype), c)

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.svd_threshold(d, scaled_step(t, c))


@register_penalty
class SpectralNorm(_MatrixPenalty):
    """``Ω(W) = c σ_max(W)²`` (squared spectral norm; smooth wherever the top singular value
    is simple). Goes through the gradient."""

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        if d.numel() == 0:  # torch's norm of an empty matrix is a constant: keep the graph
            return scaled(d.sum(), c)
        return scaled(torch.linalg.matrix_norm(_matrix(d), ord=2).square().to(d.dtype), c)


@register_penalty
class Orthogonal(_MatrixPenalty):
    """Keras ``OrthogonalRegularizer``: with ``Ŵ`` the rows (``mode="rows"``) or columns
    (``mode="columns"``) of ``W`` normalised to unit norm and ``G = Ŵ Ŵᵀ`` (``m×m``),

    ``Ω(W) = c · ½ Σ_{i≠j} |G_ij| / (m(m−1)/2)``.

    Strength = Keras ``factor``. Keras kernels are ``(in, out)``, torch weights
    ``(out, in)``: Keras ``mode="rows"`` on a Dense layer is ``mode="columns"`` here.
    """

    mode: str = "rows"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("rows", "columns"):
            raise ValueError(f"Orthogonal: mode must be 'rows' or 'columns', got {self.mode!r}")

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        m = _matrix(d)
        if self.mode == "columns":
            m = m.T
        u = torch.nn.functional.normalize(m, dim=1, eps=1e-6)
        g = u @ u.T
        size = g.shape[0]
        off = g * (1 - torch.eye(size, dtype=g.dtype, device=g.device))
        pairs = max(size * (size - 1) / 2, 1.0)
        return scaled((0.5 * off.abs().sum() / pairs).to(d.dtype), c)
