"""Entry point of the ``gigagpt`` command: dispatches without loading more than it needs.

``prepare | sample | export | plot`` are plain commands (``prepare`` never loads torch or
Lightning); everything else goes to the LightningCLI in :mod:`gigagpt.cli`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module exposing add_arguments(parser) and main(args), help)
EXTRA_COMMANDS = {
    "prepare": ("gigagpt.prepare", "tokenize text into train.bin / val.bin"),
    "sample": ("gigagpt.sample", "generate text from a checkpoint"),
    "export": ("gigagpt.export", "convert checkpoints (Lightning .ckpt, Cerebras .mdl, Hugging Face)"),
    "plot": ("gigagpt.plot", "plot loss and learning-rate curves of a run"),
}


def run_extra(name: str, argv: list[str]) -> None:
    module_name, help_text = EXTRA_COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise SystemExit(f"gigagpt {name}: this installation has no {name} command") from None
    parser = _OneLineParser(prog=f"gigagpt {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        module.main(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # includes DataConfigError
        raise SystemExit(f"gigagpt {name}: error: {' '.join(str(err).split())}") from None
    except OSError as err:  # a folder that cannot be made or written, a full disk
        where = f"{err.filename}: " if err.filename else ""
        raise SystemExit(f"gigagpt {name}: error: {where}{err.strerror or err}; check that the path exists "
                         "and is writable, and the free space") from None


class _OneLineParser(argparse.ArgumentParser):
    """A wrong argument is one line naming it; the usage only on --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        run_extra(argv[0], argv[1:])
        return
    from gigagpt.cli import cli_main

    cli_main(argv if argv != sys.argv[1:] else None)


if __name__ == "__main__":
    main()
