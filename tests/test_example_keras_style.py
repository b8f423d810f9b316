"""The Keras-style example runs, at a small size, and shows what it claims."""

from __future__ import annotations

import pytest


@pytest.fixture
def example(load_example, one_thread):
    return load_example("keras_style")


def test_declared_terms_give_exact_zeros_in_a_stock_loop_and_a_sweep(example, capsys):
    out = example.main(["--steps", "300"])
    assert out["sgd_zero_fraction"] > 0
    assert out["adam_zero_fraction"] > 0
    assert out["sweep_max_zero_fraction"] == 1.0  # the largest strength zeroes the layer
    assert out["sweep_models"] == 16  # the declared spec, 16 strengths, one run
    assert "hidden.weight" in capsys.readouterr().out
