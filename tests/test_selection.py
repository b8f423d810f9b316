"""Selection rules: the one-standard-error rule, SweepResult.best(rule=...), fold masks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from funcreg._folds import fold_masks
from funcreg.result import SweepResult, one_se_index


def test_one_se_index_picks_the_most_regularised_within_one_se() -> None:
    mean = torch.tensor([3.0, 1.2, 1.0, 1.05, 2.0])
    se = torch.tensor([0.1, 0.1, 0.25, 0.1, 0.1])
    order = torch.tensor([0.1, 1.0, 0.5, 0.2, 0.01])  # strengths, not sorted
    # best is index 2 (1.0 ± 0.25): within 1.25 are 1 (strength 1.0), 2, 3 -> strength 1.0
    assert one_se_index(mean, se, order) == 1
    assert one_se_index(mean, torch.zeros(5), order) == 2  # se = 0: the minimum itself
    # NaN scores never win; ties in the order are broken by the lower mean
    mean_nan = torch.tensor([float("nan"), 1.0, 1.1])
    assert one_se_index(mean_nan, torch.full((3,), 0.5), torch.tensor([9.0, 1.0, 1.0])) == 1
    with pytest.raises(ValueError, match="no model has a finite score"):
        one_se_index(torch.full((2,), float("nan")), torch.ones(2), torch.ones(2))


def _result(
    grid: dict[str, torch.Tensor], val: torch.Tensor, se: torch.Tensor | None
) -> SweepResult:
    k = val.numel()
    history: dict[str, Any] = {
        "loss": val[None].clone(),
        "penalty": torch.zeros(1, k),
        "eval_step": torch.tensor([1]),
        "val_loss": val[None],
        "zeros": {},
    }
    if se is not None:
        history["val_loss_se"] = se[None]
    return SweepResult(
        grid=grid,
        stacked={"w": torch.zeros(k, 2)},
        stacked_buffers={},
        history=history,
        diverged=torch.zeros(k, dtype=torch.bool),
        diverged_at=torch.full((k,), -1),
        steps=1,
        meta={"metrics": ["loss", "penalty", *[a for a in grid if a != "lr"]]},
    )


def test_sweep_result_best_rules() -> None:
    s = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    val = torch.tensor([2.0, 1.1, 1.0, 1.3])
    plain = _result({"l1": s}, val, None)
    assert plain.best().index == 2 and plain.best(rule="min").index == 2
    with pytest.raises(ValueError, match=r"rule='1se' needs the standard error of 'val_loss'"):
        plain.best(rule="1se")
    with pytest.raises(ValueError, match="rule must be 'min' or '1se'"):
        plain.best(rule="2se")
    with_se = _result({"l1": s}, val, torch.full((4,), 0.15))
    b = with_se.best(rule="1se")
    assert (
        b.index == 1 and b.strengths["l1"] == pytest.approx(0.1) and "one-standard-error" in b.note
    )
    # two varying axes: which one orders the models must be said
    two = _result(
        {"l1": s, "lr": torch.tensor([0.1, 0.2, 0.1, 0.2], dtype=torch.float64)},
        val,
        torch.full((4,), 0.15),
    )
    with pytest.raises(ValueError, match=r"varies along several axes \['l1', 'lr'\]; pass axis="):
        two.best(rule="1se")
    assert two.best(rule="1se", axis="l1").index == 1
    with pytest.raises(ValueError, match="axis 'l2' is not a grid axis"):
        two.best(rule="1se", axis="l2")


def test_fold_masks_errors() -> None:
    with pytest.raises(ValueError, match=r"folds\[1\] has an empty test set"):
        fold_masks([([0, 1], [2]), ([0, 1], [])], 3)
    with pytest.raises(ValueError, match=r"indices must be integers in \[0, 3\)"):
        fold_masks([([0, 1], [5]), ([0, 2], [1])], 3)
    with pytest.raises(TypeError, match=r"folds\[0\] must be a \(train_idx, test_idx\) pair"):
        fold_masks([1, 2], 3)
    with pytest.raises(TypeError, match="folds must be an int"):
        fold_masks(2.5, 3)
    with pytest.raises(ValueError, match="fold ids must be integers"):
        fold_masks(torch.tensor([0.0, 0.5, 1.0]), 3)
    train, test = fold_masks([([0, 1], [2]), ([1, 2], [0])], 3)
    assert train.tolist() == [[True, True, False], [False, True, True]]
    assert test.tolist() == [[False, False, True], [True, False, False]]
