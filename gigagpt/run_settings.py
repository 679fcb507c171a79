"""Settings the command line derives before the classes are built: the vocabulary from the data, and a
run's folders from one ``run`` setting."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import Namespace

from gigagpt.cli_errors import config_files
from gigagpt.model import GPTConfig
from gigagpt.token_files import read_meta


def vocabulary_from_data(config: Namespace, argv: list[str]) -> None:
    """``model.config.vocab_size`` follows the data's ``meta.json`` unless it is set on the command line or
    in a config file given (then a mismatch is the data module's clear error)."""
    data, model = config.get("data") or {}, config.get("model")
    path = data.get("path") if hasattr(data, "get") else None
    if model is None or not isinstance(path, (str, Path)) or not path or "://" in str(path) or _sets_vocab_size(argv):
        return
    vocab = read_meta(path).get("vocab_size") if Path(path, "meta.json").is_file() else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        return
    if model.get("config") is None:
        model["config"] = Namespace(**GPTConfig.from_name("tiny").to_dict())
    model["config"]["vocab_size"] = vocab  # documented behaviour: no line of its own on every run


def _sets_vocab_size(argv: list[str]) -> bool:
    if any(arg.split("=", 1)[0] == "--model.config.vocab_size" for arg in argv):
        return True
    import yaml

    for path in config_files(argv):
        try:
            settings = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        model = settings.get("model") if isinstance(settings, dict) else None
        model_config = model.get("config") if isinstance(model, dict) else None
        if isinstance(model_config, dict) and "vocab_size" in model_config:
            return True
    return False


# A run folder's layout, as `gigagpt sample` and `gigagpt plot` read it.
RUN_LOGGERS = (("lightning.pytorch.loggers.CSVLogger", {"name": "logs"}),
               ("lightning.pytorch.loggers.TensorBoardLogger", {"name": "tensorboard", "default_hp_metric": False}))


def run_folders(config: Namespace) -> None:
    """``run: FOLDER`` places a run: ``trainer.default_root_dir`` FOLDER, the CSV and TensorBoard logs in
    FOLDER/logs and FOLDER/tensorboard, checkpoints in FOLDER/checkpoints; each that is set otherwise
    (``trainer.default_root_dir``, ``trainer.logger``, ``checkpoint.dirpath``) keeps its own value."""
    run = config.get("run")
    trainer = config.get("trainer")
    if not run or trainer is None:
        return
    run = str(run)
    if trainer.get("default_root_dir") is None:
        trainer["default_root_dir"] = run
    if trainer.get("logger") in (None, True):
        trainer["logger"] = [Namespace(class_path=path, init_args=Namespace(save_dir=run, **args))
                             for path, args in RUN_LOGGERS]
    checkpoint = config.get("checkpoint")
    if checkpoint is not None and checkpoint.get("dirpath") is None:
        checkpoint["dirpath"] = str(Path(run) / "checkpoints")
