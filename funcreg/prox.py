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


def safe_ratio(num: Step, norm: Tensor) -> Tensor:
    """``num / norm`` where ``norm > 0``, else 0 — NaN-free at ``norm = 0``.

    A Python ``num`` becomes a tensor first: ``number / tensor`` is computed by torch as
    ``number · (1/tensor)``, whose reciprocal overflows for subnormal norms in float16
    (``0 · inf = NaN``); a true division gives ``0 / norm = 0``."""
    positive = norm > 0
    if not isinstance(num, Tensor):
        num = norm.new_full((), num)  # a fill on norm's device, no host-to-device copy
    return torch.where(positive, num / torch.where(positive, norm, torch.ones_like(norm)), 0.0)


_safe_ratio = safe_ratio  # the former private name, still imported by the path module


def group_shrink(x: Tensor, t: Step, dim: int | tuple[int, ...]) -> Tensor:
    """Prox of ``t·Σ_g ‖y_g‖₂`` (block soft-thresholding), groups indexed by the axes *not*
    in ``dim``: ``y_g = x_g · max(1 − t/‖x_g‖, 0)``. ``t`` broadcasts against the group
    norms taken with ``keepdim=True`` (so a per-group ``t`` has size 1 along ``dim``). A step
    of 0 returns ``x`` exactly (also groups whose norm underflows to 0)."""
    if not isinstance(t, Tensor) and t == 0:
        return x
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    scale = torch.clamp(1 - safe_ratio(t, norm), min=0)
    # A norm of 0 is a zero group, or a nonzero one whose squares underflowed (subnormal
    # entries): keep it at step 0 (the exact identity), zero it otherwise (t > its norm).
    keep = norm > 0
    if isinstance(t, Tensor):
        keep = keep | (t == 0)
    return x * torch.where(keep, scale, torch.zeros_like(scale))


def _low_precision(x: Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def svd_threshold(x: Tensor, t: Step) -> Tensor:
    """Prox of ``t·‖Y‖_*`` (nuclear norm): soft-threshold the singular values,
    ``U diag(max(σ − t, 0)) Vᵀ``. Tensors with more than 2 dims are treated as the matrix
    ``x.reshape(x.shape[0], -1)``. float16/bfloat16 are decomposed in float32 and cast back
    (torch has no low-precision SVD); a step of 0 returns ``x`` itself (the reconstruction
    ``U Σ Vᵀ`` is exact only up to rounding); an empty matrix is returned as is."""
    if x.numel() == 0 or (not isinstance(t, Tensor) and t == 0):
        return x
    shape = x.shape
    m = matrix(x)
    if _low_precision(x):
        m = m.float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s = torch.clamp(s - t, min=0)
    out = ((u * s.unsqueeze(-2)) @ vh).reshape(shape).to(x.dtype)
    return out if not isinstance(t, Tensor) else torch.where(t == 0, x, out)


def matrix(x: Tensor) -> Tensor:
    """``x`` as the matrix ``(x.shape[0], prod(x.shape[1:]))`` (also with 0 rows)."""
    cols = 1
    for n in x.shape[1:]:
        cols *= int(n)
    return x.reshape(x.shape[0], cols)


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
    return x * torch.where(over, safe_ratio(max_value, norm), torch.ones_like(norm))


def _as_tensor(v: Step, x: Tensor) -> Tensor:
    return v.to(x.dtype) if isinstance(v, Tensor) else torch.tensor(v, dtype=x.dtype)


def mcp_prox(x: Tensor, t: Step, lam: Step, gamma: float) -> Tensor:
    """Prox of ``t·MCP_{λ,γ}``: the global minimiser of ``h(y) = ½(y − x)² + t·p(y)`` for
    every step ``t ≥ 0``.

    * ``t < γ`` (``h`` strongly convex; firm thresholding): ``y = soft(x, tλ)/(1 − t/γ)`` if
      ``|x| ≤ γλ``, else ``y = x``.
    * ``t ≥ γ`` (``h`` concave on ``|y| ≤ γλ``, so its minimum there is at ``0`` or at
      ``±γλ``, and ``±γλ`` loses to ``0`` or to ``x``): hard thresholding, ``y = x`` if
      ``|x| > √(tγ)·λ`` (where ``h(x) = tγλ²/2 < h(0) = x²/2``), else ``0``; at equality
      both are minimisers and ``0`` is returned.

    A tensor ``t`` (per-model steps under ``vmap``) picks the case elementwise.
    """
    ax = x.abs()
    if not isinstance(t, Tensor) and t < gamma:
        return torch.where(ax <= gamma * lam, soft_threshold(x, t * lam) / (1 - t / gamma), x)
    hard = torch.where(ax > (t * gamma) ** 0.5 * lam, x, torch.zeros_like(x))
    if not isinstance(t, Tensor):
        return hard
    convex = t < gamma
    denominator = torch.where(convex, 1 - t / gamma, torch.ones_like(t))
    firm = torch.where(ax <= gamma * lam, soft_threshold(x, t * lam) / denominator, x)
    return torch.where(convex, firm, hard)


def scad_prox(x: Tensor, t: Step, lam: Step, a: float) -> Tensor:
    """Prox of ``t·SCAD_{λ,a}``: the global minimiser of ``h(y) = ½(y − x)² + t·p(y)`` for
    every step ``t ≥ 0``.

    * ``t < a − 1`` (``h`` strongly convex): ``soft(x, tλ)`` if ``|x| ≤ (1+t)λ``;
      ``x − sign(x)·t(aλ − |x|)/(a − 1 − t)`` (``= ((a−1)x − sign(x)·t a λ)/(a − 1 − t)``,
      written so that ``t = 0`` gives ``x`` exactly) if ``(1+t)λ < |x| ≤ aλ``; ``x``
      otherwise.
    * ``t ≥ a − 1`` (``h`` concave on ``λ ≤ |y| ≤ aλ``, so its minimum there is at an end):
      the better of the minimisers on the two convex pieces,
      ``y₁ = sign(x)·min(max(|x| − tλ, 0), λ)`` (on ``|y| ≤ λ``) and
      ``y₃ = sign(x)·max(|x|, aλ)`` (on ``|y| ≥ aλ``), ``y₁`` on ties.

    A tensor ``t`` (per-model steps under ``vmap``) picks the case elementwise.
    """
    ax = x.abs()
    sign = torch.sign(x)
    gap = a - 1 - t
    if isinstance(gap, Tensor):
        gap = torch.where(gap > 0, gap, torch.ones_like(gap))
    elif gap <= 0:
        gap = 1.0
    small = soft_threshold(x, t * lam)
    middle = x - sign * (t * (a * lam - ax) / gap)
    piecewise = torch.where(ax <= (1 + t) * lam, small, torch.where(ax <= a * lam, middle, x))
    if not isinstance(t, Tensor) and t < a - 1:
        return piecewise
    lam_t = _as_tensor(lam, x)
    y1 = torch.minimum(torch.clamp(ax - t * lam, min=0), lam_t)
    y3 = torch.maximum(ax, a * lam_t)
    h1 = 0.5 * (y1 - ax).square() + t * lam * y1
    h3 = 0.5 * (y3 - ax).square() + (0.5 * (a + 1) * t * lam_t) * lam_t
    outer = sign * torch.where(h1 <= h3, y1, y3)
    if not isinstance(t, Tensor):
        return outer
    return torch.where(t < a - 1, piecewise, outer)
