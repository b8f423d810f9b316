"""Keras parity: Keras's layer arguments and its norm constraints in funcreg's terms.

    strengths = fr.keras.from_layer(
        net.hidden, "hidden",
        kernel_regularizer={"l1": 1e-3, "l2": 1e-4},        # or a Keras get_config() dict
        bias_regularizer={"l2": 1e-4},
        activity_regularizer={"l1": 1e-5},
        kernel_constraint={"class_name": "MaxNorm", "config": {"max_value": 2}},
    )
    spec = fr.spec_of(net)          # terms hidden_kernel_l1, hidden_kernel_l2, ...

Conventions (Keras kernels are ``(in, out)``, torch weights ``(out, in)``):

=========================  ==========================================================
Keras                      funcreg
=========================  ==========================================================
``L1(l1)``                 ``L1``, strength ``l1``
``L2(l2)`` (``l2·Σw²``)    ``L2`` (``½Σw²``), strength ``2·l2``
``L1L2(l1, l2)``           both of the above
``activity_regularizer``   :mod:`funcreg.activity` ``L1L2(l1, l2)`` (same formulas)
``NonNeg()``               ``NonNegative()``
``MaxNorm(m, axis)``       ``MaxNorm(max_value=m)`` (norm of each output unit's weights)
``UnitNorm(axis)``         :class:`~funcreg.UnitNorm` (same groups)
``MinMaxNorm(lo, hi, r)``  :class:`~funcreg.MinMaxNorm` ``(min_value=lo, max_value=hi, rate=r)``
=========================  ==========================================================

Keras's norm constraints divide by ``ε + ‖w‖`` (``ε = 1e-7``); funcreg's divide by ``‖w‖``
where it is positive and leave a zero group at zero, like :class:`~funcreg.MaxNorm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from . import activity as _activity
from .declare import regularize
from .penalties import L1, L2, Constraint, MaxNorm, MinMaxNorm, NonNegative, Penalty, UnitNorm

__all__ = ["MinMaxNorm", "UnitNorm", "from_layer"]


def _config(what: str, value: Any) -> tuple[str, dict[str, Any]]:
    """``(class name, config)`` from a Keras ``get_config()``-style dict
    (``{"class_name": ..., "config": {...}}``) or a plain ``{"l1": .., "l2": ..}``."""
    if isinstance(value, Mapping) and "class_name" in value:
        return str(value["class_name"]), dict(value.get("config") or {})
    if isinstance(value, Mapping):
        return "L1L2", dict(value)
    raise TypeError(
        f"fr.keras.from_layer: {what} must be a dict such as {{'l1': 1e-3, 'l2': 1e-4}} or a "
        f"Keras get_config() dict {{'class_name': ..., 'config': {{...}}}}, "
        f"got {type(value).__name__}"
    )


def _regularizer(what: str, value: Any) -> dict[str, tuple[Penalty, float]]:
    name, config = _config(what, value)
    l1 = float(config.get("l1", 0.0)) if name in ("L1", "L1L2") else 0.0
    l2 = float(config.get("l2", 0.0)) if name in ("L2", "L1L2") else 0.0
    unknown = set(config) - {"l1", "l2"}
    if name not in ("L1", "L2", "L1L2") or unknown:
        raise ValueError(
            f"fr.keras.from_layer: {what}: unsupported regularizer {name} {config}; "
            "supported: L1, L2, L1L2 (use fr.Orthogonal for OrthogonalRegularizer)"
        )
    out: dict[str, tuple[Penalty, float]] = {}
    if l1:
        out["l1"] = (L1(), l1)
    if l2:
        out["l2"] = (L2(), 2.0 * l2)
    return out


def _constraint(what: str, value: Any) -> Constraint:
    name, config = _config(what, value)
    axis = config.pop("axis", None)
    if axis is not None and axis not in (0, [0, 1, 2], (0, 1, 2), [0, 1], (0, 1)):
        raise ValueError(
            f"fr.keras.from_layer: {what}: axis={axis!r} is not the per-output-unit norm; "
            "declare the torch constraint yourself with dim= on the (out, in, ...) weight"
        )
    if name == "NonNeg":
        return NonNegative()
    if name == "MaxNorm":
        return MaxNorm(max_value=float(config.get("max_value", 2.0)))
    if name == "UnitNorm":
        return UnitNorm()
    if name == "MinMaxNorm":
        return MinMaxNorm(
            min_value=float(config.get("min_value", 0.0)),
            max_value=float(config.get("max_value", 1.0)),
            rate=float(config.get("rate", 1.0)),
        )
    raise ValueError(
        f"fr.keras.from_layer: {what}: unsupported constraint {name!r}; supported: NonNeg, "
        "MaxNorm, UnitNorm, MinMaxNorm"
    )


def from_layer(
    module: nn.Module,
    name: str,
    *,
    kernel_regularizer: Any = None,
    bias_regularizer: Any = None,
    activity_regularizer: Any = None,
    kernel_constraint: Any = None,
    bias_constraint: Any = None,
    per_batch: bool = False,
) -> dict[str, float]:
    """Declare a Keras layer's regularization arguments on ``module`` (its ``weight`` is the
    kernel, its ``bias`` the bias) and return the strengths of the declared terms, named
    ``{name}_kernel_l1``, ``{name}_kernel_l2``, ``{name}_bias_l1``, ``{name}_bias_l2``,
    ``{name}_kernel_constraint``, ``{name}_bias_constraint`` (see the module's table).
    ``activity_regularizer`` is declared with :func:`funcreg.activity.declare`
    (``per_batch`` as there)."""
    if not name.isidentifier():
        raise ValueError(f"fr.keras.from_layer: name must be an identifier, got {name!r}")
    terms: dict[str, Penalty] = {}
    strengths: dict[str, float] = {}
    for part, select, reg in (
        ("kernel", "weight", kernel_regularizer),
        ("bias", "bias", bias_regularizer),
    ):
        if reg is None:
            continue
        for kind, (pen, strength) in _regularizer(f"{part}_regularizer", reg).items():
            terms[f"{name}_{part}_{kind}"] = type(pen)(select)
            strengths[f"{name}_{part}_{kind}"] = strength
    for part, select, con in (
        ("kernel", "weight", kernel_constraint),
        ("bias", "bias", bias_constraint),
    ):
        if con is not None:
            c = _constraint(f"{part}_constraint", con)
            terms[f"{name}_{part}_constraint"] = _with_select(c, select)
    if activity_regularizer is not None:
        kind, config = _config("activity_regularizer", activity_regularizer)
        _regularizer("activity_regularizer", activity_regularizer)  # the same checks
        _activity.declare(
            module,
            _activity.L1L2(
                l1=float(config.get("l1", 0.0)) if kind in ("L1", "L1L2") else 0.0,
                l2=float(config.get("l2", 0.0)) if kind in ("L2", "L1L2") else 0.0,
                per_batch=per_batch,
            ),
        )
    if terms:
        regularize(module, **terms)
    return strengths


def _with_select(c: Constraint, select: str) -> Constraint:
    return dataclasses.replace(c, select=select)
