"""Property tests of every penalty: formula, non-negativity, homogeneity, prox optimality,
Moreau/nonexpansiveness, vmap == loop, finite gradients at zero."""

import math

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap

import funcreg as fr

DT = torch.float64

# --- independent formulas, written out from the docstrings --------------------------------


def f_l1(w):
    return sum(abs(v) for v in w.flatten().tolist())


def f_l2(w):
    return 0.5 * sum(v * v for v in w.flatten().tolist())


def f_enet(w, r):
    return r * f_l1(w) + (1 - r) * f_l2(w)


def f_group(w, dim):
    # groups indexed by the axes not in dim (2-d: dim=0 -> columns, dim=1 -> rows)
    m = w if dim == 0 else w.T
    n = m.shape[0]
    return sum(
        math.sqrt(n) * math.sqrt(sum(v * v for v in m[:, j].tolist())) for j in range(m.shape[1])
    )


def f_sgl(w, dim, r):
    return r * f_l1(w) + (1 - r) * f_group(w, dim)


def f_nuc(w):
    return float(torch.linalg.svdvals(w.reshape(w.shape[0], -1)).sum())


def f_spec(w):
    return float(torch.linalg.svdvals(w.reshape(w.shape[0], -1))[0]) ** 2


def f_orth_rows(w):
    rows = [
        r / max(math.sqrt(sum(v * v for v in r)), 1e-6)
        for r in [torch.tensor(x, dtype=DT) for x in w.tolist()]
    ]
    m = len(rows)
    tot = sum(abs(float(rows[i] @ rows[j])) for i in range(m) for j in range(m) if i != j)
    return 0.5 * tot / max(m * (m - 1) / 2, 1)  # one row: no pairs, 0


def f_mcp(w, lam, g):
    out = 0.0
    for v in w.flatten().tolist():
        a = abs(v)
        out += lam * a - a * a / (2 * g) if a <= g * lam else g * lam * lam / 2
    return out


def f_scad(w, lam, a):
    out = 0.0
    for v in w.flatten().tolist():
        x = abs(v)
        if x <= lam:
            out += lam * x
        elif x <= a * lam:
            out += (2 * a * lam * x - x * x - lam * lam) / (2 * (a - 1))
        else:
            out += lam * lam * (a + 1) / 2
    return out


CONVEX = {
    "L1": (fr.L1(), f_l1),
    "L2": (fr.L2(), f_l2),
    "ElasticNet": (fr.ElasticNet(l1_ratio=0.3), lambda w: f_enet(w, 0.3)),
    "GroupLasso0": (fr.GroupLasso(dim=0), lambda w: f_group(w, 0)),
    "GroupLasso1": (fr.GroupLasso(dim=1), lambda w: f_group(w, 1)),
    "SparseGroupLasso": (fr.SparseGroupLasso(dim=1, l1_ratio=0.4), lambda w: f_sgl(w, 1, 0.4)),
    "Nuclear": (fr.Nuclear(), f_nuc),
}
SMOOTH_ONLY = {
    "SpectralNorm": (fr.SpectralNorm(), f_spec),
    "Orthogonal": (fr.Orthogonal(), f_orth_rows),
}
NONCONVEX = {
    "MCP": (fr.MCP(gamma=3.0), lambda w: f_mcp(w, 1.0, 3.0)),
    "SCAD": (fr.SCAD(a=3.7), lambda w: f_scad(w, 1.0, 3.7)),
}
ALL = {**CONVEX, **SMOOTH_ONLY, **NONCONVEX}
HOMOGENEOUS_DEGREE = {
    "L1": 1,
    "L2": 2,
    "GroupLasso0": 1,
    "GroupLasso1": 1,
    "SparseGroupLasso": 1,
    "Nuclear": 1,
    "SpectralNorm": 2,
    "Orthogonal": 0,
}

# Values reach every branch of every penalty at the strengths used below (λ up to 3):
# MCP's flat region |w| > γλ and SCAD's outer branch |w| > aλ (γ = 3, a = 3.7 at λ = 1),
# exact zeros and subnormals (whose squares underflow).
floats = st.one_of(
    st.floats(-3, 3, allow_nan=False, width=64),
    st.floats(-15, 15, allow_nan=False, width=64),
    st.sampled_from([0.0, -0.0, 5e-324, -1e-310, 2.2e-308, 1e-160]),
)


