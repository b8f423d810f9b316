"""Helpers for the classic ``loss.backward(); optimizer.step()`` loop, and converters from
the strength conventions of torch.optim, Keras and scikit-learn.

    spec = fr.Spec(l1=fr.L1("hidden.*"), l2=fr.L2("hidden.*"))
    loss = loss_func(net(x), y) + fr.penalty(net, spec.smooth(), strengths)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    fr.prox_(net, spec.nonsmooth(), strengths, lr=0.2)        # exact zeros
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from .penalties import L1, L2, ElasticNet, Penalty
from .selectors import Selector, SelectorLike, as_selector, biases, norm_layers
from .spec import Spec, Strengths, as_spec


def params(module: nn.Module) -> dict[str, Tensor]:
    """``{name: detached copy}`` of the module's floating-point parameters, keyed like
    ``named_parameters()`` — the ``torch.func.functional_call`` convention."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"params() expects an nn.Module, got {type(module).__name__}")
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.is_floating_point()}


def buffers(module: nn.Module) -> dict[str, Tensor]:
    """``{name: detached copy}`` of the module's buffers (BatchNorm running stats, ...)."""
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def _live_params(module_or_params: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(module_or_params, nn.Module):
        return dict(module_or_params.named_parameters())
    _checks.check_float_params(module_or_params)
    return module_or_params


def _one_model(
    where: str, spec: Spec, live: Mapping[str, Tensor], strengths: Strengths
) -> dict[str, Any]:
    """The eager checks of ``fr.penalty``/``fr.prox_``: the spec against the params, then one
    model's strengths (no unknown key, one number per term; numpy scalars as floats)."""
    spec.validate(live, strengths)
    return _checks.check_one_model_strengths(
        where, strengths, spec.strength_names, spec.known_terms
    )


def penalty(
    module_or_params: nn.Module | Mapping[str, Tensor],
    spec: Spec | Mapping[str, Penalty],
    strengths: Strengths,
) -> Tensor | float:
    """``Σ_k s_k Ω_k`` of a module's own parameters (so ``loss.backward()`` reaches them) or
    of a params dict; validates the spec and the strengths first: one model's strengths,
    a number (numpy scalars too) or a 0-dim tensor per term, keyed by the terms of ``spec``
    (or of the spec it was split from by ``smooth()``/``nonsmooth()``). Non-smooth terms give
    their subgradient through backward; use :func:`prox_` for exact zeros."""
    spec = as_spec(spec)
    live = _live_params(module_or_params)
    strengths = _one_model("penalty", spec, live, strengths)
    return spec(live, strengths)


@torch.no_grad()
def prox_(
    module_or_params: nn.Module | Mapping[str, Tensor],
    spec: Spec | Mapping[str, Penalty],
    strengths: Strengths,
    lr: float | Tensor,
) -> None:
    """In place: ``p ← prox_{lr·s_k·Ω_k}(p)`` for every term of ``spec`` (use
    ``spec.nonsmooth()``), after ``optimizer.step()``. With SGD this is proximal gradient
    descent; with any torch.optim optimizer it leaves exact zeros (L1, group lasso) and
    feasible weights (constraints). ``strengths`` as for :func:`penalty`; ``lr`` a number
    or a 0-dim tensor >= 0. After an Adam step this scalar step is the *decoupled* prox
    (threshold ``lr·s`` whatever Adam's scaling); :func:`funcreg.attach` takes the prox in
    Adam's own metric, whose fixed points are those of ``loss + Σ s_k Ω_k``."""
    spec = as_spec(spec)
    live = _live_params(module_or_params)
    strengths = _one_model("prox_", spec, live, strengths)
    lr = _checks.check_lr("prox_", lr)
    for term, pen in spec.items():  # a defined prox step (MCP needs lr < gamma, ...)
        try:
            pen.check_step(float(lr))
        except ValueError as e:
            raise ValueError(f"prox_: term {term!r}: {e}") from None
    new = spec.prox({n: p.detach() for n, p in live.items()}, strengths, lr)
    touched = {n for names in spec.selection(live).values() for n in names}
    for name in touched:
        live[name].copy_(new[name])


def param_groups(
    module: nn.Module,
    weight_decay: float,
    exclude: SelectorLike | None = None,
) -> list[dict[str, Any]]:
    """torch.optim param groups: decay on everything but ``exclude`` (default: biases and
    normalisation layers), which get ``weight_decay=0``. Pass to ``SGD``/``AdamW``."""
    sel: Selector = (biases() | norm_layers(module)) if exclude is None else as_selector(exclude)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for n, p in module.named_parameters():
        (no_decay if sel(n, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------------
# Converters: (spec, strengths) equivalent to other libraries' conventions
# ---------------------------------------------------------------------------------------


def from_weight_decay(
    weight_decay: float, select: SelectorLike | None = None
) -> tuple[Spec, dict[str, float]]:
    """``torch.optim.SGD(weight_decay=λ)`` (gradient ``+λw``) is ``L2`` with strength ``λ``."""
    _checks.check_strength_value("weight_decay", weight_decay)
    return Spec(l2=L2(select)), {"l2": float(weight_decay)}


def from_keras(
    l1: float = 0.0, l2: float = 0.0, select: SelectorLike | None = None
) -> tuple[Spec, dict[str, float]]:
    """Keras ``L1L2(l1, l2)`` — i.e. ``l1·Σ|w| + l2·Σw²``, also the hand-written
    ``l1 * p.abs().sum() + l2 * p.pow(2).sum()`` — is ``L1`` with strength ``l1`` plus ``L2``
    with strength ``2·l2`` (funcreg's ``L2`` is ``½Σw²``)."""
    _checks.check_strength_value("l1", l1)
    _checks.check_strength_value("l2", l2)
    return Spec(l1=L1(select), l2=L2(select)), {"l1": float(l1), "l2": 2.0 * float(l2)}


def from_sklearn(
    alpha: float, l1_ratio: float = 1.0, select: SelectorLike | None = None
) -> tuple[Spec, dict[str, float]]:
    """scikit-learn ``ElasticNet(alpha, l1_ratio)`` / ``Lasso(alpha)`` (``l1_ratio=1``):
    with the data term ``1/(2n)‖y − Xw‖²`` (half the MSE), the penalty
    ``alpha·(l1_ratio‖w‖₁ + (1 − l1_ratio)/2‖w‖²)`` is ``ElasticNet(l1_ratio)`` with
    strength ``alpha``."""
    _checks.check_strength_value("alpha", alpha)
    return Spec(elastic_net=ElasticNet(select, l1_ratio=l1_ratio)), {"elastic_net": float(alpha)}
