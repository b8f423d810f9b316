"""Spec: named penalty terms, and the penalized objective as a pure function.

A :class:`Spec` maps term names to penalties. Each term's name is also the name of its
strength, so for strengths ``s`` the total penalty is

    ``R(params; s) = Σ_k  Σ_{p selected by term k}  s_k · Ω_k(p)``

(for MCP/SCAD ``s_k`` is the λ inside the formula; constraints add nothing and need no
strength). :func:`penalized` adds ``R`` to a loss and stays a pure function of
``(params, strengths, *batch)``: ``grad``, ``vmap``, ``jacrev`` and ``torch.compile`` apply
to it unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import _checks
from .penalties import L1, L2, MCP, SCAD, ElasticNet, GroupLasso, Penalty, as_dims

Params = Mapping[str, Tensor]
Strengths = Mapping[str, Any]
RESERVED = ("loss", "penalty", "objective")


class Spec(Mapping[str, Penalty]):
    """An immutable mapping ``term name -> Penalty``.

    >>> spec = fr.Spec(l1=fr.L1("hidden.weight"), l2=fr.L2())
    >>> spec(params, {"l1": 1e-3, "l2": 1e-4})      # total penalty, a 0-dim tensor
    """

    __slots__ = ("_terms", "_cache", "_known", "__weakref__")

    def __init__(self, terms: Mapping[str, Penalty] | None = None, /, **kwargs: Penalty) -> None:
        merged = dict(terms or {})
        for k, v in kwargs.items():
            if k in merged:
                raise ValueError(f"term {k!r} given twice")
            merged[k] = v
        for k, v in merged.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"term names must be identifiers (they name strengths), got {k!r}")
            if k in RESERVED:
                raise ValueError(
                    f"term name {k!r} is reserved for metrics ({', '.join(RESERVED)}); rename it"
                )
            if not isinstance(v, Penalty):
                raise TypeError(
                    f"term {k!r} must be a penalty such as fr.L1(), got {type(v).__name__}"
                )
        self._terms: dict[str, Penalty] = merged
        self._cache: dict[tuple, dict[str, tuple[str, ...]]] = {}
        self._known: tuple[str, ...] = tuple(merged)
        _LIVE.add(self)

    def __reduce__(self) -> tuple[type[Spec], tuple[dict[str, Penalty]], tuple[str, ...]]:
        """Copies and unpickled specs are rebuilt through ``__init__`` (fresh cache, and
        registered for the traced selection under ``torch.compile``)."""
        return (type(self), (self._terms,), self._known)

    def __setstate__(self, known: tuple[str, ...]) -> None:
        self._known = tuple(known)

    def _part(self, terms: dict[str, Penalty]) -> Spec:
        part = Spec(terms)
        part._known = self._known
        return part

    @property
    def known_terms(self) -> tuple[str, ...]:
        """The terms of the spec this one was split from by :meth:`smooth`/:meth:`nonsmooth`
        (its own terms otherwise): the keys a strengths dict given to it may hold, so that
        one dict serves ``fr.penalty(net, spec.smooth(), s)`` and ``fr.prox_(net,
        spec.nonsmooth(), s, lr)``."""
        return self._known

    # -- mapping protocol -----------------------------------------------------------------
    def __getitem__(self, key: str) -> Penalty:
        return self._terms[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._terms)

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._terms.items())
        return f"Spec({inner})"

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    # -- splits ---------------------------------------------------------------------------
    def smooth(self) -> Spec:
        """The terms that go through the gradient (no prox used in training)."""
        return self._part({k: v for k, v in self._terms.items() if v.smooth})

    def nonsmooth(self) -> Spec:
        """The terms applied by their prox/projection after a gradient step."""
        return self._part({k: v for k, v in self._terms.items() if not v.smooth})

    @property
    def strength_names(self) -> tuple[str, ...]:
        """Terms that need a strength (every term but constraints)."""
        return tuple(k for k, v in self._terms.items() if not v.is_constraint)

    def strength_term(self, term: str | None, what: str) -> str:
        """The term whose strength a path or a cross-validation varies: ``term``, or the
        spec's only term with a strength when ``term`` is ``None``; ``what`` names the caller
        in the messages."""
        names = self.strength_names
        if term is None:
            if len(names) != 1:
                raise ValueError(
                    f"{what}: the spec has {len(names)} terms with a strength ({list(names)}); "
                    "say which one the grid varies with term=..."
                )
            return names[0]
        if term not in names:
            raise ValueError(
                f"{what}: term {term!r} is not a spec term with a strength; "
                f"the spec has {list(names)}"
            )
        return term

    # -- selection ------------------------------------------------------------------------
    def selection(self, params: Params) -> dict[str, tuple[str, ...]]:
        """``{term: names of the params it penalises}``, resolved from names and static
        facts (shape, dtype) and cached per key set; raises if a term selects nothing.

        Under ``torch.compile`` the resolution is a traced constant, so it adds nothing to
        the graph."""
        if not self._terms:
            return {}
        key = tuple((n, v.shape, v.dtype) for n, v in params.items() if isinstance(v, Tensor))
        if torch.compiler.is_compiling():
            return dict(_traced_selection(id(self), key))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = dict(_resolve_selection(self, key))
        return hit

    def selected_names(self, params: Params) -> list[str]:
        """Names of the params any term penalises, each once, in order of first selection."""
        out: list[str] = []
        for names in self.selection(params).values():
            out += [n for n in names if n not in out]
        return out

    def describe(self, params: Params) -> str:
        """A printable table: every parameter, its shape, and the terms that touch it."""
        sel = self.selection(params)
        rows = [("parameter", "shape", "terms")]
        for n, v in params.items():
            if not isinstance(v, Tensor):
                continue
            terms = [f"{t}: {type(self._terms[t]).__name__}" for t, ns in sel.items() if n in ns]
            if not v.is_floating_point():
                terms = ["(not floating: never penalised)"]
            rows.append((n, str(tuple(v.shape)), ", ".join(terms) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)

    # -- values ---------------------------------------------------------------------------
    def parts(self, params: Params, strengths: Strengths) -> dict[str, Tensor]:
        """``{term: s_term · Σ_selected Ω_term(p)}`` — each term's contribution.

        A penalty linear in its strength (``penalty`` not overridden, i.e. ``s · Ω``) is
        evaluated as ``s · Σ_p Ω(p)``, one product per term, like the hand-written
        ``l2 * (w1.pow(2).sum() + w2.pow(2).sum())``; others (MCP, SCAD) per parameter."""
        sel = self.selection(params)
        out: dict[str, Tensor] = {}
        for term, names in sel.items():
            pen = self._terms[term]
            linear = type(pen).penalty is Penalty.penalty
            s = 1.0 if pen.is_constraint else strength_of(strengths, term)
            total: Tensor | None = None
            for n in names:
                v = pen.value(params[n], n) if linear else pen.penalty(params[n], s, n)
                total = v if total is None else total + v
            assert total is not None
            out[term] = s * total if linear and not pen.is_constraint else total
        return out

    def __call__(self, params: Params, strengths: Strengths) -> Tensor | float:
        """The total penalty ``Σ_k s_k Ω_k(params)`` (0.0 for an empty spec)."""
        parts = self.parts(params, strengths)
        total: Tensor | float = 0.0
        for v in parts.values():
            total = total + v
        return total

    def prox(
        self, params: Params, strengths: Strengths, lr: Tensor | float | Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Apply ``prox_{lr·s_k·Ω_k}`` of every term in this spec to the params it selects,
        in spec order (pure: returns a new dict; untouched entries are passed through).
        Use on ``spec.nonsmooth()``.

        ``lr`` is one step for all (a number or a 0-dim tensor), or ``{name: step}`` with a
        step per coordinate of each selected param (a tensor broadcastable to it), the steps
        ``η / d`` of a variable metric ``diag(d)`` (:func:`funcreg.optim.prox_steps`). Each
        penalty then gets the prox in that metric where it has a closed form, and the prox
        in a metric constant on each block otherwise (:func:`metric_step`)."""
        sel = self.selection(params)
        out = dict(params)
        for term, names in sel.items():
            pen = self._terms[term]
            if not pen.has_prox:
                raise _checks.no_prox_error(term, type(pen).__name__, pen.smooth)
            s = 1.0 if pen.is_constraint else strength_of(strengths, term)
            for n in names:
                step = metric_step(pen, lr[n], out[n]) if isinstance(lr, Mapping) else lr
                out[n] = pen.prox_step(out[n], step, s, n)
        return out

    def validate(self, params: Params, strengths: Strengths) -> None:
        """Eager checks: params are tensors, every term selects something and every needed
        strength is present, finite and >= 0."""
        _checks.check_float_params(params)
        self.selection(params)
        _checks.check_strengths(self._terms, strengths, needs=self.strength_names)


