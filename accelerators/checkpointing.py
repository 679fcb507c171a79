"""When and how checkpoints leave the cluster.

- Weights are read only by a checkpoint closure of a running executor (``cstorch.checkpoint_closure``
  runs on ``is_pre_initial_step`` or ``is_checkpoint_step``: ``utils/step_closures.py``). The closure
  takes no arguments: CS-X fetches closure arguments with ``LtcBackendImpl._get_cpu_tensor``, which
  refuses weight tensors ("Please use cstorch.save()"). It builds the state (weights, optimizer and
  schedule state) inside and writes it with ``cstorch.save``, as gigaGPT's ``train.py`` does.
- A save Lightning asks for between executors (``ModelCheckpoint(monitor=...)`` at
  ``on_validation_end``) is queued and runs at the next training executor's pre-initial step
  (``LtcBackendImpl.on_run_start`` runs the queued closures there, before any step changes the
  weights). After the last executor it is written from the final step's file on the host.
- The final training step is always a checkpoint step and is always saved when a ModelCheckpoint
  exists, whatever ``every_n_train_steps`` says.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from gigagpt.accelerators import private
from gigagpt.accelerators.bridge_errors import CerebrasCheckpointError, import_cstorch
from gigagpt.accelerators.checkpoint_io import MDL_SUFFIX

_STATE_KEYS = ("state_dict", "optimizer_states", "lr_schedulers")


class CerebrasModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing ``.mdl`` files, so ``ckpt_path="last"`` finds ``last.mdl`` too."""

    FILE_EXTENSION = MDL_SUFFIX


