"""What the penalty classes know about themselves: the zero threshold behind
``strength_max`` (``zero_threshold``), group counts (``nonzero_groups``) and whether the
prox is elementwise (``elementwise``), each against an independent reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

import funcreg as fr
import funcreg.penalties as penalties_module

DT = torch.float64


def _grad(seed, shape=(5, 4), dtype=DT):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- zero_threshold -------------------------------------------------------------------------


def _ref_l1(g, c, r):
    pairs = zip(g.flatten().tolist(), c.flatten().tolist(), strict=True)
    vals = [abs(a) / (r * b) for a, b in pairs if b > 0]
    return max(vals, default=0.0)


def _columns(g, dim):
    m = g if dim == 0 else g.T  # groups are the slices along the axis not in dim
    return [m[:, j].tolist() for j in range(m.shape[1])]


def _ref_group(g, dim, cg):
    cols = _columns(g, dim)
    root = math.sqrt(len(cols[0]))
    pairs = zip(cols, cg, strict=True)
    vals = [math.sqrt(sum(v * v for v in col)) / (root * c) for col, c in pairs if c > 0]
    return max(vals, default=0.0)


def _sgl_kkt_gap(col, lam, r, c):
    """‖soft(g, λ r c)‖ − λ (1 − r) √|g| c: ≤ 0 iff zero is stationary for this group."""
    soft = [max(abs(v) - lam * r * c, 0.0) for v in col]
    return math.sqrt(sum(s * s for s in soft)) - lam * (1 - r) * math.sqrt(len(col)) * c


@pytest.mark.parametrize("r", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("seed", range(4))
def test_l1_and_elastic_net_threshold_is_max_abs_grad_over_factor(r, seed):
    g = _grad(seed)
    c = torch.rand(g.shape, generator=torch.Generator().manual_seed(seed + 9), dtype=DT)
    c[0, :2] = 0.0  # unpenalised coordinates set no bound
    pen = fr.L1(weight=c) if r == 1.0 else fr.ElasticNet(l1_ratio=r, weight=c)
    assert pen.zero_threshold(g, "w") == pytest.approx(_ref_l1(g, c, r), rel=1e-15)
    plain = fr.L1() if r == 1.0 else fr.ElasticNet(l1_ratio=r)
    assert plain.zero_threshold(g, "w") == pytest.approx(float(g.abs().max()) / r, rel=1e-15)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("seed", range(4))
def test_group_lasso_threshold_is_max_group_norm_over_root_size_and_factor(dim, seed):
    g = _grad(seed)
    n_groups = g.shape[1 - dim]
    cg = [0.0] + [0.5 + k for k in range(n_groups - 1)]
    shape = (1, n_groups) if dim == 0 else (n_groups, 1)
    pen = fr.GroupLasso(dim=dim, weight={"w": torch.tensor(cg, dtype=DT).reshape(shape)})
    assert pen.zero_threshold(g, "w") == pytest.approx(_ref_group(g, dim, cg), rel=1e-14)
    # a dict without this name: factor 1
    assert pen.zero_threshold(g, "other") == pytest.approx(
        _ref_group(g, dim, [1.0] * n_groups), rel=1e-14
    )


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("r", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_sparse_group_lasso_threshold_is_the_smallest_kkt_strength(dim, r, seed):
    """At the threshold every group satisfies its KKT condition at zero; a hair below, one
    group does not (computed with Python floats, independently of the bisection)."""
    g = _grad(seed)
    cols = _columns(g, dim)
    cg = [0.7 + 0.3 * k for k in range(len(cols))]
    shape = (1, len(cols)) if dim == 0 else (len(cols), 1)
    pen = fr.SparseGroupLasso(dim=dim, l1_ratio=r, weight=torch.tensor(cg, dtype=DT).reshape(shape))
    lam = pen.zero_threshold(g, "w")
    assert max(_sgl_kkt_gap(col, lam, r, c) for col, c in zip(cols, cg, strict=True)) <= 1e-12 * lam
    below = lam * (1 - 1e-9)
    assert max(_sgl_kkt_gap(col, below, r, c) for col, c in zip(cols, cg, strict=True)) > 0


def test_sparse_group_lasso_threshold_at_the_ends_of_l1_ratio():
    g = _grad(3)
    assert fr.SparseGroupLasso(l1_ratio=1.0).zero_threshold(g, "w") == pytest.approx(
        fr.L1().zero_threshold(g, "w"), rel=1e-15
    )
    assert fr.SparseGroupLasso(l1_ratio=0.0).zero_threshold(g, "w") == pytest.approx(
        fr.GroupLasso().zero_threshold(g, "w"), rel=1e-15
    )


PENALTIES_WITH_ZEROS = [
    fr.L1(),
    fr.ElasticNet(l1_ratio=0.4),
    fr.GroupLasso(dim=0),
    fr.GroupLasso(dim=1),
    fr.SparseGroupLasso(dim=0, l1_ratio=0.3),
    fr.SparseGroupLasso(dim=1, l1_ratio=0.8),
]


@pytest.mark.parametrize("pen", PENALTIES_WITH_ZEROS, ids=repr)
@given(seed=st.integers(0, 10_000), t=st.floats(0.01, 2.0))
@settings(max_examples=30, deadline=None)
def test_threshold_is_where_zero_becomes_a_fixed_point_of_the_prox_gradient_step(pen, seed, t):
    """Zero is stationary iff it is a fixed point of ``w ↦ prox_{t s Ω}(w − t g)``: the
    step from zero stays at zero just above the threshold and leaves it just below."""
    g = _grad(seed, shape=(4, 3))
    s = pen.zero_threshold(g, "w")
    assert torch.equal(pen.prox_step(-t * g, t, s * (1 + 1e-9)), torch.zeros_like(g))
    assert bool((pen.prox_step(-t * g, t, s * (1 - 1e-6)) != 0).any())


@pytest.mark.parametrize("pen", PENALTIES_WITH_ZEROS, ids=repr)
def test_threshold_edge_cases(pen):
    assert pen.zero_threshold(torch.zeros(0, 3, dtype=DT), "w") == 0.0
    assert pen.zero_threshold(torch.zeros(4, 3, dtype=DT), "w") == 0.0
    g32 = _grad(1, dtype=torch.float32)
    assert isinstance(pen.zero_threshold(g32, "w"), float)
    assert pen.zero_threshold(g32, "w") == pytest.approx(
        pen.zero_threshold(g32.double(), "w"), rel=1e-6
    )
    if not isinstance(pen, fr.GroupLasso):
        assert fr.L1(weight=torch.zeros(5, 4)).zero_threshold(_grad(0), "w") == 0.0


@pytest.mark.parametrize(
    "pen", [fr.L2(), fr.MCP(), fr.SCAD(), fr.Nuclear(), fr.SpectralNorm(), fr.NonNegative()]
)
def test_threshold_of_penalties_without_exact_sparsity_is_an_error(pen):
    msg = (
        rf"{type(pen).__name__} induces no exact sparsity; strength_max is defined for L1, "
        r"ElasticNet \(l1_ratio > 0\), GroupLasso and SparseGroupLasso"
    )
    with pytest.raises(ValueError, match=msg):
        pen.zero_threshold(_grad(0), "w")
    with pytest.raises(ValueError, match=r"ElasticNet with l1_ratio=0 is ridge"):
        fr.ElasticNet(l1_ratio=0.0).zero_threshold(_grad(0), "w")


# --- nonzero_groups -------------------------------------------------------------------------


def _count_groups(w, dim):
    return sum(any(v != 0 for v in col) for col in _columns(w, dim))


@pytest.mark.parametrize("dim", [0, 1])
def test_nonzero_groups_counts_groups_with_a_nonzero_entry(dim):
    w = _grad(0, shape=(4, 6))
    w = torch.where(w.abs() < 0.7, 0.0, w)
    w[:, 1] = 0.0
    w[2, :] = 0.0
    w[0, 3] = 1e-320  # subnormal: its square underflows, but the group is not zero
    for pen in (fr.GroupLasso(dim=dim), fr.SparseGroupLasso(dim=dim)):
        n = pen.nonzero_groups(w)
        assert n.dtype == torch.int64 and n.dim() == 0
        assert int(n) == _count_groups(w, dim)
    assert int(fr.GroupLasso(dim=(0, 1)).nonzero_groups(w)) == 1
    assert int(fr.GroupLasso().nonzero_groups(torch.zeros(0, 3))) == 0


def test_nonzero_groups_under_vmap_equals_the_loop():
    stacked = _grad(2, shape=(7, 4, 5))
    stacked = torch.where(stacked.abs() < 1.0, 0.0, stacked)
    stacked[3] = 0.0
    for pen in (fr.GroupLasso(dim=0), fr.SparseGroupLasso(dim=1)):
        got = vmap(pen.nonzero_groups)(stacked)
        assert got.dtype == torch.int64
        assert got.tolist() == [_count_groups(stacked[k], pen.dim) for k in range(7)]


@pytest.mark.parametrize(
    "pen", [fr.L1(), fr.L2(), fr.ElasticNet(), fr.MCP(), fr.Nuclear(), fr.MaxNorm(), fr.Box()]
)
def test_nonzero_groups_is_none_without_groups(pen):
    assert pen.nonzero_groups(torch.ones(3, 2)) is None


# --- elementwise ----------------------------------------------------------------------------


def test_elementwise_flag_marks_exactly_the_coordinatewise_prox_penalties():
    classes = {
        v
        for v in vars(penalties_module).values()
        if isinstance(v, type) and issubclass(v, fr.Penalty)
    }
    flagged = {c.__name__ for c in classes if c.elementwise}
    assert flagged == {"L1", "L2", "ElasticNet", "NonNegative", "Box"}


def test_elementwise_is_not_inherited_unless_the_subclass_says_so():
    class Doubled(fr.L1):
        def _prox(self, d, t, c):
            return super()._prox(d, 2 * t, c)

    class Tagged(fr.L1):
        elementwise = True

    assert not Doubled.elementwise and not Doubled().elementwise
    assert Tagged.elementwise


@pytest.mark.parametrize(
    "pen",
    [fr.L1(), fr.L2(), fr.ElasticNet(l1_ratio=0.3), fr.NonNegative(), fr.Box(lo=-0.2, hi=0.5)],
    ids=repr,
)
def test_elementwise_prox_on_a_stacked_tensor_with_broadcast_steps_equals_vmap(pen):
    """What the flag promises: the prox applied to ``(K, ...)`` with ``(K, 1, 1)`` steps and
    strengths is the per-model prox."""
    w = _grad(5, shape=(6, 4, 3))
    lr = torch.linspace(0.05, 0.6, 6, dtype=DT)
    s = torch.linspace(0.0, 2.0, 6, dtype=DT)
    direct = pen.prox_step(w, lr.view(-1, 1, 1), s.view(-1, 1, 1))
    per_model = vmap(pen.prox_step)(w, lr, s)
    torch.testing.assert_close(direct, per_model, rtol=0, atol=0)
