"""The command line's one-line wording of what the argument parser and Lightning refuse."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gigagpt.errors import ConfigError

TRAINER_COMMANDS = ("fit", "validate", "test")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def os_error(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}; check that the path exists and is writable, and the free space"


def argument_error(err: BaseException, argv: list[str]) -> str:
    """The parser's complaint in one line; a config file that is not YAML is named with its line."""
    message = one_line(err)
    if "Problems parsing config" in message:
        for path in config_files(argv):
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


def config_files(argv: list[str]) -> list[str]:
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
        return where + one_line(getattr(err, "problem", None) or err)
    except OSError:
        return None
    return None


def no_gpu_hint(err: BaseException) -> str:
    text = str(err).lower()
    if torch.cuda.is_available() or not ("gpu" in text or "cuda" in text):
        return ""
    return (" (this machine has no CUDA GPU: --trainer.accelerator cpu, with a strategy that runs on "
            "CPUs such as --trainer.strategy auto or ddp; configs/gpu/ are for GPU machines)")


def config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError in ``err``'s chain of causes, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
