"""The training half of the ``gigagpt`` command (:mod:`gigagpt.commands` dispatches to it).

``gigagpt fit|validate|test --config configs/tiny.yaml`` is a LightningCLI over
:class:`GPTModule` and :class:`GPTDataModule`, composed here with the Cerebras bridge
(:mod:`gigagpt.accelerators`, which registers the ``cerebras`` names) and gigagpt's callbacks.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import fields
from pathlib import Path

from jsonargparse import ArgumentError, Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from gigagpt.accelerators.bridge_errors import CerebrasError
from gigagpt.callbacks import (
    GPTSummary,
    NonFiniteGuard,
    StepSeed,
    TextSamples,
    ThrottledRichProgressBar,
    ThroughputMFU,
)
from gigagpt.checkpoint import AtomicCheckpointIO
from gigagpt.cli_errors import TRAINER_COMMANDS, argument_error, config_error, no_gpu_hint, os_error
from gigagpt.data import DataConfigError, GPTDataModule
from gigagpt.errors import ConfigError
from gigagpt.machine import apply_cpu_precision
from gigagpt.model import SHAPE_FIELDS, GPTConfig
from gigagpt.module import GPTModule
from gigagpt.quiet import quiet_known_noise, quiet_resumed_folder
from gigagpt.run_folder import (
    RunLock,
    cstorch_optimizer_state,
    newest_complete_checkpoint,
    peek_checkpoint,
    preflight,
    saved_model_config,
    shape_differences,
)
from gigagpt.run_settings import run_folders, vocabulary_from_data

quiet_known_noise()
MAX_SEED = 2**32 - 1  # numpy's seeds, which Lightning's seed_everything and data.seed feed


class GigaCLI(LightningCLI):
    """LightningCLI with checkpointing and a rich progress bar wired in by default."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, without ``predict``: GPTModule has no predict step (``gigagpt sample`` generates)."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in TRAINER_COMMANDS}

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
        parser.add_argument(
            "--run", type=str | None, default=None,
            help="the run's folder: trainer.default_root_dir, the CSV and TensorBoard logs (RUN/logs, "
            "RUN/tensorboard) and checkpoint.dirpath (RUN/checkpoints) follow it unless set themselves",
        )
        parser.add_argument(
            "--untrained", type=bool, default=False,
            help="validate/test: with no --ckpt_path and no checkpoint in checkpoint.dirpath, evaluate the "
            "model's initial (untrained) weights instead of refusing",
        )

    def instantiate_trainer(self, **kwargs):
        if self._get(self.config_init, "trainer", default={}).get("enable_progress_bar") is False:
            # The default rich bar would make Lightning refuse --trainer.enable_progress_bar false.
            self._drop_default(ProgressBar)
        if self._get(self.config_init, "trainer", default={}).get("enable_model_summary") is False:
            self._drop_default(ModelSummary)
        apply_cpu_precision(self._get(self.config_init, "trainer", default={}), self.subcommand)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # Lightning refusing a Trainer setting
            raise ConfigError(f"trainer settings: {err}{no_gpu_hint(err)}") from err
        # Atomic, fsynced checkpoint files wherever Lightning's default writer would be used.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # Before the loggers make their folders: a refused run leaves nothing behind.
        check_run(self.subcommand, self.model, trainer)
        return trainer

    def _drop_default(self, kind: type) -> None:
        defaults = self.trainer_defaults.get("callbacks") or []
        self.trainer_defaults = {**self.trainer_defaults,
                                 "callbacks": [c for c in defaults if not isinstance(c, kind)]}

    def parse_arguments(self, parser, args) -> None:
        # the arguments as given: model.config.vocab_size set in them stays (vocabulary_from_data)
        self._argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, tuple)) or \
            args is None else []
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        run_folders(config)
        if not config.get("ckpt_path"):  # a given checkpoint decides the shape (_parse_ckpt_path)
            vocabulary_from_data(config, self._argv)

    def _set_seed(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed_everything must be in [0, {MAX_SEED}] (or true: a random seed, false: "
                              f"none), got {seed}")
        super()._set_seed()

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
                "Trainer, convert its weights where cerebras-pytorch is installed (pip install "
                f"\"gigagpt[cerebras]\", its own environment): gigagpt export {path} "
                f"{path.with_suffix('.ckpt')}"
            )
        ckpt = peek_checkpoint(path) if path.suffix == ".ckpt" else None
        if subcommand == "fit" and ckpt is not None and "optimizer_states" not in ckpt:
            raise ConfigError(
                f"--ckpt_path {str(path)!r} holds only a model's weights (no optimizer or schedule to resume): "
                f"to fine-tune from them with a fresh optimizer and schedule, pass --model.init_from {path} instead"
            )
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
        """One ``fit`` per run folder (a lock), the folders checked before step 0, then auto-resume from
        the newest complete checkpoint of the run."""
        config = self.config_init["fit"]
        folders = checkpoint_dirs(self.trainer)
        if rank_zero_only.rank == 0:  # DDP's other ranks run this too, after rank 0 holds the lock
            strategy = self.trainer.strategy  # a Cerebras validate_only / compile_only run writes no checkpoint
            saves = not (getattr(strategy, "validate_only", False) or getattr(strategy, "compile_only", False))
            preflight(folders, log_dirs(self.trainer), self.model, saves=saves)
            self._run_locks = [RunLock(folder).acquire() for folder in folders]
        # (An explicit --ckpt_path takes the model's shape from the checkpoint: _parse_ckpt_path.)
        if config.get("ckpt_path") is not None or config.get("resume", "auto") != "auto":
            self._resumes_not_init(config.get("ckpt_path"))
            return
        path, info, broken = newest_complete_checkpoint(folders)
        for skipped in broken:
            rank_zero_info(f"gigagpt: passing over {skipped}: incomplete, unreadable, or not a checkpoint "
                           "this environment can verify")
        if path is None:
            if broken:
                raise ConfigError(
                    f"{broken[0].parent} holds checkpoints but none is complete and loadable here "
                    f"({', '.join(p.name for p in broken[:4])}); pass one with --ckpt_path, or start fresh "
                    "with --resume never (or another checkpoint.dirpath)")
            return
        self._check_resume(path, info)
        rank_zero_info(f"gigagpt: resuming from {path} (step {info['step']}; --resume never to start fresh)")
        config["ckpt_path"] = str(path)
        self._resumes_not_init(path)
        _overwrite_own_names(self.trainer)
        quiet_resumed_folder(path.parent)
        if 0 <= self.trainer.max_steps <= info["step"]:
            _note(f"{path} is at step {info['step']} and trainer.max_steps is "
                  f"{self.trainer.max_steps}: nothing left to train; raise trainer.max_steps to train on, "
                  "or start fresh with --resume never")

    def _resumes_not_init(self, ckpt_path) -> None:
        """A run that resumes a checkpoint continues it: ``model.init_from`` is for a fresh start only."""
        if ckpt_path is not None and getattr(self.model, "init_from", None):
            rank_zero_info(f"gigagpt: model.init_from {self.model.init_from} is not used: the run resumes {ckpt_path}")
            self.model.init_from = None

    def after_fit(self) -> None:
        for lock in getattr(self, "_run_locks", []):
            lock.release()

    def _check_resume(self, path: Path, info: dict) -> None:
        """Refuse, in one line, to resume a checkpoint this Trainer cannot continue exactly."""
        on_cerebras = "Cerebras" in type(self.trainer.strategy).__name__
        if not on_cerebras and (info["hdf5"] or info["cstorch_optimizer"]):
            raise ConfigError(f"cannot resume from {path}: it was written by a Cerebras run (cstorch optimizer "
                              "state); continue that run with the Cerebras accelerator, or start fresh with "
                              "--resume never (or another checkpoint.dirpath)")
        if on_cerebras and not info["cstorch_optimizer"]:
            raise ConfigError(f"cannot resume from {path} on Cerebras: it holds torch AdamW state from a run on "
                              "the plain Trainer, which cstorch's optimizer does not continue; continue it without "
                              "the Cerebras configs, or start fresh with --resume never (or another "
                              "checkpoint.dirpath)")
        self._refuse_other_model(path, info, "resume from", "resume with the model.config it was trained "
                                 "with, or start fresh with --resume never (or another checkpoint.dirpath)")

    def _refuse_other_model(self, path: Path, info: dict, action: str, fix: str) -> None:
        config = getattr(self.model, "config", None)
        differences = [] if info["hdf5"] or config is None else shape_differences(path, config)
        if differences:
            raise ConfigError(f"cannot {action} {path}: it holds a different model ({', '.join(differences)}); {fix}")

    def before_validate(self) -> None:
        self._evaluated_checkpoint("validate")

    def before_test(self) -> None:
        self._evaluated_checkpoint("test")

    def _evaluated_checkpoint(self, subcommand: str) -> None:
        """Without ``--ckpt_path``, ``validate``/``test`` evaluate the run's newest complete checkpoint, as
        ``fit`` resumes from it; with none, they refuse rather than report the loss of random weights."""
        config = self.config_init[subcommand]
        if config.get("ckpt_path") is not None:
            return
        folders = checkpoint_dirs(self.trainer)
        path, info, broken = newest_complete_checkpoint(folders)
        if path is None:
            if config.get("untrained"):
                rank_zero_info(f"gigagpt: {subcommand} evaluates the model's initial (untrained) weights "
                               "(--untrained true)")
                return
            where = " or ".join(str(f) for f in folders) or "the run (no checkpoint.dirpath)"
            unusable = f" ({len(broken)} incomplete or unreadable)" if broken else ""
            raise ConfigError(f"{subcommand}: no complete checkpoint in {where}{unusable}, so it would evaluate "
                              "untrained weights; pass --ckpt_path FILE, train first with gigagpt fit (same "
                              "config), or add --untrained true to evaluate the initial weights")
        if info["hdf5"] and "Cerebras" not in type(self.trainer.strategy).__name__:
            raise ConfigError(f"{subcommand}: the run's newest checkpoint {path} is a Cerebras .mdl; evaluate it "
                              "with the Cerebras accelerator, or convert it (gigagpt export "
                              f"{path} {path.with_suffix('.ckpt')}) and pass --ckpt_path")
        self._refuse_other_model(path, info, "evaluate", "use the model.config it was trained with, or pass "
                                 "--ckpt_path")
        rank_zero_info(f"gigagpt: {subcommand} evaluates {path} (step {info['step']}; --ckpt_path to choose "
                       "another)")
        config["ckpt_path"] = str(path)


