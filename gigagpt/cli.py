"""The ``gigagpt`` command.

``gigagpt fit|validate|test|predict --config configs/tiny.yaml`` is a LightningCLI over
:class:`GPTModule` and :class:`GPTDataModule`; ``gigagpt prepare|sample|export|plot`` are plain
commands beside it.
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from gigagpt.data import DataConfigError, GPTDataModule
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
        })


def _extra_commands() -> dict[str, tuple[str, callable, callable]]:
    """name -> (help, add_arguments, main); imported lazily so `fit` starts fast."""
    from gigagpt import prepare, sample

    commands = {
        "prepare": ("tokenize text into train.bin / val.bin", prepare.add_arguments, prepare.main),
        "sample": ("generate text from a checkpoint", sample.add_arguments, sample.main),
    }
    for name, module_name, help_text in (
        ("export", "gigagpt.export", "convert checkpoints (Lightning .ckpt, Cerebras .mdl, Hugging Face)"),
        ("plot", "gigagpt.plot", "plot loss and learning rate curves of a run"),
    ):
        try:
            module = __import__(module_name, fromlist=["main"])
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        commands[name] = (help_text, module.add_arguments, module.main)
    return commands


def run_extra(name: str, argv: list[str]) -> None:
    help_text, add_arguments, main = _extra_commands()[name]
    parser = argparse.ArgumentParser(prog=f"gigagpt {name}", description=help_text)
    add_arguments(parser)
    main(parser.parse_args(argv))


def cli_main(argv: list[str] | None = None, run: bool = True) -> GigaCLI | None:
    args = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("prepare", "sample", "export", "plot"):
        try:
            run_extra(argv[0], argv[1:])
        except (DataConfigError, FileNotFoundError, ValueError) as err:
            raise SystemExit(f"gigagpt {argv[0]}: error: {err}") from None
        return None
    try:
        return GigaCLI(
            GPTModule,
            GPTDataModule,
            args=args,
            run=run,
            trainer_defaults={"callbacks": [RichProgressBar()]},
            parser_kwargs={
                "description": "Train GPT models with Lightning. Other commands: "
                "gigagpt prepare | sample | export | plot (each with --help).",
            },
            save_config_kwargs={"overwrite": True},
        )
    except DataConfigError as err:
        raise SystemExit(f"gigagpt: data error: {err}") from None


def main() -> None:
    cli_main()


if __name__ == "__main__":
    main()
