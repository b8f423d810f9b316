"""Functional optimizers: pure ``init`` / ``step`` pairs that work under ``torch.func`` and compile.

An :class:`Optimizer` is a small NamedTuple of pure functions::

    opt = adam(lr="lr")                      # lr read from the hyperparameters dict
    state = opt.init(params)                 # pytree of tensors (NamedTuple of dicts)
    params, state = opt.step(grads, state, params, {"lr": torch.tensor(1e-3)})

Nothing is updated in place, no value is read back with ``.item()`` and nothing branches on a
tensor's value, so a step can be wrapped in ``torch.func.vmap`` (one model per strength of a
sweep), differentiated with ``torch.func.grad`` (hypergradients) and compiled with
``torch.compile(fullgraph=True)``.

Every hyperparameter is a :data:`HyperValue`: a number, fixed when the optimizer is built, or
the *name* of an entry of the ``hyper`` dict passed to ``step``, so that a vmapped sweep can
give every model its own value (a 0-dim tensor per model under ``vmap``). Numbers are
validated eagerly when the optimizer is built; tensors are never inspected.

The updates reproduce ``torch.optim.SGD``, ``torch.optim.Adam`` and ``torch.optim.AdamW``
(``maximize=False``, ``amsgrad=False``) step for step; the formulas are in each factory's
docstring. The step count lives in the state (field ``step``) as a 0-dim ``float32`` tensor
(exact up to 2**24 steps); bias corrections are computed in the promoted dtype of that count
and the parameter, so ``float64`` parameters get ``float64`` corrections.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "AdamState",
    "Hyper",
    "HyperValue",
    "MissingHyperparameterError",
    "Optimizer",
    "Params",
    "SGDState",
    "adam",
    "adam_metric",
    "adamw",
    "decoupled",
    "prox_steps",
    "resolve",
    "sgd",
]

Params: TypeAlias = dict[str, Tensor]
Hyper: TypeAlias = Mapping[str, Tensor | float]
HyperValue: TypeAlias = float | str
"""A hyperparameter: a number, or the name of an entry of the ``hyper`` dict given to ``step``."""

_Scalar: TypeAlias = Tensor | float


class Optimizer(NamedTuple):
    """A functional optimizer.

    Attributes:
        init: ``params -> state``; the state is a pytree of tensors whose step count ``step`` is a
            0-dim float tensor, so ``vmap(opt.init)(stacked_params)`` gives one state per model.
        step: ``step(grads, state, params, hyper) -> (new_params, new_state)``; pure, never in
            place. ``grads`` has exactly the keys of ``params``. ``hyper`` holds the values of the
            names in :attr:`hyperparameters` (may be omitted when there are none).
        hyperparams: the names this optimizer reads from ``hyper`` (empty when all are numbers).
        learning_rate: ``hyper -> lr``, the learning rate a step uses (resolved from ``hyper``
            when it was given by name); proximal training takes its prox step from it
            (:func:`prox_steps`: ``lr``, or ``lr / d`` with a :attr:`metric`).
        config: the optimizer's name and settings as given (numbers or names), e.g.
            ``(("name", "adam"), ("lr", "lr"), ("betas", (0.9, 0.999)), ...)``; checkpoints
            use it to recognise the same optimizer.
        step_eager: optional, an eager twin of ``step`` for one unbatched model given by
            whoever builds the optimizer (same signature, same results, pure, not for
            ``vmap``/``torch.compile``/``torch.func.grad``); ``None`` (the built-in
            optimizers) leaves it to :func:`funcreg._foreach.eager_update`, which finds the
            ``torch._foreach``/fused-kernel twins of :func:`sgd`, :func:`adam` and
            :func:`adamw` from ``config``. :func:`funcreg.train.train_step` uses the twin only
            with ``autograd=True``.
        metric: optional, ``(state, hyper) -> {name: d}``: the diagonal of the variable metric
            the step just used, a pure function of the state *after* the step (same keys and
            shapes as the params). A preconditioned step ``w - η D⁻¹ m`` is the gradient step
            of the metric ``D = diag(d)``, so the prox that keeps the penalized objective's
            fixed points is the prox in that metric, per coordinate ``prox`` with step
            ``η / d`` (:func:`prox_steps`). ``None`` means ``d = 1`` (SGD's Euclidean metric,
            or the decoupled prox of :func:`decoupled`).
        elementwise: ``True`` declares that ``step`` works entry by entry on a leading model
            axis: its state is a NamedTuple whose fields are per-model scalars (the step
            count) or dicts with the params' keys (or empty), and given the K models'
            params, grads and per-param state each as one ``(K, n)`` tensor under one key,
            and the per-model scalars and ``hyper`` values as ``(K, 1)``, it returns row by
            row what ``vmap(step)`` returns for each model. ``fr.sweep`` then applies it once
            to a vmapped chunk's concatenated models, outside ``vmap``
            (:mod:`funcreg._stacked`). ``False`` (the default): always under ``vmap``. A
            step swapped into a built-in optimizer with ``_replace(step=...)`` keeps the
            flag but is not trusted with it (:func:`funcreg._foreach.stacks`): give such
            a step its own ``config`` name to declare it.
    """

    init: Callable[[Params], Any]
    step: Callable[[Params, Any, Params, Hyper], tuple[Params, Any]]
    hyperparams: frozenset[str]
    learning_rate: Callable[[Hyper], Tensor | float]
    config: tuple[tuple[str, Any], ...] = ()
    step_eager: Callable[[Params, Any, Params, Hyper], tuple[Params, Any]] | None = None
    metric: Callable[[Any, Hyper], Params] | None = None
    elementwise: bool = False


class SGDState(NamedTuple):
    """State of :func:`sgd`: number of steps taken (0-dim float tensor) and momentum buffers.

    ``momentum_buffer`` is empty when ``momentum`` is the number 0.
    """

    step: Tensor
    momentum_buffer: Params


class AdamState(NamedTuple):
    """State of :func:`adam` / :func:`adamw`: number of steps taken (0-dim float tensor) and the
    first and second moment estimates (``m``, ``v``)."""

    step: Tensor
    exp_avg: Params
    exp_avg_sq: Params


class MissingHyperparameterError(KeyError, ValueError):
    """A hyperparameter given by name is missing from the ``hyper`` dict.

    Subclasses both ``KeyError`` and ``ValueError``; ``str()`` is the plain message.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- helpers