class CheckpointsMixin:
    """Checkpoint schedule and saves of :class:`~gigagpt.accelerators.strategy.CerebrasStrategy`."""

    def _checkpoint_every(self, trainer) -> list[int]:
        every = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if private.checkpoint_train_time_interval(cb):
                    raise CerebrasCheckpointError(
                        "ModelCheckpoint(train_time_interval=...) cannot be honoured on Cerebras: weights "
                        "are fetched only at scheduled steps; use checkpoint.every_n_train_steps instead"
                    )
                n = private.checkpoint_every_n_train_steps(cb)
                if n > 0:
                    every.append(n)
        return sorted(set(every))

    def _align_checkpoint_callbacks(self, trainer) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.FILE_EXTENSION != MDL_SUFFIX:
                cb.FILE_EXTENSION = MDL_SUFFIX  # this instance only: its files are cstorch .mdl files
        self._checkpoint_every(trainer)

    def _checkpoint_schedule(self, start: int, num_steps: int, final: bool):
        """Executor steps k (0-based) at which global step start+k+1 is a multiple of some every_n,
        plus the executor's last step when it ends the training."""
        cstorch = import_cstorch()
        schedule = cstorch.utils.data.utils.Schedule
        ranges, trainer = [], self.lightning_module.trainer
        for n in self._checkpoint_every(trainer):
            first = (n - start % n) - 1
            if first < num_steps:
                ranges.append(schedule.Range(start=first, end=num_steps, step=n, include_last=final))
        if final and not ranges and any(isinstance(cb, ModelCheckpoint) for cb in trainer.checkpoint_callbacks):
            # (cstorch makes every checkpoint step an activation step: DataExecutor aligns activation_steps)
            ranges.append(schedule.Range(start=num_steps - 1, end=num_steps, step=num_steps, include_last=True))
        return schedule(ranges)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("the Cerebras strategy takes no storage_options; remove them from the save call")
        if self.validate_only or self.compile_only:
            return  # nothing was trained
        filepath = str(filepath)
        executor = self._train_executor
        if executor is None:
            self._pending_saves.append((checkpoint, filepath))
            return
        if not executor.run_context.is_checkpoint_step:
            every = self._checkpoint_every(self.lightning_module.trainer)
            raise CerebrasCheckpointError(
                f"refusing to save {filepath} at step {self.lightning_module.trainer.global_step}: the Cerebras "
                f"executor fetches weights only every {', '.join(map(str, every)) or 'no'} steps (from "
                "ModelCheckpoint.every_n_train_steps) and at the end of training, so this save would be "
                "silently skipped; save at those steps or set checkpoint.every_n_train_steps"
            )
        self._queue_save(checkpoint, filepath)

    def _queue_save(self, checkpoint: dict, filepath: str) -> None:
        """A no-argument checkpoint closure that reads the weights and writes ``filepath``."""
        cstorch = import_cstorch()
        module, optimizers, configs, io = self.lightning_module, list(self.optimizers), self.lr_scheduler_configs, \
            self.checkpoint_io
        step = checkpoint.get("global_step")
        self._saved_steps.add(step)

        @cstorch.checkpoint_closure
        def save_state():
            state = dict(checkpoint)
            state["state_dict"] = module.state_dict()
            if "optimizer_states" in checkpoint:
                state["optimizer_states"] = [opt.state_dict() for opt in optimizers]
                state["lr_schedulers"] = [config.scheduler.state_dict() for config in configs]
            io.save_checkpoint(state, filepath)
            self._written[step] = filepath

        save_state()

    def _queue_pending_saves(self) -> None:
        pending, self._pending_saves = self._pending_saves, []
        for checkpoint, filepath in pending:
            self._queue_save(checkpoint, filepath)

    def _save_final_step(self) -> None:
        """On the last step of training, save it if no ModelCheckpoint did (and ``last`` along)."""
        trainer = self.lightning_module.trainer
        executor = self._train_executor
        step = trainer.global_step
        if step < trainer.max_steps or not executor.on_final_iteration or step in self._saved_steps:
            return
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        if not callbacks or not executor.run_context.is_checkpoint_step:
            return
        cb = next((c for c in callbacks if private.checkpoint_every_n_train_steps(c)), callbacks[0])
        metrics = {**trainer.callback_metrics, "step": step, "epoch": trainer.current_epoch}
        filepath = cb.format_checkpoint_name(metrics)
        trainer.save_checkpoint(filepath, cb.save_weights_only)
        if cb.save_last:
            self._final_last = (filepath, cb.format_checkpoint_name(metrics, cb.CHECKPOINT_NAME_LAST), cb.save_last)

    def _write_after_last_executor(self) -> None:
        """Saves asked for after the last executor: the final step's file with their own metadata."""
        if self._final_last is not None:
            target, last, mode = self._final_last
            self._final_last = None
            _link_or_copy(target, last, mode)
        pending, self._pending_saves = self._pending_saves, []
        if not pending:
            return
        cstorch = import_cstorch()
        for checkpoint, filepath in pending:
            source = self._written.get(checkpoint.get("global_step"))
            if source is None:
                raise CerebrasCheckpointError(
                    f"cannot save {filepath} at step {checkpoint.get('global_step')}: no executor ran that step's "
                    "weights off the cluster; save at ModelCheckpoint.every_n_train_steps or the final step"
                )
            saved = cstorch.load(source)
            state = {**checkpoint, **{k: saved[k] for k in _STATE_KEYS if k in saved and k in checkpoint}}
            self.checkpoint_io.save_checkpoint(state, filepath)

    def remove_checkpoint(self, filepath) -> None:
        before = len(self._pending_saves)
        self._pending_saves = [(c, p) for c, p in self._pending_saves if p != str(filepath)]
        if len(self._pending_saves) == before:
            self.checkpoint_io.remove_checkpoint(filepath)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        # Not Strategy.load_optimizer_state_dict: it moves the state to root_device (the host CPU on
        # CSX), undoing cstorch's placement of the moments on the backend device.
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state)


def _link_or_copy(target: str, link: str, mode) -> None:
    target_path, link_path = Path(target), Path(link)
    if target_path == link_path:
        return
    if link_path.is_symlink() or link_path.exists():
        link_path.unlink()
    if mode == "link":
        os.symlink(os.path.relpath(target_path, link_path.parent), link_path)
    else:
        shutil.copyfile(target_path, link_path)