class _LiveSpecs:
    """Every :class:`Spec` alive in this process, by ``id``: how :func:`_traced_selection`
    finds a spec from a number, since its arguments must be constants to the tracer and
    older releases (torch 2.11) do not treat a Spec object as one.

    The single instance :data:`_LIVE` owns the table. An entry appears when a spec is built
    (``Spec.__init__``, which copies and unpickling also go through) and goes away by itself
    when the spec is garbage-collected (weak references: the table keeps no spec alive). An
    id is looked up only by ``Spec.selection`` of the spec itself, which is alive during the
    call, so the entry is there and is that spec even if CPython reuses the id of a dead one
    (the new spec's registration replaces the old entry). Safe under threads: one-item reads
    and writes of the weak dictionary are atomic under the GIL, and distinct live specs have
    distinct ids. Under ``torch.compile`` it is read at trace time only (the lookup is an
    ``assume_constant_result``), so it adds nothing to a graph.
    """

    def __init__(self) -> None:
        self._specs: weakref.WeakValueDictionary[int, Spec] = weakref.WeakValueDictionary()

    def add(self, spec: Spec) -> None:
        self._specs[id(spec)] = spec

    def __getitem__(self, spec_id: int) -> Spec:
        return self._specs[spec_id]

    def __contains__(self, spec_id: object) -> bool:
        return spec_id in self._specs

    def __len__(self) -> int:
        return len(self._specs)


