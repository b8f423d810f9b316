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

Where each kind lives (all importable from here and from ``funcreg``):

* ``_penalty_base`` — :class:`Penalty` (this protocol), :func:`register_penalty`, and the
  kernels the kinds share (``weight=`` factors, step scaling, ``dim=`` axes);
* ``_penalty_separable`` — :class:`L1`, :class:`L2`, :class:`ElasticNet`;
* ``_penalty_group`` — :class:`GroupLasso`, :class:`SparseGroupLasso`;
* ``_penalty_matrix`` — :class:`Nuclear`, :class:`SpectralNorm`, :class:`Orthogonal`;
* ``_penalty_nonconvex`` — :class:`MCP`, :class:`SCAD` (the strength is the λ inside);
* ``_penalty_constraint`` — :class:`Constraint`, :class:`NonNegative`, :class:`Box`,
  :class:`MaxNorm`, :class:`UnitNorm`, :class:`MinMaxNorm`.

Adding a penalty: one ``@register_penalty`` class in the module of its kind (a new kind:
a new ``_penalty_<kind>.py`` that imports ``_penalty_base``, never this module, with a
floor in ``tests/test_architecture.py``), re-exported below and in
``funcreg/__init__.py``. Everything the solvers, ``strength_max``, ``path`` and
``cross_validate`` need to know about it (``_value``, ``_prox``/``has_prox``, ``smooth``,
``elementwise``, ``zero_threshold``, ``nonzero_groups``) is a member of the class; no other
module changes. A penalty defined outside the package works the same way
(``tests/test_new_penalty.py``).
"""

from __future__ import annotations

from ._penalty_base import ClosedForm, Dim, Penalty, Ref, as_dims, register_penalty
from ._penalty_constraint import Box, Constraint, MaxNorm, MinMaxNorm, NonNegative, UnitNorm
from ._penalty_group import GroupLasso, SparseGroupLasso
from ._penalty_matrix import Nuclear, Orthogonal, SpectralNorm
from ._penalty_nonconvex import MCP, SCAD
from ._penalty_separable import L1, L2, ElasticNet

# by kind, in the order of the list above
__all__ = ["Penalty", "register_penalty", "ClosedForm", "Ref", "Dim", "as_dims"]
__all__ += ["L1", "L2", "ElasticNet"]
__all__ += ["GroupLasso", "SparseGroupLasso"]
__all__ += ["Nuclear", "SpectralNorm", "Orthogonal"]
__all__ += ["MCP", "SCAD"]
__all__ += ["Constraint", "NonNegative", "Box", "MaxNorm", "UnitNorm", "MinMaxNorm"]
