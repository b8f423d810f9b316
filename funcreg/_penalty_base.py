"""The base of every penalty: the :class:`Penalty` protocol (described in
:mod:`funcreg.penalties`), :func:`register_penalty`, and the small kernels the penalty kinds
share (``weight=`` factors, step scaling, ``dim=`` axes, zero-threshold ratios).

A penalty kind lives in a module of its own (``_penalty_separable``, ``_penalty_group``,
``_penalty_matrix``, ``_penalty_nonconvex``, ``_penalty_constraint``) that imports this
one; :mod:`funcreg.penalties` re-exports them all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

from . import _checks
from . import prox as P
from .selectors import Selector, SelectorLike, as_selector

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**kwargs: Any) -> Callable[[Any], Any]:
        return lambda f: f


Ref = Tensor | Mapping[str, Tensor] | float | None
Dim = int | tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Penalty:
    """Base class of all penalties (the protocol: :mod:`funcreg.penalties`)."""

    select: SelectorLike | None = None
    _: KW_ONLY
    toward: Ref = None
    weight: Ref = None

    smooth: ClassVar[bool] = True
    has_prox: ClassVar[bool] = False
    is_constraint: ClassVar[bool] = False
    min_ndim: ClassVar[int] = 0
    min_ndim_reason: ClassVar[str] = ""
    elementwise: ClassVar[bool] = False
    """Whether ``prox_step(w, lr, s)`` acts coordinate by coordinate with ``lr``/``s``
    broadcastable against ``w`` (so solvers may apply it to a stacked ``(K, ...)`` tensor with
    ``(K, 1, ...)`` steps directly, without ``vmap``): ``L1``, ``L2``, ``ElasticNet``,
    ``NonNegative``, ``Box``. Not inherited: a subclass is ``False`` unless its own body sets
    it (it may override ``_prox`` with a non-separable map)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "elementwise" not in cls.__dict__:
            cls.elementwise = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "select", as_selector(self.select))
        name = type(self).__name__
        if isinstance(self.weight, Mapping):
            for k, v in self.weight.items():
                _checks.check_factor_values(name, torch.as_tensor(v), f" for {k!r}")
        elif self.weight is not None:
            _checks.check_factor_values(name, torch.as_tensor(self.weight))

    @property
    def selector(self) -> Selector:
        assert isinstance(self.select, Selector)
        return self.select

    # -- kernels: override these, on the shifted tensor d = w - w_ref and factor c ------
    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        name = type(self).__name__
        if self.smooth:
            fix = (
                "it is smooth, so training applies it through its gradient: leave it to "
                "fr.penalty / the gradient part of the spec (spec.smooth()), not to prox"
            )
        else:
            fix = (
                "train with prox=False (it then goes through its subgradient), or give the "
                "subclass a _prox and has_prox = True"
            )
        raise NotImplementedError(f"{name} has no closed-form proximal operator; {fix}")

    def _factor_shape(self, w: Tensor) -> tuple[int, ...]:
        """The shape ``weight=`` factors must broadcast to (elementwise by default)."""
        return tuple(w.shape)

    # -- resolution of toward= and weight= for one parameter -----------------------------
    def reference(self, name: str | None) -> Tensor | None:
        return _lookup(self.toward, name, "toward", type(self).__name__, missing_ok=False)

    def factor(self, name: str | None) -> Tensor | None:
        return _lookup(self.weight, name, "weight", type(self).__name__, missing_ok=True)

    def _shift(self, w: Tensor, name: str | None) -> Tensor:
        ref = self.reference(name)
        return w if ref is None else w - ref.to(w)

    def _c(self, w: Tensor, name: str | None) -> Tensor | None:
        c = self.factor(name)
        return None if c is None else c.to(w)

    # -- public protocol ------------------------------------------------------------------
    def value(self, w: Tensor, name: str | None = None) -> Tensor:
        """``Ω(w)`` at unit strength (``name`` resolves dict-valued ``toward``/``weight``)."""
        return self._value(self._shift(w, name), self._c(w, name))

    def penalty(self, w: Tensor, strength: Tensor | float, name: str | None = None) -> Tensor:
        """The term in the objective: ``strength · Ω(w)``."""
        return strength * self.value(w, name)

    def prox(self, w: Tensor, t: Tensor | float, name: str | None = None) -> Tensor:
        """``argmin_y ½‖w − y‖² + t·Ω(y)`` (with ``toward=``: ``w_ref + prox(w − w_ref)``)."""
        ref = self.reference(name)
        c = self._c(w, name)
        if ref is None:
            return self._prox(w, t, c)
        ref = ref.to(w)
        return ref + self._prox(w - ref, t, c)

    def prox_step(
        self, w: Tensor, lr: Tensor | float, strength: Tensor | float, name: str | None = None
    ) -> Tensor:
        """The proximal step of training: ``prox`` of ``lr · strength · Ω``."""
        return self.prox(w, lr * strength, name)

    def closed_form(self) -> ClosedForm | None:
        """A function ``(ws, s, gs) -> (s · Σ_p Ω(p), [g + s · ∂Ω(p) for p, g in zip(ws,
        gs)])``: value, and (sub)gradient added to given gradients, over several parameters
        at once with ``torch._foreach_*`` kernels, for eager single-model steps that would
        otherwise differentiate the penalty with autograd; ``None`` when this penalty has
        none (the default; also for subclasses and with ``toward=``/``weight=``)."""
        return None

    def check(self, term: str, name: str, w: Tensor) -> None:
        """Static checks of this penalty against one selected parameter (eager)."""
        if w.dim() < self.min_ndim:
            _checks.check_min_ndim(
                term, type(self).__name__, name, w, self.min_ndim, self.min_ndim_reason
            )
        ref = self.reference(name)
        if ref is not None:
            _checks.check_toward(term, name, w, ref)
        c = self.factor(name)
        if c is not None:
            _checks.check_weight(term, name, w, c, self._factor_shape(w))

    def check_step(self, lr: float) -> None:
        """Eager check that a prox step with learning rate ``lr`` is allowed (MCP/SCAD)."""

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """The smallest strength ``s`` at which zero (or the ``toward=`` reference) is a
        stationary point for parameter ``name``, given ``grad``, the data loss's gradient
        there: the smallest ``s`` with ``−grad ∈ s·∂Ω(0)`` (the top of a regularization path,
        :func:`funcreg.strength_max`). Coordinates or groups whose ``weight=`` factor is 0
        are unpenalised and set no bound; an empty ``grad`` gives 0.

        Defined by the penalties that make exact zeros (:class:`L1`, :class:`ElasticNet`
        with ``l1_ratio > 0``, :class:`GroupLasso`, :class:`SparseGroupLasso`); here it
        raises ``ValueError``."""
        raise ValueError(
            f"{type(self).__name__} induces no exact sparsity; strength_max is defined for "
            "L1, ElasticNet (l1_ratio > 0), GroupLasso and SparseGroupLasso"
        )

    def nonzero_groups(self, w: Tensor) -> Tensor | None:
        """For one (unstacked) parameter, the number of groups with a nonzero entry as a
        0-dim int64 tensor (works under ``vmap``); ``None`` for penalties without groups
        (here)."""
        return None

    def check_names(self, term: str, selected: list[str]) -> None:
        if isinstance(self.toward, Mapping):
            _checks.check_toward_names(term, list(self.toward), selected)

    def __repr__(self) -> str:
        parts = [repr(self.select)]
        for f in fields(self):
            if f.name in ("select", "_"):
                continue
            v = getattr(self, f.name)
            if f.name in ("toward", "weight"):
                if v is not None:
                    parts.append(f"{f.name}=<{type(v).__name__}>")
            else:
                parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _lookup(
    ref: Ref, name: str | None, option: str, owner: str, *, missing_ok: bool
) -> Tensor | None:
    """The entry of ``option=`` (``toward`` or ``weight``) for parameter ``name``."""
    if ref is None:
        return None
    if isinstance(ref, Mapping):
        if name is None:
            raise ValueError(
                f"{owner} has a dict-valued {option}=: pass name= (the parameter's name) "
                "so its entry can be found"
            )
        if name not in ref:
            if missing_ok:
                return None
            raise ValueError(
                f"{owner}: {option}= has no entry for parameter {name!r} (it has "
                f"{sorted(ref)}): give every selected parameter one, or narrow the selector"
            )
        return torch.as_tensor(ref[name])
    return torch.as_tensor(ref)


