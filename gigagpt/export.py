"""``gigagpt export``: convert between Lightning ``.ckpt``, Cerebras ``.mdl`` and Hugging Face GPT-2.

    gigagpt export runs/tiny/checkpoints/last.ckpt hf/tiny     # -> GPT2LMHeadModel folder
    gigagpt export hf/gpt2 gpt2.ckpt                           # -> Lightning checkpoint
    gigagpt export model.mdl hf/model                          # Cerebras -> HF (needs cerebras-pytorch)

The output format follows the destination: a path ending in ``.ckpt`` is a Lightning checkpoint
(``GPTModule.load_from_checkpoint`` and ``gigagpt sample`` read it), ``.mdl`` a Cerebras checkpoint
(needs cerebras-pytorch), anything else a Hugging Face folder (``config.json`` +
``model.safetensors``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from gigagpt.convert import load_model, save_hf, save_lightning_checkpoint, save_mdl

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a Lightning .ckpt (or run folder), a Cerebras .mdl, or a Hugging Face folder"
    )
    parser.add_argument("destination", help="a .ckpt file (Lightning) or a folder (Hugging Face GPT-2)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="cast the weights (default: keep the source's dtype)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing destination file")


def _has_cstorch() -> bool:
    try:
        return importlib.util.find_spec("cerebras.pytorch") is not None
    except ModuleNotFoundError:
        return False


def check_destination(destination: Path, force: bool) -> None:
    """Refuse, before any work, what would overwrite a file or could not be written."""
    blocked = next((p for p in destination.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ValueError(f"cannot write {destination}: {blocked} is a file, not a folder; choose another destination")
    if destination.suffix in (".ckpt", ".mdl") and destination.exists() and not force:
        raise ValueError(f"destination {destination} exists (a training checkpoint?); pass --force to "
                         "replace it, or choose another destination")
    if destination.suffix == ".mdl" and not _has_cstorch():
        raise ValueError(f"writing {destination} (a Cerebras .mdl) needs cerebras-pytorch (cstorch), which is "
                         "not installed here: pip install \"gigagpt[cerebras]\" in its own environment, or "
                         "export to a .ckpt / Hugging Face folder")


def _save(model, destination: Path, dtype) -> tuple[Path, str]:
    if destination.suffix == ".ckpt":
        return save_lightning_checkpoint(model if dtype is None else model.to(dtype), destination), \
            "Lightning checkpoint"
    if destination.suffix == ".mdl":
        return save_mdl(model if dtype is None else model.to(dtype), destination), "Cerebras checkpoint"
    return save_hf(model, destination, dtype=dtype), "Hugging Face GPT2LMHeadModel folder"


def main(args: argparse.Namespace) -> Path:
    source, destination = Path(args.source), Path(args.destination)
    if source.resolve() == destination.resolve():
        raise ValueError("source and destination are the same path; choose another destination")
    check_destination(destination, args.force)
    model = load_model(source)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        out, kind = _save(model, destination, dtype)
    except OSError as err:  # an unwritable folder, a full disk: name the destination, not a temp file
        raise ValueError(f"cannot write {destination}: {err.strerror or err}; check that its folder is "
                         "writable and has free space, or choose another destination") from None
    c = model.config
    sys.stdout.write(
        f"wrote {out} ({kind}; depth {c.depth}, width {c.width}, heads {c.heads}, "
        f"vocab {c.vocab_size}, context {c.max_position_embeddings}, "
        f"{model.num_params() / 1e6:.2f}M parameters)\n"
    )
    return out