def resolve(value: HyperValue, hyper: Hyper | None) -> Tensor | float:
    """Resolve a hyperparameter: a number is returned as is, a name is looked up in ``hyper``.

    Raises:
        MissingHyperparameterError: (a ``KeyError`` and a ``ValueError``) when ``value`` is a
            name that is not in ``hyper``; the message lists the available names.
    """
    if not isinstance(value, str):
        return value
    if hyper is None or value not in hyper:
        available = sorted(hyper) if hyper is not None else []
        lowered = {str(k).lower(): k for k in available}
        close = difflib.get_close_matches(value.lower(), list(lowered), n=1)
        hint = f" Did you mean {lowered[close[0]]!r}?" if close else ""
        raise MissingHyperparameterError(
            f"optimizer hyperparameter {value!r} is not in the hyperparameters dict "
            f"(available: {', '.join(map(repr, available)) or 'none'}); pass it in the "
            f"grid/strengths or give a number.{hint}"
        )
    return hyper[value]


_Rule = tuple[Callable[[float], bool], str]
_FINITE: _Rule = (math.isfinite, "a finite number")
_NONNEG: _Rule = (lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
_POSITIVE: _Rule = (lambda x: math.isfinite(x) and x > 0, "a finite number > 0")
_UNIT: _Rule = (lambda x: 0 <= x < 1, "a number in [0, 1)")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_number(opt: str, arg: str, value: float, rule: _Rule, source: str = "") -> None:
    ok, what = rule
    if not ok(value):
        raise ValueError(f"{opt}: {arg} must be {what}, got {value!r}{source}.")


def _hyper_value(opt: str, arg: str, value: object, rule: _Rule) -> HyperValue:
    """Validate a constructor argument: a number satisfying ``rule`` or a non-empty name."""
    if isinstance(value, str):
        if not value:
            raise ValueError(
                f"{opt}: {arg} is an empty string; give a number or the name of an entry of "
                "the hyperparameters dict."
            )
        return value
    if not _is_number(value):
        raise TypeError(
            f"{opt}: {arg} must be a number or the name (str) of an entry of the "
            f"hyperparameters dict, got {type(value).__name__} {value!r}. To vary it per model "
            f'or avoid recompiles, pass e.g. {arg}="{arg}" and put the tensor in the dict.'
        )
    number = float(value)  # type: ignore[arg-type]
    _check_number(opt, arg, number, rule)
    return number


def _get(opt: str, arg: str, value: HyperValue, hyper: Hyper | None, rule: _Rule) -> _Scalar:
    """Resolve ``value``; a plain number found in ``hyper`` is validated like a constructor one."""
    resolved = resolve(value, hyper)
    if isinstance(value, str) and _is_number(resolved):
        resolved = float(resolved)
        _check_number(opt, arg, resolved, rule, f" (from hyperparameters[{value!r}])")
    return resolved


def _descend(p: Tensor, g: Tensor, lr: _Scalar) -> Tensor:
    """``p - lr·g``: ``torch.optim.SGD``'s ``add(g, alpha=-lr)`` for a number (one op)."""
    if isinstance(lr, Tensor):
        return p - lr * g
    return torch.add(p, g, alpha=-lr)


def _moving_average(m: Tensor, g: Tensor, beta: _Scalar) -> Tensor:
    """``β m + (1 - β) g``: one ``lerp`` when ``β`` is a number (a tensor weight of ``lerp``
    must have the params' dtype once vmap batches it, so a grid's ``β`` takes two ops)."""
    if isinstance(beta, Tensor):
        return beta * m + (1 - beta) * g
    return torch.lerp(m, g, 1 - beta)


def _decayed_square(v: Tensor, g: Tensor, beta: _Scalar) -> Tensor:
    """``β v + (1 - β) g²``: one ``addcmul`` after a ``mul`` when ``β`` is a number."""
    if isinstance(beta, Tensor):
        return beta * v + (1 - beta) * (g * g)
    return torch.addcmul(v * beta, g, g, value=1 - beta)


def is_zero(value: HyperValue | Tensor) -> bool:
    """True when ``value`` is the number 0 (a name or a tensor is never statically zero)."""
    return not isinstance(value, str | Tensor) and _is_number(value) and value == 0


def _names(*values: HyperValue) -> frozenset[str]:
    return frozenset(v for v in values if isinstance(v, str))


def check_grads(opt: str, grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    if grads.keys() != params.keys():
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise ValueError(
            f"{opt}.step: grads and params must have the same keys; missing from grads: "
            f"{missing}, not in params: {extra}. Differentiate exactly the params dict."
        )


def _zero_count(params: Params) -> Tensor:
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.float32, device=device)


def _as_dtype(value: _Scalar, dtype: torch.dtype) -> _Scalar:
    return value.to(dtype) if isinstance(value, Tensor) else value


# ------------------------------------------------ hyperparameters as a step resolves them
# Module-level, with the optimizer's settings (``dict(opt.config)``) as argument, so that
# the eager twins of :mod:`funcreg._foreach` resolve and check exactly as the pure steps do.


def sgd_scalars(
    settings: Mapping[str, Any], hyper: Hyper | None
) -> tuple[_Scalar, _Scalar, _Scalar, _Scalar]:
    """``(lr, weight_decay, momentum, dampening)`` of :func:`sgd` with ``settings`` as a
    step resolves them (the last two 0.0 when ``momentum`` is the number 0)."""
    name = "sgd"
    lr_ = _get(name, "lr", settings["lr"], hyper, _NONNEG)
    wd = _get(name, "weight_decay", settings["weight_decay"], hyper, _NONNEG)
    mu: _Scalar = 0.0
    tau: _Scalar = 0.0
    if not is_zero(settings["momentum"]):
        mu = _get(name, "momentum", settings["momentum"], hyper, _NONNEG)
        tau = _get(name, "dampening", settings["dampening"], hyper, _FINITE)
        # torch.optim.SGD ignores dampening when momentum == 0: then b_t = g on every step.
        if isinstance(mu, Tensor):
            tau = tau * (mu != 0).to(mu.dtype)
        elif mu == 0:
            tau = 0.0
    return lr_, wd, mu, tau


def adam_scalars(
    settings: Mapping[str, Any], hyper: Hyper | None
) -> tuple[_Scalar, _Scalar, _Scalar, _Scalar, _Scalar]:
    """``(lr, beta1, beta2, eps, weight_decay)`` of :func:`adam`/:func:`adamw` with
    ``settings`` as a step resolves them."""
    name = settings["name"]
    beta1, beta2 = settings["betas"]
    return (
        _get(name, "lr", settings["lr"], hyper, _NONNEG),
        _get(name, "betas[0]", beta1, hyper, _UNIT),
        _get(name, "betas[1]", beta2, hyper, _UNIT),
        _get(name, "eps", settings["eps"], hyper, _POSITIVE),
        _get(name, "weight_decay", settings["weight_decay"], hyper, _NONNEG),
    )


def bias_corrections(
    count: Tensor, dtype: torch.dtype, lr: _Scalar, beta1: _Scalar, beta2: _Scalar
) -> tuple[_Scalar, _Scalar]:
    """Adam's ``(lr / (1 - β1^t), sqrt(1 - β2^t))`` at step ``t = count``, computed in
    ``dtype``."""
    t = count.to(dtype)
    bc1 = 1 - _as_dtype(beta1, dtype) ** t
    bc2 = 1 - _as_dtype(beta2, dtype) ** t
    return lr / bc1, torch.sqrt(bc2)


def adam_metric(state: AdamState, settings: Mapping[str, Any], hyper: Hyper | None) -> Params:
    """Adam's diagonal metric after a step: ``d = sqrt(v_t) / sqrt(1 - β2^t) + ε`` per
    coordinate (``sqrt(v̂) + ε``, the denominator the step at count ``t = state.step`` used),
    computed in the promoted dtype of the count and each parameter, like the step."""
    _, _, b2, eps_, _ = adam_scalars(settings, hyper)
    out: Params = {}
    roots: dict[torch.dtype, Tensor] = {}
    for key, v in state.exp_avg_sq.items():
        if v.dtype not in roots:
            dtype = torch.promote_types(state.step.dtype, v.dtype)
            roots[v.dtype] = torch.sqrt(1 - _as_dtype(b2, dtype) ** state.step.to(dtype))
        out[key] = torch.sqrt(v) / roots[v.dtype] + eps_
    return out


def prox_steps(
    optimizer: Optimizer, state: Any, hyper: Hyper | None
) -> Tensor | float | dict[str, Tensor]:
    """The steps of the prox that follows ``optimizer.step`` (``state`` is the state the step
    returned): the learning rate ``η`` when the optimizer has no :attr:`Optimizer.metric`
    (SGD: proximal gradient descent), else ``{name: η / d}`` per coordinate, ``d`` the
    metric's diagonal (Adam/AdamW: ``η / (sqrt(v̂) + ε)``).

    With these steps a fixed point of *step then prox* satisfies the optimality (KKT)
    conditions of ``loss + Σ s_k Ω_k`` for separable ``Ω`` (L1: ``|∂_i loss| ≤ s`` where
    ``w_i = 0``, ``∂_i loss = -s·sign(w_i)`` elsewhere), whatever the preconditioner.
    """
    hyper = {} if hyper is None else hyper
    lr = optimizer.learning_rate(hyper)
    if optimizer.metric is None:
        return lr
    return {k: lr / d for k, d in optimizer.metric(state, hyper).items()}


def decoupled(optimizer: Optimizer) -> Optimizer:
    """``optimizer`` whose prox step is the plain learning rate ``η`` (metric 1), decoupled
    from its preconditioner, as AdamW decouples weight decay.

    Not the prox of the documented objective under Adam: a coordinate stays at zero when
    ``|g_i| / (sqrt(v̂_i) + ε) ≤ s``, so a strength means "a threshold on the normalised
    step", about ``s`` times the learning rate per step whatever the gradients' scale. Use it
    to reproduce runs made with that rule, or for MCP/SCAD, whose prox needs every step
    below ``γ`` (resp. ``a - 1``), which Adam's per-coordinate steps need not be.
    """
    return optimizer._replace(metric=None)


# --------------------------------------------------------------------------- SGD


def sgd(
    lr: HyperValue,
    momentum: HyperValue = 0.0,
    dampening: HyperValue = 0.0,
    nesterov: bool = False,
    weight_decay: HyperValue = 0.0,
) -> Optimizer:
    """Stochastic gradient descent, exactly as ``torch.optim.SGD``.

    With ``λ = weight_decay``, ``μ = momentum``, ``τ = dampening``, ``γ = lr`` and step ``t``
    (``t = 1`` on the first step)::

        g   = ∇f(w) + λ w
        b_t = g                          if t = 1
        b_t = μ b_{t-1} + (1 - τ) g      otherwise
        d   = g + μ b_t  (nesterov)   or   b_t
        w  <- w - γ d

    When ``momentum`` is the number 0 there is no buffer and ``d = g`` (``dampening`` ignored).
    When ``momentum`` is a name, models whose momentum is 0 also get ``d = g`` exactly.

    Args:
        lr: learning rate ``γ >= 0``, a number or a name of the hyperparameters dict.
        momentum: ``μ >= 0``.
        dampening: ``τ``.
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (checked
            for the arguments given as numbers; with names, momentum 0 gives plain SGD).
        weight_decay: coupled L2 coefficient ``λ >= 0`` (the gradient of ``L2`` with strength
            ``λ``).

    Returns:
        An :class:`Optimizer` whose state is :class:`SGDState`.
    """
    name = "sgd"
    lr = _hyper_value(name, "lr", lr, _NONNEG)
    momentum = _hyper_value(name, "momentum", momentum, _NONNEG)
    dampening = _hyper_value(name, "dampening", dampening, _FINITE)
    weight_decay = _hyper_value(name, "weight_decay", weight_decay, _NONNEG)
    if not isinstance(nesterov, bool):
        raise TypeError(f"sgd: nesterov must be a bool, got {type(nesterov).__name__}.")
    if nesterov and _is_number(momentum) and float(momentum) <= 0:
        raise ValueError(
            f"sgd: nesterov=True requires momentum > 0, got momentum={momentum!r}; "
            "set momentum or use nesterov=False."
        )
    if nesterov and _is_number(dampening) and float(dampening) != 0:
        raise ValueError(
            f"sgd: nesterov=True requires dampening == 0, got dampening={dampening!r}; "
            "set dampening=0 or use nesterov=False."
        )
    use_momentum = not is_zero(momentum)
    config = (
        ("name", name),
        ("lr", lr),
        ("momentum", momentum),
        ("dampening", dampening),
        ("nesterov", nesterov),
        ("weight_decay", weight_decay),
    )
    settings = dict(config)

    def init(params: Params) -> SGDState:
        buffers = {k: torch.zeros_like(p) for k, p in params.items()} if use_momentum else {}
        return SGDState(step=_zero_count(params), momentum_buffer=buffers)

    def step(
        grads: Params, state: SGDState, params: Params, hyper: Hyper | None = None
    ) -> tuple[Params, SGDState]:
        check_grads(name, grads, params)
        lr_, wd, mu, tau = sgd_scalars(settings, hyper)
        new_params: Params = {}
        new_buffers: Params = {}
        if use_momentum:
            first = state.step == 0
        for key, p in params.items():
            g = grads[key]
            if not is_zero(wd):
                g = g + wd * p
            if use_momentum:
                buf = torch.where(first, g, mu * state.momentum_buffer[key] + (1 - tau) * g)
                new_buffers[key] = buf
                g = g + mu * buf if nesterov else buf
            new_params[key] = _descend(p, g, lr_)
        return new_params, SGDState(step=state.step + 1, momentum_buffer=new_buffers)

    def learning_rate(hyper: Hyper | None = None) -> Tensor | float:
        return _get(name, "lr", lr, hyper, _NONNEG)

    names = _names(lr, momentum, dampening, weight_decay)
    return Optimizer(init, step, names, learning_rate, config, elementwise=True)


# --------------------------------------------------------------------------- Adam / AdamW


def _adam_like(
    name: str,
    lr: HyperValue,
    betas: tuple[HyperValue, HyperValue],
    eps: HyperValue,
    weight_decay: HyperValue,
    decoupled: bool,
) -> Optimizer:
    lr = _hyper_value(name, "lr", lr, _NONNEG)
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise TypeError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}.")
    beta1 = _hyper_value(name, "betas[0]", betas[0], _UNIT)
    beta2 = _hyper_value(name, "betas[1]", betas[1], _UNIT)
    eps = _hyper_value(name, "eps", eps, _POSITIVE)
    weight_decay = _hyper_value(name, "weight_decay", weight_decay, _NONNEG)
    config = (
        ("name", name),
        ("lr", lr),
        ("betas", (beta1, beta2)),
        ("eps", eps),
        ("weight_decay", weight_decay),
    )
    settings = dict(config)

    def init(params: Params) -> AdamState:
        return AdamState(
            step=_zero_count(params),
            exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
            exp_avg_sq={k: torch.zeros_like(p) for k, p in params.items()},
        )

    def step(
        grads: Params, state: AdamState, params: Params, hyper: Hyper | None = None
    ) -> tuple[Params, AdamState]:
        check_grads(name, grads, params)
        lr_, b1, b2, eps_, wd = adam_scalars(settings, hyper)
        count = state.step + 1
        # (-lr / (1 - β1^t), sqrt(1 - β2^t)) per parameter dtype, computed once for all
        corrections: dict[torch.dtype, tuple[_Scalar, _Scalar]] = {}
        new_params: Params = {}
        exp_avg: Params = {}
        exp_avg_sq: Params = {}
        for key, p in params.items():
            g = grads[key]
            if not is_zero(wd):
                if decoupled:
                    p = p * (1 - lr_ * wd)
                else:
                    g = g + wd * p
            # torch.optim's kernels, out of place: a few fused ops per tensor (each op is a
            # kernel launch on a GPU and a dispatch under vmap)
            m = _moving_average(state.exp_avg[key], g, b1)
            v = _decayed_square(state.exp_avg_sq[key], g, b2)
            if p.dtype not in corrections:
                dtype = torch.promote_types(count.dtype, p.dtype)
                step_size, bc2_sqrt = bias_corrections(count, dtype, lr_, b1, b2)
                corrections[p.dtype] = (-step_size, bc2_sqrt)
            neg_step, bc2_sqrt = corrections[p.dtype]
            denom = torch.sqrt(v) / bc2_sqrt + eps_
            new_params[key] = torch.addcdiv(p, m * neg_step, denom)
            exp_avg[key] = m
            exp_avg_sq[key] = v
        return new_params, AdamState(step=count, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)

    def learning_rate(hyper: Hyper | None = None) -> Tensor | float:
        return _get(name, "lr", lr, hyper, _NONNEG)

    def metric(state: AdamState, hyper: Hyper | None = None) -> Params:
        return adam_metric(state, settings, hyper)

    names = _names(lr, beta1, beta2, eps, weight_decay)
    return Optimizer(init, step, names, learning_rate, config, metric=metric, elementwise=True)


