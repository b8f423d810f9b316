"""Numerical edge cases and misuse of penalties and prox operators: out-of-range ``dim=``,
steps beyond the convexity bound of MCP/SCAD, huge strengths, subnormal group norms, step 0,
low-precision dtypes and empty matrices."""

from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import funcreg as fr

DT = torch.float64


# --- dim= of group penalties ------------------------------------------------------------------


@pytest.mark.parametrize(
    "pen", [fr.GroupLasso(dim=2), fr.SparseGroupLasso(dim=-3), fr.GroupLasso(dim=(0, 2))]
)
def test_group_dim_out_of_range_is_an_error_not_wrapped(pen):
    w = torch.ones(3, 4, dtype=DT)
    name = type(pen).__name__
    msg = rf"{name}: dim=.* is out of range for a parameter with ndim 2 \(shape \(3, 4\)\); "
    msg += r"dim must be in \[-2, 1\]"
    for call in (lambda: pen.value(w), lambda: pen.prox(w, 0.1), lambda: pen.penalty(w, 1.0)):
        with pytest.raises(ValueError, match=msg):
            call()


def test_group_dim_out_of_range_names_term_and_parameter_at_the_eager_boundary():
    net = nn.Linear(4, 3)
    with pytest.raises(
        ValueError, match=r"term 'g', parameter 'weight': GroupLasso: dim=2 is out of range"
    ):
        fr.penalty(net, {"g": fr.GroupLasso(dim=2)}, {"g": 1.0})
    with pytest.raises(ValueError, match=r"MaxNorm: dim=3 is out of range.*shape \(3, 4\)"):
        fr.MaxNorm(dim=3).prox(torch.ones(3, 4), 1.0)


def test_group_dim_named_twice_is_an_error():
    with pytest.raises(ValueError, match=r"GroupLasso: dim=\(0, -2\) names an axis twice"):
        fr.GroupLasso(dim=(0, -2)).value(torch.ones(3, 4))


def test_negative_dim_in_range_still_means_the_same_axis():
    w = torch.randn(3, 4, dtype=DT)
    assert float(fr.GroupLasso(dim=-2).value(w)) == float(fr.GroupLasso(dim=0).value(w))


# --- MCP/SCAD prox beyond the convexity bound -------------------------------------------------


def _mcp(y, lam, gamma):
    a = y.abs()
    return torch.where(a <= gamma * lam, lam * a - a * a / (2 * gamma), gamma * lam * lam / 2)


def _scad(y, lam, a_):
    x = y.abs()
    mid = (2 * a_ * lam * x - x * x - lam * lam) / (2 * (a_ - 1))
    return torch.where(x <= lam, lam * x, torch.where(x <= a_ * lam, mid, lam * lam * (a_ + 1) / 2))


GRID = torch.linspace(-12, 12, 480_001, dtype=DT)  # spacing 5e-5


def _brute_min(x, t, p):
    """min_y ½(y − x)² + t·p(y) over a fine grid (and the grid point)."""
    h = 0.5 * (GRID - x) ** 2 + t * p(GRID)
    i = int(h.argmin())
    return float(h[i]), float(GRID[i])


@pytest.mark.parametrize(
    ("pen", "p", "bound"),
    [
        (fr.MCP(gamma=2.5), lambda y, lam: _mcp(y, lam, 2.5), 2.5),
        (fr.SCAD(a=3.7), lambda y, lam: _scad(y, lam, 3.7), 2.7),
    ],
    ids=["MCP", "SCAD"],
)
@pytest.mark.parametrize("lam", [0.4, 1.3])
def test_prox_is_the_global_minimiser_for_every_step(pen, p, bound, lam):
    """Against brute-force 1-D minimisation, for steps on both sides of the convexity bound
    (MCP: t < γ firm, t ≥ γ hard thresholding; SCAD: t < a − 1 and beyond)."""
    xs = [-9.0, -4.7, -3.3, -2.1, -1.0, -0.3, 0.0, 0.2, 0.8, 1.6, 2.4, 3.1, 4.4, 5.5, 8.0]
    for t in [0.0, 0.3, 1.0, 0.999 * bound, bound, 1.001 * bound, 4.0, 7.5]:
        y = pen.prox_step(torch.tensor(xs, dtype=DT), t, lam) if t < bound else None
        # prox of t·Ω at unit λ with weight= c = lam is the same map: Ω's λ is c
        z = fr.MCP if isinstance(pen, fr.MCP) else fr.SCAD
        kw = {"gamma": pen.gamma} if isinstance(pen, fr.MCP) else {"a": pen.a}
        ylam = z(weight=torch.full((len(xs),), lam, dtype=DT), **kw).prox(
            torch.tensor(xs, dtype=DT), t
        )
        if y is not None:
            torch.testing.assert_close(y, ylam, rtol=1e-15, atol=1e-15)
        for x, yi in zip(xs, ylam.tolist(), strict=True):
            h_min, y_grid = _brute_min(x, t, lambda g: p(g, lam))
            h_y = 0.5 * (yi - x) ** 2 + t * float(p(torch.tensor(yi, dtype=DT), lam))
            # the prox is at least as good as every grid point, and the grid is within its
            # resolution of the minimum (½δ²·curvature + δ·slope at a kink, δ = 5e-5)
            assert h_y <= h_min + 1e-12, (x, t, yi, y_grid)
            assert h_y >= h_min - 5e-4, (x, t, yi, y_grid)


