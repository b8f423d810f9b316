"""The ``optimizer="secant"`` outer method of :func:`funcreg.tune`: safeguarded secant
(quasi-Newton) steps on the log-strengths, with cubic interpolation.

The outer objective ``E(θ)`` of a tuning problem has few variables and costs a full set of
inner solves per evaluation, so every evaluation should count. With ``x`` the flattened
``θ``, ``g = ∇E(x)`` (the hypergradient) and ``x_b`` the best point so far, the segment
``u = x − x_b`` carries ``φ(t) = E(x_b + t u)`` with ``φ(0), φ(1)`` and the slopes
``φ'(0) = g_bᵀu``, ``φ'(1) = gᵀu``; the cubic through them (Hermite) has, at ``t = 1``,
the curvature ``φ''(1) = 4 (φ'(1) − φ'(0)) − 6 (φ(1) − φ(0) − φ'(0))``. Each coordinate
gets a Newton step on a diagonal curvature: its own secant ``(g_i − g_b,i)/u_i``, all
scaled so that the curvature along ``u`` is the cubic's (in one dimension: exactly the
cubic's)::

    c_i = ρ (g_i − g_b,i) / u_i,   ρ = φ''(1) / (uᵀ(g − g_b)),   d_i = −g_i / c_i   (c_i > 0)
    d_i = −sign(g_i) · min(2 |u_i|, max_step)                                  (otherwise)

each ``|d_i| ≤ max_step``. Using the values as well as the slopes makes the steps robust to
the kinks of a Lasso's cross-validation curve (piecewise smooth: its hypergradient jumps
where the support changes). The first step has no curvature: the largest coordinate moves
by ``step`` (``d = −step · g / max|g|``). A point worse than the best is an overshoot: the
next one is the minimiser of the cubic on the segment (of the quadratic through ``φ(0)``,
``φ'(0)``, ``φ(1)`` where the cubic has none), ``t ∈ [0.1, 0.9]``. The search stops when
the proposed step is at most ``xtol`` in every coordinate (``xtol = 0.01``: strengths
within about 1% of a stationary point).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .optim import Optimizer, adam


class Secant:
    """Safeguarded diagonal secant steps on a dict of log-parameters (module docstring)."""

    def __init__(self, step: float = 0.5, max_step: float = 1.0, xtol: float = 0.01) -> None:
        for name, v in (("step", step), ("max_step", max_step), ("xtol", xtol)):
            if not v > 0:
                raise ValueError(f"tune: the secant search needs {name} > 0, got {v!r}")
        self.step0, self.max_step, self.xtol = step, max_step, xtol
        self.best: tuple[Tensor, float, Tensor] | None = None

    def propose(
        self, theta: Mapping[str, Tensor], value: float, grads: Mapping[str, Tensor]
    ) -> dict[str, Tensor] | None:
        """The next point after evaluating ``value`` and ``grads`` at ``theta``, or ``None``
        when the step would be below ``xtol`` (converged)."""
        keys = list(theta)
        x = torch.cat([theta[k].reshape(-1) for k in keys])
        g = torch.cat([grads[k].reshape(-1) for k in keys]).to(x)
        if self.best is None:
            self.best = (x, value, g)
            top = float(g.abs().max())
            if top == 0.0:
                return None
            d = -self.step0 * g / top
        else:
            xb, eb, gb = self.best
            u = x - xb
            s0, s1 = float(gb @ u), float(g @ u)
            rise = value - eb - s0  # φ(1) − φ(0) − φ'(0)
            if value <= eb:  # an improvement: Newton steps on the cubic's curvature
                self.best = (x, value, g)
                moved = u != 0
                c = torch.where(moved, (g - gb) / torch.where(moved, u, 1.0), 0.0)
                along = s1 - s0
                curv = 4 * along - 6 * rise
                c = c * (curv / along) if along > 0 and curv > 0 else torch.zeros_like(c)
                expand = -torch.sign(g) * (2 * u.abs()).clamp(max=self.max_step)
                expand = torch.where(moved, expand, -torch.sign(g) * self.step0)
                d = torch.where(c > 0, -g / torch.where(c > 0, c, 1.0), expand)
                d = d.clamp(-self.max_step, self.max_step)
                x0 = x
            else:  # an overshoot: back onto the segment from the best point
                d = min(max(_cubic_min(s0, s1, rise), 0.1), 0.9) * u
                x0 = xb
            if float(d.abs().max()) <= self.xtol:
                return None
            x = x0
        new = x + d
        out: dict[str, Tensor] = {}
        at = 0
        for k in keys:
            n = theta[k].numel()
            out[k] = new[at : at + n].reshape(theta[k].shape).to(theta[k].dtype)
            at += n
        return out


def _cubic_min(s0: float, s1: float, rise: float) -> float:
    """The minimiser in ``(0, 1)`` of the cubic ``φ`` with ``φ'(0) = s0``, ``φ'(1) = s1``
    and ``φ(1) − φ(0) − φ'(0) = rise``; else that of the quadratic through ``φ(0)``,
    ``φ'(0)`` and ``φ(1)``; else ``½``."""
    a = 3 * rise - (s1 - s0)  # φ(t) = φ(0) + s0 t + a t² + b t³
    b = (s1 - s0 - 2 * a) / 3
    if b != 0:
        disc = a * a - 3 * b * s0
        if disc >= 0:
            for t in ((-a + math.sqrt(disc)) / (3 * b), (-a - math.sqrt(disc)) / (3 * b)):
                if 0 < t < 1 and 2 * a + 6 * b * t > 0:
                    return t
    if rise > 0 and s0 < 0:
        return -s0 / (2 * rise)
    return 0.5


