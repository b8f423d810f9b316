"""The Lightning callback equals the plain loop with fr.attach and logs the penalty."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import funcreg as fr

pl = pytest.importorskip("pytorch_lightning")
from funcreg.lightning import Regularize  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = fr.regularize(nn.Linear(6, 5), l1=fr.L1(), l2=fr.L2())
        self.out = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


class LitNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(32, dtype=torch.float64, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def test_lightning_fit_equals_plain_loop_with_attach():
    strengths = {"l1": 0.3, "l2": 0.1}
    torch.manual_seed(0)
    lit = LitNet().double()
    torch.manual_seed(0)
    plain = LitNet().double()

    optimizer = plain.configure_optimizers()
    handle = fr.attach(optimizer, None, strengths, model=plain)
    for _ in range(2):
        for batch_idx, batch in enumerate(_loader()):
            optimizer.zero_grad()
            plain.training_step(batch, batch_idx).backward()
            optimizer.step()
    handle.remove()

    callback = Regularize(strengths)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer.fit(lit, _loader())

    for (name, a), b in zip(lit.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert int((lit.net.hidden.weight == 0).sum()) > 0  # exact zeros
    metrics = trainer.logged_metrics
    for key in ("penalty/l1", "penalty/l2", "penalty/total", "zeros/fraction"):
        assert key in metrics
    w = lit.net.hidden.weight.detach()
    expected = 0.3 * w.abs().sum() + 0.1 * 0.5 * w.square().sum()
    torch.testing.assert_close(metrics["penalty/total"].double(), expected, rtol=1e-6, atol=0)
    assert not callback.handles  # removed at fit end


class FusedLitNet(LitNet):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05, fused=self.fused)


def test_mixed_precision_with_a_fused_optimizer_equals_the_unfused_fit():
    """Lightning unscales an unfused optimizer's gradients before on_before_optimizer_step,
    a fused one's only inside its step: the callback's smooth gradient is scaled to match."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        lit = FusedLitNet(fused).float()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            callbacks=[Regularize({"l1": 0.01, "l2": 1.0})],
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(lit, _loader_float())
        weights.append([p.detach().clone() for p in lit.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _loader_float() -> torch.utils.data.DataLoader:
    x, y = _loader().dataset.tensors
    data = torch.utils.data.TensorDataset(x.float(), y.float())
    return torch.utils.data.DataLoader(data, batch_size=8)
