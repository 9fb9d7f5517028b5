"""The private Lightning names symstitch relies on, each kept to one small adapter here because Lightning offers
no public route; ``tests/test_lightning_adapters.py`` fails as soon as Lightning renames or changes them.

- :class:`QuietWandbLogger`: Lightning's ``WandbLogger`` always passes ``anonymous`` to ``wandb.init`` (None unless
  asked for), and W&B (0.31) then warns on every run that the setting has no effect. No constructor argument of
  Lightning's leaves it out.
- :func:`find_unused_parameters`: a module that stops using some of its parameters mid-fit (a G_σ stitch after
  hardening) needs DDP to look for parameters without gradients. Lightning's public routes,
  ``DDPStrategy(find_unused_parameters=True)`` and ``strategy="ddp_find_unused_parameters_true"``, are chosen when
  the trainer is built, from the user's strategy setting (``ddp``, ``auto`` on several devices, a DDPStrategy of
  their own); only the module knows it needs them, at ``setup``, which runs before DDP wraps it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy

from symstitch.loggers import current_wandb_grouping


class QuietWandbLogger(WandbLogger):
    """Lightning's W&B logger without the ``anonymous`` setting it always passes to ``wandb.init`` unless it was
    asked for. Same arguments; inside a sweep's run it joins the sweep's group
    (:func:`symstitch.loggers.wandb_grouping`) unless given a ``group`` or ``job_type`` of its own."""

    def __init__(self, *args: Any, **kwargs: Any):
        grouping = current_wandb_grouping()
        if grouping is not None:  # LightningCLI passes every wandb.init argument, unset ones as None
            for key, value in zip(("group", "job_type"), grouping):
                if kwargs.get(key) is None:
                    kwargs[key] = value
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # the arguments Lightning gives wandb.init
            self._wandb_init.pop("anonymous", None)


def find_unused_parameters(strategy: DDPStrategy) -> None:
    """Make ``strategy`` wrap its module with ``find_unused_parameters=True``, as
    ``DDPStrategy(find_unused_parameters=True)`` would, unless the user set that option; before DDP wraps the
    module (a LightningModule's ``setup``)."""
    strategy._ddp_kwargs.setdefault("find_unused_parameters", True)  # what the strategy passes to DDP
