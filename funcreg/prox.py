"""Pure proximal operators and projections.

Each function computes ``prox_{t g}(x) = argmin_y ½‖x − y‖² + t·g(y)`` for one ``g``,
with the step ``t`` passed as data (a number or a tensor broadcastable to ``x``), so every
kernel works under ``vmap``, ``grad`` and ``torch.compile``: no ``.item()``, no branching
on values, no in-place writes, and no NaN at ``x = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

Step = Tensor | float


def soft_threshold(x: Tensor, t: Step) -> Tensor:
    """Prox of ``t·Σ|y|``: ``sign(x)·max(|x| − t, 0)`` (elementwise; ``t`` may be a tensor)."""
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0)


def ridge_shrink(x: Tensor, t: Step) -> Tensor:
    """Prox of ``t·½Σy²``: ``x / (1 + t)``."""
    return x / (1 + t)


def elastic_net_prox(x: Tensor, t: Step, l1_ratio: float) -> Tensor:
    """Prox of ``t·(r Σ|y| + (1−r)/2 Σy²)``: ``soft_threshold(x, t r) / (1 + t (1−r))``."""
    return soft_threshold(x, t * l1_ratio) / (1 + t * (1 - l1_ratio))


def _safe_ratio(num: Step, norm: Tensor) -> Tensor:
    """``num / norm`` where ``norm > 0``, else ``+inf``-free 0 — NaN-free at ``norm = 0``."""
    positive = norm > 0
    return torch.where(positive, num / torch.where(positive, norm, torch.ones_like(norm)), 0.0)


def group_shrink(x: Tensor, t: Step, dim: int | tuple[int, ...]) -> Tensor:
    """Prox of ``t·Σ_g ‖y_g‖₂`` (block soft-thresholding), groups indexed by the axes *not*
    in ``dim``: ``y_g = x_g · max(1 − t/‖x_g‖, 0)``. ``t`` broadcasts against the group
    norms taken with ``keepdim=True`` (so a per-group ``t`` has size 1 along ``dim``)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    scale = torch.clamp(1 - _safe_ratio(t, norm), min=0)
    # Where the norm is 0, x_g is 0 and any scale gives 0; keep it finite.
    return x * torch.where(norm > 0, scale, torch.zeros_like(scale))


def svd_threshold(x: Tensor, t: Step) -> Tensor:
    """Prox of ``t·‖Y‖_*`` (nuclear norm): soft-threshold the singular values,
    ``U diag(max(σ − t, 0)) Vᵀ``. Tensors with more than 2 dims are treated as the matrix
    ``x.reshape(x.shape[0], -1)``."""
    shape = x.shape
    m = x.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s = torch.clamp(s - t, min=0)
    return ((u * s.unsqueeze(-2)) @ vh).reshape(shape)


def project_box(x: Tensor, lo: Step, hi: Step) -> Tensor:
    """Euclidean projection onto ``{lo ≤ y ≤ hi}``: ``clamp(x, lo, hi)``."""
    return torch.clamp(x, lo, hi)  # type: ignore[arg-type]


def project_nonnegative(x: Tensor) -> Tensor:
    """Euclidean projection onto ``{y ≥ 0}``: ``max(x, 0)``."""
    return torch.clamp(x, min=0)


def project_max_norm(x: Tensor, max_value: Step, dim: int | tuple[int, ...]) -> Tensor:
    """Projection onto ``{‖y_g‖₂ ≤ max_value}`` for every group (norm over ``dim``):
    ``y_g = x_g · min(1, max_value/‖x_g‖)`` (Keras ``MaxNorm`` without its ε)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    over = norm > max_value
    return x * torch.where(over, _safe_ratio(max_value, norm), torch.ones_like(norm))


def mcp_prox(x: Tensor, t: Step, lam: Step, gamma: float) -> Tensor:
    """Prox of ``t·MCP_{λ,γ}`` (requires ``γ > t``; firm thresholding):

    ``y = soft(x, tλ) / (1 − t/γ)`` if ``|x| ≤ γλ``, else ``y = x``.
    """
    inner = soft_threshold(x, t * lam) / (1 - t / gamma)
    return torch.where(x.abs() <= gamma * lam, inner, x)


def scad_prox(x: Tensor, t: Step, lam: Step, a: float) -> Tensor:
    """Prox of ``t·SCAD_{λ,a}`` (requires ``a > 1 + t``):

    ``soft(x, tλ)`` if ``|x| ≤ (1+t)λ``; ``((a−1)x − sign(x)·t a λ)/(a − 1 − t)`` if
    ``(1+t)λ < |x| ≤ aλ``; ``x`` otherwise.
    """
    ax = x.abs()
    small = soft_threshold(x, t * lam)
    middle = ((a - 1) * x - torch.sign(x) * (t * a * lam)) / (a - 1 - t)
    return torch.where(ax <= (1 + t) * lam, small, torch.where(ax <= a * lam, middle, x))
