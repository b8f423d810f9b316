"""Activity regularization: Keras's ``activity_regularizer``, penalties on module outputs.

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = fr.activity.declare(nn.Linear(8, 16), fr.activity.L1L2(l1=1e-3))
            ...

    with fr.activity.collect(net) as acts:        # eager, or inside a functional loss
        out = net(x)                              # or functional_call(net, params, (x,))
    loss = loss_fn(out, y) + acts.penalty()

A declaration is plain data in the module's ``__dict__`` (survives ``copy.deepcopy`` and
``torch.save``, outside ``state_dict``); :func:`collect` installs forward hooks only for the
duration of its ``with`` block and removes them on exit, so the module's forward is unchanged
outside it. The hooks only compute on the outputs the forward produces, so the same block
works inside a loss given to ``torch.func.grad``/``vmap`` (under ``vmap`` each model's
activations and penalty are its own).

Formulas (Keras): ``l1·Σ|a| + l2·Σa²`` over the whole output (batch included);
``per_batch=True`` divides by the batch size ``a.shape[0]`` (``tf.keras`` 2's
``activity_loss / batch_size``; Keras 3 does not divide).

Activity strengths as data (a sweep axis)
-----------------------------------------
An :class:`L1L2` declaration holds fixed coefficients. To give an activity term a strength
that is data, like a spec term's, name it with :class:`Activity` and build the objective with
:func:`penalized`, hook-free: the loss returns its activations as an auxiliary output,

    def loss(params, x, y):                       # -> (data loss, {module path: output})
        h = torch.func.functional_call(net.hidden, sub(params, "hidden"), (x,))
        return mse(head(params, h), y), {"hidden": h}

    terms = {"act": fr.activity.Activity(fr.L1(), "hidden")}
    objective = fr.activity.penalized(loss, spec, terms)  # (params, strengths, *batch)
    grads = vmap(grad(objective), in_dims=(0, 0, None, None))(stacked, {"act": s_k, ...}, x, y)

so ``objective(params, strengths, *batch) = loss + Σ_k s_k Ω_k(params) + Σ_t s_t Σ_a Ω_t(a)``
(``Ω_t`` a funcreg penalty applied to each recorded output ``a``: ``fr.L1()`` gives
``Σ|a|``, ``fr.L2()`` gives ``½Σa²``, so Keras's ``l2·Σa²`` is strength ``2·l2``, as for
kernels; :func:`terms_of` converts ``L1L2`` declarations). K strengths vmap in one run. A
loss may also return ``acts.outputs`` of a :func:`collect` block run inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor, nn

from . import _checks
from .declare import check_registered
from .penalties import L1, L2, Penalty
from .spec import Spec, as_spec, strength_of
from .spec import penalized as _penalized

__all__ = ["Activity", "Collected", "L1L2", "collect", "declare", "penalized", "terms_of"]

_ATTR = "_funcreg_activity"
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class L1L2:
    """Keras ``L1L2`` as an activity regularizer: ``l1·Σ|a| + l2·Σa²`` (``/ a.shape[0]``
    with ``per_batch=True``)."""

    l1: float = 0.0
    l2: float = 0.0
    per_batch: bool = False

    def __post_init__(self) -> None:
        _checks.check_strength_value("l1", self.l1)
        _checks.check_strength_value("l2", self.l2)

    def __call__(self, a: Tensor) -> Tensor:
        value = a.new_zeros(())
        if self.l1:
            value = value + self.l1 * a.abs().sum()
        if self.l2:
            value = value + self.l2 * a.square().sum()
        return value / a.shape[0] if self.per_batch and a.dim() > 0 else value


def declare(module: M, regularizer: L1L2, /) -> M:
    """Declare an activity regularizer on ``module``'s output (in place); returns it."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"fr.activity.declare: the first argument must be an nn.Module, "
            f"got {type(module).__name__}"
        )
    if not isinstance(regularizer, L1L2):
        raise TypeError(
            "fr.activity.declare: the regularizer must be fr.activity.L1L2(l1=..., l2=...), "
            f"got {type(regularizer).__name__}"
        )
    module.__dict__[_ATTR] = regularizer
    return module


class Collected:
    """The activity penalties of one ``with collect(...)`` block, per module path."""

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor]] = {}
        self.outputs: dict[str, list[Tensor]] = {}

    def penalty(self) -> Tensor | float:
        """Sum over the collected outputs of their regularizer's value (0.0 when none)."""
        total: Tensor | float = 0.0
        for values in self.values.values():
            for v in values:
                total = total + v
        return total

    def parts(self) -> dict[str, Tensor | float]:
        """``{module path: its summed penalty}``, for logging."""
        out: dict[str, Tensor | float] = {}
        for path, values in self.values.items():
            part: Tensor | float = 0.0
            for v in values:
                part = part + v
            out[path] = part
        return out


