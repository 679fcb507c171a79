"""Entry point of the ``gigagpt`` command: dispatches without loading more than it needs.

``prepare | sample | export | plot`` are plain commands (``prepare`` never loads torch or
Lightning); everything else goes to the LightningCLI in :mod:`gigagpt.cli`.

``gigagpt export``: convert between Lightning ``.ckpt``, Cerebras ``.mdl`` and Hugging Face GPT-2.

    gigagpt export runs/tiny/checkpoints/last.ckpt hf/tiny     # -> GPT2LMHeadModel folder
    gigagpt export hf/gpt2 gpt2.ckpt                           # -> Lightning checkpoint
    gigagpt export model.mdl hf/model                          # Cerebras -> HF

The output format follows the destination: a path ending in ``.ckpt`` is a Lightning checkpoint
(``GPTModule.load_from_checkpoint`` and ``gigagpt sample`` read it), ``.mdl`` a Cerebras checkpoint
(needs cerebras-pytorch), anything else a Hugging Face folder (``config.json`` +
``model.safetensors``, ``generation_config.json`` and the tokenizer the checkpoint was trained with:
``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, which ``AutoTokenizer`` loads).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# name -> (module exposing add_arguments(parser) and main(args), help)
EXTRA_COMMANDS = {
    "prepare": ("gigagpt.prepare_command", "tokenize text into train.bin / val.bin"),
    "sample": ("gigagpt.sample", "generate text from a checkpoint"),
    "export": ("gigagpt.commands", "convert checkpoints (Lightning .ckpt, Cerebras .mdl, Hugging Face)"),
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
    add_arguments, run = (_export_arguments, export) if name == "export" else (module.add_arguments, module.main)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # includes DataConfigError
        raise SystemExit(f"gigagpt {name}: error: {' '.join(str(err).split())}") from None
    except OSError as err:  # a folder that cannot be made or written, a full disk
        where = f"{err.filename}: " if err.filename else ""
        raise SystemExit(f"gigagpt {name}: error: {where}{err.strerror or err}; check that the path exists "
                         "and is writable, and the free space") from None


DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes (torch loads only when exporting)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a Lightning .ckpt (or run folder), a Cerebras .mdl, or a Hugging Face folder"
    )
    parser.add_argument("destination", help="a .ckpt file (Lightning) or a folder (Hugging Face GPT-2)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="cast the weights (default: keep the source's dtype)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing destination file")
    parser.add_argument(
        "--tokenizer", default=None,
        help="Hugging Face folders: the tokenizer to write beside the model, 'gpt2', 'bytes' or a GPT-2 "
        ".tiktoken file (default: the one the checkpoint was trained with)",
    )


def check_destination(destination: Path, force: bool) -> None:
    """Refuse, before any work, what would overwrite a file or could not be written."""
    blocked = next((p for p in destination.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ValueError(f"cannot write {destination}: {blocked} is a file, not a folder; choose another destination")
    if destination.suffix in (".ckpt", ".mdl") and destination.exists() and not force:
        raise ValueError(f"destination {destination} exists (a training checkpoint?); pass --force to "
                         "replace it, or choose another destination")
    from gigagpt.accelerators.bridge_errors import cstorch_available

    if destination.suffix == ".mdl" and not cstorch_available():
        raise ValueError(f"writing {destination} (a Cerebras .mdl) needs cerebras-pytorch (cstorch), which is "
                         "not installed here: pip install \"gigagpt[cerebras]\" in its own environment, or "
                         "export to a .ckpt / Hugging Face folder")


def export_tokenizer(source: Path, spec: str | None, vocab_size: int):
    """The tokenizer an exported Hugging Face folder gets, and how it was found: as given, else the
    one the checkpoint was trained with (as ``gigagpt sample`` finds it), else the vocabulary's."""
    from gigagpt.checkpoint import find_checkpoint
    from gigagpt.sample import default_tokenizer, training_tokenizer, training_tokenizer_file
    from gigagpt.tokenizer import get_tokenizer

    if spec:
        return get_tokenizer(spec)
    if source.is_dir() and (source / "config.json").is_file():
        raise ValueError(f"{source} is a Hugging Face folder: its own tokenizer files are not copied")
    path = find_checkpoint(source)
    found = training_tokenizer(path)
    return found or get_tokenizer(training_tokenizer_file(path) or default_tokenizer(vocab_size))


def _save(model, destination: Path, dtype, tokenizer=None) -> tuple[Path, str]:
    from gigagpt.checkpoint import save_hf, save_lightning_checkpoint

    if destination.suffix == ".ckpt":
        return save_lightning_checkpoint(model if dtype is None else model.to(dtype), destination), \
            "Lightning checkpoint"
    if destination.suffix == ".mdl":
        from gigagpt.accelerators.checkpoint_io import save_mdl

        return save_mdl(model if dtype is None else model.to(dtype), destination), "Cerebras checkpoint"
    return save_hf(model, destination, dtype=dtype, tokenizer=tokenizer), "Hugging Face GPT2LMHeadModel folder"


def export(args: argparse.Namespace) -> Path:
    source, destination = Path(args.source), Path(args.destination)
    if source.resolve() == destination.resolve():
        raise ValueError("source and destination are the same path; choose another destination")
    check_destination(destination, args.force)
    import torch

    from gigagpt.checkpoint import load_model

    model = load_model(source)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tokenizer, hf_folder = None, destination.suffix not in (".ckpt", ".mdl")
    if hf_folder:
        try:
            tokenizer = export_tokenizer(source, args.tokenizer, model.config.vocab_size)
        except (OSError, ValueError, RuntimeError) as err:
            if args.tokenizer:
                raise
            sys.stderr.write(f"gigagpt export: warning: the folder gets no tokenizer files ({' '.join(str(err).split())}"
                             "); pass --tokenizer gpt2, bytes or PATH.tiktoken to add them\n")
    try:
        out, kind = _save(model, destination, dtype, tokenizer)
    except OSError as err:  # an unwritable folder, a full disk: name the destination, not a temp file
        raise ValueError(f"cannot write {destination}: {err.strerror or err}; check that its folder is "
                         "writable and has free space, or choose another destination") from None
    c = model.config
    sys.stdout.write(
        f"wrote {out} ({kind}{_tokenizer_note(tokenizer, hf_folder)}; depth {c.depth}, width {c.width}, heads {c.heads}, "
        f"vocab {c.vocab_size}, context {c.max_position_embeddings}, "
        f"{model.num_params() / 1e6:.2f}M parameters)\n"
    )
    return out


def _tokenizer_note(tokenizer, hf_folder: bool) -> str:
    if not hf_folder:
        return ""
    if tokenizer is None:
        return " without a tokenizer"
    source = getattr(tokenizer, "source_file", None)
    return f" with the {tokenizer.name} tokenizer{f' of {source}' if source else ''}"


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
    from gigagpt.errors import GigagptError

    try:
        cli_main(argv if argv != sys.argv[1:] else None, other_commands=tuple(EXTRA_COMMANDS))
    except GigagptError as err:  # what the CLI did not word itself (e.g. a non-finite loss mid-run)
        raise SystemExit(f"gigagpt: {' '.join(str(err).split())}") from None


if __name__ == "__main__":
    main()
