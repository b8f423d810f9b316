"""Penalties declared where the model is defined, collected into one Spec.

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = fr.regularize(nn.Linear(64, 32), l1=fr.L1(), l2=fr.L2())
            self.out = nn.Linear(32, 10)

    spec = fr.spec_of(net)   # Spec(l1=L1(['hidden.weight']), l2=L2(['hidden.weight']))

A declaration is plain data kept in the module's ``__dict__`` (never a parameter, buffer or
hook): it survives ``copy.deepcopy`` and ``torch.save(module)``, stays out of
``state_dict()`` (so ``torch.load(..., weights_only=True)`` of a state dict works and a model
built by the same ``__init__`` has the same declarations) and never changes ``forward``.
Each term's selector is read relative to the module it is declared on (its own parameters
and those of its submodules, named as ``module.named_parameters()`` names them);
:func:`spec_of` turns it into the exact dotted names of the whole model. Strengths stay data:
one per term name, given wherever the spec is used (``fr.penalty``, ``fr.train_step``,
``fr.sweep``, ``fr.solve``, ``fr.attach``...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from .penalties import Penalty
from .selectors import by_name
from .spec import Spec

__all__ = ["check_registered", "declared", "regularize", "spec_of", "unregularize"]

_ATTR = "_funcreg_terms"
M = TypeVar("M", bound=nn.Module)


def regularize(module: M, /, **terms: Penalty) -> M:
    """Declare penalty terms on ``module`` (in place) and return it, for use in ``__init__``.

    ``terms`` maps term names (which are also the names of their strengths) to penalties;
    a penalty's selector picks among ``module``'s own parameters (default ``fr.weights()``:
    those with ``ndim >= 2``; ``"weight"``, ``"*.bias"``... as globs on the names
    ``module.named_parameters()`` gives). Declaring a term name again on the same module
    replaces it. Declarations on several modules under one term name are one term of
    :func:`spec_of` (the same penalty, same settings, on all their parameters).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or a term is not a penalty.
        ValueError: a term name is not an identifier or is reserved.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"fr.regularize: the first argument must be an nn.Module (a layer of the model), "
            f"got {type(module).__name__}"
        )
    if not terms:
        raise ValueError("fr.regularize: give at least one term, e.g. l1=fr.L1()")
    Spec(terms)  # the same checks as a Spec's terms (identifiers, not reserved, penalties)
    current = dict(module.__dict__.get(_ATTR, {}))
    current.update(terms)
    module.__dict__[_ATTR] = current
    return module


def unregularize(module: nn.Module, *names: str) -> None:
    """Remove the declared terms ``names`` from ``module`` (all of them when none given)."""
    current = dict(module.__dict__.get(_ATTR, {}))
    for name in names:
        if name not in current:
            raise ValueError(
                f"fr.unregularize: term {name!r} is not declared on this module; "
                f"declared: {sorted(current)}"
            )
        del current[name]
    if not names:
        current = {}
    module.__dict__[_ATTR] = current


def declared(module: nn.Module) -> dict[str, Penalty]:
    """The terms declared on ``module`` itself (not its submodules), ``{}`` when none."""
    return dict(module.__dict__.get(_ATTR, {}))