def check_run(subcommand: str | None, model, trainer) -> None:
    """One line for a run that would do nothing, or not what was meant, before it starts."""
    optim = getattr(model, "optim", None)
    init_from = getattr(model, "init_from", None)
    if subcommand == "fit" and init_from and "://" not in init_from and not Path(init_from).exists():
        raise ConfigError(f"model.init_from {init_from!r} does not exist; give a Hugging Face GPT-2 folder, a "
                          ".ckpt (or run folder) or a Cerebras .mdl to start from")
    if subcommand == "fit":
        if trainer.max_steps == 0:
            raise ConfigError("trainer.max_steps is 0: the run would train nothing and save no checkpoint; "
                              "set trainer.max_steps > 0 (or -1 with trainer.max_epochs)")
        if optim is not None and 0 < trainer.max_steps < optim.warmup_steps:
            # a warning, not a refusal: a short smoke run of a real config is a common, meant thing
            _warn(f"model.optim.warmup_steps={optim.warmup_steps} is longer than the run "
                  f"(trainer.max_steps={trainer.max_steps}): the learning rate never reaches "
                  f"model.optim.lr={optim.lr}; lower model.optim.warmup_steps for a full schedule")
    check_csx_tools(trainer.strategy)
    # (The data files are checked in GPTDataModule.prepare_data, also before any folder is made.)


