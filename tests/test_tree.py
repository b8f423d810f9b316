"""funcreg._tree: the one-vector reductions equal the per-tensor route they replace."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcreg import _tree

DT = torch.float64


def _tensors(shapes, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(s), generator=g, dtype=dtype) for s in shapes]


def _reference(ts):
    ts = [t for t in ts if t.numel()]
    abs_sum = sum(float(t.abs().sum()) for t in ts)
    sq_sum = sum(float((t * t).sum()) for t in ts)
    largest = max((float(t.abs().max()) for t in ts), default=0.0)
    return abs_sum, sq_sum, largest


shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 10_000))
def test_reductions_equal_the_per_tensor_route(shapes, seed):
    ts = _tensors(shapes, seed=seed)
    abs_sum, sq_sum, largest = _reference(ts)
    assert float(_tree.sum_abs(ts)) == pytest.approx(abs_sum, rel=1e-12, abs=1e-300)
    assert float(_tree.sum_squares(ts)) == pytest.approx(sq_sum, rel=1e-12, abs=1e-300)
    assert _tree.max_abs(ts) == largest


def test_large_or_mixed_lists_take_the_per_tensor_route_with_the_same_numbers():
    big = _tensors([(300, 300), (10,)])  # over FLAT_MAX elements: not copied
    mixed = [*_tensors([(3, 4)]), *_tensors([(5,)], dtype=torch.float32)]
    assert _tree.flat(big) is None and _tree.flat(mixed) is None
    for ts in (big, mixed):
        abs_sum, sq_sum, largest = _reference(ts)
        assert float(_tree.sum_abs(ts)) == pytest.approx(abs_sum, rel=1e-6)
        assert float(_tree.sum_squares(ts)) == pytest.approx(sq_sum, rel=1e-6)
        assert _tree.max_abs(ts) == pytest.approx(largest, rel=1e-7)


def test_one_contiguous_tensor_is_viewed_not_copied():
    (t,) = _tensors([(4, 5)])
    v = _tree.flat([t])
    assert v is not None and v.data_ptr() == t.data_ptr()
    assert _tree.flat([t.T]) is not None  # a strided one is copied
    assert _tree.flat([]) is None and _tree.max_abs([]) == 0.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("big", [False, True], ids=["flat", "per-tensor"])
def test_max_abs_sees_every_non_finite_value_and_never_overflows(bad, big):
    ts = _tensors([(300, 300) if big else (30, 3), (7,)], dtype=torch.float32)
    huge = [t.fill_(3e38) for t in _tensors([(400,), (3,)], dtype=torch.float32)]
    assert math.isfinite(_tree.max_abs(huge))  # a sum would overflow to inf here
    ts[1][4] = bad
    assert not math.isfinite(_tree.max_abs(ts))


_SPECIAL = [0.0, 1.0, -2.5, 3e38, -3e38, 6e4, 1e-40, math.inf, -math.inf, math.nan]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(_SPECIAL), max_size=6), max_size=4),
    st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
)
def test_all_finite_is_every_entry_finite(values: list[list[float]], dtype: torch.dtype) -> None:
    """``all_finite`` (a sum per tensor, then the largest magnitude when the sum is not
    finite) says what ``isfinite().all()`` says, also where finite entries sum past the
    dtype's range, for empty lists, empty tensors, subnormals and half precision."""
    ts = [torch.tensor(v, dtype=torch.float64).to(dtype) for v in values]
    expected = all(bool(torch.isfinite(t).all()) for t in ts)
    assert _tree.all_finite(ts) is expected
