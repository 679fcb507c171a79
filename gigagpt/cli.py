"""The ``gigagpt`` command.

``gigagpt fit|validate|test|predict --config configs/tiny.yaml`` is a LightningCLI over
:class:`GPTModule` and :class:`GPTDataModule`; ``gigagpt prepare|sample|export|plot`` are plain
commands beside it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from accelerators.errors import CerebrasError
from callbacks import NonFiniteGuard, StepSeed, TextSamples, ThrottledRichProgressBar, ThroughputMFU
from gigagpt.checkpoint import AtomicCheckpointIO, shape_differences
from gigagpt.commands import EXTRA_COMMANDS, run_extra
from gigagpt.data import DataConfigError, GPTDataModule
from gigagpt.errors import ConfigError
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
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic, fsynced checkpoint files wherever Lightning's default writer would be used.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        config = self.config_init["fit"]
        # (An explicit --ckpt_path needs no check: LightningCLI rebuilds the model from its hparams.)
        if config.get("ckpt_path") is not None or config.get("resume", "auto") != "auto":
            return
        found = last_checkpoints(self.trainer)
        if found:
            newest = max(found, key=lambda p: p.stat().st_mtime)
            self._check_resume(newest)
            rank_zero_info(f"gigagpt: resuming from {newest} (--resume never to start fresh)")
            config["ckpt_path"] = "last"

    def _check_resume(self, path: Path) -> None:
        """Refuse, in one line, to resume a checkpoint of a differently shaped model."""
        config = getattr(self.model, "config", None)
        if path.suffix != ".ckpt" or config is None:
            return
        differences = shape_differences(path, config)
        if differences:
            raise SystemExit(f"gigagpt: cannot resume from {path}: it holds a different model "
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
    except MisconfigurationException as err:  # Lightning's own refusal of a Trainer setting
        hint = " (this machine has no CUDA GPU: --trainer.accelerator cpu or auto)" if (
            "gpu" in str(err).lower() and not torch.cuda.is_available()) else ""
        raise SystemExit(f"gigagpt: trainer settings: {err}{hint}") from None
    except Exception as err:
        # A wrong model/optimizer/schedule setting, possibly wrapped by the argument parser.
        cause = _config_error(err)
        if cause is None:
            raise
        raise SystemExit(f"gigagpt: {cause}") from None


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
