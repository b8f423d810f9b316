"""Quadratic losses found by their structure, and the Lasso on their Gram matrix.

A loss is quadratic in its params ``θ`` (all entries flattened into one vector of ``P``)
exactly when its Hessian-vector products do not depend on ``θ``; then

    ``f(θ) = c − bᵀθ + ½ θᵀHθ``,   ``∇f(θ) = Hθ − b``,   ``H = ∇²f(0)``, ``b = −∇f(0)``.

:func:`extract` computes ``c``, ``b`` and ``H`` at ``θ = 0`` (``H`` by one ``jacfwd`` of
the gradient: ``P`` Hessian-vector products at once; where forward mode fails, as through
``F.mse_loss``'s backward, by reverse over reverse, :func:`funcreg._newton.derivatives`) in
float64, and accepts them only when
two seeded random probes ``z`` — one of scale 1, one of scale ``100 (1 + ‖b‖/‖H‖)`` —
satisfy, in float64,

    ``|f(z) − (c − bᵀz + ½ zᵀHz)| ≤ 1e-6 (|c| + |bᵀz| + ½|zᵀHz|)`` and
    ``‖∇f(z) − (Hz − b)‖ ≤ 1e-6 (‖b‖ + ‖Hz‖)``.

A quadratic passes to round-off (about ``1e-14``); a logistic, Poisson or Huber loss (with
a threshold below the probes' residuals) fails by orders of magnitude. A probe cannot see a
loss that is quadratic only on a region around both probes; :func:`funcreg.solvers.solve`
therefore also certifies every returned point with the *original* loss, and re-solves on
the general route any model that this certificate does not accept.

**The Lasso on the Gram matrix** (:func:`lasso_route`). When every non-smooth term is an
exact ``L1`` without ``toward=`` and there are no smooth terms, split ``θ = (u, v)``: ``u``
the coordinates some ``L1`` term selects (thresholds ``τ``), ``v`` the free ones (e.g. an
intercept). Minimising over ``v`` in closed form, ``v(u) = H_vv⁻¹ (b_v − H_vu u)``, leaves
a Lasso in ``u`` alone,

    ``G = H_uu − H_uv H_vv⁻¹ H_vu``,   ``r = b_u − H_uv H_vv⁻¹ b_v``

(the Schur complement; for least squares with an intercept this is centring ``X`` and
``y``, as glmnet and scikit-learn do), solved by :func:`funcreg._lasso.fista_lasso` — for
thresholds that are one pattern scaled per model (a grid of one ``L1`` term) started from
the exact solutions of the homotopy (:mod:`funcreg._homotopy`: every strength for a small
``u``, the sparse top of the path for a large one; see its ``exact_start``), so that the
loop's first test certifies them: in float64 only (in a lower work dtype the
rule's floor is above what the start would add), and not with a given ``L0``
(``lipschitz=``: plain FISTA from the given start, as documented there). When
``H_vv`` is not positive definite (a free coordinate the loss does not determine), there is
no such elimination and the general loop runs instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacfwd, jvp, vmap

from ._homotopy import HARD_MAX, exact_start
from ._lasso import fista_lasso, gram_lipschitz
from ._newton import derivatives, gradient
from ._tree import Params
from .losses import LeastSquares
from .penalties import L1
from .spec import Spec

DETECT_MAX = 1024  # look for a quadratic automatically up to this many parameter entries
_PROBE_RTOL = 1e-6
_FORWARD_TRIAL_MIN = 256  # from this many entries, try forward mode on one tangent first
_LINE_RTOL = 1e-3  # the quick test's bound: far above round-off, only a clear non-quadratic


class Layout:
    """The flattening of a params dict ``{name: shape}`` into one vector of ``P`` entries
    (names in order, each entry row-major)."""

    def __init__(self, single: Mapping[str, Tensor]) -> None:
        self.names = list(single)
        self.shapes = {n: tuple(v.shape) for n, v in single.items()}
        self.sizes = [int(v.numel()) for v in single.values()]
        self.P = sum(self.sizes)
        self.offsets: dict[str, int] = {}
        at = 0
        for n, size in zip(self.names, self.sizes, strict=True):
            self.offsets[n] = at
            at += size

    def flatten(self, stacked: Mapping[str, Tensor]) -> Tensor:
        """``{name: (K, *shape)}`` -> ``(K, P)``."""
        k = stacked[self.names[0]].shape[0]
        return torch.cat([stacked[n].reshape(k, -1) for n in self.names], 1)

    def unflatten(self, flat: Tensor) -> Params:
        """``(K, P)`` -> ``{name: (K, *shape)}``."""
        parts = torch.split(flat, self.sizes, dim=1)
        return {
            n: v.reshape(flat.shape[0], *self.shapes[n])
            for n, v in zip(self.names, parts, strict=True)
        }

    def single(self, theta: Tensor) -> Params:
        """``(P,)`` -> one model's ``{name: shape}`` (slices of ``theta``, no copy)."""
        return {
            n: theta[self.offsets[n] : self.offsets[n] + size].reshape(self.shapes[n])
            for n, size in zip(self.names, self.sizes, strict=True)
        }


