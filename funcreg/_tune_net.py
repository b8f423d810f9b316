"""Tuning the strengths of a network: the route :func:`funcreg.tune` takes when it is given
``training=fr.Training(...)``.

The inner problem is a training run, not a convex solve, so the outer objective
``E(θ) = score(w(θ), validation)`` (``θ = log s``) depends on *which* ``w(θ)`` training
returns. Two definitions of ``w(θ)`` have a derivative that can be trusted, and
``Training.hypergrad`` picks one:

* ``"implicit"``: ``w(θ)`` is a stationary point of the penalized training objective
  ``F(w, s) = loss(w, *data) + Σ_j s_j Ω_j(w)`` (smooth terms only). The first outer step
  trains ``steps`` steps of ``optimizer`` from ``params``; then, at every outer step, full-
  batch L-BFGS on ``F`` (at most ``polish`` iterations) drives ``‖∇_w F‖`` down to ``gtol``
  times its value at ``params``. Later outer steps start L-BFGS from the previous step's
  weights (a warm start: they follow one branch of minimisers as ``s`` moves). At the
  stationary point, implicit differentiation gives::

      (H + μ I) v = ∇_w E(w),     dE/ds_j = − vᵀ ∂_{s_j} ∇_w F(w, s),

  with ``H = ∇²_w F`` applied by Hessian-vector products, ``v`` by conjugate gradient (which
  stops at a direction of non-positive curvature) and an optional damping ``μ``. The measured
  relative stationarity of every step is in the history; the derivative is that of the
  stationary point only when it is small.
* ``"unrolled"``: ``w(θ)`` is ``steps`` steps of ``optimizer`` from ``params`` (the same
  init every outer step), and the derivative is the exact reverse-mode derivative through
  the last ``truncate`` of those steps (:func:`funcreg.unrolled.unrolled_hypergrad`; all of
  them by default). Prox steps (non-smooth terms) are included.

Neither helps when the trained validation loss is not a smooth function of ``s``: a ReLU
network trained by full-batch Adam at a large learning rate gives a map whose finite
differences change sign between steps of 0.01 and 0.002 in ``log s`` (``benchmarks/README.md``);
the exact derivative of such a map is correct and useless. Smooth activations with a stable
training (a moderate SGD-momentum learning rate), or training to stationarity, give a map
whose hypergradient equals finite differences.

The outer loop is :func:`funcreg.tune`'s: a functional optimizer on ``θ`` (default
``adam(lr=0.1)``) or ``"secant"``, stopping after ``steps`` outer steps, on ``patience``
steps without relative improvement ``tol``, on ``‖∇_θ E‖ ≤ gtol``, on a secant step
below ``xtol``, or on a non-finite value or hypergradient (``stopped="nonfinite"``). The
history has ``"step"``, ``"strengths"``, ``"value"``, ``"grad_norm"`` and ``"stationarity"``
(``‖∇_w F‖`` at the trained weights over its value at ``params``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from . import _checks
from ._implicit import cg, flat, hessian_vector, outer_grad, unflat
from ._secant import Outer
from .optim import Optimizer
from .progress import Progress
from .spec import Spec, as_spec, penalized
from .train import train_step
from .unrolled import unrolled_hypergrad

__all__ = ["Training", "tune_network"]

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Training:
    """How :func:`funcreg.tune` trains a network at each outer step (module docstring).

    Attributes:
        optimizer: a :mod:`funcreg.optim` optimizer for :func:`funcreg.train_step`.
        steps: full-batch optimizer steps (from ``params``; with ``"implicit"``, at the
            first outer step only).
        hypergrad: ``"implicit"`` (train to a stationary point, implicit differentiation)
            or ``"unrolled"`` (differentiate through the training steps).
        polish: the most L-BFGS iterations per outer step (``"implicit"``).
        gtol: L-BFGS stops when ``‖∇_w F‖`` is at most ``gtol`` times ``‖∇_w F(params)‖``.
        damping: ``μ`` in ``(H + μ I) v = ∇E`` (``"implicit"``; 0: none).
        cg_iter, cg_tol: conjugate-gradient iterations and relative residual.
        truncate: ``"unrolled"``: differentiate through the last ``truncate`` steps only.
        check: warn when a step's relative stationarity exceeds this (``"implicit"``).
    """

    optimizer: Optimizer
    steps: int
    hypergrad: str = "implicit"
    polish: int = 2000
    gtol: float = 1e-6
    damping: float = 0.0
    cg_iter: int = 1000
    cg_tol: float = 1e-8
    truncate: int | None = None
    check: float = 1e-3


def _check_training(tr: Any, who: str) -> None:
    if not isinstance(tr, Training):
        raise TypeError(
            f"{who}: training= must be a funcreg.Training(optimizer, steps, ...), got "
            f"{type(tr).__name__}"
        )
    if not isinstance(tr.optimizer, Optimizer):
        raise TypeError(
            f"{who}: Training.optimizer must be a funcreg.optim optimizer (e.g. "
            f"fr.optim.adam(1e-2)), got {type(tr.optimizer).__name__}"
        )
    for name in ("steps", "polish", "cg_iter"):
        v = getattr(tr, name)
        low = 0 if name == "polish" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{who}: Training.{name} must be an integer >= {low}, got {v!r}")
    if tr.hypergrad not in ("implicit", "unrolled"):
        raise ValueError(
            f"{who}: Training.hypergrad must be 'implicit' or 'unrolled', got {tr.hypergrad!r}"
        )
    if tr.hypergrad == "implicit" and tr.polish == 0:
        raise ValueError(
            f"{who}: Training(hypergrad='implicit', polish=0) would train only at the first "
            "outer step (later steps polish the warm start to a stationary point with L-BFGS); "
            "give polish >= 1, or use hypergrad='unrolled'"
        )
    for name in ("gtol", "damping", "cg_tol", "check"):
        v = getattr(tr, name)
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{who}: Training.{name} must be a finite number >= 0, got {v!r}")
    if tr.truncate is not None and (
        isinstance(tr.truncate, bool)
        or not isinstance(tr.truncate, int)
        or not 1 <= tr.truncate <= tr.steps
    ):
        raise ValueError(
            f"{who}: Training.truncate must be None or an integer in [1, steps={tr.steps}], "
            f"got {tr.truncate!r}"
        )


def _norm(tree: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float((v * v).sum()) for v in tree.values()))


class _Implicit:
    """Training to a stationary point of ``F`` and its implicit hypergradient."""

    def __init__(
        self, loss_fn: Callable[..., Tensor], spec: Spec, data: tuple[Any, ...], tr: Training
    ) -> None:
        self.loss_fn, self.spec, self.data, self.tr = loss_fn, spec, data, tr
        self.F = penalized(loss_fn, spec)

    def grad_norm(self, w: Params, s: Mapping[str, Tensor]) -> float:
        return _norm(grad(self.F)(w, s, *self.data))

    def train(self, w: Params, s: Mapping[str, Tensor], scale: float, first: bool) -> Params:
        if first:
            step = train_step(self.loss_fn, self.spec, self.tr.optimizer)
            state = self.tr.optimizer.init(w)
            with torch.no_grad():
                for _ in range(self.tr.steps):
                    w, state, _ = step(w, state, s, *self.data)
        x = flat(w).detach().clone().requires_grad_()
        lbfgs = torch.optim.LBFGS(
            [x],
            lr=1.0,
            max_iter=min(100, self.tr.polish),
            tolerance_grad=0.0,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            lbfgs.zero_grad()
            v = self.F(unflat(x, w), s, *self.data)
            v.backward()
            return v

        target = self.tr.gtol * scale
        done = 0
        while done < self.tr.polish:
            with torch.enable_grad():
                lbfgs.step(closure)
            done += min(100, self.tr.polish)
            assert x.grad is not None
            if float(torch.linalg.vector_norm(x.grad)) <= target:
                break
            if not bool(torch.isfinite(x).all()):
                break
        return {n: t.detach() for n, t in unflat(x.detach(), w).items()}

    def hypergrad(
        self,
        w: Params,
        s: Mapping[str, Tensor],
        tuned: tuple[str, ...],
        score: Callable[..., Tensor],
        held: tuple[Any, ...],
    ) -> tuple[float, dict[str, Tensor]]:
        val, gE = outer_grad(score, w, held, "tune")
        x = flat(w)

        def gradF(y: Tensor) -> Tensor:
            return flat(grad(self.F)(unflat(y, w), s, *self.data))

        mu = self.tr.damping

        def op(u: Tensor) -> Tensor:
            return hessian_vector(gradF, x, u) + mu * u

        v = cg(op, gE, self.tr.cg_tol, self.tr.cg_iter)

        def mixed(th: Mapping[str, Tensor]) -> Tensor:
            s2 = dict(s)
            s2.update({t: th[t].exp() for t in tuned})
            return flat(grad(self.F)(w, s2, *self.data)) @ v

        theta = {t: s[t].log() for t in tuned}
        g = grad(mixed)(theta)
        return float(val), {t: -g[t].detach() for t in tuned}


def tune_network(
    loss_fn: Callable[..., Tensor],
    spec: Any,
    params: Mapping[str, Tensor],
    strengths: Mapping[str, Any],
    data: tuple[Tensor, ...],
    *,
    training: Training,
    validation: tuple[Tensor, ...] | None,
    folds: Any,
    score_fn: Callable[..., Tensor] | None,
    terms: Iterable[str] | None,
    weights: Iterable[str],
    optimizer: Optimizer | str | None,
    steps: int,
    patience: int,
    tol: float,
    gtol: float,
    xtol: float,
    progress: bool,
) -> dict[str, Any]:
    """The network route of :func:`funcreg.tune` (module docstring); arguments as there.
    Returns the fields of a :class:`~funcreg.TuneResult` (``tune`` builds it)."""
    who = "tune"
    _check_training(training, who)
    spec = as_spec(spec)
    if validation is None or folds is not None:
        raise ValueError(
            f"{who}: with training= give a validation split, validation=(X_val, y_val) "
            "(cross-validation folds are not supported for networks)"
        )
    if tuple(weights):
        raise ValueError(f"{who}: weights= is not supported with training= (networks)")
    if not isinstance(data, tuple) or not data:
        raise TypeError(f"{who}: data must be a tuple of tensors, e.g. (X, y)")
    if not isinstance(validation, tuple) or not validation:
        raise TypeError(f"{who}: validation must be a tuple of tensors, e.g. (X_val, y_val)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{who}: steps must be an integer >= 1, got {steps!r}")
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"{who}: params must be a non-empty dict {{name: tensor}}")
    for t, v in strengths.items():
        if isinstance(v, (list, tuple)) or (isinstance(v, Tensor) and v.dim() > 0):
            raise ValueError(
                f"{who}: several starting points are not supported with training=; give "
                f"{t!r} one number"
            )
    tuned = _checks.tuned_terms(who, spec.strength_names, strengths, terms)
    implicit = training.hypergrad == "implicit"
    if implicit:
        rough = [t for t, pen in spec.items() if not pen.smooth]
        if rough:
            raise ValueError(
                f"{who}: training=Training(hypergrad='implicit') needs smooth terms, but "
                f"{rough[0]!r} ({type(spec[rough[0]]).__name__}) is not; use "
                "hypergrad='unrolled' (prox steps are differentiated through)"
            )
    score = loss_fn if score_fn is None else score_fn
    p0 = {n: t.detach() for n, t in params.items()}
    like = next(iter(p0.values()))

    def as_t(v: Any) -> Tensor:
        return torch.as_tensor(float(v), dtype=like.dtype, device=like.device)

    theta = {t: as_t(strengths[t]).log() for t in tuned}
    outer_loop = Outer(who, optimizer, theta, tol, patience, gtol, xtol)

    F = penalized(loss_fn, spec)
    inner = _Implicit(loss_fn, spec, data, training) if implicit else None
    step_fn = None if implicit else train_step(loss_fn, spec, training.optimizer)
    s_fixed = {t: as_t(strengths[t]) for t in spec.strength_names}
    scale = max(_norm(grad(F)(p0, s_fixed, *data)), 1e-300)

    history: dict[str, list[Any]] = {
        "step": [],
        "strengths": [],
        "value": [],
        "grad_norm": [],
        "stationarity": [],
    }
    best_w, stopped = p0, "steps"
    w = p0
    worst = 0.0
    with Progress(steps, enabled=progress, desc=who) as bar:
        for k in range(steps):
            s = dict(s_fixed)
            s.update({t: theta[t].exp() for t in tuned})
            if inner is not None:
                w = inner.train(w, s, scale, first=k == 0)
                val, g = inner.hypergrad(w, s, tuned, score, validation)
                stat = inner.grad_norm(w, s) / scale
                worst = max(worst, stat) if stat > training.check else worst
            else:
                assert step_fn is not None
                v, g, w = unrolled_hypergrad(
                    step_fn,
                    p0,
                    training.optimizer.init(p0),
                    s,
                    [data] * training.steps,
                    score,
                    validation,
                    terms=tuned,
                    truncate=training.truncate,
                )
                val = float(v)
                stat = _norm(grad(F)(w, s, *data)) / scale
            gnorm = _norm(g)
            history["step"].append(k)
            history["strengths"].append({t: float(v) for t, v in s.items()})
            history["value"].append(val)
            history["grad_norm"].append(gnorm)
            history["stationarity"].append(stat)
            bar.update()
            if not math.isfinite(val) or not math.isfinite(gnorm):
                stopped = "nonfinite"
                break
            if outer_loop.record(val):
                best_w = w
            bar.status(outer_loop.best, 0, 1)
            nxt, why = outer_loop.step(theta, val, g, gnorm)
            if nxt is None:
                stopped = why or stopped
                break
            theta = nxt
    if worst > 0:
        warnings.warn(
            f"{who}: training did not reach a stationary point at some outer steps (relative "
            f"‖∇F‖ up to {worst:.1e} > check={training.check:.0e}); their implicit "
            "hypergradients are approximations: raise Training.polish or use a smooth "
            "activation (history['stationarity'] has every step's value)",
            RuntimeWarning,
            stacklevel=3,
        )
    i = min(range(len(history["value"])), key=lambda j: history["value"][j])
    return {
        "strengths": dict(history["strengths"][i]),
        "weights": {},
        "value": outer_loop.best,
        "params": dict(best_w),
        "spec": spec,
        "history": history,
        "stopped": stopped,
    }