def adam(
    lr: HyperValue = 1e-3,
    betas: tuple[HyperValue, HyperValue] = (0.9, 0.999),
    eps: HyperValue = 1e-8,
    weight_decay: HyperValue = 0.0,
) -> Optimizer:
    """Adam with coupled L2 weight decay, exactly as ``torch.optim.Adam``.

    With ``γ = lr``, ``(β1, β2) = betas``, ``ε = eps``, ``λ = weight_decay`` and step
    ``t = 1, 2, ...`` (stored in the state)::

        g   = ∇f(w) + λ w
        m_t = β1 m_{t-1} + (1 - β1) g
        v_t = β2 v_{t-1} + (1 - β2) g²
        w  <- w - γ / (1 - β1^t) · m_t / (sqrt(v_t) / sqrt(1 - β2^t) + ε)

    Args:
        lr: learning rate ``γ >= 0``, a number or a name of the hyperparameters dict.
        betas: ``(β1, β2)``, each in ``[0, 1)``.
        eps: ``ε > 0``.
        weight_decay: coupled L2 coefficient ``λ >= 0`` (added to the gradient, hence rescaled
            by Adam; use :func:`adamw` for decoupled decay).

    Returns:
        An :class:`Optimizer` whose state is :class:`AdamState`, with the metric
        ``d = sqrt(v̂) + ε`` (:func:`adam_metric`): proximal training thresholds at
        ``lr·s/d`` per coordinate (:func:`prox_steps`; :func:`decoupled` for ``lr·s``).
    """
    return _adam_like("adam", lr, betas, eps, weight_decay, decoupled=False)


def adamw(
    lr: HyperValue = 1e-3,
    betas: tuple[HyperValue, HyperValue] = (0.9, 0.999),
    eps: HyperValue = 1e-8,
    weight_decay: HyperValue = 1e-2,
) -> Optimizer:
    """AdamW (decoupled, lr-scaled weight decay), exactly as ``torch.optim.AdamW``.

    With the notation of :func:`adam`, ``g = ∇f(w)`` (no decay in the gradient) and::

        w   <- w (1 - γ λ)
        m_t = β1 m_{t-1} + (1 - β1) g
        v_t = β2 v_{t-1} + (1 - β2) g²
        w   <- w - γ / (1 - β1^t) · m_t / (sqrt(v_t) / sqrt(1 - β2^t) + ε)

    Args:
        lr, betas, eps: as in :func:`adam`.
        weight_decay: decoupled decay ``λ >= 0``; each step shrinks ``w`` by ``γ λ w``.

    Returns:
        An :class:`Optimizer` whose state is :class:`AdamState`, with Adam's metric (see
        :func:`adam`): the penalties of a spec are *not* decoupled like ``weight_decay``.
    """
    return _adam_like("adamw", lr, betas, eps, weight_decay, decoupled=True)
