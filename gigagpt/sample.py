"""``gigagpt sample``: generate text from a trained checkpoint, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from gigagpt.checkpoint import load_gpt
from gigagpt.generate import generate_stream
from gigagpt.tokenizer import get_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a Lightning .ckpt file (or a run folder holding last.ckpt)")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--tokenizer", default=None,
                        help="'gpt2', 'bytes' or a .tiktoken file (default: from the checkpoint's vocabulary)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")


def default_tokenizer(vocab_size: int) -> str:
    return "bytes" if vocab_size == 256 else "gpt2"


def main(args: argparse.Namespace) -> str:
    model = load_gpt(args.checkpoint, map_location=args.device)
    tokenizer = get_tokenizer(args.tokenizer or default_tokenizer(model.config.vocab_size))
    ids = tokenizer.encode(args.prompt) or [tokenizer.eot_token]
    context = model.config.max_position_embeddings
    if len(ids) > context:
        warnings.warn(f"prompt of {len(ids)} tokens cropped to the model's context of {context}", stacklevel=1)
        ids = ids[-context:]
    prompt = torch.tensor([ids], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = []
    sys.stdout.write(args.prompt)
    for token in generate_stream(model, prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
                                 generator=generator):
        out.append(int(token[0, 0]))
        if out[-1] == tokenizer.eot_token:
            break
        sys.stdout.write(tokenizer.decode([out[-1]]) if tokenizer.name == "gpt2" else "")
        sys.stdout.flush()
    text = tokenizer.decode(out)
    if tokenizer.name != "gpt2":  # bytes may split a character: print the decoded whole
        sys.stdout.write(text)
    sys.stdout.write("\n")
    return text
