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


def main(args: argparse.Namespace) -> Path:
    source, destination = Path(args.source), Path(args.destination)
    if source.resolve() == destination.resolve():
        raise ValueError("source and destination are the same path; choose another destination")
    model = load_model(source)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if destination.suffix == ".ckpt":
        if dtype is not None:
            model = model.to(dtype)
        out = save_lightning_checkpoint(model, destination)
        kind = "Lightning checkpoint"
    elif destination.suffix == ".mdl":
        if dtype is not None:
            model = model.to(dtype)
        out = save_mdl(model, destination)
        kind = "Cerebras checkpoint"
    else:
        out = save_hf(model, destination, dtype=dtype)
        kind = "Hugging Face GPT2LMHeadModel folder"
    c = model.config
    sys.stdout.write(
        f"wrote {out} ({kind}; depth {c.depth}, width {c.width}, heads {c.heads}, "
        f"vocab {c.vocab_size}, context {c.max_position_embeddings}, "
        f"{model.num_params() / 1e6:.2f}M parameters)\n"
    )
    return out
