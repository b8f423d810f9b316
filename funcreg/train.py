"""One pure training step: (sub)gradient of the smooth part, optimizer update, prox of the rest.

With ``prox=True`` a step is proximal gradient descent generalised to any functional
optimizer:

    ``g  = ∇ [ loss(w) + Σ_{k smooth} s_k Ω_k(w) ]``
    ``w' = optimizer.step(g, w)``
    ``w⁺ = prox_{η s_k Ω_k}(w')`` for every non-smooth term ``k`` (in spec order),
    with ``η`` the optimizer's learning rate.

with ``η`` the optimizer's learning rate and, for an optimizer with a variable metric
(:attr:`funcreg.optim.Optimizer.metric`: Adam, AdamW), the prox taken in that metric.

With SGD this is exactly ISTA/proximal SGD. With Adam/AdamW the step ``w - η D⁻¹ m̂`` is a
gradient step in the metric ``D = diag(sqrt(v̂) + ε)``, so the prox is taken in the same
metric: per coordinate the threshold ``η·s/(sqrt(v̂_i) + ε)``
(:func:`funcreg.optim.prox_steps`; group and matrix penalties take one metric value per
group/tensor, :func:`funcreg.spec.metric_step`). Its fixed points satisfy the optimality
conditions of ``loss + Σ s_k Ω_k`` (L1: ``|∂_i loss| ≤ s`` at ``w_i = 0``), so a strength
means the same under Adam as under SGD and in the exact solvers. The decoupled prox (plain
``η``, thresholding at ``|g_i|/(sqrt(v̂_i)+ε) ≤ s``) is :func:`funcreg.optim.decoupled`.
MCP and SCAD need every prox step below ``γ`` (``a - 1``), which Adam's per-coordinate
steps do not guarantee: with an adaptive optimizer they need ``decoupled(...)``.

With ``prox=False`` every term but the constraints goes through the (sub)gradient —
the hand-written penalty loop, which never produces exact zeros. Constraints
(``NonNegative``, ``Box``, ``MaxNorm``) have no gradient and are always projected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from . import _checks
from ._foreach import donates, eager_update
from ._tree import all_finite
from .activity import Activity
from .activity import penalized as activity_penalized
from .optim import Optimizer, prox_steps
from .penalties import MCP, SCAD, Penalty
from .spec import Spec, as_spec, penalized, strength_of

Step = Callable[..., tuple[dict[str, Tensor], Any, dict[str, Tensor]]]


def split_spec(spec: Spec | Mapping[str, Penalty], prox: bool) -> tuple[Spec, Spec]:
    """``(gradient part, prox part)`` of a spec for training with or without prox steps."""
    spec = as_spec(spec)
    if prox:
        prox_part = spec.nonsmooth()
        for term, pen in prox_part.items():
            if not pen.has_prox:
                raise _checks.no_prox_error(term, type(pen).__name__, pen.smooth)
        return spec.smooth(), prox_part
    constraints = {k: v for k, v in spec.items() if v.is_constraint}
    return Spec({k: v for k, v in spec.items() if not v.is_constraint}), Spec(constraints)


def check_metric_prox(
    where: str,
    prox_part: Spec,
    adaptive: bool,
    fix: str = "wrap the optimizer as fr.optim.decoupled(optimizer) (prox step lr) or use sgd",
) -> None:
    """Refuse MCP/SCAD terms applied by prox under a per-coordinate (adaptive) metric."""
    if not adaptive:
        return
    for term, pen in prox_part.items():
        if isinstance(pen, MCP | SCAD):
            raise ValueError(
                f"{where}: term {term!r} ({type(pen).__name__}) has a prox only for steps below "
                f"its concavity, and an adaptive optimizer's per-coordinate prox steps "
                f"lr/(sqrt(v)+eps) are unbounded; {fix}"
            )


def _autograd_grad(
    loss_fn: Callable[..., Any], spec: Spec, activity: Mapping[str, Activity] | None = None
) -> Callable[..., Any]:
    """``grad(penalized(loss_fn, spec, return_parts=True), has_aux=True)`` for one unbatched
    model, by ``torch.autograd``. Terms with a closed form (:meth:`Penalty.closed_form`:
    plain ``L1``, ``L2``) stay out of the autograd graph: their gradients come from one
    ``torch._foreach_add`` over all their parameters and their values from one reduction
    (:mod:`funcreg._tree`), the same numbers as autograd's (``s·sign(w)``, ``s·w``) for less
    work. The first call checks that the data loss, and each activity term, depends on the
    params it is given (not detached, not computed from a module's own weights) and raises,
    naming ``loss_fn`` or the term, if it does not."""
    forms = {t: f for t, p in spec.items() if (f := p.closed_form()) is not None}
    rest = Spec({t: p for t, p in spec.items() if t not in forms})
    objective = (
        activity_penalized(loss_fn, rest, activity, True)
        if activity
        else penalized(loss_fn, rest, True)
    )
    order = ["loss", *spec, *(activity or {})]
    checked: list[bool] = []  # set once the first call found the loss reading the params

    def grad_fn(params: Mapping[str, Tensor], strengths: Mapping[str, Any], *batch: Any) -> Any:
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
            total, parts = objective(leaves, strengths, *batch)
            if leaves and not checked:  # once: the data loss must reach some param
                if not _checks.reaches(parts["loss"], leaves):
                    raise _checks.loss_ignores_params_error(loss_fn)
                for term, act in (activity or {}).items():
                    if not _checks.reaches(parts[term], leaves):
                        raise _checks.activation_ignores_params_error(
                            "train_step", term, act.modules
                        )
                checked.append(True)
            if total.requires_grad:
                found = torch.autograd.grad(
                    total, list(leaves.values()), allow_unused=True, materialize_grads=True
                )
            else:  # nothing left in the graph depends on the params
                found = tuple(torch.zeros_like(p) for p in leaves.values())
        grads = dict(zip(leaves, found, strict=True))
        metrics = {k: v.detach() for k, v in parts.items()}
        if forms:
            selection = spec.selection(params)
            with torch.no_grad():  # the closed-form terms: no autograd graph
                for term, form in forms.items():
                    names = selection[term]
                    # out of place: autograd may hand the same tensor to several params
                    value, summed = form(
                        [params[n] for n in names],
                        strength_of(strengths, term),
                        [grads[n] for n in names],
                    )
                    grads.update(zip(names, summed, strict=True))
                    metrics[term] = value
            metrics = {k: metrics[k] for k in order}
        return grads, metrics

    return grad_fn


def _gradient(
    loss_fn: Callable[..., Tensor],
    grad_part: Spec,
    prox_part: Spec,
    autograd: bool,
    activity: Mapping[str, Activity] | None,
) -> Callable[..., tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """``(params, strengths, *batch) -> (grads, metrics)``: the first half of
    :func:`train_step`'s step (its metrics, ``"penalty"`` included)."""
    if autograd:
        grad_fn = _autograd_grad(loss_fn, grad_part, activity)
    elif activity:
        grad_fn = grad(activity_penalized(loss_fn, grad_part, activity, True), has_aux=True)
    else:
        grad_fn = grad(penalized(loss_fn, grad_part, return_parts=True), has_aux=True)
    has_prox = len(prox_part) > 0

    def gradient(
        params: dict[str, Tensor], strengths: Mapping[str, Any], *batch: Any
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        grads, parts = grad_fn(params, strengths, *batch)
        metrics = dict(parts)
        if has_prox:
            metrics.update(prox_part.parts(params, strengths))
        penalty_total = None
        for k, v in metrics.items():
            if k != "loss":
                penalty_total = v if penalty_total is None else penalty_total + v
        metrics["penalty"] = metrics["loss"] * 0 if penalty_total is None else penalty_total
        return grads, metrics

    return gradient


def gradient_step(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    prox: bool = True,
    *,
    activity: Mapping[str, Activity] | None = None,
) -> tuple[Callable[..., tuple[dict[str, Tensor], dict[str, Tensor]]], Spec]:
    """:func:`train_step`'s step cut at its optimizer: ``(gradient, prox part)``, with
    ``gradient(params, strengths, *batch) -> (grads, metrics)`` the part before the update
    (pure, vmappable; the same gradient and metrics) and the terms whose prox
    (:meth:`Spec.prox <funcreg.spec.Spec.prox>`) follows it (with ``prox=False``: the
    constraints)."""
    grad_part, prox_part = split_spec(spec, prox)
    return _gradient(loss_fn, grad_part, prox_part, False, activity), prox_part


def train_step(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    optimizer: Optimizer,
    prox: bool = True,
    *,
    autograd: bool = False,
    activity: Mapping[str, Activity] | None = None,
) -> Step:
    """A pure step ``(params, state, strengths, *batch) -> (params, state, metrics)``.

    ``strengths`` carries one entry per term that needs a strength and every
    hyperparameter the optimizer reads by name (``optimizer.hyperparams``). ``metrics`` has
    ``"loss"`` (the data loss at the incoming params), ``"penalty"`` (the total penalty
    there) and each term's value ``s_k Ω_k``. Initialise ``state`` with
    ``optimizer.init(params)``. Vmap it over stacked params/state/strengths for a sweep.

    ``autograd=True`` computes the gradient with ``torch.autograd.grad`` instead of
    ``torch.func.grad`` and updates with the optimizer's eager twin when it has one
    (:func:`funcreg._foreach.eager_update`: a ``_foreach`` or fused-kernel twin of its step):
    the same numbers up to rounding, less per-call overhead for one unbatched model in eager
    mode, but not usable under ``vmap``/``torch.compile``.

    ``activity={term: fr.activity.Activity(...)}`` adds activity terms whose strengths are
    entries of ``strengths``: ``loss_fn`` then returns ``(data loss, {module path:
    activation})`` (:func:`funcreg.activity.penalized`) and ``metrics`` gains each term's
    value.
    """
    return _step(loss_fn, spec, optimizer, prox, autograd, activity)


DONATE_MIN_NUMEL = 1 << 16
"""A donated step copies its state only below this many parameter entries: the finiteness
check that donation needs costs tens of microseconds, the copy it saves ~1 ns per entry."""


def _donates_here(params: Mapping[str, Tensor]) -> bool:
    """Whether a donated step pays off for these params: on CPU (elsewhere its finiteness
    check would be a second host sync per step) from :data:`DONATE_MIN_NUMEL` entries."""
    ps = list(params.values())
    on_cpu = bool(ps) and ps[0].device.type == "cpu"
    return on_cpu and sum(p.numel() for p in ps) >= DONATE_MIN_NUMEL


def eager_step(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    optimizer: Optimizer,
    prox: bool = True,
    activity: Mapping[str, Activity] | None = None,
    donate_state: bool = False,
) -> Step:
    """:func:`train_step` with ``autograd=True`` for one unbatched model: the same
    signature, the same numbers up to rounding, less per-step overhead on CPU (``fr.sweep``
    runs chunks of one model with it). ``donate_state=True``: the optimizer's eager twin may
    update the state it is given in place (:func:`funcreg._foreach.eager_update`), for a
    caller that owns that state and never reads it again, one copy of it less per step
    (on CPU, for models of at least :data:`DONATE_MIN_NUMEL` parameter entries); the params
    are never modified. A step whose loss, penalty or gradients are not all finite
    takes the copying update instead, so that a caller's divergence guard can keep the
    state of the step before (only an update that overflows from finite gradients — a
    learning rate near the dtype's range — changes a donated state that such a guard
    then discards)."""
    return _step(loss_fn, spec, optimizer, prox, True, activity, donate_state)


def _step(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    optimizer: Optimizer,
    prox: bool,
    autograd: bool,
    activity: Mapping[str, Activity] | None,
    donate_state: bool = False,
) -> Step:
    """:func:`train_step`'s step (``donate_state``: see :func:`eager_step`)."""
    grad_part, prox_part = split_spec(spec, prox)
    gradient = _gradient(loss_fn, grad_part, prox_part, autograd, activity)
    # eager: the optimizer's _foreach or fused twin of its step, when it has one
    twin = eager_update(optimizer) if autograd else None
    update = twin if twin is not None else optimizer.step
    donated = (
        eager_update(optimizer, True) if autograd and donate_state and donates(optimizer) else None
    )
    has_prox = len(prox_part) > 0
    check_metric_prox("train_step", prox_part, optimizer.metric is not None)

    def step(
        params: dict[str, Tensor], state: Any, strengths: Mapping[str, Any], *batch: Any
    ) -> tuple[dict[str, Tensor], Any, dict[str, Tensor]]:
        grads, metrics = gradient(params, strengths, *batch)
        if (
            donated is not None
            and _donates_here(params)
            and all_finite([*grads.values(), *metrics.values()])
        ):
            new_params, new_state = donated(grads, state, params, strengths)
        else:  # also a non-finite step: a divergence guard keeps the state it was given
            new_params, new_state = update(grads, state, params, strengths)
        if has_prox:
            steps = prox_steps(optimizer, new_state, strengths)
            new_params = prox_part.prox(new_params, strengths, steps)
        return new_params, new_state, metrics

    return step