def test_mcp_prox_beyond_gamma_is_hard_thresholding():
    x = torch.tensor([-5.0, -3.4, 0.5, 3.0, 3.5, 9.0], dtype=DT)
    y = fr.MCP(gamma=3.0).prox(x, 4.0)  # λ = 1: threshold √(tγ) = √12 ≈ 3.464
    assert torch.equal(y, torch.tensor([-5.0, 0.0, 0.0, 0.0, 3.5, 9.0], dtype=DT))


@pytest.mark.parametrize("pen", [fr.MCP(gamma=2.0), fr.SCAD(a=2.5)], ids=["MCP", "SCAD"])
def test_tensor_steps_on_both_sides_of_the_bound_under_vmap_equal_the_loop(pen):
    x = torch.linspace(-6, 6, 49, dtype=DT)
    steps = torch.tensor([0.0, 0.5, 1.4999, 1.5, 2.0, 3.0, 5.0], dtype=DT)
    got = vmap(lambda t: pen.prox(x, t))(steps)
    for k, t in enumerate(steps.tolist()):
        torch.testing.assert_close(got[k], pen.prox(x, t), rtol=0, atol=0)


def test_prox_step_keeps_the_training_guard():
    with pytest.raises(ValueError, match=r"MCP prox needs lr < gamma.*lower the learning rate"):
        fr.MCP(gamma=2.0).prox_step(torch.ones(2, 2), 3.0, 0.1)
    with pytest.raises(ValueError, match=r"SCAD prox needs a > 1 \+ lr.*raise a"):
        fr.SCAD(a=3.0).prox_step(torch.ones(2, 2), 2.0, 0.1)
    # at the bound itself (lr = γ: the step is no longer firm thresholding) it is refused too
    with pytest.raises(ValueError, match=r"MCP prox needs lr < gamma, got lr=2.0, gamma=2.0"):
        fr.MCP(gamma=2.0).prox_step(torch.ones(2, 2), 2.0, 0.1)
    assert torch.isfinite(fr.MCP(gamma=2.0).prox_step(torch.ones(2, 2), 1.999, 0.1)).all()
    assert torch.isfinite(fr.SCAD(a=3.0).prox_step(torch.ones(2, 2), 1.999, 0.1)).all()


# --- huge strengths -------------------------------------------------------------------------


def _exact_mcp(ws, lam, gamma):
    out = Fraction(0)
    lam, gamma = Fraction(lam), Fraction(gamma)
    for w in ws:
        a = abs(Fraction(w))
        out += lam * a - a * a / (2 * gamma) if a <= gamma * lam else gamma * lam * lam / 2
    return out


def _exact_scad(ws, lam, a_):
    out = Fraction(0)
    lam, a_ = Fraction(lam), Fraction(a_)
    for w in ws:
        x = abs(Fraction(w))
        if x <= lam:
            out += lam * x
        elif x <= a_ * lam:
            out += (2 * a_ * lam * x - x * x - lam * lam) / (2 * (a_ - 1))
        else:
            out += lam * lam * (a_ + 1) / 2
    return out


def _as_float(q):
    try:
        return float(q)
    except OverflowError:
        return float("inf")


@pytest.mark.parametrize("lam", [1e150, 1e300, 1e308])
@pytest.mark.parametrize("scale", [0.0, 1.0, 1.5, 2.5, 10.0])
def test_mcp_and_scad_values_at_huge_strengths_are_exact_or_inf_never_nan(lam, scale):
    ws = [v for v in (0.0, 0.25 * scale * lam, -scale * lam, 1.0, -2.0) if abs(v) < 1e308]
    w = torch.tensor(ws, dtype=DT)
    for pen, exact in [
        (fr.MCP(gamma=3.0), _as_float(_exact_mcp(ws, lam, 3.0))),
        (fr.SCAD(a=3.7), _as_float(_exact_scad(ws, lam, 3.7))),
    ]:
        v = float(pen.penalty(w, lam))
        if exact == float("inf"):
            assert v == float("inf"), (pen, ws)
        else:
            assert v == pytest.approx(exact, rel=1e-12), (pen, ws)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_strength_beyond_the_dtype_range_gives_inf_or_zero_not_nan(dtype):
    """1e300 overflows float32: every nonzero weight costs more than the dtype holds (inf)
    and exact zeros cost nothing."""
    for pen in (fr.MCP(), fr.SCAD()):
        assert float(pen.penalty(torch.tensor([0.0, 1.0, -2.0], dtype=dtype), 1e300)) == float(
            "inf"
        )
        assert float(pen.penalty(torch.zeros(3, dtype=dtype), 1e300)) == 0.0
        g = grad(lambda v, pen=pen: pen.penalty(v, 1.0))(torch.zeros(3, dtype=dtype))
        assert torch.equal(g, torch.zeros(3, dtype=dtype))


