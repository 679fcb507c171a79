"""Stop training at the first non-finite loss or gradient, naming the step and the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from gigagpt.errors import GigagptError

_READABLE_DEVICES = ("cpu", "cuda", "mps")


class NonFiniteLossError(GigagptError, RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """Raise :class:`NonFiniteLossError` when the loss or the gradients stop being finite.

    Gradients are checked before the optimizer step, so a non-finite gradient never reaches the
    weights, and the error is raised before ``ModelCheckpoint`` could save the bad state. The
    message names the optimizer step and the newest checkpoint written, to resume from with a
    lower learning rate or a different seed.

    Under fp16 loss scaling (a precision plugin with a ``scaler``) gradients are not checked: an
    overflowing step is routine there, and the scaler itself skips it and lowers the scale, so no
    non-finite gradient reaches the weights; the loss is still checked.

    Reading a value costs one device synchronisation; ``every_n_steps`` spaces the checks (on
    devices whose tensors cannot be read during the step, the logged ``train/loss`` is checked).

    Args:
        every_n_steps: check every this many optimizer steps.
        check_grads: also check the gradient norm before each optimizer step.
    """

    def __init__(self, every_n_steps: int = 1, check_grads: bool = True):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"NonFiniteGuard every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.check_grads = every_n_steps, check_grads
        self._warned_unreadable = False

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    @staticmethod
    def last_checkpoint(trainer: L.Trainer) -> str | None:
        """The newest checkpoint file any ModelCheckpoint of ``trainer`` has written."""
        paths = []
        for cb in trainer.checkpoint_callbacks:
            paths += [getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")]
            paths += list(getattr(cb, "best_k_models", {}) or {})
        files = [Path(p) for p in paths if p and Path(p).is_file()]
        if not files:
            return None
        return str(max(files, key=lambda p: p.stat().st_mtime))

    def _fail(self, trainer: L.Trainer, what: str, step: int) -> None:
        last = self.last_checkpoint(trainer)
        hint = (f"the last good checkpoint is {last}; resume from it (--ckpt_path {last}) with a lower "
                "model.optim.lr, more warmup or gradient clipping (trainer.gradient_clip_val)"
                if last else "no checkpoint was written yet; lower model.optim.lr or add warmup and restart")
        raise NonFiniteLossError(f"{what} at optimizer step {step}: training stopped; {hint}")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.check_grads or not self._due(trainer):
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: the scaler skips overflowing steps itself
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        if grads[0].device.type not in _READABLE_DEVICES:
            if not self._warned_unreadable:
                self._warned_unreadable = True
                rank_zero_warn(f"NaN guard: gradients on the {grads[0].device.type} device cannot be read inside "
                               "the step; only the loss is checked")
            return
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
        if not torch.isfinite(total):
            self._fail(trainer, f"the gradient norm is {float(total)}", trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # global_step has already advanced past the step that produced this loss.
        step = trainer.global_step - 1 if not (batch_idx + 1) % trainer.accumulate_grad_batches else trainer.global_step
        if step % self.every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or loss.device.type not in _READABLE_DEVICES:
            loss = trainer.callback_metrics.get("train/loss")
        readable = isinstance(loss, torch.Tensor) and loss.device.type in _READABLE_DEVICES
        if readable and not torch.isfinite(loss).all():
            self._fail(trainer, f"the training loss is {float(loss)}", step)