class Quadratic:
    """``f(θ) = c − bᵀθ + ½ θᵀHθ`` on params of the given :class:`Layout`: ``H (P, P)``,
    ``b (P,)``, ``c`` a 0-dim tensor. It offers what the Gram oracle of
    :func:`~funcreg.solvers.solve` needs (``hessian_apply``, ``linear_term``).
    ``homotopy``: whether :func:`lasso_route` may start from the homotopy's exact solutions
    (``False`` for a path's cold starts, kept for comparison)."""

    def __init__(
        self, H: Tensor, b: Tensor, c: Tensor, layout: Layout, homotopy: bool = True
    ) -> None:
        self.H, self.b, self.c, self.layout = H, b, c, layout
        self.homotopy = homotopy

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.layout.shapes)

    def __call__(self, params: Mapping[str, Tensor]) -> Tensor:
        theta = self.layout.flatten({n: v[None] for n, v in params.items()})[0].to(self.H.dtype)
        return self.c - self.b @ theta + 0.5 * theta @ (self.H @ theta)

    def hessian_apply(self, theta: Params) -> Params:
        """``H θ`` on stacked params."""
        return self.layout.unflatten(self.layout.flatten(theta) @ self.H)

    def linear_term(self) -> Params:
        """``b`` as one model's params."""
        return self.layout.single(self.b)

    def to(self, dtype: torch.dtype) -> Quadratic:
        return Quadratic(
            self.H.to(dtype), self.b.to(dtype), self.c.to(dtype), self.layout, self.homotopy
        )

    def cold(self) -> Quadratic:
        """The same quadratic, solved without the homotopy's starting points."""
        return Quadratic(self.H, self.b, self.c, self.layout, homotopy=False)

    def settle(self, zero: Iterable[str]) -> Params | None:
        """The minimiser over the entries outside the params ``zero``, those held at zero:
        ``θ_v = H_vv⁻¹ b_v`` (``v`` the other entries; e.g. the intercept of a linear model
        with its weights at zero: the mean of the targets), in ``H``'s dtype; ``None`` where
        ``H_vv`` is not positive definite (a free entry the loss does not determine)."""
        free = torch.ones(self.layout.P, dtype=torch.bool, device=self.H.device)
        views = self.layout.single(free)  # views of ``free``, param by param
        for n in zero:
            views[n].fill_(False)
        v = free.nonzero().squeeze(1)
        theta = torch.zeros_like(self.b)
        if v.numel():
            chol, info = torch.linalg.cholesky_ex(self.H[v][:, v])
            if int(info) != 0:
                return None
            theta[v] = torch.cholesky_solve(self.b[v, None], chol)[:, 0]
        return {n: t.clone() for n, t in self.layout.single(theta).items()}


