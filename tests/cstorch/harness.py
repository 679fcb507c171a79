"""Runs one small training in this process and writes its per-step losses as JSON.

``python tests/cstorch/harness.py KIND DATA OUT [options]`` with KIND ``cpu`` (plain Lightning) or
``cerebras_cpu`` (cstorch CPU backend). cstorch allows one backend per process, so every Cerebras run in
the tests is a fresh process running this file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import gigagpt.accelerators  # noqa: F401  registers the Cerebras strategies with Lightning
from gigagpt import GPTConfig, GPTDataModule, GPTModule, OptimConfig


class EvalCounter(Callback):
    """Validation batches run outside the sanity check."""

    def __init__(self):
        self.batches = 0

    def on_validation_batch_end(self, trainer, *args):
        if not trainer.sanity_checking:
            self.batches += 1


class StepTimer(Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, trainer, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        self.times.append(time.perf_counter() - self._t)


def build(args):
    config = GPTConfig(vocab_size=256, max_position_embeddings=args.seq, depth=args.depth, width=args.width,
                       heads=args.heads, mup=args.mup_base_width > 0, mup_base_width=args.mup_base_width or 256)
    optim = OptimConfig(lr=args.lr, warmup_steps=args.warmup, min_lr_ratio=0.1, weight_decay=0.1)
    module = (MetricModule if args.train_metric else GPTModule)(config, optim)
    data = GPTDataModule(path=args.data, sequence_length=args.seq, batch_size=args.batch, seed=1337,
                         val_batches=args.val_batches)
    return module, data


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["cpu", "cerebras_cpu"])
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None, help="schedule length (default: --steps)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--val-every", type=int, default=0)
    p.add_argument("--val-batches", type=int, default=2)
    p.add_argument("--sanity", type=int, default=0, help="num_sanity_val_steps")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--mup-base-width", type=int, default=0, help="turn μP on with this base width")
    p.add_argument("--save-at", type=int, default=0, help="also call trainer.save_checkpoint after this step")
    p.add_argument("--emulate-csx", action="store_true", help="CS-X semantics on the CPU backend (csx_emulation)")
    p.add_argument("--val-epoch", action="store_true",
                   help="validate every --val-every steps with Lightning's default check_val_every_n_epoch=1")
    p.add_argument("--monitor", action="store_true", help="also ModelCheckpoint(monitor='val/loss')")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-final", action="store_true", help="trainer.save_checkpoint(OUT/final.ckpt) after fit")
    p.add_argument("--train-metric", action="store_true", help="the module updates a torchmetrics metric in training_step")
    p.add_argument("--lr-monitor", action="store_true", help="also a LearningRateMonitor")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.emulate_csx:
        import csx_emulation

        csx_emulation.install()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(1337, verbose=False)
    module, data = build(args)
    timer, evals = StepTimer(), EvalCounter()
    callbacks = [timer, evals]
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", filename="step{step:04d}",
                                         auto_insert_metric_name=False, every_n_train_steps=args.ckpt_every,
                                         save_top_k=-1, save_last=True))
    if args.monitor:
        callbacks.append(ModelCheckpoint(dirpath=out / "best", filename="best{step:04d}", auto_insert_metric_name=False,
                                         monitor="val/loss", save_top_k=1))
    if args.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if args.save_at:
        callbacks.append(SaveAt(args.save_at, out / "manual.mdl"))
    max_steps = args.max_steps or args.steps
    trainer = L.Trainer(
        accelerator="cpu" if args.kind == "cpu" else "cerebras",
        strategy="auto" if args.kind == "cpu" else "cerebras_cpu",
        devices=1,
        precision=args.precision,
        max_steps=max_steps,
        logger=CSVLogger(out, name="logs", version=0),
        log_every_n_steps=args.log_every,
        gradient_clip_val=args.clip or None,
        val_check_interval=args.val_every or None,
        check_val_every_n_epoch=1 if args.val_epoch or not args.val_every else None,
        limit_val_batches=args.val_batches if args.val_every else 0,
        num_sanity_val_steps=args.sanity,
        enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    if args.steps < max_steps:
        stopper = StopAt(args.steps)
        trainer.callbacks.append(stopper)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data, ckpt_path=args.resume)
    if args.save_final:
        trainer.save_checkpoint(out / "final.ckpt")
    for w in caught:  # still shown, after the run
        print(f"{w.category.__name__}: {w.message}", file=sys.stderr)
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    lrs = {int(r["step"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}
    vals = {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
    tokens = {int(r["step"]): float(r["train/tokens"]) for r in rows if r.get("train/tokens")}
    monitored = {int(r["step"]): float(r[k]) for r in rows for k in r if k.startswith("lr-") and r[k]}
    result = {
        "losses": losses, "lrs": lrs, "val": vals, "tokens": tokens, "lr_monitor": monitored, "step_times": timer.times, "global_step": trainer.global_step,
        "val_batches_run": evals.batches,
        "metric_warnings": [str(w.message) for w in caught if "torchmetrics" in str(w.filename)],
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "progress_bar": {k: float(v) for k, v in trainer.progress_bar_metrics.items()
                         if isinstance(v, (int, float, torch.Tensor))},
    }
    if args.emulate_csx:
        import csx_emulation

        result["emulation"] = csx_emulation.EMULATION
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / "result.json")


class MetricModule(GPTModule):
    """Updates a torchmetrics metric inside training_step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torchmetrics.aggregation import MeanMetric

        self.train_mean = MeanMetric()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.train_mean.update(loss.detach())
        return loss


class SaveAt(Callback):
    """Calls trainer.save_checkpoint by hand after step N (outside ModelCheckpoint's schedule)."""

    def __init__(self, n, path):
        self.n, self.path = n, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.n:
            trainer.save_checkpoint(self.path)


class StopAt(Callback):
    """Stops after N steps of a longer schedule (an interrupted run)."""

    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.n:
            trainer.should_stop = True


if __name__ == "__main__":
    main()