@contextmanager
def collect(model: nn.Module) -> Iterator[Collected]:
    """Collect the declared activity penalties of ``model``'s modules while the block runs
    (forward hooks, removed on exit). A module called several times adds one value per
    call; a shared module is hooked once. ``Collected.outputs`` keeps the outputs
    themselves, ``{path: [output, ...]}``, for :class:`Activity` terms."""
    check_registered("fr.activity.collect", model, _ATTR)
    collected = Collected()
    handles = []
    for path, module in model.named_modules():
        reg = module.__dict__.get(_ATTR)
        if reg is None:
            continue

        def hook(mod: nn.Module, args: Any, output: Any, path: str = path, reg: L1L2 = reg) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"fr.activity: module {path!r} returned {type(output).__name__}; an "
                    "activity regularizer needs a module whose output is one tensor"
                )
            collected.values.setdefault(path, []).append(reg(output))
            collected.outputs.setdefault(path, []).append(output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield collected
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Activity:
    """An activity term whose strength is data: ``s · Σ_a Ω(a)`` over the recorded outputs
    ``a`` of the modules ``modules`` (paths as ``model.named_modules()`` names them; one
    path or several), ``Ω`` a funcreg penalty's value (``fr.L1()``: ``Σ|a|``; ``fr.L2()``:
    ``½Σa²``; its ``toward=``/``weight=`` may be tensors, not name dicts). ``per_batch=True``
    divides each output's value by its batch size ``a.shape[0]`` (``tf.keras`` 2)."""

    penalty: Penalty
    modules: str | tuple[str, ...]
    per_batch: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.penalty, Penalty) or self.penalty.is_constraint:
            raise TypeError(
                "fr.activity.Activity: the first argument must be a penalty such as fr.L1() "
                f"or fr.L2(), got {self.penalty!r}"
            )
        for field in ("toward", "weight"):
            if isinstance(getattr(self.penalty, field), Mapping):
                raise ValueError(
                    f"fr.activity.Activity: {field}= as a {{name: tensor}} dict names parameters;"
                    " an activation has no parameter name: give a tensor (or nothing)"
                )
        paths = (self.modules,) if isinstance(self.modules, str) else tuple(self.modules)
        if not paths or not all(isinstance(p, str) for p in paths):
            raise TypeError(
                "fr.activity.Activity: modules must be a module path such as 'hidden' or a "
                f"tuple of them, got {self.modules!r}"
            )
        object.__setattr__(self, "modules", paths)

    def __call__(self, outputs: Mapping[str, Any], strength: Any, term: str = "") -> Tensor:
        """``s · Σ_a Ω(a)`` over ``outputs[path]`` (a tensor or a list of tensors) of every
        path of the term."""
        total: Tensor | None = None
        for path in self.modules:
            if path not in outputs:
                raise ValueError(
                    f"fr.activity: term {term!r} reads the output of module {path!r}, which the "
                    f"loss did not return (it returned {sorted(outputs)}); return it in the "
                    "loss's {module path: activation} dict, or fix the term's modules"
                )
            found = outputs[path]
            for a in (found,) if isinstance(found, Tensor) else found:
                value = self.penalty.penalty(a, strength)
                if self.per_batch and a.dim() > 0:
                    value = value / a.shape[0]
                total = value if total is None else total + value
        assert total is not None
        return total


def penalized(
    loss_fn: Callable[..., Any],
    spec: Spec | Mapping[str, Penalty],
    terms: Mapping[str, Activity],
    return_parts: bool = False,
) -> Callable[..., Any]:
    """:func:`funcreg.penalized` with activity terms whose strengths are data.

    ``loss_fn(params, *batch)`` returns ``(data loss, {module path: activation})``; the
    result ``objective(params, strengths, *batch)`` is
    ``loss + Σ_k s_k Ω_k(params) + Σ_t s_t Σ_a Ω_t(a)``, with one strength per spec term and
    per activity term in ``strengths`` (``return_parts=True``: ``(total, {"loss": ...,
    term: value, ...})``). Pure: ``grad``/``vmap`` over K strengths apply unchanged, and no
    forward hook is needed when the loss returns its activations itself.

    Raises:
        ValueError: an activity term's name is a spec term's or reserved.
        TypeError: a term is not an :class:`Activity`, or ``loss_fn`` does not return a pair.
    """
    spec = as_spec(spec)
    Spec({t: L1() for t in terms})  # activity term names: identifiers, not reserved
    for term, act in terms.items():
        if not isinstance(act, Activity):
            raise TypeError(
                f"fr.activity.penalized: term {term!r} must be fr.activity.Activity(penalty, "
                f"module path), got {type(act).__name__}"
            )
        if term in spec:
            raise ValueError(
                f"fr.activity.penalized: {term!r} names both a spec term and an activity term; "
                "one name is one strength: rename one of them"
            )
    name = getattr(loss_fn, "__name__", "loss")

    def objective(params: Mapping[str, Tensor], strengths: Mapping[str, Any], *args: Any) -> Any:
        out = loss_fn(params, *args)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise TypeError(
                f"fr.activity.penalized: {name} must return (data loss, {{module path: "
                f"activation}}), got {type(out).__name__}"
            )
        data, outputs = out
        total, parts = _penalized(lambda p: data, spec, return_parts=True)(params, strengths)
        for term, act in terms.items():
            parts[term] = act(outputs, strength_of(strengths, term), term)
            total = total + parts[term]
        return (total, parts) if return_parts else total

    objective.__name__ = f"penalized_{name}"
    return objective


def terms_of(model: nn.Module) -> tuple[dict[str, Activity], dict[str, float]]:
    """The :class:`L1L2` declarations of ``model`` as activity terms and their strengths:
    ``{"<path>_l1": Activity(L1(), path), "<path>_l2": Activity(L2(), path)}`` (dots of the
    path as ``_``) with strengths ``l1`` and ``2·l2`` (Keras's ``l2·Σa²`` is ``L2``'s
    ``½Σa²`` at strength ``2·l2``), zero coefficients left out; ready for :func:`penalized`
    and a sweep over those strengths."""
    check_registered("fr.activity.terms_of", model, _ATTR)
    terms: dict[str, Activity] = {}
    strengths: dict[str, float] = {}
    for path, module in model.named_modules():
        reg = module.__dict__.get(_ATTR)
        if reg is None:
            continue
        stem = path.replace(".", "_") or "model"
        for kind, pen, value in (("l1", L1(), reg.l1), ("l2", L2(), 2.0 * reg.l2)):
            if value:
                terms[f"{stem}_{kind}"] = Activity(pen, path, per_batch=reg.per_batch)
                strengths[f"{stem}_{kind}"] = value
    return terms, strengths
