"""The ``gigagpt`` command.

``gigagpt fit|validate|test|predict --config configs/tiny.yaml`` is a LightningCLI over
:class:`GPTModule` and :class:`GPTDataModule`; ``gigagpt prepare|sample|export|plot`` are plain
commands beside it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from accelerators.errors import CerebrasError
from callbacks import NonFiniteGuard, StepSeed, TextSamples, ThrottledRichProgressBar, ThroughputMFU
from gigagpt.checkpoint import (
    SHAPE_FIELDS,
    AtomicCheckpointIO,
    cstorch_optimizer_state,
    peek_checkpoint,
    saved_model_config,
    shape_differences,
)
from gigagpt.commands import EXTRA_COMMANDS, run_extra
from gigagpt.data import DataConfigError, GPTDataModule
from gigagpt.errors import ConfigError
from gigagpt.model import GPTConfig
from gigagpt.module import GPTModule

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


class GigaCLI(LightningCLI):
    """LightningCLI with checkpointing and a rich progress bar wired in by default."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.filename": "step{step:07d}",
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": -1,
            "checkpoint.every_n_train_steps": 1000,
            # GPTDataModule shards batches by rank itself (batch k is a function of seed and k).
            "trainer.use_distributed_sampler": False,
        })
        # gigagpt's callbacks, each configurable under its own key (e.g. --samples.every_n_steps 0).
        parser.add_lightning_class_args(StepSeed, "step_seed")
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        parser.add_lightning_class_args(ThroughputMFU, "throughput")
        parser.add_lightning_class_args(TextSamples, "samples")
        parser.add_argument(
            "--resume", choices=("auto", "never"), default="auto",
            help="fit: with 'auto' and no --ckpt_path, continue from the last checkpoint in "
            "checkpoint.dirpath when one exists; 'never' always starts fresh",
        )

    def instantiate_trainer(self, **kwargs):
        if self._get(self.config_init, "trainer", default={}).get("enable_progress_bar") is False:
            # The default rich bar would make Lightning refuse --trainer.enable_progress_bar false.
            defaults = self.trainer_defaults.get("callbacks") or []
            self.trainer_defaults = {**self.trainer_defaults,
                                     "callbacks": [c for c in defaults if not isinstance(c, ProgressBar)]}
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # Lightning refusing a Trainer setting
            raise ConfigError(f"trainer settings: {err}{_no_gpu_hint(err)}") from err
        # Atomic, fsynced checkpoint files wherever Lightning's default writer would be used.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: the run keeps the settings given (config files and flags), as auto-resume
        does, so a resumed run can change e.g. the learning rate; only the model's shape comes from
        the checkpoint, with a note where it differs.

        (LightningCLI itself replaces every model setting with the checkpoint's, silently, and reads
        the file with ``torch.load``, which a Cerebras ``.mdl`` checkpoint is not made for.)
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
            return
        path = Path(str(ckpt_path))
        if not path.is_file():
            raise ConfigError(f"--ckpt_path {str(ckpt_path)!r} does not exist; pass a checkpoint file "
                              "(e.g. <checkpoint.dirpath>/last.ckpt), or 'last'")
        on_cerebras = "cerebras" in str(self.config[subcommand].get("trainer", {}).get("accelerator"))
        if path.suffix == ".mdl" and not on_cerebras:
            raise ConfigError(
                f"--ckpt_path {str(path)!r} is a Cerebras checkpoint: use it with the Cerebras accelerator "
                "(e.g. --config configs/cerebras/tiny.yaml); for sample / export / validate on this "
                "Trainer, convert its weights: python -c \"from accelerators.convert import "
                f"convert_checkpoint; convert_checkpoint('{path}', '{path.with_suffix('.ckpt')}')\""
            )
        ckpt = peek_checkpoint(path) if path.suffix == ".ckpt" else None
        if subcommand == "fit" and not on_cerebras and cstorch_optimizer_state(ckpt):
            raise ConfigError(
                f"--ckpt_path {str(path)!r} was converted from a Cerebras .mdl: its optimizer state is "
                "cstorch's, which torch's AdamW cannot resume; continue that run on the Cerebras "
                "accelerator, or use this file for gigagpt sample / export / validate"
            )
        saved = saved_model_config(ckpt)
        model = self.config[subcommand].get("model")
        if saved is None or model is None:
            return
        known = {f.name for f in fields(GPTConfig)}
        if model.get("config") is None:  # no model settings given: the checkpoint's model entirely
            model["config"] = Namespace(**{**GPTConfig.from_name("tiny").to_dict(),
                                           **{k: v for k, v in saved.items() if k in known}})
            return
        current, changed = model["config"], []
        for name in SHAPE_FIELDS:
            if name in saved and current.get(name) != saved[name]:
                changed.append(f"{name} {current.get(name)} -> {saved[name]}")
                current[name] = saved[name]
        if changed:
            rank_zero_info(f"gigagpt: the model's shape comes from {path}: {', '.join(changed)}")

    def before_fit(self) -> None:
        config = self.config_init["fit"]
        # (An explicit --ckpt_path takes the model's shape from the checkpoint: _parse_ckpt_path.)
        if config.get("ckpt_path") is not None or config.get("resume", "auto") != "auto":
            return
        found = last_checkpoints(self.trainer)
        if found:
            newest = max(found, key=lambda p: p.stat().st_mtime)
            self._check_resume(newest)
            rank_zero_info(f"gigagpt: resuming from {newest} (--resume never to start fresh)")
            config["ckpt_path"] = str(newest)  # the file itself: Lightning's "last" looks for .ckpt only

    def _check_resume(self, path: Path) -> None:
        """Refuse, in one line, to resume a checkpoint of a differently shaped model."""
        config = getattr(self.model, "config", None)
        if path.suffix != ".ckpt" or config is None:
            return
        differences = shape_differences(path, config)
        if differences:
            raise ConfigError(f"cannot resume from {path}: it holds a different model "
                              f"({', '.join(differences)}); resume with the model.config it was trained "
                              "with, or start fresh with --resume never (or another checkpoint.dirpath)")


