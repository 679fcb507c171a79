"""Lightning's rich progress bar, reading the logged values every few steps instead of every step.

Showing ``train/loss`` means reading a device tensor, which makes the host wait for the GPU to
finish the step: once per step, Lightning's ``RichProgressBar`` keeps the host from queueing the
next step ahead. This bar moves every step but reads the values every ``metrics_every_n_steps``
optimizer steps (default: the Trainer's ``log_every_n_steps``, when the loggers read them anyway).
It also names a step-bounded run's epoch as ``Epoch 0``, not ``Epoch 0/-2``, shows the rates of
callbacks that offer ``bar_metrics()`` (ThroughputMFU: tokens/s and MFU, host numbers measured at
the log intervals), and prints text through rich's console, above the bar.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ThrottledRichProgressBar(RichProgressBar):
    """``RichProgressBar`` whose metric readout (a device synchronisation) is spaced out in training.

    Args:
        metrics_every_n_steps: optimizer steps between readouts (``None``: ``log_every_n_steps``).
        **kwargs: ``RichProgressBar``'s own arguments (``refresh_rate``, ``leave``, ``theme``, ...).
    """

    def __init__(self, metrics_every_n_steps: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if metrics_every_n_steps is not None and metrics_every_n_steps < 1:
            raise ValueError(f"metrics_every_n_steps must be >= 1, got {metrics_every_n_steps}")
        self.metrics_every_n_steps = metrics_every_n_steps
        self._metrics_due = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        every = self.metrics_every_n_steps or max(trainer.log_every_n_steps, 1)
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        self._metrics_due = last or trainer.global_step % every == 0
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._metrics_due = True

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._metrics_due:
            super()._update_metrics(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        for callback in trainer.callbacks:
            offered = getattr(callback, "bar_metrics", None)
            if callable(offered):
                metrics.update(offered())
        return metrics

    def print(self, *args, sep: str = " ", **kwargs) -> None:
        """A line above the bar (``print`` would land behind the bar's own line)."""
        if self._console is None:
            super().print(*args, sep=sep, **kwargs)
            return
        self._console.print(sep.join(map(str, args)), markup=False, highlight=False, soft_wrap=True)

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:  # bounded by max_steps
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return description