@st.composite
def matrices(draw, min_side=1, max_side=4):
    """``r × c`` float64 matrices, ``1 ≤ r, c ≤ 4`` (1×n and n×1 included)."""
    r = draw(st.integers(min_side, max_side))
    c = draw(st.integers(min_side, max_side))
    vals = draw(st.lists(floats, min_size=r * c, max_size=r * c))
    return torch.tensor(vals, dtype=DT).reshape(r, c)


# Steps on both sides of the nonconvex convexity bounds (MCP: t < γ = 3; SCAD: t < a − 1 = 2.7).
steps = st.floats(0.0, 8.0, allow_nan=False)


@pytest.mark.parametrize("name", list(ALL))
@given(w=matrices())
def test_value_matches_formula_and_is_nonnegative(name, w):
    pen, formula = ALL[name]
    v = float(pen.value(w))
    assert v >= -1e-12
    assert v == pytest.approx(formula(w), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", list(HOMOGENEOUS_DEGREE))
@given(w=matrices(), a=st.floats(0.1, 5.0))
def test_homogeneity(name, w, a):
    pen, _ = ALL[name]
    if name == "Orthogonal" and bool((w.abs().sum(1) < 1e-3).any()):
        return  # normalisation of a (near) zero row is not scale invariant
    if HOMOGENEOUS_DEGREE[name] == 2 and bool(((w != 0) & (w.abs() < 1e-150)).any()):
        w = torch.where(w.abs() < 1e-150, 0.0, w)  # squares of these underflow
    deg = HOMOGENEOUS_DEGREE[name]
    assert float(pen.value(a * w)) == pytest.approx(
        a**deg * float(pen.value(w)), rel=1e-7, abs=1e-9
    )


@pytest.mark.parametrize("name", list(ALL))
@given(w=matrices())
def test_zero_strength_changes_nothing(name, w):
    pen, _ = ALL[name]
    assert float(pen.penalty(w, 0.0)) == 0.0
    if pen.has_prox:
        torch.testing.assert_close(pen.prox_step(w, 0.5, 0.0), w, rtol=0, atol=1e-12)


def prox_objective(pen, x, y, t):
    return 0.5 * float(((x - y) ** 2).sum()) + t * float(pen.value(y))


@pytest.mark.parametrize("name", list(CONVEX) + list(NONCONVEX))
@given(x=matrices(), t=steps, seed=st.integers(0, 10_000))
def test_prox_minimises_the_prox_objective(name, x, t, seed):
    """prox(x, t) is no worse than random perturbations of it nor the zero point nor x,
    for steps on both sides of MCP's and SCAD's convexity bounds."""
    pen, _ = ALL[name]
    y = pen.prox(x, t)
    best = prox_objective(pen, x, y, t)
    gen = torch.Generator().manual_seed(seed)
    candidates = [torch.zeros_like(x), x]
    for scale in (1e-1, 1e-2, 1e-4):
        for _ in range(6):
            candidates.append(y + scale * torch.randn(x.shape, generator=gen, dtype=DT))
    for c in candidates:
        assert best <= prox_objective(pen, x, c, t) + 1e-9 * (1 + best)


@pytest.mark.parametrize("name", list(CONVEX))
@given(x=matrices(), t=st.floats(0.01, 1.5))
def test_prox_optimality_condition(name, x, t):
    """(x - y)/t is a subgradient of Ω at y: Ω(z) >= Ω(y) + <(x-y)/t, z - y> for all z."""
    pen, _ = ALL[name]
    y = pen.prox(x, t)
    g = (x - y) / t
    gen = torch.Generator().manual_seed(1)
    for z in [
        torch.zeros_like(x),
        x,
        2 * y,
        *(torch.randn(x.shape, generator=gen, dtype=DT) for _ in range(8)),
    ]:
        assert float(pen.value(z)) >= float(pen.value(y)) + float((g * (z - y)).sum()) - 1e-8


@pytest.mark.parametrize("name", list(CONVEX))
@given(x=matrices(), z=matrices(), t=st.floats(0.01, 1.5))
def test_prox_nonexpansive_and_moreau(name, x, z, t):
    pen, _ = ALL[name]
    if x.shape != z.shape:
        z = torch.randn(x.shape, dtype=DT)
    px, pz = pen.prox(x, t), pen.prox(z, t)
    assert float((px - pz).norm()) <= float((x - z).norm()) + 1e-9

    # Moreau envelope identity for convex Ω: M(x) = min_y ½‖x−y‖² + tΩ(y) is differentiable
    # with gradient (x − prox(x))/t·t = x − prox(x); check against finite differences.
    def envelope(v):
        p = pen.prox(v, t)
        return prox_objective(pen, v, p, t)

    d = torch.randn(x.shape, dtype=DT)
    h = 1e-6
    fd = (envelope(x + h * d) - envelope(x - h * d)) / (2 * h)
    assert fd == pytest.approx(float(((x - px) * d).sum()), rel=1e-4, abs=1e-5)


def test_prox_closed_forms_against_brute_force_scalar():
    """1-d brute force over a fine grid for the separable penalties."""
    grid = torch.linspace(-4, 4, 160_001, dtype=DT)
    for pen in [
        fr.L1(fr.everything()),
        fr.L2(fr.everything()),
        fr.ElasticNet(fr.everything(), l1_ratio=0.6),
        fr.MCP(fr.everything(), gamma=2.5),
        fr.SCAD(fr.everything(), a=3.7),
    ]:
        for x in [-3.1, -1.2, -0.4, 0.0, 0.3, 0.9, 1.7, 2.6]:
            t = 0.7
            vals = 0.5 * (x - grid) ** 2 + t * _elementwise_value(pen, grid)
            y_brute = float(grid[vals.argmin()])
            y = float(pen.prox(torch.tensor([x], dtype=DT), t))
            assert y == pytest.approx(y_brute, abs=1e-4), (pen, x)


def _elementwise_value(pen, grid):
    return vmap(lambda g: pen.value(g.reshape(1)))(grid)


SEPARABLE = {
    "L1": fr.L1(fr.everything()),
    "L2": fr.L2(fr.everything()),
    "ElasticNet": fr.ElasticNet(fr.everything(), l1_ratio=0.6),
    "MCP": fr.MCP(fr.everything(), gamma=2.5),
    "SCAD": fr.SCAD(fr.everything(), a=3.7),
}


def _region(name, ax, t, lam):
    """Which piece of the prox map ``|x| = ax`` falls in (MCP γ = 2.5, SCAD a = 3.7)."""
    if name == "MCP":
        if t >= 2.5:
            return "MCP hard: kept" if ax > (t * 2.5) ** 0.5 * lam else "MCP hard: zero"
        if ax > 2.5 * lam:
            return "MCP flat region (identity)"
        return "MCP firm" if ax > t * lam else "MCP zero"
    if name == "SCAD":
        if t >= 2.7:
            return "SCAD beyond the bound"
        if ax > 3.7 * lam:
            return "SCAD outer (identity)"
        if ax > (1 + t) * lam:
            return "SCAD middle"
        return "SCAD soft" if ax > t * lam else "SCAD zero"
    return f"{name} {'zero' if ax <= t * lam else 'nonzero'}"


@pytest.mark.parametrize("name", list(SEPARABLE))
@given(
    xs=st.lists(floats, min_size=1, max_size=6),
    rel=st.lists(st.floats(-5.0, 5.0, allow_nan=False), max_size=4),
    t=st.one_of(st.floats(0.0, 1.0), st.floats(2.5, 8.0), steps),
    lam=st.floats(0.0, 3.0, allow_nan=False),
)
@example(xs=[0.1, 1.0, 2.0, 3.0, 9.0], rel=[], t=0.5, lam=1.0)  # every piece below the bound
@example(xs=[0.5, 5.0, -11.0], rel=[0.9, 4.0], t=4.0, lam=1.0)  # both sides beyond it
@settings(max_examples=40, deadline=None)
def test_prox_step_is_the_global_minimiser_by_brute_force(name, xs, rel, t, lam):
    """``prox_step(x, t, λ)`` minimises ``½(y − x)² + t·pen(y; λ)`` coordinate by coordinate,
    against a grid over ``[−|x| − 1, |x| + 1]``, for any step (a tensor step: no guard).
    Besides absolute values, coordinates ``r·λ`` (``|r| ≤ 5``) land in every piece of the
    MCP and SCAD maps whatever ``λ``, and small steps keep SCAD's middle piece wide."""
    pen = SEPARABLE[name]
    xs = xs + [r * lam for r in rel]
    x = torch.tensor(xs, dtype=DT)
    y = pen.prox_step(x, torch.tensor(t, dtype=DT), lam)
    for xi, yi in zip(xs, y.tolist(), strict=True):
        event(_region(name, abs(xi), t, lam))  # --hypothesis-show-statistics counts them
        span = abs(xi) + 1.0
        grid = torch.linspace(-span, span, 20_001, dtype=DT)
        cost = vmap(lambda g: pen.penalty(g.reshape(1), lam))(grid)
        h_grid = 0.5 * (grid - xi) ** 2 + t * cost
        h_y = 0.5 * (yi - xi) ** 2 + t * float(pen.penalty(torch.tensor([yi], dtype=DT), lam))
        slope = 2 * span + t * 3.0  # |h'| on the grid: bounds the grid's miss of the minimum
        assert h_y <= float(h_grid.min()) + 1e-12 * (1 + abs(h_y)), (xi, yi)
        assert h_y >= float(h_grid.min()) - slope * (2 * span / 20_000), (xi, yi)


def test_mcp_and_scad_strength_is_lambda_inside_the_formula():
    w = torch.linspace(-5, 5, 41, dtype=DT)
    for lam in [0.3, 1.0, 2.2]:
        assert float(fr.MCP(gamma=3.0).penalty(w, lam)) == pytest.approx(f_mcp(w, lam, 3.0))
        assert float(fr.SCAD(a=3.7).penalty(w, lam)) == pytest.approx(f_scad(w, lam, 3.7))
    # the prox step uses λ = strength and step lr
    x = torch.tensor([0.5, 1.5, 4.0], dtype=DT)
    grid = torch.linspace(-6, 6, 120_001, dtype=DT)
    for pen, f in [
        (fr.MCP(gamma=3.0), lambda g, lam: f_mcp_vec(g, lam, 3.0)),
        (fr.SCAD(a=3.7), lambda g, lam: f_scad_vec(g, lam, 3.7)),
    ]:
        y = pen.prox_step(x, 0.5, 1.2)
        for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
            obj = 0.5 * (xi - grid) ** 2 + 0.5 * f(grid, 1.2)
            assert yi == pytest.approx(float(grid[obj.argmin()]), abs=1e-3)


def f_mcp_vec(g, lam, gamma):
    a = g.abs()
    return torch.where(
        a <= gamma * lam, lam * a - a * a / (2 * gamma), torch.full_like(a, gamma * lam * lam / 2)
    )


def f_scad_vec(g, lam, a_):
    x = g.abs()
    mid = (2 * a_ * lam * x - x * x - lam * lam) / (2 * (a_ - 1))
    return torch.where(
        x <= lam,
        lam * x,
        torch.where(x <= a_ * lam, mid, torch.full_like(x, lam * lam * (a_ + 1) / 2)),
    )


@pytest.mark.parametrize("name", list(ALL))
def test_gradient_finite_at_zero(name):
    pen, _ = ALL[name]
    g = grad(lambda w: pen.value(w))(torch.zeros(4, 3, dtype=DT))
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", [n for n in ALL if ALL[n][0].has_prox])
@given(x=matrices())
def test_prox_finite_at_zero_and_zero_step(name, x):
    """Zero stays zero for a positive step; a zero step (number or tensor) is the exact
    identity, also at zero."""
    pen, _ = ALL[name]
    z = torch.zeros(4, 3, dtype=DT)
    assert torch.equal(pen.prox(z, 0.5), z)
    assert torch.equal(pen.prox(z, 0.0), z)
    assert torch.equal(pen.prox(x, 0.0), x)
    assert torch.equal(pen.prox(x, torch.tensor(0.0, dtype=DT)), x)
    assert torch.isfinite(pen.prox(x, 0.5)).all()


LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", list(ALL))
@given(w=matrices(), t=st.floats(0.0, 2.0))
@settings(max_examples=25, deadline=None)
def test_low_precision_value_and_prox_follow_float64(name, dtype, w, t):
    """float16/bfloat16 weights: value, gradient and prox keep the dtype, are finite, and
    are within a few units of the dtype's rounding of the float64 results on the same
    (rounded) weights (steps below the nonconvex bounds, where the prox is continuous)."""
    pen, _ = ALL[name]
    lo = w.to(dtype)
    w64 = lo.to(DT)
    eps = torch.finfo(dtype).eps
    scale = 1.0 + float(w64.abs().max())
    v = pen.value(lo)
    assert v.dtype == dtype and torch.isfinite(v)
    assert float(v) == pytest.approx(float(pen.value(w64)), rel=16 * eps, abs=16 * eps * scale)
    g = grad(pen.value)(lo)
    assert g.dtype == dtype
    # Orthogonal's gradient near a zero row is up to 1/eps = 1e6 (Keras' eps = 1e-6): it
    # overflows float16 honestly
    tiny_row = name == "Orthogonal" and bool((w64.norm(dim=1) < 1e-3).any())
    assert tiny_row or torch.isfinite(g).all()
    if pen.has_prox:
        y = pen.prox(lo, t)
        assert y.dtype == dtype and torch.isfinite(y).all()
        torch.testing.assert_close(y.to(DT), pen.prox(w64, t), rtol=16 * eps, atol=16 * eps * scale)


EVERY_PENALTY = {
    **{n: p for n, (p, _) in ALL.items()},
    "NonNegative": fr.NonNegative(),
    "Box": fr.Box(),
    "MaxNorm": fr.MaxNorm(),
}


@pytest.mark.parametrize("name", list(EVERY_PENALTY))
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_tensors(name, shape):
    """A parameter with no entries costs 0, has an (empty) zero gradient and an identity
    prox."""
    pen = EVERY_PENALTY[name]
    w = torch.zeros(shape, dtype=DT)
    assert float(pen.penalty(w, 1.0)) == 0.0
    g = grad(lambda v: pen.penalty(v, 1.0))(w)
    assert g.shape == w.shape
    if pen.has_prox:
        assert pen.prox_step(w, 0.1, 1.0).shape == w.shape


@pytest.mark.parametrize("name", list(ALL))
def test_vmap_equals_loop(name):
    pen, _ = ALL[name]
    K = 5
    w = torch.randn(K, 4, 3, dtype=DT)
    s = torch.linspace(0.0, 1.0, K, dtype=DT)
    vals = vmap(pen.penalty)(w, s)
    loop = torch.stack([pen.penalty(w[k], s[k]) for k in range(K)])
    torch.testing.assert_close(vals, loop, rtol=1e-12, atol=1e-12)
    grads = vmap(grad(pen.penalty))(w, s)
    loop_g = torch.stack([grad(pen.penalty)(w[k], s[k]) for k in range(K)])
    torch.testing.assert_close(grads, loop_g, rtol=1e-12, atol=1e-12)
    if pen.has_prox:
        lr = 0.3
        px = vmap(lambda wk, sk: pen.prox_step(wk, lr, sk))(w, s)
        loop_p = torch.stack([pen.prox_step(w[k], lr, s[k]) for k in range(K)])
        torch.testing.assert_close(px, loop_p, rtol=1e-12, atol=1e-12)


# --- constraints ---------------------------------------------------------------------------


@given(x=matrices())
def test_constraints_project(x):
    assert torch.equal(fr.NonNegative().prox(x, 1.0), x.clamp(min=0))
    b = fr.Box(lo=-0.5, hi=0.25).prox(x, 1.0)
    assert torch.equal(b, x.clamp(-0.5, 0.25))
    m = fr.MaxNorm(max_value=1.0).prox(x, 1.0)
    norms = m.norm(dim=1)
    assert bool((norms <= 1.0 + 1e-12).all())
    # rows already inside the ball are unchanged; rows outside are rescaled, not rotated
    inside = x.norm(dim=1) <= 1.0
    torch.testing.assert_close(m[inside], x[inside])
    out = ~inside
    torch.testing.assert_close(m[out], x[out] / x[out].norm(dim=1, keepdim=True))
    # projections are idempotent and need no strength
    assert torch.equal(fr.NonNegative().prox_step(x, 0.1, 123.0), x.clamp(min=0))
    assert float(fr.Box().penalty(x, 10.0)) == 0.0


def test_maxnorm_matches_keras_formula():
    # Keras: w * clip(norms, 0, max) / (eps + norms), eps = 1e-7, norm over the input axis.
    w = torch.randn(5, 7, dtype=DT) * 3
    norms = w.norm(dim=1, keepdim=True)
    keras = w * norms.clamp(0, 2.0) / (1e-7 + norms)
    torch.testing.assert_close(fr.MaxNorm(max_value=2.0).prox(w, 1.0), keras, rtol=1e-6, atol=1e-6)


# --- toward= and weight= -------------------------------------------------------------------


@given(x=matrices(), t=st.floats(0.01, 1.0))
def test_toward_shifts_value_and_prox(x, t):
    ref = torch.randn(x.shape, dtype=DT)
    for cls in (fr.L1, fr.L2, fr.GroupLasso, fr.Nuclear):
        pen = cls(toward=ref)
        base = cls()
        assert float(pen.value(x)) == pytest.approx(float(base.value(x - ref)))
        torch.testing.assert_close(pen.prox(x, t), ref + base.prox(x - ref, t))
        # the gradient is the base penalty's gradient at x − ref
        torch.testing.assert_close(grad(pen.value)(x), grad(base.value)(x - ref))
        # at the reference the penalty vanishes, and so does the gradient (autograd's
        # subgradient at 0 of |·| and ‖·‖ is 0; the nuclear norm's at the zero matrix is
        # U Vᵀ of some SVD, so only its size is known: spectral norm ≤ 1)
        assert float(pen.value(ref)) == pytest.approx(0.0, abs=1e-12)
        g_ref = grad(pen.value)(ref)
        if cls is fr.Nuclear:
            assert float(torch.linalg.matrix_norm(g_ref, ord=2)) <= 1 + 1e-12
        else:
            assert torch.equal(g_ref, torch.zeros_like(ref))


def test_toward_dict_uses_each_name():
    p = {"a.weight": torch.randn(3, 2, dtype=DT), "b.weight": torch.randn(2, 2, dtype=DT)}
    ref = {k: torch.randn_like(v) for k, v in p.items()}
    spec = fr.Spec(sp=fr.L2(toward=ref))
    expect = sum(0.5 * float(((p[k] - ref[k]) ** 2).sum()) for k in p)
    assert float(spec(p, {"sp": 1.0})) == pytest.approx(expect)


@given(x=matrices(), t=st.floats(0.01, 1.0))
def test_weight_factors(x, t):
    c = torch.rand(x.shape, dtype=DT) * 2
    pen = fr.L1(weight=c)
    assert float(pen.value(x)) == pytest.approx(float((c * x.abs()).sum()))
    torch.testing.assert_close(pen.prox(x, t), torch.sign(x) * (x.abs() - t * c).clamp(min=0))
    # zero factor: unpenalised coordinates are left alone by the prox (glmnet penalty.factor)
    c0 = torch.zeros_like(x)
    torch.testing.assert_close(fr.L1(weight=c0).prox(x, t), x)
    # per-group factors for group lasso (one per column when dim=0)
    cg = torch.rand(1, x.shape[1], dtype=DT)
    gl = fr.GroupLasso(dim=0, weight=cg)
    expect = sum(
        float(cg[0, j]) * math.sqrt(x.shape[0]) * float(x[:, j].norm()) for j in range(x.shape[1])
    )
    assert float(gl.value(x)) == pytest.approx(expect)


def test_l2_gradient_is_weight_decay():
    w = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(grad(lambda v: fr.L2().penalty(v, 0.3))(w), 0.3 * w)


@pytest.mark.parametrize("pen", [fr.L1(), fr.L2()], ids=["L1", "L2"])
@given(a=matrices(), b=matrices(), s=st.floats(0.0, 5.0, allow_nan=False))
def test_closed_form_equals_autograd(pen, a, b, s):
    """closed_form's value and (sub)gradient over several tensors equal the penalty's value
    and autograd's gradient (at 0 too: autograd's subgradient of |w| there is 0)."""
    a = torch.where(a.abs() < 0.5, 0.0, a)  # exact zeros among the entries
    form = pen.closed_form()
    assert form is not None
    zeros = [torch.zeros_like(a), torch.zeros_like(b)]
    value, grads = form([a, b], torch.tensor(s, dtype=DT), zeros)
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    total = pen.penalty(leaves[0], s) + pen.penalty(leaves[1], s)
    expect = torch.autograd.grad(total, leaves)
    torch.testing.assert_close(value, total.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expect, strict=True):  # exact but for subnormal round-off
        torch.testing.assert_close(got, want, rtol=0, atol=1e-300)
    # added to given gradients, out of place, with a number or a 0-dim tensor strength
    gs = [torch.ones_like(a), -torch.ones_like(b)]
    for strength in (s, torch.tensor(s, dtype=DT)):
        _, summed = form([a, b], strength, gs)
        for got, g, want in zip(summed, gs, expect, strict=True):
            torch.testing.assert_close(got, g + want, rtol=1e-15, atol=1e-15)
    assert torch.equal(gs[0], torch.ones_like(a))  # the given gradients are not modified


def test_closed_form_only_for_plain_terms():
    """toward=, weight= or a subclass with its own value: no closed form (autograd instead)."""
    w = torch.zeros(3, dtype=DT)

    class Scaled(fr.L2):
        def _value(self, d, c):
            return 3.0 * super()._value(d, c)

    assert fr.L1(toward=w).closed_form() is None
    assert fr.L2(weight=w + 1).closed_form() is None
    assert Scaled().closed_form() is None
    assert fr.ElasticNet().closed_form() is None