class NotQuadraticLoss:
    """A loss that :func:`extract` examined and found not quadratic, called as the loss
    itself: :func:`~funcreg.solvers.solve` does not look again (a path looks once for all
    its solves; on ``load_breast_cancer``'s L1 logistic path one look is ~4% of the time)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)


def from_least_squares(ls: LeastSquares) -> Quadratic | None:
    """The :class:`Quadratic` of a one-output ``least_squares`` loss (``weight (1, p)``
    and, with an intercept, ``bias (1,)``); ``None`` for several outputs."""
    if ls.Y.shape[1] != 1:
        return None
    X = ls.X
    single = {n: X.new_zeros(s) for n, s in ls.shapes.items()}
    layout = Layout(single)
    H, b = ls.gram, ls.xty[0]
    if ls.fit_intercept:
        mu = ls.x_mean[:, None]
        one = X.new_ones(1, 1)
        H = torch.cat([torch.cat([H, mu], 1), torch.cat([mu.T, one], 1)], 0)
        b = torch.cat([b, ls.y_mean])
    return Quadratic(H, b, ls.const, layout)


def _float64(v: Any) -> Any:
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.to(torch.float64)
    return v


def extract(
    fn: Callable[..., Tensor], single: Mapping[str, Tensor], data: tuple[Any, ...]
) -> tuple[Quadratic | None, str]:
    """``(Quadratic, "")`` when ``fn(params, *data)`` is a quadratic in ``params`` (module
    docstring: ``H``, ``b``, ``c`` at 0 in float64, checked at two random probes), else
    ``(None, why)``. A gradient that is clearly not affine along a random line
    (:func:`_bent`) rules the loss out before ``H`` is formed."""
    layout = Layout(single)
    ref = next(iter(single.values()))
    data64 = tuple(_float64(d) for d in data)

    def value(theta: Tensor) -> Tensor:
        return fn(layout.single(theta), *data64)

    both = grad_and_value(value)

    def with_aux(theta: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        g, v = both(theta)
        return g, (g, v)

    zero = torch.zeros(layout.P, dtype=torch.float64, device=ref.device)
    bent = _bent(value, zero)
    if bent > _LINE_RTOL:  # three gradients, not the Hessian, rule it out
        return None, (
            f"its gradient is not affine along a random line ({bent:.1e} relative: the "
            "Hessian is not constant)"
        )
    try:  # H, ∇f(0) and f(0) from one forward-over-reverse pass
        if layout.P >= _FORWARD_TRIAL_MIN:  # where forward mode fails, fail on one tangent
            jvp(grad(value), (zero,), (torch.ones_like(zero),))
        H, (g0, c) = jacfwd(with_aux, has_aux=True)(zero)
        H, g0, c = H.detach(), g0.detach(), c.detach()
    except Exception:  # noqa: BLE001 - e.g. F.mse_loss: no forward-mode rule for its backward
        try:  # reverse over reverse: one backward with create_graph, one batched backward
            c, g0, H = derivatives(value, zero)
        except Exception as err:  # noqa: BLE001 - any failure means: not recognised
            return None, f"its Hessian could not be formed at 0 ({type(err).__name__}: {err})"
    if c.dim() != 0 or H.shape != (layout.P, layout.P):
        return None, "it does not return a 0-dim tensor"
    if not bool(torch.isfinite(H).all() & torch.isfinite(g0).all() & torch.isfinite(c)):
        return None, "its value, gradient or Hessian at 0 is not finite"
    H = 0.5 * (H + H.T)
    gen = torch.Generator().manual_seed(0)
    hn = float(torch.linalg.matrix_norm(H))
    far = 100.0 * (1.0 + float(g0.norm()) / max(hn, 1e-300))
    worst = 0.0
    for scale in (1.0, far):
        z = scale * torch.randn(layout.P, generator=gen, dtype=torch.float64).to(ref.device)
        try:
            gz, fz = (t.detach() for t in both(z))
        except Exception as err:  # noqa: BLE001
            return None, f"it failed at a probe ({type(err).__name__}: {err})"
        hz = H @ z
        model_f = c + g0 @ z + 0.5 * z @ hz
        size_f = c.abs() + (g0 @ z).abs() + 0.5 * (z @ hz).abs()
        size_g = g0.norm() + hz.norm()
        rel_f = float((fz - model_f).abs() / size_f.clamp(min=1e-300))
        rel_g = float((gz - (hz + g0)).norm() / size_g.clamp(min=1e-300))
        worst = max(worst, rel_f, rel_g)
    if not worst <= _PROBE_RTOL:
        return None, (
            f"at a random probe its value or gradient differs from the quadratic model by "
            f"{worst:.1e} relative (the Hessian is not constant)"
        )
    return Quadratic(H, -g0, c, layout), ""


def _bent(value: Callable[[Tensor], Tensor], zero: Tensor) -> float:
    """``‖g(2z) − 2g(z) + g(0)‖ / (‖g(2z)‖ + 2‖g(z)‖ + ‖g(0)‖)`` along a random ``z`` (its own
    seed): 0 up to round-off where the gradient is affine, as a quadratic's is; 0 also where
    it cannot be evaluated (the full test decides). The gradients come by plain reverse
    mode (a third of the cost of ``torch.func``'s transforms on a small loss)."""
    z = torch.randn(zero.shape[0], generator=torch.Generator().manual_seed(1), dtype=zero.dtype)
    z = z.to(zero.device)
    try:
        g0, g1, g2 = (gradient(value, t) for t in (zero, z, 2 * z))
    except Exception:  # noqa: BLE001 - the full test reports it
        return 0.0
    size = float(g2.norm() + 2 * g1.norm() + g0.norm())
    bent = float((g2 - 2 * g1 + g0).norm())
    return bent / size if size > 0 else 0.0


def gradient_gap(
    loss_fn: Callable[..., Tensor], q: Quadratic, x: Params, data: tuple[Any, ...]
) -> Tensor:
    """``δ_k = ‖∇f(x_k) − (H x_k − b)‖ / max(‖b‖, ‖∇f(x_k)‖)`` for stacked ``x``: how far
    the loss ``f`` is from its quadratic model ``q`` at each solution, relative to the
    stopping rule's scale. The prox is 1-Lipschitz, so the prox-gradient mapping of ``f``
    and of ``q`` differ by at most ``δ`` (relative) there."""
    dims = (0,) + (None,) * len(data)
    g_true = q.layout.flatten(vmap(grad(loss_fn), in_dims=dims)(x, *data))
    flat = q.layout.flatten(x).to(q.H.dtype)
    g_true = g_true.to(q.H.dtype)
    scale = torch.maximum(q.b.norm(), torch.linalg.vector_norm(g_true, dim=1))
    return torch.linalg.vector_norm(g_true - (flat @ q.H - q.b), dim=1) / scale


def l1_thresholds(
    layout: Layout, like: Tensor, nonsmooth: Spec, single: Params, S: Params
) -> tuple[Tensor, Tensor] | None:
    """``(τ (K, P), penalised (P,) bool)`` when every non-smooth term is an exact ``L1``
    without ``toward=``: the per-coordinate thresholds at unit step (``Σ_terms s_k c``),
    and which coordinates some term selects; else ``None``."""
    if any(type(pen) is not L1 or pen.toward is not None for pen in nonsmooth.values()):
        return None
    K = next(iter(S.values())).shape[0] if S else 1
    tau = like.new_zeros(K, layout.P)
    penalised = torch.zeros(layout.P, dtype=torch.bool, device=like.device)
    for term, names in nonsmooth.selection(single).items():
        pen = nonsmooth[term]
        for n in names:
            at = layout.offsets[n]
            part = slice(at, at + single[n].numel())
            level = S[term][:, None].to(tau.dtype)
            c = pen.factor(n)
            if c is not None:
                level = level * c.to(tau).expand(layout.shapes[n]).reshape(1, -1)
            tau[:, part] += level
            penalised[part] = True
    return tau, penalised


def lasso_thresholds(
    q: Quadratic, smooth: Spec, nonsmooth: Spec, single: Params, S: Params
) -> tuple[Tensor, Tensor] | None:
    """:func:`l1_thresholds` when the problem on ``q`` is a plain (weighted) Lasso — no
    smooth terms, at least one non-smooth term, all exact ``L1`` — else ``None``."""
    if len(smooth) or not len(nonsmooth):
        return None
    return l1_thresholds(q.layout, q.H, nonsmooth, single, S)


def lasso_route(
    q: Quadratic,
    tau: Tensor,
    penalised: Tensor,
    x0: Tensor,
    max_iter: int,
    tol: float,
    L0: Tensor | None,
    restart: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float, bool] | None:
    """The Lasso on ``q`` with the free coordinates eliminated (module docstring), from
    ``x0 (K, P)``: ``(x (K, P), iterations, converged, floors, optimality, L,
    eliminated)`` from :func:`~funcreg._lasso.fista_lasso` on the reduced problem (``L`` its
    step's inverse; ``eliminated``: whether free coordinates were eliminated),
    or ``None`` when ``H_vv`` is not positive definite."""
    u = penalised.nonzero().squeeze(1)
    v = (~penalised).nonzero().squeeze(1)
    H, b = q.H, q.b
    Huu, bu = H[u][:, u], b[u]
    A: Tensor | None = None
    if v.numel():
        chol, info = torch.linalg.cholesky_ex(H[v][:, v])
        if int(info) != 0:
            return None
        Hvu = H[v][:, u]
        A = torch.cholesky_solve(torch.cat([Hvu, b[v, None]], 1), chol)  # (nv, nu + 1)
        G = Huu - Hvu.T @ A[:, :-1]
        G = 0.5 * (G + G.T)
        r = bu - Hvu.T @ A[:, -1]
    else:
        G, r = Huu, bu
    tiny = torch.finfo(G.dtype).tiny ** 0.5
    w0 = x0[:, u]
    homotopy = q.homotopy and L0 is None and G.dtype == torch.float64 and G.shape[0] > 0
    condition: float | None = None  # λ_max/λ_min of G, where eigvalsh is cheap
    if homotopy and G.shape[0] <= HARD_MAX:
        ev = torch.linalg.eigvalsh(G)  # λ_max for the step, λ_min for the homotopy's choice
        L = max(float(ev[-1].clamp(min=0)), tiny)
        condition = L / max(float(ev[0]), tiny)
    else:
        L = max(gram_lipschitz(G), tiny) if L0 is None else float(L0.max())
    if homotopy:
        w0 = exact_start(G, r, tau[:, u], w0, condition)
    w, iterations, converged, floors, optimality = fista_lasso(
        G, r[None], tau[:, u], w0, max_iter, tol, G.new_tensor([L]), restart
    )
    x = torch.zeros_like(x0)
    x[:, u] = w
    if A is not None:
        x[:, v] = A[:, -1] - w @ A[:, :-1].T
    return x, iterations, converged, floors, optimality, L, A is not None
