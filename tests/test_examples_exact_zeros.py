"""The exact-zeros example runs, at a small size, and shows what it claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "exact_zeros.py"


@pytest.fixture
def example():
    spec = importlib.util.spec_from_file_location("exact_zeros_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(before)


def test_prox_gives_exact_zeros_and_subgradient_none(example, capsys):
    counts = example.main(n=256, steps=300)
    assert counts["L1 prox"] > 0
    assert counts["L1 subgradient"] == 0
    assert counts["GroupLasso(dim=0) prox"] > 0
    assert counts["GroupLasso(dim=0) subgradient"] == 0
    out = capsys.readouterr().out
    assert "exact zeros" in out and "inputs kept" in out
