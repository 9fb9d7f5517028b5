"""ClassifierModule and its learning-rate schedule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from symstitch.data import DataModule, normalize_batch
from symstitch.training import ClassifierModule, WarmupCosine


def test_warmup_cosine_closed_form():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = WarmupCosine(opt, total_steps=100, warmup=0.1, final_fraction=0.0)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for t in range(10):
        assert lrs[t] == pytest.approx(0.2 * (t + 1) / 10)
    for t in (10, 37, 55, 99):
        assert lrs[t] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90)))
    assert max(lrs) == pytest.approx(0.2)


def test_fit_learns_digits_and_logs_exact_metrics(tmp_path):
    pl.seed_everything(0)
    dm = DataModule(dataset="digits", batch_size=64)
    module = ClassifierModule("mcnn", arch_kwargs={"width": 0.25}, num_classes=dm.num_classes)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    (tested,) = trainer.test(module, datamodule=dm, verbose=False)
    # the logged accuracy is the exact fraction of correct test predictions
    module.eval()
    dm.setup("test")
    x, y = dm.test_set.x, dm.test_set.y
    with torch.no_grad():
        logits = module(normalize_batch(x, dm.mean, dm.std))
    assert tested["test/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert tested["test/acc"] > 0.8
