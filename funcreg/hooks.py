"""Attach a spec to a stock ``torch.optim`` optimizer through its step hooks.

    net = Net()                                    # terms declared with fr.regularize
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    handle = fr.attach(optimizer, None, {"l1": 1e-3, "l2": 1e-4}, model=net)
    for x, y in loader:                            # the user's loop, unchanged
        optimizer.zero_grad(); loss_fn(net(x), y).backward(); optimizer.step()
    handle.penalty(), handle.zeros()               # for logging; handle.remove() detaches

Per ``optimizer.step()``, with ``η`` each param group's *current* ``lr`` (an
``lr_scheduler`` is followed) and ``s`` the strengths of this step:

* before the step (``smooth="gradient"``): the gradient of the smooth terms,
  ``s_k ∇Ω_k``, is added to ``p.grad`` (``smooth="loss"``: the user adds
  ``fr.penalty(net, spec.smooth(), s)`` to the loss instead);
* after the step: every non-smooth term by its prox and every constraint by its projection,
  ``p ← prox_{η s_k Ω_k}(p)``, in the optimizer's metric: SGD the Euclidean one, step
  ``η``; ``Adam``/``AdamW`` the diagonal metric ``d = sqrt(v̂) + ε`` of their own
  ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``), step ``η / d`` per coordinate
  (:func:`funcreg.spec.metric_step` for group and matrix penalties).
  ``metric="decoupled"`` uses ``η`` for every optimizer; other optimizers (RMSprop,
  Adagrad, NAdam, ...: their own scalings) need it, as ``"auto"`` does not know their
  metric.

With ``torch.optim.SGD`` this is step for step ``fr.train_step(loss, spec,
fr.optim.sgd(...), prox=True)``; with Adam the prox of :func:`funcreg.optim.prox_steps`.

Implementation flags of the optimizer: ``foreach=True`` and ``fused=True`` change how
``step()`` computes its update, not that it runs: the step hooks fire around it and the state
(``exp_avg_sq``, ``step``) has the same keys, so the result equals the for-loop
implementation's (to rounding). Under a ``torch.amp.GradScaler`` a fused optimizer receives
still-scaled gradients and a ``found_inf`` flag (its kernel unscales, or skips the update):
the smooth gradient added before the step is scaled by the same ``grad_scale``, and the prox
is skipped (the handle's ``step`` not advanced) when the update is. ``capturable=True`` is
refused for prox terms: a step replayed from a CUDA graph runs no Python hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from .declare import spec_of
from .spec import Spec, as_spec
from .train import check_metric_prox

__all__ = ["Attached", "attach"]

Strengths = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]


class Attached:
    """The handle :func:`attach` returns: ``remove()``, the current ``strengths`` and
    ``step`` count, and logging values ``penalty()`` and ``zeros()``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        spec: Spec,
        strengths: Strengths,
        params: dict[str, nn.Parameter],
        smooth: str,
        metric: str,
        model: nn.Module,
    ) -> None:
        self.optimizer = optimizer
        self.model = model
        self.spec = spec
        self.step = 0
        self._schedule = strengths
        self._params = params
        self._metric = metric
        self._smooth = spec.smooth() if smooth == "gradient" else Spec()
        self._prox = spec.nonsmooth()
        self._group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._handles = [optimizer.register_step_post_hook(self._after)]
        if len(self._smooth):
            self._handles.append(optimizer.register_step_pre_hook(self._before))
        self.strengths = self._strengths_at(0)

    # -- the hooks --------------------------------------------------------------------
    def _check_params(self) -> None:
        """The selected params are still the model's, and trainable."""
        now = dict(self.model.named_parameters())
        for term, names in self.spec.selection(self._params).items():
            for n in names:
                if now.get(n) is not self._params[n]:
                    raise ValueError(
                        f"fr.attach: term {term!r} was attached to parameter {n!r}, which is no "
                        "longer a parameter of the model (deleted or replaced); call "
                        "handle.remove() and fr.attach again"
                    )
                if not self._params[n].requires_grad:
                    raise ValueError(
                        f"fr.attach: term {term!r} selects {n!r}, which was frozen "
                        "(requires_grad=False) after attach; call handle.remove() and attach "
                        "a spec that leaves it out"
                    )

    def _strengths_at(self, step: int) -> dict[str, Any]:
        self._check_params()
        value = self._schedule(step) if callable(self._schedule) else self._schedule
        if not isinstance(value, Mapping):
            raise TypeError(
                f"fr.attach: the strengths schedule returned {type(value).__name__} at step "
                f"{step}; it must return a dict {{term: strength}}"
            )
        self.spec.validate(self._params, value)
        return _checks.check_one_model_strengths(
            "fr.attach", value, self.spec.strength_names, self.spec.known_terms
        )

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.add_smooth_gradient(self._smooth)

    @torch.no_grad()
    def add_smooth_gradient(
        self, part: Spec | None = None, scale: Tensor | float | None = None
    ) -> None:
        """Add ``s_k ∇Ω_k`` of the smooth terms (``part``: default all of the spec's) to the
        parameters' ``.grad``, at this step's strengths: what the pre-step hook does, for
        loops whose step computes the gradients itself (a closure, as Lightning's). Under a
        ``GradScaler`` with a fused optimizer the gradients are still scaled when the step
        starts (the fused kernel unscales them): the added gradient is scaled alike, by the
        optimizer's ``grad_scale`` inside the step, or by ``scale`` when given (a caller
        that runs before the scaler's step, as the Lightning callback does)."""
        part = self.spec.smooth() if part is None else part
        self.strengths = self._strengths_at(self.step)
        names = part.selected_names(self._params)
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_() for n, p in self._params.items()}
            total = part(leaves, self.strengths)
            if not isinstance(total, Tensor) or not total.requires_grad:
                return
            grads = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
        if scale is None:
            scale = getattr(self.optimizer, "grad_scale", None)
        for n, g in zip(names, grads, strict=True):
            if g is None:
                continue
            if scale is not None:
                g = g * (scale.to(g) if isinstance(scale, Tensor) else scale)
            p = self._params[n]
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    @torch.no_grad()
    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor) and bool(found_inf.any()):
            return  # a GradScaler's fused step skipped the update: so does the prox
        if not len(self._smooth):  # else read by the pre-step hook
            self.strengths = self._strengths_at(self.step)
        if len(self._prox):
            live = {n: p.detach() for n, p in self._params.items()}
            steps = {n: self._prox_step(n, p) for n, p in live.items()}
            new = self._prox.prox(live, self.strengths, steps)
            for n in self._prox.selected_names(live):
                live[n].copy_(new[n])
        self.step += 1

    def _prox_step(self, name: str, p: Tensor) -> Tensor:
        group = self._group_of[id(self._params[name])]
        lr = group["lr"]
        lr = lr.to(p) if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=p.dtype)
        if self._metric == "decoupled":
            return lr
        d = _adam_metric(self.optimizer, group, self._params[name])
        return lr if d is None else lr / d

    # -- public -----------------------------------------------------------------------
    def remove(self) -> None:
        """Detach from the optimizer: later steps are the stock optimizer's exactly."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def penalty(self) -> dict[str, Tensor]:
        """``{term: s_k Ω_k, ..., "penalty": total}`` at the current params and strengths
        (detached; constraints are 0)."""
        live = {n: p.detach() for n, p in self._params.items()}
        parts = self.spec.parts(live, self.strengths)
        total = sum(parts.values(), torch.zeros(()))
        return {**parts, "penalty": total}

    @torch.no_grad()
    def zeros(self) -> dict[str, int]:
        """``{param name: number of exact zeros}`` for every parameter a term selects."""
        names = self.spec.selected_names(self._params)
        return {n: int((self._params[n] == 0).sum()) for n in names}

    def zero_fraction(self) -> float:
        """Exact zeros over all the coordinates the terms select."""
        names = self.spec.selected_names(self._params)
        size = sum(self._params[n].numel() for n in names)
        return sum(self.zeros().values()) / max(size, 1)


def _adam_metric(optimizer: Any, group: Mapping[str, Any], p: nn.Parameter) -> Tensor | None:
    """``sqrt(v̂) + ε`` from torch.optim.Adam/AdamW's state for ``p``; ``None`` for an
    optimizer without one (metric 1)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return None
    state = optimizer.state.get(p, {})
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    if key not in state:
        return None
    step = torch.as_tensor(state["step"]).to(p.dtype)
    beta2 = group["betas"][1]
    root = torch.sqrt(1 - torch.as_tensor(beta2, dtype=p.dtype) ** step)
    return torch.sqrt(state[key]) / root + group["eps"]


