"""Penalties: small frozen dataclasses that say *what* a regularizer is, never how strong.

Every penalty ``Ω`` has

* ``select`` — its first positional argument: which parameters it touches (a selector,
  a glob string or a list of them; default :func:`~funcreg.weights`, i.e. ``ndim >= 2``);
* ``value(w)`` — ``Ω(w)`` at unit strength;
* ``penalty(w, s)`` — the term as it enters the objective, ``s·Ω(w)`` (MCP and SCAD,
  whose strength is the λ inside the formula, override it);
* ``prox(w, t)`` — ``argmin_y ½‖w − y‖² + t·Ω(y)`` where a closed form exists
  (``has_prox``), and ``prox_step(w, lr, s)`` — the prox of ``lr·s·Ω`` used by training;
* ``smooth`` — whether it goes through the gradient (``spec.smooth()``) or through its prox
  (``spec.nonsmooth()``).

Two options on every penalty:

* ``toward=`` — a tensor or a ``{name: tensor}`` dict of reference weights: the penalty
  acts on ``w − w_ref`` (L2-SP: stay close to pretrained weights). Its prox is
  ``w_ref + prox(w − w_ref)``.
* ``weight=`` — per-coordinate (separable penalties) or per-group (group penalties)
  non-negative factors ``c``, a tensor or a ``{name: tensor}`` dict; names missing from a
  dict get factor 1 (glmnet's ``penalty.factor``, adaptive lasso).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

from . import _checks
from . import _tree as _flat
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
    """Base class of all penalties (see the module docstring for the protocol)."""

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


def _l1_closed_form(
    ws: list[Tensor], s: Tensor | float, gs: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    value = s * _flat.sum_abs(ws)
    return value, _add_scaled(gs, list(torch._foreach_sign(ws)), s)


def _l2_closed_form(
    ws: list[Tensor], s: Tensor | float, gs: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    value = s * (0.5 * _flat.sum_squares(ws))
    return value, _add_scaled(gs, ws, s)


def _add_scaled(gs: list[Tensor], xs: list[Tensor], s: Tensor | float) -> list[Tensor]:
    """``[g + s·x]`` (new tensors): one ``_foreach_add`` when ``s`` is a number or a 0-dim
    CPU tensor."""
    if isinstance(s, Tensor):
        if s.ndim or s.device.type != "cpu":
            return [g + s * x for g, x in zip(gs, xs, strict=True)]
        s = float(s)
    return list(torch._foreach_add(gs, xs, alpha=s))


def _scaled(x: Tensor, c: Tensor | None) -> Tensor:
    return x if c is None else x * c


def _max_ratio(num: Tensor, den: Tensor | float) -> float:
    """``max(num / den)`` over the entries with ``den > 0`` (0 elsewhere: an unpenalised
    coordinate sets no bound); 0 for an empty ``num``."""
    if num.numel() == 0:
        return 0.0
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return float(P.safe_ratio(num, den).max())


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


# ---------------------------------------------------------------------------------------
# Separable penalties
# ---------------------------------------------------------------------------------------


@register_penalty
class L1(Penalty):
    """Lasso: ``Ω(w) = Σ_i c_i |w_i|``; prox: soft-thresholding ``sign(w)·max(|w| − t c, 0)``.

    Equivalents: Keras ``L1(l)`` = strength ``l``; the hand-written ``l * p.abs().sum()``
    = strength ``l``; scikit-learn ``Lasso(alpha)`` with data term ``1/(2n)‖y − Xw‖²``
    = strength ``alpha``.
    """

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return _scaled(d.abs(), c).sum()

    def closed_form(self) -> ClosedForm | None:
        """``s Σ‖p‖₁`` and the subgradient ``s·sign(p)`` (0 at 0, as autograd's)."""
        plain = type(self) is L1 and self.toward is None and self.weight is None
        return _l1_closed_form if plain else None

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.soft_threshold(d, _scaled_step(t, c))

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """``max_i |g_i| / c_i`` (over ``c_i > 0``)."""
        return _l1_threshold(grad, self._c(grad, name), 1.0)


def _l1_threshold(grad: Tensor, c: Tensor | None, r: float) -> float:
    """``max_i |g_i| / (r c_i)`` over ``c_i > 0``: zero is stationary for ``s r Σ c|w|``
    (plus any term smooth at 0) iff ``|g_i| ≤ s r c_i`` for every ``i``."""
    return _max_ratio(grad.detach().abs(), r if c is None else r * c)


@register_penalty
class L2(Penalty):
    """Ridge / weight decay: ``Ω(w) = ½ Σ_i c_i w_i²``, gradient ``c·w``; prox ``w/(1 + t c)``.

    Strength ``λ`` is exactly ``torch.optim.SGD(weight_decay=λ)``. Keras ``L2(l)`` and the
    hand-written ``l * p.pow(2).sum()`` are strength ``2l`` (see :func:`fr.from_keras`);
    scikit-learn ``Ridge(alpha)`` (``‖y − Xw‖² + alpha‖w‖²``) is strength ``alpha`` with the
    data term ``½‖y − Xw‖²`` (the same objective halved).
    """

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return 0.5 * _scaled(d.square(), c).sum()

    def closed_form(self) -> ClosedForm | None:
        """``s · ½ Σ‖p‖²`` and the gradient ``s·p``."""
        plain = type(self) is L2 and self.toward is None and self.weight is None
        return _l2_closed_form if plain else None

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.ridge_shrink(d, _scaled_step(t, c))

    has_prox: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True


@register_penalty
class ElasticNet(Penalty):
    """``Ω(w) = r Σ c|w| + (1 − r)/2 Σ c w²`` with ``r = l1_ratio``;
    prox ``soft(w, t r c) / (1 + t (1 − r) c)``.

    With data term ``1/(2n)‖y − Xw‖²`` and strength ``α`` its minimiser is
    ``sklearn.linear_model.ElasticNet(alpha=α, l1_ratio=r)``.
    """

    l1_ratio: float = 0.5

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ValueError(f"ElasticNet: l1_ratio must be in [0, 1], got {self.l1_ratio}")

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """``max_i |g_i| / (r c_i)`` with ``r = l1_ratio`` (the ridge part is smooth at 0);
        ``l1_ratio = 0`` is ridge, which makes no zeros: ``ValueError``."""
        if self.l1_ratio == 0:
            raise ValueError(
                "ElasticNet with l1_ratio=0 is ridge: no sparsity, so no strength makes zero "
                "stationary; use l1_ratio > 0, or choose ridge strengths with a grid"
            )
        return _l1_threshold(grad, self._c(grad, name), self.l1_ratio)

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        r = self.l1_ratio
        return _scaled(r * d.abs() + 0.5 * (1 - r) * d.square(), c).sum()

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.elastic_net_prox(d, _scaled_step(t, c), self.l1_ratio)


def _scaled_step(t: Tensor | float, c: Tensor | None) -> Tensor | float:
    return t if c is None else t * c


# ---------------------------------------------------------------------------------------
# Group penalties
# ---------------------------------------------------------------------------------------


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


def _group_size(w: Tensor, dims: tuple[int, ...]) -> int:
    size = 1
    for d in dims:
        size *= int(w.shape[d])
    return size


@register_penalty
class GroupLasso(Penalty):
    """``Ω(w) = Σ_g c_g √|g| ‖w_g‖₂``; the norm is taken over ``dim``, so groups are indexed
    by the remaining axes. For an ``nn.Linear`` weight ``(out, in)``: ``dim=0`` (default)
    gives one group per *input feature* (feature selection, LassoNet), ``dim=1`` one group
    per output unit. ``|g|`` is the group size. Prox: block soft-thresholding
    ``w_g · max(1 − t c_g √|g| / ‖w_g‖, 0)``. ``weight=`` is per group (it broadcasts
    against the norms taken with ``keepdim=True``).
    """

    dim: Dim = 0

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    min_ndim: ClassVar[int] = 2
    min_ndim_reason: ClassVar[str] = "a group is a slice along the axes not in dim"

    def _dims(self, w: Tensor) -> tuple[int, ...]:
        """The axes of ``w`` the group norm runs over (checked against ``w``'s shape)."""
        return as_dims(self.dim, w.dim(), type(self).__name__, tuple(w.shape))

    def check(self, term: str, name: str, w: Tensor) -> None:
        super().check(term, name, w)
        try:
            self._dims(w)
        except ValueError as e:
            raise ValueError(f"term {term!r}, parameter {name!r}: {e}") from None

    def _factor_shape(self, w: Tensor) -> tuple[int, ...]:
        dims = self._dims(w)
        return tuple(1 if i in dims else s for i, s in enumerate(w.shape))

    def _group_scale(self, d: Tensor, c: Tensor | None) -> Tensor | float:
        root = math.sqrt(_group_size(d, self._dims(d)))
        return root if c is None else root * c

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        norms = torch.linalg.vector_norm(d, dim=self._dims(d), keepdim=True)
        return (self._group_scale(d, c) * norms).sum()

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.group_shrink(d, t * self._group_scale(d, c), self._dims(d))

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """``max_g ‖g_g‖₂ / (√|g| c_g)`` (over ``c_g > 0``)."""
        g = grad.detach()
        norms = torch.linalg.vector_norm(g, dim=self._dims(g), keepdim=True)
        return _max_ratio(norms, self._group_scale(g, self._c(g, name)))

    def nonzero_groups(self, w: Tensor) -> Tensor | None:
        """The number of groups (slices along the axes not in ``dim``) with a nonzero entry
        (exact: no norm, so entries whose squares underflow still count)."""
        return ((w != 0).sum(dim=self._dims(w)) > 0).sum()


@register_penalty
class SparseGroupLasso(GroupLasso):
    """``Ω(w) = r Σ_i c|w_i| + (1 − r) Σ_g c_g √|g| ‖w_g‖₂`` (Simon et al. 2013), groups as
    in :class:`GroupLasso`. Prox: soft-threshold, then block-shrink (exact for this sum)."""

    l1_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ValueError(f"SparseGroupLasso: l1_ratio must be in [0, 1], got {self.l1_ratio}")

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        r = self.l1_ratio
        return r * _scaled(d.abs(), c).sum() + (1 - r) * super()._value(d, c)

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        r = self.l1_ratio
        return super()._prox(P.soft_threshold(d, _scaled_step(t * r, c)), t * (1 - r), c)

    def zero_threshold(self, grad: Tensor, name: str) -> float:
        """The smallest ``λ`` with ``‖soft(g_g, λ r c_g)‖₂ ≤ λ (1 − r) √|g| c_g`` for every
        group ``g`` with ``c_g > 0`` (``r = l1_ratio``): per group the left side decreases and
        the right increases in ``λ``, so it is found by bisection (200 halvings of
        ``[0, max|g_g|/(r c_g) + ‖g_g‖/((1 − r)√|g| c_g)]``, all groups at once; norms in
        ``grad``'s dtype, ``λ`` in float64). ``r = 1``: ``max|g_g|/c_g`` (lasso); ``r = 0``:
        the group lasso bound."""
        g = grad.detach()
        dims = self._dims(g)
        if g.numel() == 0:
            return 0.0
        size = _group_size(g, dims)
        groups = g.movedim(dims, tuple(range(len(dims)))).reshape(size, -1).abs()
        c = self._c(g, name)
        cg = torch.ones((), dtype=g.dtype) if c is None else c
        cflat = torch.broadcast_to(cg, self._factor_shape(g)).reshape(-1).double()
        penalised = cflat > 0
        c1 = torch.where(penalised, cflat, torch.ones_like(cflat))
        r, root = self.l1_ratio, math.sqrt(size)
        gmax = groups.amax(0).double()
        gnorm = torch.linalg.vector_norm(groups, dim=0).double()
        if r >= 1.0:
            bound = gmax / c1
        elif r <= 0.0:
            bound = gnorm / (root * c1)
        else:
            lo = torch.zeros_like(c1)
            hi = gmax / (r * c1) + gnorm / ((1 - r) * root * c1) + 1e-300
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                shrunk = torch.clamp(groups - (mid * r * c1).to(g.dtype), min=0)
                ok = torch.linalg.vector_norm(shrunk, dim=0).double() <= mid * (1 - r) * root * c1
                hi = torch.where(ok, mid, hi)
                lo = torch.where(ok, lo, mid)
            bound = hi
        return float(torch.where(penalised, bound, torch.zeros_like(bound)).max())


# ---------------------------------------------------------------------------------------
# Matrix penalties (tensors with > 2 dims are seen as w.reshape(w.shape[0], -1))
# ---------------------------------------------------------------------------------------


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
        return _scaled(torch.linalg.matrix_norm(_matrix(d), ord="nuc").to(d.dtype), c)

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return P.svd_threshold(d, _scaled_step(t, c))


@register_penalty
class SpectralNorm(_MatrixPenalty):
    """``Ω(W) = c σ_max(W)²`` (squared spectral norm; smooth wherever the top singular value
    is simple). Goes through the gradient."""

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        if d.numel() == 0:  # torch's norm of an empty matrix is a constant: keep the graph
            return _scaled(d.sum(), c)
        return _scaled(torch.linalg.matrix_norm(_matrix(d), ord=2).square().to(d.dtype), c)


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
        return _scaled((0.5 * off.abs().sum() / pairs).to(d.dtype), c)


# ---------------------------------------------------------------------------------------
# Nonconvex penalties: the strength is the λ inside the formula
# ---------------------------------------------------------------------------------------


class _Nonconvex(Penalty):
    """Elementwise nonconvex penalty ``Σ_i p(w_i; λ_i)``, ``λ_i = strength · c_i``, whose
    strength is the λ inside the formula; subclasses give ``_p`` and its prox ``_prox_lam``."""

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True

    def _p(self, d: Tensor, lam: Tensor | float) -> Tensor:
        raise NotImplementedError

    def _prox_lam(self, d: Tensor, t: Tensor | float, lam: Tensor | float) -> Tensor:
        raise NotImplementedError

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return self._p(d, 1.0 if c is None else c).sum()

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        # prox of t·Ω with Ω at λ = 1: step t, λ = c (or 1)
        return self._prox_lam(d, t, 1.0 if c is None else c)

    def penalty(self, w: Tensor, strength: Tensor | float, name: str | None = None) -> Tensor:
        lam = _scaled_step(strength, self._c(w, name))
        return self._p(self._shift(w, name), lam).sum()

    def prox_step(
        self, w: Tensor, lr: Tensor | float, strength: Tensor | float, name: str | None = None
    ) -> Tensor:
        if isinstance(lr, (int, float)):
            self.check_step(lr)
        ref = self.reference(name)
        lam = _scaled_step(strength, self._c(w, name))
        out = self._prox_lam(self._shift(w, name), lr, lam)
        return out if ref is None else out + ref.to(w)


@register_penalty
class MCP(_Nonconvex):
    """Minimax concave penalty (Zhang 2010), strength ``λ``, concavity ``γ > 1``:

    ``p(w) = λ|w| − w²/(2γ)`` if ``|w| ≤ γλ``, else ``γλ²/2``; ``Ω = Σ_i p(w_i)`` with
    ``λ_i = λ c_i``. ``value(w)`` is at ``λ = 1``. Computed as ``|w|·(λ − |w|/(2γ))`` (both
    factors ≥ 0, so a huge ``λ`` overflows to ``inf``, never ``inf − inf``) and exactly 0 at
    ``w = 0`` whatever ``λ``.

    Prox (:func:`funcreg.prox.mcp_prox`, the global minimiser for every step ``t``): firm
    thresholding ``soft(w, tλ)/(1 − t/γ)`` inside ``|w| ≤ γλ`` and ``w`` outside when
    ``t < γ``; hard thresholding at ``√(tγ)·λ`` when ``t ≥ γ``. Training steps
    (:meth:`prox_step`, ``fr.sweep``) keep ``lr < γ`` (:meth:`check_step`), where the step is
    the unique, continuous firm-thresholding map.
    """

    gamma: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gamma > 1:
            raise ValueError(f"MCP: gamma must be > 1, got {self.gamma}")

    def _p(self, d: Tensor, lam: Tensor | float) -> Tensor:
        a = d.abs()
        nonzero = a > 0
        a1 = torch.where(nonzero, a, torch.ones_like(a))  # no 0·inf when λ overflows
        inside = torch.where(nonzero, a1 * (lam - a1 / (2 * self.gamma)), torch.zeros_like(a))
        return torch.where(a <= self.gamma * lam, inside, (0.5 * self.gamma * lam) * lam)

    def _prox_lam(self, d: Tensor, t: Tensor | float, lam: Tensor | float) -> Tensor:
        return P.mcp_prox(d, t, lam, self.gamma)

    def check_step(self, lr: float) -> None:
        """Training keeps ``lr < γ`` (firm thresholding; beyond it the step is hard
        thresholding, which jumps)."""
        if not lr < self.gamma:
            raise ValueError(
                f"MCP prox needs lr < gamma, got lr={lr}, gamma={self.gamma}: lower the "
                "learning rate or raise gamma (MCP.prox(w, t) itself is exact for any t)"
            )


@register_penalty
class SCAD(_Nonconvex):
    """Smoothly clipped absolute deviation (Fan & Li 2001), strength ``λ``, ``a > 2``:

    ``p(w) = λ|w|`` if ``|w| ≤ λ``; ``(2aλ|w| − w² − λ²) / (2(a − 1))`` if ``λ < |w| ≤ aλ``;
    ``λ²(a + 1)/2`` otherwise. ``value(w)`` is at ``λ = 1``. The middle piece is computed as
    ``|w|(λ − v) + λv`` with ``v = (|w| − λ)/(2(a − 1)) ≤ λ/2`` (terms ≥ 0: a huge ``λ``
    overflows to ``inf``, never ``inf − inf``), and ``p(0) = 0`` whatever ``λ``.

    Prox (:func:`funcreg.prox.scad_prox`, the global minimiser for every step ``t``): the
    three-piece closed form when ``a > 1 + t``, else the better of the minimisers on
    ``|y| ≤ λ`` and ``|y| ≥ aλ``. Training steps keep ``a > 1 + lr`` (:meth:`check_step`).
    """

    a: float = 3.7

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.a > 2:
            raise ValueError(f"SCAD: a must be > 2, got {self.a}")

    def _p(self, d: Tensor, lam: Tensor | float) -> Tensor:
        x = d.abs()
        a = self.a
        nonzero = x > 0
        x1 = torch.where(nonzero, x, torch.ones_like(x))  # no 0·inf when λ overflows
        small = torch.where(nonzero, lam * x1, torch.zeros_like(x))
        v = (x - lam) / (2 * (a - 1))
        mid = x * (lam - v) + lam * v
        big = (0.5 * (a + 1) * lam) * lam
        return torch.where(x <= lam, small, torch.where(x <= a * lam, mid, big))

    def _prox_lam(self, d: Tensor, t: Tensor | float, lam: Tensor | float) -> Tensor:
        return P.scad_prox(d, t, lam, self.a)

    def check_step(self, lr: float) -> None:
        """Training keeps ``a > 1 + lr`` (the three-piece closed form, continuous in ``w``)."""
        if not self.a > 1 + lr:
            raise ValueError(
                f"SCAD prox needs a > 1 + lr, got lr={lr}, a={self.a}: lower the learning "
                "rate or raise a (SCAD.prox(w, t) itself is exact for any t)"
            )


# ---------------------------------------------------------------------------------------
# Constraints: no strength, no value, only a projection
# ---------------------------------------------------------------------------------------


class Constraint(Penalty):
    """A constraint set ``C``: ``value`` is 0 (the indicator of ``C`` on feasible points),
    ``prox`` is the Euclidean projection onto ``C`` whatever the step. Needs no strength."""

    smooth: ClassVar[bool] = False
    has_prox: ClassVar[bool] = True
    is_constraint: ClassVar[bool] = True

    def _value(self, d: Tensor, c: Tensor | None) -> Tensor:
        return d.new_zeros(())

    def penalty(self, w: Tensor, strength: Tensor | float, name: str | None = None) -> Tensor:
        return w.new_zeros(())

    def _project(self, d: Tensor) -> Tensor:
        raise NotImplementedError

    def _prox(self, d: Tensor, t: Tensor | float, c: Tensor | None) -> Tensor:
        return self._project(d)

    def prox_step(
        self, w: Tensor, lr: Tensor | float, strength: Tensor | float, name: str | None = None
    ) -> Tensor:
        return self.prox(w, 0.0, name)


@register_penalty
class NonNegative(Constraint):
    """``w ≥ 0`` (with ``toward=``: ``w ≥ w_ref``); projection ``max(w, 0)``. Like Keras
    ``NonNeg`` and scikit-learn's ``positive=True``."""

    elementwise: ClassVar[bool] = True

    def _project(self, d: Tensor) -> Tensor:
        return P.project_nonnegative(d)


@register_penalty
class Box(Constraint):
    """``lo ≤ w ≤ hi`` elementwise (with ``toward=``: ``lo ≤ w − w_ref ≤ hi``);
    projection ``clamp(w, lo, hi)``."""

    lo: float = -1.0
    hi: float = 1.0

    elementwise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lo <= self.hi:
            raise ValueError(f"Box: needs lo <= hi, got lo={self.lo}, hi={self.hi}")

    def _project(self, d: Tensor) -> Tensor:
        return P.project_box(d, self.lo, self.hi)


@register_penalty
class MaxNorm(Constraint):
    """Keras ``MaxNorm``: ``‖w_g‖₂ ≤ max_value`` for every group, the norm over ``dim``.
    ``dim=None`` (default) means all axes but 0: each output unit's incoming weights for
    ``nn.Linear (out, in)`` and ``nn.Conv* (out, in, *k)`` — Keras' default ``axis=0`` on
    its ``(in, out)`` kernel. Projection ``w_g · min(1, max_value/‖w_g‖)``."""

    max_value: float = 2.0
    dim: Dim | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.max_value >= 0:
            raise ValueError(f"MaxNorm: max_value must be >= 0, got {self.max_value}")

    def _project(self, d: Tensor) -> Tensor:
        dims = (
            tuple(range(1, d.dim()))
            if self.dim is None
            else as_dims(self.dim, d.dim(), "MaxNorm", tuple(d.shape))
        )
        if not dims:
            dims = (0,)
        return P.project_max_norm(d, self.max_value, dims)


def _group_norm(d: Tensor, dim: Dim | None, owner: str) -> Tensor:
    """``‖d_g‖₂`` per group, kept as a broadcastable tensor: the norm over ``dim`` (``None``:
    all axes but 0, as :class:`MaxNorm`)."""
    dims = tuple(range(1, d.dim())) if dim is None else as_dims(dim, d.dim(), owner, tuple(d.shape))
    return torch.linalg.vector_norm(d, dim=dims or (0,), keepdim=True)


def _rescale(d: Tensor, norm: Tensor, target: Tensor) -> Tensor:
    """``d_g · target_g / ‖d_g‖`` where ``‖d_g‖ > 0``; a zero group stays zero."""
    positive = norm > 0
    safe = torch.where(positive, norm, torch.ones_like(norm))
    return d * torch.where(positive, target / safe, torch.zeros_like(norm))


@register_penalty
class UnitNorm(Constraint):
    """Keras ``UnitNorm``: each group (norm over ``dim``; ``None``: all axes but 0, each
    output unit's incoming weights, as :class:`MaxNorm`) rescaled to norm 1:
    ``w_g / ‖w_g‖`` (a zero group stays zero; Keras divides by ``ε + ‖w_g‖``, ``ε = 1e-7``).
    The projection onto the unit sphere."""

    dim: Dim | None = None

    def _project(self, d: Tensor) -> Tensor:
        norm = _group_norm(d, self.dim, "UnitNorm")
        return _rescale(d, norm, torch.ones_like(norm))


@register_penalty
class MinMaxNorm(Constraint):
    """Keras ``MinMaxNorm``: each group's norm pulled toward ``[min_value, max_value]``,
    ``w_g · (rate·clip(‖w_g‖, lo, hi) + (1 − rate)·‖w_g‖) / ‖w_g‖`` (a zero group stays
    zero; Keras divides by ``ε + ‖w_g‖``); ``rate=1`` is the projection onto the shell
    ``lo ≤ ‖w_g‖ ≤ hi``. Groups as :class:`UnitNorm`."""

    min_value: float = 0.0
    max_value: float = 1.0
    rate: float = 1.0
    dim: Dim | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(
                f"MinMaxNorm: needs 0 <= min_value <= max_value, got {self.min_value}, "
                f"{self.max_value}"
            )
        if not 0 <= self.rate <= 1:
            raise ValueError(f"MinMaxNorm: rate must be in [0, 1], got {self.rate}")

    def _project(self, d: Tensor) -> Tensor:
        norm = _group_norm(d, self.dim, "MinMaxNorm")
        clipped = torch.clamp(norm, self.min_value, self.max_value)
        return _rescale(d, norm, self.rate * clipped + (1 - self.rate) * norm)
