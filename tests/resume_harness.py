"""A tiny, fully specified training run for the resume tests, usable in-process and as a script.

Every optimizer step appends ``train <step> <loss as float.hex>`` (and ``lr``) to ``<root>/record.txt``;
every validation appends ``val <step> <loss hex>``. Lines are flushed at once, so a process killed
with SIGKILL loses nothing it had computed. ``python resume_harness.py ROOT DATA MAX_STEPS [--resume]``
runs it as a script.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from gigagpt.callbacks.rng import StepSeed
from gigagpt.checkpoint import AtomicCheckpointIO
from gigagpt.data import GPTDataModule
from gigagpt.model import GPTConfig
from gigagpt.module import GPTModule
from gigagpt.optim import OptimConfig

# Dropout on: resume must also reproduce the dropout masks, not only weights and data.
CONFIG = GPTConfig(vocab_size=256, max_position_embeddings=32, depth=2, width=32, heads=2, dropout=0.1)
SEQ, BATCH = 32, 4
CKPT_EVERY, VAL_EVERY = 3, 4


class Recorder(L.Callback):
    """Appends each step's loss and learning rate, and each validation's loss, to a text file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _write(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self._write(f"train {trainer.global_step} {float(loss).hex()} {float(lr).hex()}")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self._write(f"val {trainer.global_step} {float(trainer.callback_metrics['val/loss']).hex()}")


class SlowCheckpointIO(AtomicCheckpointIO):
    """The production atomic writer with its bytes trickled out in 4 kB chunks.

    Halfway through each file it writes ``<write number> <temporary file>`` to ``marker`` so a test
    can kill the process while a checkpoint is being written.
    """

    def __init__(self, marker: Path):
        super().__init__()
        self.marker, self.writes = Path(marker), 0

    def write(self, checkpoint, f) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data, chunk = buffer.getvalue(), 4096
        self.writes += 1
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])
            f.flush()
            if i == (len(data) // 2) // chunk * chunk:
                self.marker.write_text(f"{self.writes} {f.name}")
            time.sleep(0.005)


def read_record(root: Path) -> dict[str, dict[int, str]]:
    """``{"train": {step: "loss lr"}, "val": {step: loss}}``; a later line for a step replaces an earlier one."""
    out: dict[str, dict[int, str]] = {"train": {}, "val": {}}
    path = Path(root) / "record.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            kind, step, *values = line.split()
            out[kind][int(step)] = " ".join(values)
    return out


def checkpoint_callback(root: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=Path(root) / "checkpoints", filename="step{step:04d}", save_last=True,
                           save_top_k=-1, every_n_train_steps=CKPT_EVERY, auto_insert_metric_name=False)


def make_trainer(root: Path, max_steps: int, callbacks=(), checkpoint_io=None, **overrides) -> L.Trainer:
    root = Path(root)
    kwargs = dict(
        accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps,
        val_check_interval=VAL_EVERY, check_val_every_n_epoch=None, limit_val_batches=2,
        log_every_n_steps=1, gradient_clip_val=1.0, default_root_dir=root,
        logger=CSVLogger(root, name="logs"), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Recorder(root / "record.txt"), StepSeed(), *callbacks, checkpoint_callback(root)],
        plugins=[checkpoint_io or AtomicCheckpointIO()],
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def make_module_and_data(data: Path | str, **data_options) -> tuple[GPTModule, GPTDataModule]:
    L.seed_everything(1337, verbose=False)
    module = GPTModule(config=CONFIG, optim=OptimConfig(lr=3e-3, warmup_steps=3, min_lr_ratio=0.1))
    dm = GPTDataModule(path=str(data), sequence_length=SEQ, batch_size=BATCH, seed=7, val_batches=2, **data_options)
    return module, dm


def fit(root: Path, data: Path | str, max_steps: int, ckpt_path=None, callbacks=(), checkpoint_io=None,
        data_options: dict | None = None, **overrides) -> L.Trainer:
    torch.set_num_threads(1)
    module, dm = make_module_and_data(data, **(data_options or {}))
    trainer = make_trainer(root, max_steps, callbacks, checkpoint_io, **overrides)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


if __name__ == "__main__":
    root, data, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resume = "--resume" in sys.argv
    io_plugin = SlowCheckpointIO(root / "writing") if "--slow-writes" in sys.argv else None
    fit(root, data, max_steps, ckpt_path="last" if resume else None, checkpoint_io=io_plugin)
