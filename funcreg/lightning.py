"""A PyTorch Lightning callback that applies a spec to the ``Trainer``'s optimizer.

    net = LitNet()                       # terms declared with fr.regularize in __init__
    trainer = pl.Trainer(callbacks=[fr.lightning.Regularize({"l1": 1e-3})])
    trainer.fit(net, loader)

It is :func:`funcreg.attach` wired into ``Trainer.fit``: at fit start it attaches to every
optimizer the ``LightningModule`` configured, the smooth terms' gradient is added in
``on_before_optimizer_step`` (after Lightning's closure has run the backward, before the
update; with ``precision="16-mixed"`` and a fused optimizer, whose gradients are still
scaled there, scaled alike), the non-smooth terms are applied by their prox after each step
(in Adam's metric for Adam/AdamW; skipped with a step the scaler skips) and constraints by
projection; after each training batch it logs
``penalty/<term>``, ``penalty/total`` and ``zeros/fraction`` (exact zeros over the
coordinates the terms select). Importing this module needs ``pytorch-lightning``
(``pip install funcreg[lightning]``); nothing else in funcreg does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

from .hooks import Attached, Strengths, attach
from .spec import Spec

__all__ = ["Regularize"]


class Regularize(pl.Callback):
    """Apply ``spec`` (``None``: the terms declared on the ``LightningModule`` with
    ``fr.regularize``) with ``strengths`` (a dict, or a schedule ``step -> dict``) during
    ``Trainer.fit``; ``metric`` as for :func:`funcreg.attach`; ``log=False`` logs nothing.
    The attached handles are in :attr:`handles` during the fit."""

    def __init__(
        self,
        strengths: Strengths,
        spec: Spec | Mapping[str, Any] | None = None,
        *,
        metric: str = "auto",
        log: bool = True,
    ) -> None:
        super().__init__()
        self.strengths = strengths
        self.spec = spec
        self.metric = metric
        self.log = log
        self.handles: list[Attached] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        for optimizer in trainer.optimizers:
            self.handles.append(
                attach(
                    optimizer,
                    self.spec,
                    self.strengths,
                    model=pl_module,
                    smooth="loss",  # added in on_before_optimizer_step, after the backward
                    metric=self.metric,
                )
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = None
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = scaler.get_scale()  # a fused optimizer's gradients are still scaled here
        for handle in self.handles:
            if handle.optimizer is optimizer:
                handle.add_smooth_gradient(scale=scale)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.log or not self.handles:
            return
        handle = self.handles[0]
        for term, value in handle.penalty().items():
            name = "penalty/total" if term == "penalty" else f"penalty/{term}"
            pl_module.log(name, value.float(), on_step=True, on_epoch=False)
        pl_module.log("zeros/fraction", handle.zero_fraction(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
