"""Proximal Newton for smooth, non-quadratic losses with ``L1`` terms (L1 logistic, Poisson,
...) and moderate ``P`` (glmnet's outer loop, with the exact Hessian).

Per model, from its start ``x`` (``F = f + h``, ``h(x) = Σ_j τ_j |x_j|``)::

    repeat
        f(x), g = ∇f(x), H = ∇²f(x)               (autograd, solver's dtype)
        stop when the stopping rule of solve holds at x, with L = λ_max(H)
        w = argmin_w ½ (w − x)ᵀH(w − x) + gᵀ(w − x) + h(w)
            = the Lasso on the Gram matrix H with linear term Hx − g (:func:`feature_sign`;
              where that fails, funcreg._lasso.fista_lasso with its Newton polish)
        d = w − x;  Δ = gᵀd + h(x + d) − h(x)  (< 0 unless x is optimal)
        t = 1, ½, ¼, ... until F(x + t d) ≤ F(x) + ¼ t Δ     (Armijo; t = 1 when Δ is
                                                        round-off: near the solution)
        x ← x + t d

Near the solution ``t = 1`` and the iteration converges quadratically (the active set is
fixed, the Hessian exact, the inner Lasso solved exactly). **Warm starts:** the models run
one after the other, largest total threshold first (a path from the sparse end, as glmnet),
and each starts from the previous model's solution where that has a lower objective than
its own start ``x_0`` (the stopping rule's scale keeps ``‖∇f(x_0)‖`` of the given start, so
the test is the same either way). Where only the ``L1`` strengths differ between models
(``shared``), the first step of a warm-started model reuses ``f``, ``∇f`` and ``∇²f`` at the
previous solution. (On ``load_breast_cancer`` with 10 values of ``C`` from 0.01 to 1: 5
Newton iterations per model at ``tol=1e-8``, 4 derivative evaluations of them new; 5–10
before, cold-started.)

The problems here are small (``P ≤ NEWTON_MAX``), where an eager torch call costs more than
its arithmetic. **The Hessian of a GLM-type loss** (:class:`Separable`): where the loss is
``F(u)`` of an affine ``u = Aθ + c`` (a linear model's outputs) with ``F`` a sum of
per-entry terms (glmnet's and IRLS's setting, found once per call on the autograd graph and
checked at a random probe), ``∇f = Aᵀ∇F(u)`` and ``∇²f = Aᵀ diag(F''(u)) A`` come from a
backward that stops at ``u`` and one double backward through ``F`` alone, then a product in
numpy; ``F'' ≥ 0`` makes this Hessian positive semidefinite by its form. Every stop (and
every 8th step) is checked with autograd's own gradient; where it disagrees the model goes
on without the structure. Otherwise the Hessian comes from one backward with
``create_graph`` and one batched backward over the ``P`` unit vectors
(``is_grads_batched``; 4× cheaper than ``torch.func.hessian``'s forward-over-reverse here,
which remains the fallback). The dense ``P × P`` linear algebra (``λ_max``, the inner
Lasso, the stopping rule) runs in numpy float64 on the host, and the full step's value comes
with its derivatives (one forward for the line search's test and the next Hessian).

A Hessian that is not positive semidefinite (a non-convex loss) has no such model:
:func:`prox_newton` returns ``None`` and :func:`funcreg.solvers.solve` falls back to FISTA
with a warning that says so. Above ``NEWTON_MAX`` parameter entries the ``P × P`` Hessian is
not formed and FISTA runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.func import hessian

from . import _tree
from ._lasso import fista_lasso

NEWTON_MAX = 256  # form the P × P Hessian up to this many parameter entries
_MAX_NEWTON = 100  # outer iterations per model, at most
_ARMIJO = 0.25
_SIGN_STEPS_PER_P = 4  # feature-sign steps per coordinate before the FISTA fallback
_ONE = np.ones(1)


def feature_sign(G: np.ndarray, b: np.ndarray, tau: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """The minimiser of ``q(v) = ½ vᵀGv − bᵀv + Σ_j τ_j |v_j|`` (``G`` positive semidefinite,
    ``τ_j ≥ 0``; ``τ_j = 0``: a free coordinate) by feature-sign search (Lee, Battle, Raina
    & Ng 2007) from ``w``, or ``None`` after ``_SIGN_STEPS_PER_P · p`` steps (or at a
    singular support system). With ``A`` the non-zero and free coordinates and ``σ`` the
    signs on ``A``, repeat:

    * when ``A`` is optimal (last step full), the zero coordinate with the largest
      ``|∇_j| − τ_j > 0`` (``∇ = Gv − b``) joins with ``σ_j = −sign(∇_j)``; none: ``v`` is
      the minimiser (the optimality conditions hold on ``A`` by construction);
    * ``u_A = G_AA⁻¹ (b_A − τ_A σ_A)``; ``v`` moves to the point of the segment ``[v, u]``
      with the least ``q``: ``u`` or a point where a coordinate of ``A`` crosses zero
      (``q`` is convex on the segment and quadratic between those points); coordinates at
      zero leave ``A``.

    ``q`` decreases at every step, so no sign pattern repeats and the search is finite.
    Started at the current Newton iterate, near the solution, it is one solve on the
    support that is already right."""
    p = w.shape[0]
    free = tau <= 0
    eps = np.finfo(np.float64).eps
    slack = 64 * eps * (np.abs(b).max() + np.abs(G).max() * max(np.abs(w).max(), 1.0))
    v = w.copy()
    sigma = np.sign(v)
    sigma[free] = 0.0
    active = (v != 0) | free
    optimal = False

    def q(V: np.ndarray) -> np.ndarray:
        return 0.5 * ((V @ G) * V).sum(1) - V @ b + np.abs(V) @ tau

    penalised = ~free
    for _ in range(_SIGN_STEPS_PER_P * p + 10):
        if optimal:
            grad = G @ v - b
            excess = np.abs(grad) - tau
            excess[active] = -np.inf
            j = int(np.argmax(excess))
            if not excess[j] > slack:
                return v
            active[j] = True
            sigma[j] = -np.sign(grad[j])
        idx = np.flatnonzero(active)
        u = np.zeros_like(v)
        if idx.size:
            try:
                u[idx] = np.linalg.solve(G[idx[:, None], idx], b[idx] - tau[idx] * sigma[idx])
            except np.linalg.LinAlgError:
                return None
        if not np.isfinite(u).all():
            return None
        step = u - v
        crossing = active & penalised & (v * u < 0)
        cross = np.full(p, np.inf)
        if crossing.any():
            cross[crossing] = -v[crossing] / step[crossing]
            ts = np.unique(np.append(cross[cross < 1.0], 1.0))
            values = q(np.concatenate([v[None], v[None] + ts[:, None] * step[None]]))
        else:  # the segment's least q is at u
            ts, values = _ONE, q(np.stack([v, u]))
        at = int(values[1:].argmin())
        t = float(ts[at])
        if not values[1 + at] < values[0]:
            if not np.abs(step).max() <= 1e-9 * max(np.abs(v).max(), 1.0):
                return None  # no decrease along a real step: degenerate; the caller falls back
            t = 1.0  # u is v up to round-off (v already optimal on A): take it
        pen = idx[penalised[idx]]
        # a full step is optimal on A when every penalised coordinate kept its sign
        optimal = t == 1.0 and bool(((np.sign(u[pen]) == sigma[pen]) | (u[pen] == 0)).all())
        v = u if t == 1.0 else v + t * step
        if t < 1.0:
            v[cross == t] = 0.0
        sigma = np.sign(v)
        sigma[free] = 0.0
        active = (v != 0) | free
    return None


def derivatives(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(f(x), ∇f(x), ∇²f(x))``, detached: one backward with ``create_graph`` and one
    backward batched over the ``P`` unit vectors; ``torch.func.hessian`` where the batched
    backward is refused (an op without a batching rule)."""
    xr = x.detach().requires_grad_()
    with torch.enable_grad():
        v = f(xr)
        (g,) = torch.autograd.grad(v, xr, create_graph=True)
    if not g.requires_grad:  # f is linear in x
        return v.detach(), g.detach(), torch.zeros(x.numel(), x.numel()).to(x)
    eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
    try:
        (H,) = torch.autograd.grad(g, xr, eye, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        with torch.enable_grad():
            H = hessian(f)(x.detach())
    if H is None:
        H = torch.zeros_like(eye)
    return v.detach(), g.detach(), H.detach()


def prox_newton(
    value: Callable[[Tensor, int], Tensor],
    tau: Tensor,
    x0: Tensor,
    tol: float,
    max_iter: int,
    scale0: Tensor,
    shared: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """Proximal Newton (module docstring) for each model ``k``: ``value(θ, k)`` is model
    ``k``'s smooth objective on the flat params ``θ (P,)``, ``tau (K, P)`` its L1
    thresholds, ``x0 (K, P)`` its start, ``scale0 (K,)`` ``max(‖∇f(0)‖, ‖∇f(x_0)‖)``;
    ``shared``: every model has the same smooth objective (only the ``L1`` thresholds
    differ), so a warm start reuses ``f``, ``∇f`` and ``∇²f`` at the previous solution, and
    one :class:`Separable` structure, found once, serves every model.
    Returns ``(x, iterations, converged, floors, optimality)`` (iterations count Newton
    steps), or ``None`` when a Hessian is not positive semidefinite."""
    K, P = x0.shape
    out = x0.clone()
    iterations = torch.zeros(K, dtype=torch.int64)
    report = np.zeros((K, 3))  # converged, floor, optimality
    previous: _Point | None = None
    first: _Point | None = None  # the first model's start (its f(x_0) serves every model)
    structure: Separable | None = None
    searched = False
    # the largest thresholds first: each model warm-starts from a sparser solution
    for k in torch.argsort(tau.sum(1), descending=True, stable=True).tolist():

        def f(theta: Tensor, k: int = k) -> Tensor:
            return value(theta, k)

        t_k = tau[k].detach().cpu().double().numpy()
        start = _Point(x0[k])
        if shared and first is not None and torch.equal(first.x, start.x):
            start.fx = first.fx
        first = first or start
        if previous is not None:
            again = previous if shared else _Point(previous.x)
            with torch.no_grad():
                if again.objective(f, t_k) < start.objective(f, t_k):
                    start = again
        if not shared or not searched:  # shared: one search serves every model
            structure, searched = Separable.find(f, start.x), True
        got = _one_model(f, t_k, start, tol, max_iter, float(scale0[k]), structure)
        if got is None:
            return None
        previous, iterations[k], report[k] = got
        out[k] = previous.x
    rep = torch.from_numpy(report).to(x0)
    dev = x0.device
    return out, iterations.to(dev), rep[:, 0] > 0, rep[:, 1], rep[:, 2]


class Separable:
    """``f(θ) = F(u(θ))`` with ``u (m,)`` affine in ``θ`` (``u = Aθ + c``) and ``F`` a sum of
    per-entry terms ``Σ_i F_i(u_i)``, as a GLM's loss of a linear model's outputs (glmnet's
    and IRLS's setting): then ``∇²f(θ) = Aᵀ diag(F''(u)) A``, and the Hessian costs one
    backward to ``u`` with ``create_graph`` and one double backward through ``F`` alone
    (the per-entry second derivatives ``F''(u) = ∇²F(u) 1`` for a separable ``F``) instead
    of a backward batched over the ``P`` unit vectors.

    :meth:`find` looks for ``u`` on the autograd graph of ``f(x)``: a tensor through which
    every path from ``θ`` to the value runs (a cut), nearest the value first; ``A`` is its
    Jacobian at ``x`` (a backward from ``u`` with ``create_graph`` and one batched over the
    ``P`` unit vectors). It is accepted only
    when, in float64-scale tolerances, ``∇f = Aᵀ ∇_u F`` at ``x`` and at a seeded random
    probe ``z``, and there ``∇²f(z) w = Aᵀ (F''(u) ⊙ A w)`` for a seeded random ``w``
    (one Hessian-vector product: affine ``u`` and separable ``F``). Each later evaluation
    finds ``u`` by the same route through the graph (node types checked; any change: the
    general :func:`derivatives`). The solver's stopping rule and line search use ``f`` and
    its gradient themselves, so the solutions do not rest on this structure."""

    def __init__(self, route: list[tuple[int, str]], output_nr: int, A: np.ndarray) -> None:
        self.route, self.output_nr, self.A = route, output_nr, A

    @staticmethod
    def find(f: Callable[[Tensor], Tensor], x: Tensor) -> Separable | None:
        """The structure of ``f`` around ``x`` (class docstring), or ``None``."""
        try:
            with torch.enable_grad():
                return _find_separable(f, x.detach())
        except Exception:  # noqa: BLE001 - any failure means: not recognised
            return None

    def edge(self, v: Tensor) -> GradientEdge | None:
        """The edge of ``u`` in the graph of the value ``v``, by the stored route."""
        node = v.grad_fn
        for index, name in self.route:
            if node is None or index >= len(node.next_functions):
                return None
            node = node.next_functions[index][0]
            if node is None or type(node).__name__ != name:
                return None
        return GradientEdge(node, self.output_nr) if node is not None else None

    def derivatives(
        self, f: Callable[[Tensor], Tensor], x: Tensor
    ) -> tuple[float, np.ndarray, np.ndarray] | None:
        """``(f(x), Aᵀ∇F(u(x)), F''(u(x)))`` in float64 numpy (the gradient through the
        structure: the backward stops at ``u``), or ``None`` where ``u`` is not found by the
        stored route."""
        xr = x.detach().requires_grad_()
        with torch.enable_grad():
            v = f(xr)
            e = self.edge(v)
            if e is None:
                return None
            (gu,) = torch.autograd.grad(v, e, create_graph=True)
            if gu.numel() != self.A.shape[0]:
                return None
            d = _second(gu, e)
        return float(v.detach()), self.A.T @ _np(gu), _np(d)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy().reshape(-1)


def _second(gu: Tensor, e: GradientEdge, keep: bool = False) -> Tensor:
    """``∇²F(u) 1``: the per-entry second derivatives of a separable ``F`` (``keep``: the
    graph stays for another backward)."""
    if not gu.requires_grad:  # F is linear in u
        return torch.zeros_like(gu)
    (d,) = torch.autograd.grad(gu, e, torch.ones_like(gu), retain_graph=keep, allow_unused=True)
    return torch.zeros_like(gu) if d is None else d


_SEPARABLE_MAX = 1 << 22  # entries of A (m · P), at most
_CUTS_TRIED = 4


def _find_separable(f: Callable[[Tensor], Tensor], x: Tensor) -> Separable | None:
    """:meth:`Separable.find` (raises on any failure)."""
    P = x.numel()
    xr = x.requires_grad_()
    v = f(xr)
    if v.numel() != 1 or v.grad_fn is None:
        return None
    gen = torch.Generator().manual_seed(2)
    z = (x.detach() + torch.randn(P, generator=gen, dtype=torch.float64).to(x)).requires_grad_()
    w = torch.randn(P, generator=gen, dtype=torch.float64).numpy()
    for route, output_nr in _cuts(v.grad_fn, xr)[:_CUTS_TRIED]:
        found = Separable(route, output_nr, np.zeros((0, P)))
        e = found.edge(v)
        assert e is not None
        (g, gu) = torch.autograd.grad(v, cast(Any, [xr, e]), retain_graph=True)
        m = gu.numel()
        if m * P > _SEPARABLE_MAX:
            continue
        # J = ∂u/∂θ: r(w) = Jᵀw by one backward from u with create_graph, then the rows of
        # Jᵀ as ∂r/∂w by one backward batched over the P unit vectors (batching over the m
        # entries of u instead multiplies by an m × m identity)
        w_u = torch.zeros_like(gu, requires_grad=True)
        (r,) = torch.autograd.grad([e], [xr], [w_u], create_graph=True, retain_graph=True)
        eye = torch.eye(P, dtype=r.dtype, device=r.device)
        (Jt,) = torch.autograd.grad(r, w_u, eye, is_grads_batched=True)
        A = _np(Jt).reshape(P, m).T.copy()
        found.A = A
        if not _close(_np(g), A.T @ _np(gu), A.T @ np.abs(_np(gu))):
            continue
        vz = f(z)
        ez = found.edge(vz)
        if ez is None:
            continue
        gz, guz = torch.autograd.grad(vz, cast(Any, [z, ez]), create_graph=True)
        dz = _np(_second(guz, ez, keep=True))
        (hw,) = torch.autograd.grad(gz, z, torch.from_numpy(w).to(z), allow_unused=True)
        hw_n = np.zeros(P) if hw is None else _np(hw)
        model = A.T @ (dz * (A @ w))
        size = np.abs(A).T @ (np.abs(dz) * np.abs(A @ w))
        if _close(_np(gz), A.T @ _np(guz), np.abs(A).T @ np.abs(_np(guz))) and _close(
            hw_n, model, size
        ):
            return found
    return None


def _close(a: np.ndarray, b: np.ndarray, size: np.ndarray) -> bool:
    """``a`` equals ``b`` up to round-off in sums whose terms have magnitudes ``size``."""
    return bool(np.linalg.norm(a - b) <= 1e-8 * (np.linalg.norm(size) + 1e-300))


def _cuts(root: Any, leaf: Tensor) -> list[tuple[list[tuple[int, str]], int]]:
    """The tensors of the graph under ``root`` through which every path to ``leaf`` runs,
    nearest ``root`` first, each as ``(route, output_nr)``: the route is the ``(index,
    node type)`` steps through ``next_functions`` from ``root`` to the node that made it."""
    order: list[Any] = []  # post-order: children before parents
    kids: dict[int, list[tuple[int, Any, int]]] = {}
    reaches: dict[int, bool] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            reaches[key] = getattr(node, "variable", None) is leaf or any(
                reaches[id(c)] for _, c, _ in kids[key]
            )
            order.append(node)
            continue
        if key in kids:
            continue
        kids[key] = [(i, c, nr) for i, (c, nr) in enumerate(node.next_functions) if c is not None]
        stack.append((node, True))
        stack.extend((c, False) for _, c, _ in kids[key] if id(c) not in kids)
    if not reaches.get(id(root), False):
        return []
    down: dict[int, int] = {}  # paths from a node to the leaf
    for node in order:
        key = id(node)
        leafy = getattr(node, "variable", None) is leaf
        down[key] = 1 if leafy else sum(down[id(c)] for _, c, _ in kids[key] if reaches[id(c)])
    up: dict[int, int] = {id(root): 1}  # paths from root to a node
    into: dict[tuple[int, int], int] = {}  # paths from root into a tensor (node, output_nr)
    parent: dict[int, tuple[Any, int]] = {}
    topo = order[::-1]
    rank = {id(n): r for r, n in enumerate(topo)}
    for node in topo:
        key = id(node)
        for i, c, nr in kids[key]:
            if not reaches[id(c)]:
                continue
            up[id(c)] = up.get(id(c), 0) + up[key]
            into[(id(c), nr)] = into.get((id(c), nr), 0) + up[key]
            parent.setdefault(id(c), (node, i))
    total = down[id(root)]
    nodes = {id(n): n for n in order}
    found = []
    for (key, nr), count in into.items():
        if count * down[key] == total:
            route: list[tuple[int, str]] = []
            at = nodes[key]
            while id(at) != id(root):
                above, i = parent[id(at)]
                route.append((i, type(at).__name__))
                at = above
            found.append((rank[key], route[::-1], nr))
    found.sort(key=lambda t: t[0])
    return [(route, nr) for _, route, nr in found]


class _Point:
    """A point ``x`` (in the solver's dtype) with its float64 copy and, once computed,
    ``f(x)``, ``∇f(x)``, ``∇²f(x)`` (float64 numpy) and ``λ_max(∇²f(x))``."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.detach()
        self.xn = self.x.cpu().double().numpy()
        self.fx: float | None = None
        self.g = self.H = np.zeros(0)
        self.top = 0.0
        self._pending: tuple[float, np.ndarray, np.ndarray] | None = None
        self.structural = False  # g is Aᵀ∇F(u) of a Separable structure, not autograd's

    def prefetch(self, f: Callable[[Tensor], Tensor], structure: Separable | None) -> None:
        """With a :class:`Separable` structure: ``f``, ``∇f`` and ``F''`` here at once (one
        forward serves the line search's test and, when the point is taken, the Hessian)."""
        if structure is not None and self.fx is None:
            self._pending = structure.derivatives(f, self.x)
            if self._pending is not None:
                self.fx = self._pending[0]

    def objective(self, f: Callable[[Tensor], Tensor], tau: np.ndarray) -> float:
        """``F(x) = f(x) + Σ_j τ_j |x_j|``."""
        if self.fx is None:
            self.fx = float(f(self.x))
        return self.fx + float(tau @ np.abs(self.xn))

    def differentiate(self, f: Callable[[Tensor], Tensor], structure: Separable | None) -> bool:
        """Compute ``f``, ``∇f``, ``∇²f`` and ``λ_max`` here (once); ``False`` when the
        Hessian is not positive semidefinite. With a :class:`Separable` structure and
        ``F''(u) ≥ 0`` the Hessian ``Aᵀ diag(F'') A`` is positive semidefinite by its form;
        otherwise it is formed by :func:`derivatives` and its eigenvalues are checked."""
        if self.H.size:
            return True
        got = self._pending
        if got is None and structure is not None:
            got = structure.derivatives(f, self.x)
        if got is not None and float(got[2].min(initial=0.0)) >= 0.0:
            self.fx, self.g, d = got
            self.structural = True
            A = structure.A  # type: ignore[union-attr]
            self.H = (A.T * d) @ A
            self.top = max(float(np.linalg.eigvalsh(self.H)[-1]), _TINY)
            return True
        fx, g, H = derivatives(f, self.x)
        self.fx, self.g = float(fx), g.cpu().double().numpy()
        Hn = H.cpu().double().numpy()
        self.H = 0.5 * (Hn + Hn.T)
        eig = np.linalg.eigvalsh(self.H) if self.H.size else np.zeros(1)
        self.top = max(float(eig[-1]), _TINY)
        return not float(eig[0]) < -1e-8 * self.top


_TINY = float(np.finfo(np.float64).tiny) ** 0.5


def _one_model(
    f: Callable[[Tensor], Tensor],
    tau: np.ndarray,
    at: _Point,
    tol: float,
    max_iter: int,
    scale0: float,
    structure: Separable | None = None,
) -> tuple[_Point, int, np.ndarray] | None:
    """Proximal Newton for one model from ``at``: ``(point, iterations, [converged, floor,
    optimality])``, or ``None`` at a Hessian that is not positive semidefinite. The
    stopping rule is :func:`funcreg._tree.stopping_rule` in the solver's dtype (its
    round-off floor); the rest is float64 numpy on ``P`` entries."""
    dtype = at.x.dtype
    report = np.zeros(3)
    eps = torch.finfo(dtype).eps
    for it in range(1, min(max_iter, _MAX_NEWTON) + 1):
        if not at.differentiate(f, structure):
            return None
        assert at.fx is not None
        stop, report = _test(at, tau, scale0, tol, dtype)
        if at.structural and (stop or it % _CHECK_EVERY == 0):
            # a stop is certified with autograd's own gradient (and the structure's is
            # checked every few steps); one far from the structure's means the structure
            # does not hold here: this model goes on without it, from this point
            if not _certify(f, at, scale0):
                structure, at = None, _Point(at.x)
                continue
            stop, report = _test(at, tau, scale0, tol, dtype)
        if stop:
            return at, it, report
        x, g, H = at.xn, at.g, at.H
        b = H @ x - g
        w = feature_sign(H, b, tau, x)
        if w is None:  # the iterative inner solve, exact once its polish finds the support
            Ht, bt = torch.from_numpy(H).to(at.x), torch.from_numpy(b).to(at.x)[None]
            tt = torch.from_numpy(tau).to(at.x)[None]
            inner_tol = max(tol * 1e-2, 1e-15)
            got = fista_lasso(Ht, bt, tt, at.x[None], 10_000, inner_tol, None, True)[0][0]
            w = got.cpu().double().numpy()
        d = w - x
        h_old, h_new, gd = float(tau @ np.abs(x)), float(tau @ np.abs(w)), float(g @ d)
        delta = gd + h_new - h_old
        noise = 64 * eps * (abs(gd) + h_new + h_old)
        if delta > noise:  # not a descent direction: no better model step
            if at.structural:  # the report with autograd's gradient, as at a stop
                if not _certify(f, at, scale0):
                    structure, at = None, _Point(at.x)
                    continue
                _, report = _test(at, tau, scale0, tol, dtype)
            return at, it, report
        step = 1.0  # a decrease within round-off of Δ: take the Newton step as it is
        trial = _Point(torch.from_numpy(x + d).to(at.x))
        if delta < -noise:
            assert at.fx is not None
            total = at.fx + h_old
            # the full step is taken almost always: its value comes with its derivatives
            trial.prefetch(f, structure)
            with torch.no_grad():
                for _ in range(40):
                    if trial.objective(f, tau) <= total + _ARMIJO * step * delta:
                        break
                    step *= 0.5
                    trial = _Point(torch.from_numpy(x + step * d).to(at.x))
        at = trial
    # the last step's point is not the one certified above
    report[0] = 0.0
    return at, max_iter, report


def _test(
    at: _Point, tau: np.ndarray, scale0: float, tol: float, dtype: torch.dtype
) -> tuple[bool, np.ndarray]:
    """The stopping rule at ``at`` with ``L = λ_max(∇²f)`` (:func:`_rule`)."""
    x, g, top = at.xn, at.g, at.top
    z = x - g / top
    moved = np.sign(z) * np.maximum(np.abs(z) - tau / top, 0.0)  # prox.soft_threshold
    norms = [float(np.linalg.norm(v)) for v in (x - moved, g, x)]
    return _rule(top * norms[0], norms[1], scale0, norms[2], top, tol, dtype)


_CHECK_EVERY = 8  # Newton steps on a structure's gradient between checks against autograd's


def _certify(f: Callable[[Tensor], Tensor], at: _Point, scale0: float) -> bool:
    """Replace the structure's gradient at ``at`` by autograd's; ``False`` where they differ
    by more than round-off (relative to the stopping rule's scale)."""
    g_true = _np(gradient(f, at.x))
    size = max(scale0, float(np.linalg.norm(g_true)))
    ok = bool(np.linalg.norm(g_true - at.g) <= 1e-10 * size)
    at.g, at.structural = g_true, False
    return ok


def gradient(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``∇f(x)`` by one plain backward, detached (zeros where ``f`` does not depend on
    ``x``): cheaper than ``torch.func.grad`` for one small model."""
    xr = x.detach().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(xr), xr, allow_unused=True)
    return torch.zeros_like(x) if g is None else g.detach()


_NUMPY_DTYPES: dict[torch.dtype, Any] = {torch.float64: np.float64, torch.float32: np.float32}


def _rule(
    mapping: float,
    gnorm: float,
    scale: float,
    xnorm: float,
    top: float,
    tol: float,
    dtype: torch.dtype,
) -> tuple[bool, np.ndarray]:
    """:func:`funcreg._tree.stopping_rule` and :func:`~funcreg._tree.floor_ratio` on these
    numbers rounded to the solver's ``dtype`` (numpy scalars for float64 and float32, the
    same arithmetic without a torch call): ``(stop, [converged, floor, optimality])``."""
    nd = _NUMPY_DTYPES.get(dtype)
    if nd is None:
        numbers = torch.tensor([mapping, gnorm, scale, xnorm], dtype=dtype)
        m_t, g_t, s_t, x_t = numbers.unbind()
        stop_t, ok_t = _tree.stopping_rule(m_t, g_t, s_t, top, x_t, tol)
        floor_t = _tree.floor_ratio(g_t, s_t, top, x_t)
        opt_t = m_t / torch.maximum(s_t, g_t)
        return bool(stop_t), np.array([float(ok_t), float(floor_t), float(opt_t)])
    m, gn, sc, xn, L = (nd(v) for v in (mapping, gnorm, scale, xnorm, top))
    c = nd(_tree.ROUNDOFF_FLOOR * np.finfo(nd).eps)
    ref = max(sc, gn)
    floor = c * (ref + L * xn)
    target = nd(tol) * ref
    ok = bool(m <= target) and bool(target >= floor)
    ratio = c * (1 + L * xn / max(ref, nd(np.finfo(nd).tiny)))
    opt = m / ref if ref > 0 else nd(np.inf if m > 0 else np.nan)
    return bool(m <= max(target, floor)), np.array([float(ok), float(ratio), float(opt)])
