"""Selectors: which parameters a penalty touches, decided from static facts only.

A selector looks at a parameter's dotted name and its static metadata (``ndim``, shape,
dtype) -- never at its values -- so a selection is resolved once per key set and costs
nothing inside ``vmap`` or ``torch.compile``.

    >>> sel = fr.by_name("hidden.*") & fr.weights()
    >>> sel.select(params)            # -> ['hidden.weight']

Combine with ``&`` (both), ``|`` (either) and ``~`` (not). A plain string or a list of
strings anywhere a selector is expected means :func:`by_name`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn

SelectorLike = Union["Selector", str, re.Pattern, Iterable[str | re.Pattern]]


class Selector:
    """Base class: ``sel(name, tensor) -> bool``. Floating-point tensors only are ever selected."""

    def matches(self, name: str, value: Tensor) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, name: str, value: Tensor) -> bool:
        return value.is_floating_point() and self.matches(name, value)

    def select(self, params: Mapping[str, Tensor]) -> list[str]:
        """Names of the floating-point entries of ``params`` this selector matches, in order."""
        return [n for n, v in params.items() if isinstance(v, Tensor) and self(n, v)]

    def __and__(self, other: SelectorLike) -> Selector:
        return _And(self, as_selector(other))

    def __or__(self, other: SelectorLike) -> Selector:
        return _Or(self, as_selector(other))

    def __rand__(self, other: SelectorLike) -> Selector:
        return _And(as_selector(other), self)

    def __ror__(self, other: SelectorLike) -> Selector:
        return _Or(as_selector(other), self)

    def __invert__(self) -> Selector:
        return _Not(self)

    @property
    def pattern_hint(self) -> str:
        """A string to look up the closest parameter names with, for error messages."""
        return repr(self)


@dataclass(frozen=True, eq=True)
class _ByName(Selector):
    patterns: tuple[str | re.Pattern, ...]

    def matches(self, name: str, value: Tensor) -> bool:
        for p in self.patterns:
            if isinstance(p, re.Pattern):
                if p.fullmatch(name):
                    return True
            elif fnmatch.fnmatchcase(name, p):
                return True
        return False

    def __repr__(self) -> str:
        shown = ", ".join(
            f"re.compile({p.pattern!r})" if isinstance(p, re.Pattern) else repr(p)
            for p in self.patterns
        )
        return f"by_name({shown})"

    @property
    def pattern_hint(self) -> str:
        p = self.patterns[0]
        return (p.pattern if isinstance(p, re.Pattern) else p).replace("*", "")


@dataclass(frozen=True, eq=True)
class _ByNdim(Selector):
    ndims: tuple[int, ...]
    label: str = ""

    def matches(self, name: str, value: Tensor) -> bool:
        return value.dim() in self.ndims

    def __repr__(self) -> str:
        return self.label or f"by_ndim({', '.join(map(str, self.ndims))})"


@dataclass(frozen=True, eq=True)
class _MinNdim(Selector):
    ndim: int
    label: str

    def matches(self, name: str, value: Tensor) -> bool:
        return value.dim() >= self.ndim

    def __repr__(self) -> str:
        return self.label


@dataclass(frozen=True, eq=True)
class _Names(Selector):
    names: frozenset[str]
    label: str

    def matches(self, name: str, value: Tensor) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return self.label


@dataclass(frozen=True, eq=True)
class _And(Selector):
    a: Selector
    b: Selector

    def matches(self, name: str, value: Tensor) -> bool:
        return self.a(name, value) and self.b(name, value)

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"

    @property
    def pattern_hint(self) -> str:
        return self.a.pattern_hint


@dataclass(frozen=True, eq=True)
class _Or(Selector):
    a: Selector
    b: Selector

    def matches(self, name: str, value: Tensor) -> bool:
        return self.a(name, value) or self.b(name, value)

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"

    @property
    def pattern_hint(self) -> str:
        return self.a.pattern_hint


@dataclass(frozen=True, eq=True)
class _Not(Selector):
    a: Selector

    def matches(self, name: str, value: Tensor) -> bool:
        return not self.a(name, value)

    def __repr__(self) -> str:
        return f"~{self.a!r}"


def by_name(*patterns: str | re.Pattern) -> Selector:
    """Parameters whose dotted name matches any of the glob ``patterns`` (``fnmatch``; ``*``
    also crosses dots) or compiled regular expressions (``re.fullmatch``)."""
    flat: list[str | re.Pattern] = []
    for p in patterns:
        if isinstance(p, (str, re.Pattern)):
            flat.append(p)
        elif isinstance(p, Iterable):
            flat.extend(p)
        else:
            raise TypeError(f"by_name expects strings or compiled regexes, got {type(p).__name__}")
    if not flat:
        raise ValueError("by_name needs at least one pattern, e.g. by_name('hidden.*')")
    for p in flat:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(f"by_name expects strings or compiled regexes, got {type(p).__name__}")
    return _ByName(tuple(flat))


def by_ndim(*ndims: int) -> Selector:
    """Parameters with exactly one of the given numbers of dimensions."""
    if not ndims:
        raise ValueError("by_ndim needs at least one ndim, e.g. by_ndim(2, 4)")
    return _ByNdim(tuple(int(n) for n in ndims))


def weights() -> Selector:
    """Weights: parameters with ``ndim >= 2`` (Linear/Conv/Embedding weights, not biases
    or norm-layer scales). The default selection of every penalty."""
    return _MinNdim(2, "weights()")


def biases() -> Selector:
    """Parameters with ``ndim <= 1`` (biases, norm-layer scales and shifts)."""
    return _ByNdim((0, 1), "biases()")


def by_module(model: nn.Module, *types: type[nn.Module]) -> Selector:
    """Parameters owned directly by submodules of ``model`` that are instances of ``types``
    (e.g. ``by_module(net, nn.Linear, nn.Conv2d)``). Names are resolved now, once."""
    if not types:
        raise ValueError("by_module needs at least one module type, e.g. by_module(net, nn.Linear)")
    names = set()
    for prefix, mod in model.named_modules():
        if isinstance(mod, types):
            for pname, _ in mod.named_parameters(recurse=False):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    label = f"by_module({', '.join(t.__name__ for t in types)})"
    return _Names(frozenset(names), label)


def norm_layers(model: nn.Module) -> Selector:
    """Parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm)."""
    norm_types = (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
    )
    sel = by_module(model, *norm_types)
    assert isinstance(sel, _Names)
    return _Names(sel.names, "norm_layers()")


def everything() -> Selector:
    """Every floating-point parameter."""
    return _MinNdim(0, "everything()")


def as_selector(sel: SelectorLike | None) -> Selector:
    """``None`` -> :func:`weights`; a string, regex or list of them -> :func:`by_name`."""
    if sel is None:
        return weights()
    if isinstance(sel, Selector):
        return sel
    if isinstance(sel, (str, re.Pattern)):
        return by_name(sel)
    if isinstance(sel, Iterable):
        return by_name(*sel)
    raise TypeError(
        f"expected a selector, a name pattern or a list of patterns, got {type(sel).__name__}"
    )


def is_float(t: object) -> bool:
    return isinstance(t, Tensor) and torch.is_floating_point(t)
