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


# --------------------------------------------------------------- CV standard error


def test_cv_standard_error_is_the_sample_std_over_root_f() -> None:
    """``CVResult.se`` is ``std(scores, ddof=1) / √F``, against values written out with the
    standard library (ddof=0 or a division by F instead of √F differ by 12% or more here)."""
    import math
    import statistics

    from funcreg.selection import CVResult

    rows = [[1.0, 2.5, 0.25], [1.5, 2.0, 0.5], [0.5, 4.0, 0.125], [2.0, 3.0, 1.0]]  # F=4, K=3
    scores = torch.tensor(rows, dtype=torch.float64)
    cv = CVResult(
        grid={"l1": torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64)},
        scores=scores,
        folds=[],
        path=None,  # type: ignore[arg-type]  # the statistics need no path
        axis="l1",
    )
    for k in range(3):
        col = [r[k] for r in rows]
        expect = statistics.stdev(col) / math.sqrt(4)
        assert float(cv.se[k]) == pytest.approx(expect, rel=1e-14)
        assert float(cv.mean[k]) == pytest.approx(statistics.fmean(col), rel=1e-15)
    assert float(cv.se[0]) == pytest.approx(0.3227486121839514, rel=1e-14)  # sqrt(5/12)/2


def test_cross_validate_standard_error_and_the_paths_copy_of_it() -> None:
    """On a real cross-validation (exact solver, 5 folds): ``cv.se`` and the path's
    ``history["val_loss_se"]`` equal the standard error computed with numpy from the fold
    scores (ddof=1, over √F) to 1e-12, and the scores' mean is the path's ``val_loss``."""
    import numpy as np
    from torch import nn
    from torch.func import functional_call

    import funcreg as fr
    from funcreg.selection import cross_validate

    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = x[:, 0] - 2 * x[:, 1] + 0.5 * torch.randn(60, generator=g, dtype=torch.float64)
    net = nn.Linear(6, 1).double()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()

    def loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((functional_call(net, params, (xb,)).squeeze(-1) - yb) ** 2).mean()

    cv = cross_validate(
        net, loss, fr.Spec(l1=fr.L1("weight")), [1.0, 0.3, 0.1, 0.03, 0.01], (x, y), folds=5
    )
    s = cv.scores.numpy()
    assert s.shape == (5, 5) and np.isfinite(s).all()
    se = s.std(0, ddof=1) / np.sqrt(5)
    assert np.allclose(cv.se.numpy(), se, rtol=1e-12, atol=0)
    assert np.allclose(cv.path.history["val_loss_se"][-1].numpy(), se, rtol=1e-12, atol=0)
    assert np.allclose(cv.path.history["val_loss"][-1].numpy(), s.mean(0), rtol=1e-12, atol=0)
    assert (se > 0).all()