@rank_zero_only
def _note(message: str) -> None:
    sys.stderr.write(f"gigagpt: {message}\n")
    sys.stderr.flush()


@rank_zero_only
def _warn(message: str) -> None:
    sys.stderr.write(f"gigagpt: warning: {message}\n")
    sys.stderr.flush()


def check_csx_tools(strategy) -> None:
    """CSX lowering runs ``torch-cirh-opt`` from the cerebras environment's ``bin/``; without it on
    PATH it fails deep inside the compiler with a long C++ trace."""
    if getattr(strategy, "backend_type", None) != "CSX" or shutil.which("torch-cirh-opt"):
        return
    raise ConfigError(
        "the CSX backend lowers the model with torch-cirh-opt, which is not on PATH: put the cerebras "
        f"environment's bin/ on PATH (export PATH={Path(sys.executable).parent}:$PATH) and run again"
    )


def _overwrite_own_names(trainer) -> None:
    """A resumed run rewrites its own checkpoint names (atomically) instead of adding ``-v1`` copies
    beside files it wrote before it was interrupted."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback._enable_version_counter = False


def _local_folders(objects, attribute: str) -> list[Path]:
    """The distinct local paths (no ``scheme://``) in ``attribute`` of ``objects``, where set."""
    found = []
    for obj in objects:
        folder = getattr(obj, attribute, None)
        if folder and "://" not in str(folder) and Path(folder) not in found:
            found.append(Path(folder))
    return found


def checkpoint_dirs(trainer) -> list[Path]:
    """The ``dirpath`` of each of the trainer's ModelCheckpoint callbacks (where it is set)."""
    return _local_folders(trainer.checkpoint_callbacks, "dirpath")


def log_dirs(trainer) -> list[Path]:
    """The local folders the trainer's loggers write under."""
    return _local_folders(trainer.loggers, "save_dir")


def cli_main(argv: list[str] | None = None, run: bool = True,
             other_commands: tuple[str, ...] = ()) -> GigaCLI | None:
    """The LightningCLI (``fit|validate|test``); ``argv=None`` reads ``sys.argv``.
    ``other_commands``: the dispatcher's plain commands, named in ``--help``."""
    args = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return GigaCLI(
            GPTModule,
            GPTDataModule,
            args=args,
            run=run,
            auto_configure_optimizers=False,  # the optimizer and schedule are model.optim (OptimConfig)
            trainer_defaults={"callbacks": [ThrottledRichProgressBar(), GPTSummary()]},
            parser_kwargs={
                # a wrong argument is one line (cli_main), the usage only on --help
                "exit_on_error": False,
                "prog": "gigagpt",
                "description": "Train GPT models with Lightning."
                + (f" Other commands: gigagpt {' | '.join(other_commands)} (each with --help)." if other_commands else ""),
            },
            save_config_kwargs={"overwrite": True},
        )
    except DataConfigError as err:
        raise SystemExit(f"gigagpt: data error: {err}") from None
    except CerebrasError as err:  # missing cerebras-pytorch, no cluster, refused checkpoint: one line
        raise SystemExit(f"gigagpt: {err}") from None
    except MisconfigurationException as err:  # Lightning's own refusal of a setting, later on
        raise SystemExit(f"gigagpt: {err}{no_gpu_hint(err)}") from None
    except ArgumentError as err:  # the argument parser refusing an argument or a config file
        cause = config_error(err)
        raise SystemExit(f"gigagpt: {cause if cause is not None else argument_error(err, argv)}") from None
    except OSError as err:  # a folder that cannot be made or written, a full disk
        raise SystemExit(f"gigagpt: {os_error(err)}") from None
    except Exception as err:
        # A wrong model/optimizer/schedule setting, possibly wrapped by the argument parser.
        cause = config_error(err)
        if cause is None:
            raise
        raise SystemExit(f"gigagpt: {cause}") from None