def spec_of(model: nn.Module) -> Spec:
    """One :class:`~funcreg.spec.Spec` of every term declared on ``model`` and its
    submodules, each penalty's selection turned into exact dotted names of ``model``'s
    parameters; a module reachable by several paths (shared) is counted once, under its
    first name, as ``model.named_parameters()`` does. ``toward=``/``weight=`` dicts are
    re-keyed to the dotted names.

    Raises:
        ValueError: a declared term selects no parameter of its module (deleted, or a wrong
            glob), selects a frozen parameter (``requires_grad=False``), one term name is
            declared with different penalties on two modules, or a module with declared
            terms is held in a plain list/dict attribute (not a submodule of ``model``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fr.spec_of expects an nn.Module, got {type(model).__name__}")
    check_registered("fr.spec_of", model, _ATTR)
    names_of: dict[str, list[str]] = {}
    first: dict[str, tuple[str, Penalty]] = {}
    refs: dict[str, dict[str, dict[str, Any]]] = {}
    for path, module in model.named_modules():
        terms = module.__dict__.get(_ATTR)
        if not terms:
            continue
        where = f"module {path!r}" if path else "the model itself"
        local = {n: p for n, p in module.named_parameters() if p.is_floating_point()}
        prefix = f"{path}." if path else ""
        for term, pen in terms.items():
            chosen = pen.selector.select(local)
            if not chosen:
                raise ValueError(
                    f"fr.spec_of: term {term!r} ({type(pen).__name__}) declared on {where} "
                    f"selects none of its parameters {sorted(local)} (deleted, or its selector "
                    f"{pen.selector!r} does not match); fix the selector or remove it with "
                    f"fr.unregularize(model.{path or '<module>'}, {term!r})"
                )
            for n in chosen:
                if not local[n].requires_grad:
                    raise ValueError(
                        f"fr.spec_of: term {term!r} declared on {where} selects "
                        f"{prefix + n!r}, which is frozen (requires_grad=False); unfreeze it, "
                        f"or narrow the term's selector, or fr.unregularize the term"
                    )
            if term in first and not _same_penalty(first[term][1], pen):
                other, was = first[term]
                raise ValueError(
                    f"fr.spec_of: term {term!r} is declared as {was!r} on {other} and as "
                    f"{pen!r} on {where}; one term is one penalty (its strength is shared): "
                    "give the two declarations different term names"
                )
            first.setdefault(term, (where, pen))
            dotted = [prefix + n for n in chosen]
            have = names_of.setdefault(term, [])
            have += [n for n in dotted if n not in have]
            for field in ("toward", "weight"):
                value = getattr(pen, field)
                if value is None:
                    continue
                by_name_ = refs.setdefault(term, {}).setdefault(field, {})
                for n in chosen:
                    ref = value.get(n) if isinstance(value, Mapping) else value
                    if ref is not None:
                        by_name_[prefix + n] = ref
    out: dict[str, Penalty] = {}
    for term, (_, pen) in first.items():
        changes: dict[str, Any] = {"select": by_name(*names_of[term])}
        for field in ("toward", "weight"):
            if getattr(pen, field) is not None:
                changes[field] = refs[term][field]
        out[term] = dataclasses.replace(pen, **changes)
    return Spec(out)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def check_registered(where: str, model: nn.Module, attr: str) -> None:
    """Refuse a module with declarations (``module.__dict__[attr]``) that ``model`` holds in
    a plain ``list``/``tuple``/``dict``/``set`` attribute instead of as a submodule: its
    parameters are not ``model``'s, so its terms would silently apply to nothing."""
    registered = {id(m) for m in model.modules()}
    for path, module in model.named_modules():
        for attr_name, value in vars(module).items():
            if attr_name in _MODULE_INTERNALS or not isinstance(value, list | tuple | dict | set):
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if not isinstance(item, nn.Module) or id(item) in registered:
                    continue
                if any(attr in m.__dict__ for m in item.modules()):
                    held = f"{path}.{attr_name}" if path else attr_name
                    kind = "nn.ModuleDict" if isinstance(value, dict) else "nn.ModuleList"
                    raise ValueError(
                        f"{where}: a module with declared terms is held in the plain "
                        f"{type(value).__name__} {held!r} (item {key!r}), so it is not a "
                        f"submodule of the model: its parameters are not the model's and its "
                        f"terms would apply to nothing; hold it in an {kind} (or assign it as "
                        "an attribute) so the model registers it"
                    )


def _same_penalty(a: Penalty, b: Penalty) -> bool:
    """Same type and same settings (selection and ``toward``/``weight`` aside)."""
    if type(a) is not type(b):
        return False
    skip = {"select", "toward", "weight", "_"}
    for f in dataclasses.fields(a):
        if f.name not in skip and getattr(a, f.name) != getattr(b, f.name):
            return False
    return (a.toward is None) == (b.toward is None) and (a.weight is None) == (b.weight is None)
