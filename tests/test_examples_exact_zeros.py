"""The exact-zeros example runs, at a small size, and shows what it claims."""

from __future__ import annotations

import pytest


@pytest.fixture
def example(load_example, one_thread):
    return load_example("exact_zeros")


def test_prox_gives_exact_zeros_and_subgradient_none(example, capsys):
    counts = example.main(n=256, steps=300)
    assert counts["L1 prox"] > 0
    assert counts["L1 subgradient"] == 0
    assert counts["GroupLasso(dim=0) prox"] > 0
    assert counts["GroupLasso(dim=0) subgradient"] == 0
    out = capsys.readouterr().out
    assert "exact zeros" in out and "inputs kept" in out