# --- subnormal group norms, step 0 ----------------------------------------------------------


@pytest.mark.parametrize(
    "pen", [fr.GroupLasso(), fr.SparseGroupLasso(), fr.GroupLasso(dim=1)], ids=repr
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, DT])
def test_group_prox_at_strength_zero_is_identity_at_subnormal_norms(pen, dtype):
    tiny = torch.finfo(dtype).tiny
    for v in (1.55e-6, tiny / 4, tiny):
        x = torch.full((3, 2), v, dtype=dtype)
        assert torch.equal(pen.prox(x, 0.0), x)
        assert torch.equal(pen.prox_step(x, 0.5, 0.0), x)
        assert torch.isfinite(pen.prox(x, 1e-3)).all()


def test_group_prox_through_prox_at_strength_zero_in_float16():
    net = nn.Linear(2, 3).half()
    with torch.no_grad():
        net.weight.fill_(1.55e-6)
    before = net.weight.detach().clone()
    fr.prox_(net, {"g": fr.GroupLasso("weight")}, {"g": 0.0}, lr=0.1)
    assert torch.equal(net.weight.detach(), before)


STEP0 = [
    fr.L1(),
    fr.L2(),
    fr.ElasticNet(),
    fr.GroupLasso(),
    fr.SparseGroupLasso(),
    fr.Nuclear(),
    fr.MCP(),
    fr.SCAD(),
]


@pytest.mark.parametrize("pen", STEP0, ids=lambda p: type(p).__name__)
def test_step_zero_and_strength_zero_are_the_exact_identity(pen):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen, dtype=DT) * 3
    assert torch.equal(pen.prox(x, 0.0), x)
    assert torch.equal(pen.prox_step(x, 0.5, 0.0), x)
    assert torch.equal(pen.prox_step(x, 0.0, 1.0), x)
    steps = torch.tensor([0.0, 0.0], dtype=DT)
    assert torch.equal(vmap(lambda t: pen.prox(x, t))(steps), torch.stack([x, x]))


# --- low precision and empty matrices --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pen", [fr.Nuclear(), fr.SpectralNorm()], ids=lambda p: type(p).__name__)
def test_matrix_penalties_in_low_precision(pen, dtype):
    gen = torch.Generator().manual_seed(1)
    w64 = torch.randn(4, 3, generator=gen, dtype=DT)
    w = w64.to(dtype)
    v = pen.value(w)
    assert v.dtype == dtype
    ref = pen.value(w.to(DT))  # the same (rounded) weights in float64
    assert float(v) == pytest.approx(float(ref), rel=2 * torch.finfo(dtype).eps)
    g = grad(pen.value)(w)
    assert g.dtype == dtype and torch.isfinite(g).all()
    if pen.has_prox:
        y = pen.prox(w, 0.3)
        assert y.dtype == dtype
        torch.testing.assert_close(
            y.to(DT), pen.prox(w.to(DT), 0.3), rtol=0, atol=4 * torch.finfo(dtype).eps * 3
        )


@pytest.mark.parametrize(
    "pen",
    [fr.Nuclear(), fr.SpectralNorm(), fr.Orthogonal(), fr.Orthogonal(mode="columns")],
    ids=repr,
)
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 2, 2)])
def test_matrix_penalties_on_empty_matrices(pen, shape):
    w = torch.zeros(shape, dtype=DT)
    assert float(pen.value(w)) == 0.0
    assert float(pen.penalty(w, 2.0)) == 0.0
    g = grad(pen.value)(w)
    assert g.shape == w.shape
    if pen.has_prox:
        assert torch.equal(pen.prox(w, 0.5), w)


# --- errors that say what to do -------------------------------------------------------------


def test_dict_toward_without_the_parameter_is_a_clear_error():
    pen = fr.L2(toward={"a": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"L2: toward= has no entry for parameter 'b'.*\['a'\]"):
        pen.value(torch.zeros(2), "b")
    with pytest.raises(ValueError, match=r"L2 has a dict-valued toward=: pass name="):
        pen.value(torch.zeros(2))


def test_prox_of_a_penalty_without_one_says_what_to_do():
    with pytest.raises(NotImplementedError, match=r"SpectralNorm has no closed-form.*smooth"):
        fr.SpectralNorm().prox(torch.ones(2, 2), 0.1)

    class Rough(fr.SpectralNorm):
        smooth = False

    with pytest.raises(NotImplementedError, match=r"Rough has no.*train with prox=False"):
        Rough().prox(torch.ones(2, 2), 0.1)