class Outer:
    """The outer loop of :func:`funcreg.tune` (exact solves and networks alike): its step
    rule, a :mod:`funcreg.optim` optimizer on ``θ`` (``None``: ``adam(lr=0.1)``) or
    ``"secant"`` (:class:`Secant`), and its stopping rules: ``‖∇E‖ ≤ gtol``
    (``"gradient"``), no relative improvement of the best value by more than ``tol`` in
    ``patience`` steps (``"patience"``), a secant step below ``xtol`` (``"xtol"``)."""

    def __init__(
        self,
        who: str,
        optimizer: Optimizer | str | None,
        theta: Mapping[str, Tensor],
        tol: float,
        patience: int,
        gtol: float,
        xtol: float,
    ) -> None:
        self.search: Secant | None = None
        if isinstance(optimizer, str):
            if optimizer != "secant":
                raise ValueError(
                    f"{who}: optimizer must be a funcreg.optim optimizer or 'secant', got "
                    f"{optimizer!r}"
                )
            self.search = Secant(xtol=xtol)
            optimizer = None
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{who}: optimizer= is the outer optimizer of the log-strengths: a funcreg.optim "
                f"optimizer (e.g. fr.optim.adam(0.1)) or 'secant', got {optimizer!r}"
            )
        self.opt = adam(lr=0.1) if optimizer is None else optimizer
        self.state = self.opt.init(dict(theta))
        self.tol, self.patience, self.gtol = tol, patience, gtol
        self.best = math.inf
        self.since = 0

    def record(self, value: float) -> bool:
        """Count an outer step's ``value``; whether it is the best so far."""
        b = self.best
        improved = not math.isfinite(b) or value < b - self.tol * abs(b)
        self.since = 0 if improved else self.since + 1
        if value < b:
            self.best = value
            return True
        return False

    def step(
        self,
        theta: Mapping[str, Tensor],
        value: float,
        grads: Mapping[str, Tensor],
        grad_norm: float,
    ) -> tuple[dict[str, Tensor] | None, str | None]:
        """``(next θ, None)``, or ``(None, why)`` when a stopping rule holds (after
        :meth:`record` of this step's value)."""
        if grad_norm <= self.gtol:
            return None, "gradient"
        if self.since >= self.patience:
            return None, "patience"
        if self.search is None:
            nxt, self.state = self.opt.step(dict(grads), self.state, dict(theta), {})
            return nxt, None
        proposed = self.search.propose(theta, value, grads)
        return (None, "xtol") if proposed is None else (proposed, None)