_LIVE = _LiveSpecs()


@torch.compiler.assume_constant_result
def _traced_selection(spec_id: int, key: tuple) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """:func:`_resolve_selection` of the spec ``spec_id`` as a traced constant."""
    return _resolve_selection(_LIVE[spec_id], key)


def _resolve_selection(spec: Spec, key: tuple) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Selection from static facts only: selectors and checks see meta tensors."""
    metas = {n: torch.empty(shape, dtype=dtype, device="meta") for n, shape, dtype in key}
    floats = [n for n, v in metas.items() if v.is_floating_point()]
    out = []
    for term, pen in spec.items():
        chosen = pen.selector.select(metas)
        if not chosen:
            raise _checks.no_match_error(term, pen.selector, floats)
        pen.check_names(term, chosen)
        for n in chosen:
            pen.check(term, n, metas[n])
        out.append((term, tuple(chosen)))
    return tuple(out)


def metric_step(pen: Penalty, step: Tensor, w: Tensor) -> Tensor:
    """The step a penalty's prox takes from a per-coordinate step ``step = η / d`` (the
    diagonal metric ``D = diag(d)`` of an adaptive optimizer), for a param ``w``.

    * Separable penalties (``L1``, ``L2``, ``ElasticNet``, ``MCP``, ``SCAD``) and the
      separable constraints: ``step`` itself. Their prox in the metric ``D`` is the
      coordinate-wise prox with step ``η / d_i``, exact.
    * Group penalties (``GroupLasso``, ``SparseGroupLasso``): one step per group,
      ``η / mean_g(d)``: the prox in the metric ``D`` restricted to a block has no closed
      form, so the block's metric is taken as the scalar ``mean_g(d)·I`` (exact where ``d`` is
      constant on the group; otherwise the zero-group test reads
      ``‖mean_g(d) · D_g⁻¹ ∇_g loss‖ ≤ s√|g|`` instead of ``‖∇_g loss‖ ≤ s√|g|``).
    * Any other prox (``Nuclear``, user penalties, ``MaxNorm``): one step per tensor,
      ``η / mean(d)`` (a scalar metric per tensor, under which every prox is exact).

    Projections (``NonNegative``, ``Box``, ``MaxNorm``) ignore the step: they stay
    Euclidean projections.
    """
    if step.dim() == 0 or pen.is_constraint:
        return step
    if isinstance(pen, GroupLasso):  # SparseGroupLasso too
        dims = as_dims(pen.dim, w.dim())
        return 1 / torch.mean(1 / step, dim=dims, keepdim=True)
    if type(pen) in (L1, L2, ElasticNet, MCP, SCAD):
        return step
    return 1 / torch.mean(1 / step)


def strength_of(strengths: Strengths, term: str) -> Any:
    try:
        return strengths[term]
    except KeyError:
        raise ValueError(
            f"missing strength for term {term!r}; strengths has {sorted(strengths)}"
        ) from None


def as_spec(spec: Spec | Mapping[str, Penalty]) -> Spec:
    """A :class:`Spec` from a Spec or a plain ``{name: Penalty}`` dict."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Mapping):
        return Spec(spec)
    raise TypeError(f"expected a Spec or a dict of penalties, got {type(spec).__name__}")


def penalized(
    loss_fn: Callable[..., Tensor],
    spec: Spec | Mapping[str, Penalty],
    return_parts: bool = False,
) -> Callable[..., Any]:
    """Add a spec's penalty to a loss, as a pure function.

    Returns ``objective(params, strengths, *args, **kwargs)`` equal to
    ``loss_fn(params, *args, **kwargs) + Σ_k strengths[k] · Ω_k(params)``. With
    ``return_parts=True`` it returns ``(total, {"loss": data_loss, term: value, ...})``,
    ready for ``grad(..., has_aux=True)``.

    ``strengths`` may hold extra entries (e.g. an optimizer's ``lr``); they are ignored.
    Per call only what ``loss_fn`` returned is checked, from static facts (a 0-dim tensor, not
    a float from ``.item()`` nor a shape-``(1,)`` tensor), which costs nothing under
    ``vmap``/``grad``/``torch.compile``; the strengths are not — use ``spec.validate`` or the
    eager entry points once.
    """
    spec = as_spec(spec)

    def objective(params: Params, strengths: Strengths, *args: Any, **kwargs: Any) -> Any:
        data = loss_fn(params, *args, **kwargs)
        _checks.check_loss_value(loss_fn, data)
        parts = spec.parts(params, strengths)
        total = data
        for v in parts.values():
            total = total + v
        if return_parts:
            return total, {"loss": data, **parts}
        return total

    objective.__name__ = f"penalized_{getattr(loss_fn, '__name__', 'loss')}"
    objective.__doc__ = f"{getattr(loss_fn, '__name__', 'loss')} + {spec!r}"
    return objective
