"""The training half of the ``gigagpt`` command (:mod:`gigagpt.commands` dispatches to it).

``gigagpt fit|validate|test --config configs/tiny.yaml`` is a LightningCLI over
:class:`GPTModule` and :class:`GPTDataModule`, composed here with the Cerebras bridge
(:mod:`gigagpt.accelerators`, which registers the ``cerebras`` names) and gigagpt's callbacks.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from gigagpt.accelerators.bridge_errors import CerebrasError
from gigagpt.callbacks import NonFiniteGuard, StepSeed, TextSamples, ThrottledRichProgressBar, ThroughputMFU
from gigagpt.checkpoint import AtomicCheckpointIO
from gigagpt.data import DataConfigError, GPTDataModule
from gigagpt.errors import ConfigError
from gigagpt.machine import apply_cpu_precision
from gigagpt.model import SHAPE_FIELDS, GPTConfig
from gigagpt.module import GPTModule
from gigagpt.run_folder import (
    RunLock,
    cstorch_optimizer_state,
    newest_complete_checkpoint,
    peek_checkpoint,
    preflight,
    saved_model_config,
    shape_differences,
)

TRAINER_COMMANDS = ("fit", "validate", "test")
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

    def instantiate_trainer(self, **kwargs):
        if self._get(self.config_init, "trainer", default={}).get("enable_progress_bar") is False:
            # The default rich bar would make Lightning refuse --trainer.enable_progress_bar false.
            defaults = self.trainer_defaults.get("callbacks") or []
            self.trainer_defaults = {**self.trainer_defaults,
                                     "callbacks": [c for c in defaults if not isinstance(c, ProgressBar)]}
        apply_cpu_precision(self._get(self.config_init, "trainer", default={}), self.subcommand)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # Lightning refusing a Trainer setting
            raise ConfigError(f"trainer settings: {err}{_no_gpu_hint(err)}") from err
        # Atomic, fsynced checkpoint files wherever Lightning's default writer would be used.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # Before the loggers make their folders: a refused run leaves nothing behind.
        check_run(self.subcommand, self.model, trainer)
        return trainer

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
        config = getattr(self.model, "config", None)
        if info["hdf5"] or config is None:
            return
        differences = shape_differences(path, config)
        if differences:
            raise ConfigError(f"cannot resume from {path}: it holds a different model "
                              f"({', '.join(differences)}); resume with the model.config it was trained "
                              "with, or start fresh with --resume never (or another checkpoint.dirpath)")


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
            trainer_defaults={"callbacks": [ThrottledRichProgressBar()]},
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
        raise SystemExit(f"gigagpt: {err}{_no_gpu_hint(err)}") from None
    except ArgumentError as err:  # the argument parser refusing an argument or a config file
        cause = _config_error(err)
        raise SystemExit(f"gigagpt: {cause if cause is not None else _argument_error(err, argv)}") from None
    except OSError as err:  # a folder that cannot be made or written, a full disk
        raise SystemExit(f"gigagpt: {_os_error(err)}") from None
    except Exception as err:
        # A wrong model/optimizer/schedule setting, possibly wrapped by the argument parser.
        cause = _config_error(err)
        if cause is None:
            raise
        raise SystemExit(f"gigagpt: {cause}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}; check that the path exists and is writable, and the free space"


def _argument_error(err: BaseException, argv: list[str]) -> str:
    """The parser's complaint in one line; a config file that is not YAML is named with its line."""
    message = _one_line(err)
    if "Problems parsing config" in message:
        for path in _config_files(argv):
            problem = _yaml_problem(path)
            if problem:
                return f"config file {path} is not valid YAML: {problem}"
    keys = re.findall(r'Parser key "([^"]+)"', message)
    wrong = re.search(r"Expected a <class '(\w+)'>\. Got value: (\S+)", message)
    if keys and wrong:  # a nested value of the wrong type: name the full setting, not the Union's story
        name = ".".join(k for i, k in enumerate(keys) if i == 0 or not k.startswith(keys[0]))
        return f"{name} must be of type {wrong.group(1)}, got {wrong.group(2)}"
    return f"{message} (gigagpt {_subcommand(argv)} --help lists the settings)"


def _subcommand(argv: list[str]) -> str:
    return next((a for a in argv if a in TRAINER_COMMANDS), "fit")


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _yaml_problem(path: str) -> str | None:
    import yaml

    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return where + _one_line(getattr(err, "problem", None) or err)
    except OSError:
        return None
    return None


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