def attach(
    optimizer: torch.optim.Optimizer,
    spec: Spec | Mapping[str, Any] | None,
    strengths: Strengths,
    *,
    model: nn.Module,
    smooth: str = "gradient",
    metric: str = "auto",
) -> Attached:
    """Apply ``spec`` (``None``: :func:`funcreg.spec_of` of ``model``) on every
    ``optimizer.step()`` of a stock ``torch.optim`` optimizer (see the module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (some of) ``model``'s parameters.
        spec: the terms, or ``None`` for the terms declared with ``fr.regularize``.
        strengths: ``{term: strength}``, or a schedule ``step -> {term: strength}`` read
            before each step (``step`` counts this handle's steps from 0).
        model: the module whose ``named_parameters()`` names the spec selects.
        smooth: ``"gradient"`` (add the smooth terms' gradient to ``p.grad`` before each
            step) or ``"loss"`` (the smooth terms are in the user's loss; only ``penalty()``
            reports them).
        metric: ``"auto"`` (``SGD``: step ``lr``; ``Adam``/``AdamW``: their own diagonal
            metric; any other optimizer with prox terms is refused, its steps being scaled
            its own way) or ``"decoupled"`` (prox step ``lr`` for every optimizer).

    Returns:
        An :class:`Attached` handle.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"fr.attach: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            "; for funcreg's functional optimizers use fr.train_step"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"fr.attach: model= must be the nn.Module, got {type(model).__name__}")
    if smooth not in ("gradient", "loss"):
        raise ValueError(f"fr.attach: smooth must be 'gradient' or 'loss', got {smooth!r}")
    if metric not in ("auto", "decoupled"):
        raise ValueError(f"fr.attach: metric must be 'auto' or 'decoupled', got {metric!r}")
    declared = spec is None
    spec = spec_of(model) if spec is None else as_spec(spec)
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    if not declared:
        try:
            spec.selection(params)
        except ValueError as e:
            raise ValueError(
                f"fr.attach: {e} If the spec came from fr.spec_of(a submodule) or from another "
                "model, it names that module's parameters: pass spec=None (the terms declared "
                "on model=) or fr.spec_of(model)"
            ) from None
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not optimized & {id(p) for p in params.values()}:
        raise ValueError(
            "fr.attach: none of the optimizer's parameters is a parameter of model=; pass the "
            "model whose parameters the optimizer updates"
        )
    spec.validate(params, {t: 0.0 for t in spec.strength_names})
    for term, names in spec.selection(params).items():
        for n in names:
            if id(params[n]) not in optimized:
                raise ValueError(
                    f"fr.attach: term {term!r} selects {n!r}, which the optimizer does not "
                    "update; add it to the optimizer's params or narrow the term's selector"
                )
    prox_part = spec.nonsmooth()
    if len(prox_part):
        for group in optimizer.param_groups:
            if group.get("capturable"):
                raise ValueError(
                    "fr.attach: a param group has capturable=True: a captured (CUDA graph) "
                    "step replays without Python hooks, so the prox terms "
                    f"{list(prox_part)} would be skipped; use capturable=False"
                )
    known = isinstance(optimizer, torch.optim.SGD | torch.optim.Adam | torch.optim.AdamW)
    if metric == "auto" and not known and any(not p.is_constraint for p in prox_part.values()):
        raise ValueError(
            f"fr.attach: metric='auto' knows the prox step of torch.optim.SGD (lr) and "
            f"Adam/AdamW (lr/(sqrt(v̂)+eps)), not of {type(optimizer).__name__}, which scales "
            f"its steps its own way: a prox of the terms {list(prox_part)} with step lr would "
            "not minimize loss + Σ strength·Ω; pass metric='decoupled' to threshold at "
            "lr·strength after each step anyway, or use SGD, Adam or AdamW"
        )
    adaptive = metric == "auto" and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
    check_metric_prox(
        "fr.attach", prox_part, adaptive, "pass metric='decoupled' (prox step lr) or use SGD"
    )
    return Attached(optimizer, spec, strengths, params, smooth, metric, model)