ClosedForm = Callable[[list[Tensor], "Tensor | float", list[Tensor]], tuple[Tensor, list[Tensor]]]


_P = TypeVar("_P", bound=type)


@dataclass_transform(frozen_default=True)
def register_penalty(cls: _P) -> _P:
    """Make ``cls`` a frozen dataclass whose ``__init__`` gives helpful keyword errors."""
    cls = dataclass(frozen=True, eq=False, repr=False)(cls)  # type: ignore[assignment]
    init: Callable[..., None] = cls.__init__  # type: ignore[misc]
    allowed = [f.name for f in fields(cls) if f.name != "_"]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "strength" in kwargs or "alpha" in kwargs or "lam" in kwargs:
            raise TypeError(
                f"{cls.__name__} takes no strength: a penalty says what, the strength is data "
                "passed at call time, e.g. penalized(loss, Spec(l1=L1()))(params, {'l1': 1e-3})"
            )
        _checks.check_keyword(cls.__name__, kwargs, allowed)
        if args and _checks.is_number(args[0]):  # MCP(3.0) meant MCP(gamma=3.0)
            extra = [f for f in allowed if f not in ("select", "toward", "weight")]
            fix = (
                f"give the rest by name, e.g. {cls.__name__}({extra[0]}={args[0]!r})"
                if extra
                else f"{cls.__name__} takes no strength: the strength is data, passed at call "
                f"time, e.g. penalized(loss, Spec(t={cls.__name__}()))"
                f"(params, {{'t': {args[0]!r}}})"
            )
            raise TypeError(
                f"{cls.__name__}({args[0]!r}): the first argument says which parameters (a "
                f"selector or name pattern; default all); {fix}"
            )
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    return cls


