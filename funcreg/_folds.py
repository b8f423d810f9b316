"""The folds of cross-validation as data: 0/1 sample masks, weighted means of an ordinary
loss, and the one-hot fold vector that travels with each model (how they are used:
:mod:`funcreg.selection`)."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from .selectors import by_name
from .spec import Spec

__all__ = [
    "FOLD_KEY",
    "accepts_weight",
    "exclude_fold",
    "fold_masks",
    "fold_pairs",
    "weighted_mean",
    "without_fold",
]

FOLD_KEY = "_funcreg_cv_fold"  # the one-hot fold vector that travels with each model


# ------------------------------------------------------------------------------ folds


def fold_masks(folds: Any, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(train, test)`` 0/1 masks of shape ``(F, n)`` from ``folds``:

    * an int ``F``: shuffled K-fold — a seeded permutation cut into ``F`` consecutive
      parts of sizes ``n // F`` (+1 for the first ``n % F``), as ``KFold(shuffle=True)``;
    * a per-sample tensor of fold ids (glmnet's ``foldid``): fold ``f`` holds out the
      samples with the ``f``-th smallest id;
    * a list of ``(train_idx, test_idx)`` pairs (scikit-learn's ``cv.split(X)``).
    """
    if isinstance(folds, bool):
        raise TypeError("folds must be an int, a tensor of fold ids or (train, test) pairs")
    if n == 0:
        raise ValueError("cross-validation needs data: the data has no samples")
    if (
        isinstance(folds, Sequence)
        and not isinstance(folds, str | bytes)
        and len(folds) == n
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in folds)
    ):
        folds = torch.as_tensor(list(folds))  # fold ids given as a plain list
    if isinstance(folds, numbers.Integral):
        f = int(folds)
        if f < 2:
            raise ValueError(f"folds must be >= 2 for cross-validation, got folds={f}")
        if f > n:
            raise ValueError(
                f"more folds ({f}) than samples ({n}): every fold needs a held-out sample; "
                f"use folds <= {n}"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        test = torch.zeros(f, n, dtype=torch.bool)
        start = 0
        for j in range(f):
            size = n // f + (1 if j < n % f else 0)
            test[j, perm[start : start + size]] = True
            start += size
        return ~test, test
    if isinstance(folds, Tensor | np.ndarray) and np.ndim(folds) == 1:
        ids = torch.as_tensor(folds)
        if ids.numel() != n:
            raise ValueError(f"folds: {ids.numel()} fold ids for {n} samples; give one per sample")
        if ids.is_floating_point() and not bool((ids == ids.round()).all()):
            raise ValueError("folds: fold ids must be integers")
        uniq = torch.unique(ids)
        if uniq.numel() < 2:
            raise ValueError(
                f"folds must be >= 2 for cross-validation: the fold ids hold {uniq.numel()} "
                "distinct value(s)"
            )
        test = ids[None, :] == uniq[:, None]
        return ~test, test
    if hasattr(folds, "split") and not isinstance(folds, str | bytes):
        raise TypeError(
            f"folds: a scikit-learn splitter ({type(folds).__name__}) needs the data to split; "
            "pass its pairs, folds=list(cv.split(X, y)), or an int for funcreg's own K-fold"
        )
    if isinstance(folds, Iterator):  # cv.split(X): a generator of pairs
        folds = list(folds)
    if isinstance(folds, Sequence) and not isinstance(folds, str | bytes):
        pairs = list(folds)
        if len(pairs) < 2:
            raise ValueError(
                f"folds must be >= 2 for cross-validation, got {len(pairs)} (train, test) pair(s)"
            )
        train = torch.zeros(len(pairs), n, dtype=torch.bool)
        test = torch.zeros(len(pairs), n, dtype=torch.bool)
        for j, pair in enumerate(pairs):
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(
                    f"folds[{j}] must be a (train_idx, test_idx) pair, got {type(pair).__name__}"
                )
            for mask, idx, what in ((train, pair[0], "train"), (test, pair[1], "test")):
                t = torch.as_tensor(np.asarray(idx)).reshape(-1)
                if t.dtype == torch.bool:
                    t = t.nonzero().reshape(-1)
                if t.numel() == 0:
                    raise ValueError(f"folds[{j}] has an empty {what} set")
                if t.is_floating_point() or int(t.min()) < -n or int(t.max()) >= n:
                    raise ValueError(
                        f"folds[{j}]: {what} indices must be integers in [0, {n}), got "
                        f"{t.tolist()[:5]}"
                    )
                mask[j, t] = True
        return train, test
    raise TypeError(
        "folds must be an int (K-fold), a per-sample tensor of fold ids or a list of "
        f"(train_idx, test_idx) pairs, got {type(folds).__name__}"
    )


# -------------------------------------------------------------------- weighted losses


def fold_pairs(folds: Any, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds of :func:`fold_masks` as scikit-learn's ``(train_idx, test_idx)`` index
    pairs: pass them as ``cv=`` to ``LassoCV``/``cross_val_score`` to compare on exactly the
    folds that :func:`funcreg.cross_validate` and :func:`funcreg.tune` use for the same
    ``folds`` and ``seed``.

    >>> pairs = fr.selection.fold_pairs(5, len(y))
    >>> LassoCV(cv=pairs).fit(X, y)          # the same 5 folds as fr.tune(..., folds=5)
    """
    train, test = fold_masks(folds, n, seed)
    return [
        (np.flatnonzero(a.cpu().numpy()), np.flatnonzero(b.cpu().numpy()))
        for a, b in zip(train, test, strict=True)
    ]


def accepts_weight(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a ``weight`` keyword (then it gets the sample weights)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("weight")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def check_no_activity(sweep_kwargs: Mapping[str, Any]) -> None:
    """``cross_validate`` takes no ``activity=`` terms: a fold sees the data through
    per-sample weights, and an activity term sums over every sample of a batch."""
    if sweep_kwargs.get("activity"):
        raise ValueError(
            "cross_validate: activity= terms are not supported: a fold sees the data through "
            "per-sample weights, and an activity term sums over every sample of a batch, held-"
            "out ones included. Validate activity strengths with fr.sweep(..., activity=..., "
            "val=(x_val, y_val)) on each split and compare history['val_loss']"
        )


def weighted_mean(fn: Callable[..., Tensor], use_weight: bool) -> Callable[..., Tensor]:
    """``(params, w, *batch) -> Σ_i w_i ℓ_i / Σ_i w_i`` from a mean-reduced ``fn`` (see
    :mod:`funcreg.selection`: by ``weight=`` or by per-sample evaluation under ``vmap``)."""
    if use_weight:

        def by_keyword(p: Mapping[str, Tensor], w: Tensor, *batch: Tensor) -> Tensor:
            # a minibatch may hold none of a fold's samples: its loss is 0 then, not 0/0
            some = w.sum() > 0
            out = fn(p, *batch, weight=torch.where(some, w, torch.ones_like(w)))
            return torch.where(some, out, torch.zeros_like(out))

        return by_keyword

    def per_sample(p: Mapping[str, Tensor], w: Tensor, *batch: Tensor) -> Tensor:
        def one(*sample: Tensor) -> Tensor:
            return fn(p, *(t.unsqueeze(0) for t in sample))

        losses = vmap(one)(*batch)
        total = w.sum()
        return (w * losses).sum() / torch.where(total > 0, total, torch.ones_like(total))

    return per_sample


def without_fold(p: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``p`` without the fold vector."""
    return {k: v for k, v in p.items() if k != FOLD_KEY}


def exclude_fold(spec: Spec) -> Spec:
    """The spec with every selector told to skip the fold vector."""
    skip = ~by_name(FOLD_KEY)
    return Spec({t: replace(pen, select=pen.selector & skip) for t, pen in spec.items()})
