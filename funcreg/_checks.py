"""Every user-facing check of funcreg and its message, in one place.

The checks run at the eager boundaries (``fr.grid``, ``fr.stack``, ``fr.sweep``,
``fr.penalty``, ``fr.prox_``, ...), never inside a function that runs under ``vmap``.
Each message names what was passed, the rule, and what to do instead.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` candidates most similar to ``name`` (difflib ratio), best first."""
    cands = list(candidates)
    found = difflib.get_close_matches(name, cands, n=n, cutoff=0.0)
    return found or cands[:n]


def _names(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    if not names:
        return "(none)"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def no_match_error(term: str, selector: Any, names: Iterable[str]) -> ValueError:
    names = list(names)
    pattern = getattr(selector, "pattern_hint", None) or repr(selector)
    near = closest(str(pattern), names)
    return ValueError(
        f"term {term!r}: selector {selector!r} matches no floating-point parameter. "
        f"Closest names: {_names(near)}. Parameters are: {_names(names)}. "
        "Use a glob on the dotted names (e.g. 'hidden.*'), fr.weights() or fr.biases()."
    )


def check_finite(where: str, what: str, t: Tensor) -> None:
    """No NaN or inf in a floating (or complex) tensor of data or params."""
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {what} contains NaN or inf; clean it first")


def check_strength_value(term: str, value: Any) -> None:
    """A strength must be a finite, non-negative number or floating tensor."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(
            f"strength {term!r} must be a number or a floating tensor, got {type(value).__name__}"
        )
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(
                f"strength {term!r} must be a scalar or a 1-d tensor of shape (K,), "
                f"got shape {tuple(value.shape)}"
            )
        if not (value.is_floating_point() or value.dtype in _INT_DTYPES):
            raise TypeError(f"strength {term!r} must be a floating tensor, got {value.dtype}")
        bad = ~torch.isfinite(value.double()) | (value.double() < 0)
        if bool(bad.any()):
            vals = value.reshape(-1)[bad.reshape(-1)].tolist()
            raise ValueError(
                f"strength {term!r} must be finite and >= 0, got {vals[:5]}; "
                "use 0 to switch a term off"
            )
    elif not math.isfinite(value) or value < 0:
        raise ValueError(
            f"strength {term!r} must be finite and >= 0, got {value}; use 0 to switch a term off"
        )


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_strengths(
    spec_terms: Mapping[str, Any], strengths: Mapping[str, Any], *, needs: Iterable[str]
) -> None:
    """All terms in ``needs`` have a strength, every strength is valid, no unknown term names."""
    if not isinstance(strengths, Mapping):
        raise TypeError(
            "strengths must be a dict {term name: strength}, "
            f"got {type(strengths).__name__}; e.g. {{'l1': 1e-3}}"
        )
    for term in needs:
        if term not in strengths:
            raise ValueError(
                f"missing strength for term {term!r}; strengths has {_names(strengths)}. "
                f"Pass e.g. strengths={{{term!r}: 1e-3, ...}}"
            )
    for term, value in strengths.items():
        if term in spec_terms:
            check_strength_value(term, value)


def check_float_params(params: Mapping[str, Any], what: str = "params") -> None:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{what} must be a dict {{name: tensor}} as from fr.params(model), "
            f"got {type(params).__name__}"
        )
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}[{name!r}] must be a tensor, got {type(p).__name__}")


def check_keyword(kind: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise TypeError(
                f"{kind} got an unexpected keyword {key!r}; "
                f"did you mean {closest(key, allowed, 1)[0]!r}? Allowed: {_names(allowed)}"
            )


def check_toward(term: str, name: str, w: Tensor, ref: Tensor) -> None:
    if tuple(ref.shape) != tuple(w.shape):
        raise ValueError(
            f"term {term!r}: toward= reference for parameter {name!r} has shape "
            f"{tuple(ref.shape)}, but the parameter has shape {tuple(w.shape)}"
        )


def check_toward_names(term: str, ref_names: Iterable[str], selected: Iterable[str]) -> None:
    selected = list(selected)
    missing = [n for n in selected if n not in set(ref_names)]
    if missing:
        raise ValueError(
            f"term {term!r}: toward= has no reference for selected parameter(s) "
            f"{_names(missing)}; it has {_names(ref_names)}"
        )


def check_weight(term: str, name: str, w: Tensor, factor: Tensor, target: tuple[int, ...]) -> None:
    try:
        ok = torch.broadcast_shapes(tuple(factor.shape), target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"term {term!r}: weight= factor for parameter {name!r} has shape "
            f"{tuple(factor.shape)}, which does not broadcast to {target} "
            f"(parameter shape {tuple(w.shape)})"
        )


def check_factor_values(penalty: str, factor: Tensor, where: str = "") -> None:
    """``weight=`` factors are finite and non-negative (checked once, at construction)."""
    if not factor.is_floating_point():
        factor = factor.double()
    if bool((factor < 0).any()) or not bool(torch.isfinite(factor).all()):
        raise ValueError(f"{penalty}: weight= factors{where} must be finite and >= 0")


def check_min_ndim(term: str, penalty: str, name: str, w: Tensor, ndim: int, why: str) -> None:
    if w.dim() < ndim:
        raise ValueError(
            f"term {term!r}: {penalty} needs a parameter with at least {ndim} dimensions "
            f"({why}), but {name!r} has shape {tuple(w.shape)}; select weights only, "
            "e.g. fr.weights() or a name pattern"
        )