# -- kernels shared by the penalty kinds -----------------------------------------------


def scaled(x: Tensor, c: Tensor | None) -> Tensor:
    """``x · c``, the ``weight=`` factors applied (``x`` without factors)."""
    return x if c is None else x * c


def max_ratio(num: Tensor, den: Tensor | float) -> float:
    """``max(num / den)`` over the entries with ``den > 0`` (0 elsewhere: an unpenalised
    coordinate sets no bound); 0 for an empty ``num``."""
    if num.numel() == 0:
        return 0.0
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return float(P.safe_ratio(num, den).max())


def scaled_step(t: Tensor | float, c: Tensor | None) -> Tensor | float:
    """``t · c``: a prox step per coordinate (or group) with ``weight=`` factors ``c``."""
    return t if c is None else t * c


def as_dims(
    dim: Dim, ndim: int, owner: str = "a group penalty", shape: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """``dim`` as sorted non-negative axes of a tensor with ``ndim`` dims; an axis out of
    ``[-ndim, ndim)`` or named twice is an error (never wrapped around)."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    of = f"shape {shape}" if shape is not None else f"{ndim} dims"
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(
                f"{owner}: dim={dim!r} is out of range for a parameter with ndim {ndim} "
                f"({of}); dim must be in [{-ndim}, {ndim - 1}]: pick the axes the group norm "
                "runs over (for an nn.Linear weight (out, in): dim=0 gives one group per "
                "input feature, dim=1 one per output unit), or narrow the selector"
            )
    out = tuple(sorted(d % ndim for d in dims))
    if len(set(out)) != len(out):
        raise ValueError(f"{owner}: dim={dim!r} names an axis twice ({of}); list each once")
    return out