def last_checkpoints(trainer) -> list[Path]:
    """``last*.ckpt`` / ``last*.mdl`` files in the ``dirpath`` of the trainer's ModelCheckpoint callbacks."""
    found = []
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath and Path(dirpath).is_dir():
            found += [p for p in Path(dirpath).iterdir()
                      if p.suffix in (".ckpt", ".mdl") and re.match(r"^last(-v?\d+)?$", p.stem)]
    return found


def cli_main(argv: list[str] | None = None, run: bool = True) -> GigaCLI | None:
    """The LightningCLI (``fit|validate|test|predict``); ``argv=None`` reads ``sys.argv``."""
    args = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        run_extra(argv[0], argv[1:])
        return None
    try:
        return GigaCLI(
            GPTModule,
            GPTDataModule,
            args=args,
            run=run,
            trainer_defaults={"callbacks": [ThrottledRichProgressBar()]},
            parser_kwargs={
                "prog": "gigagpt",
                "description": "Train GPT models with Lightning. Other commands: "
                "gigagpt prepare | sample | export | plot (each with --help).",
            },
            save_config_kwargs={"overwrite": True},
        )
    except DataConfigError as err:
        raise SystemExit(f"gigagpt: data error: {err}") from None
    except CerebrasError as err:  # missing cerebras-pytorch, no cluster, refused checkpoint: one line
        raise SystemExit(f"gigagpt: {err}") from None
    except MisconfigurationException as err:  # Lightning's own refusal of a setting, later on
        raise SystemExit(f"gigagpt: {err}{_no_gpu_hint(err)}") from None
    except Exception as err:
        # A wrong model/optimizer/schedule setting, possibly wrapped by the argument parser.
        cause = _config_error(err)
        if cause is None:
            raise
        raise SystemExit(f"gigagpt: {cause}") from None


def _no_gpu_hint(err: BaseException) -> str:
    text = str(err).lower()
    if torch.cuda.is_available() or not ("gpu" in text or "cuda" in text):
        return ""
    return (" (this machine has no CUDA GPU: --trainer.accelerator cpu, with a strategy that runs on "
            "CPUs such as --trainer.strategy auto or ddp; configs/gpu/ are for GPU machines)")


def _config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main() -> None:
    from gigagpt.commands import main as dispatch

    dispatch()


if __name__ == "__main__":
    main()
