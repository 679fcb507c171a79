"""``gigagpt sample``: generate text from a trained model, streamed to the terminal.

The model comes from a Lightning ``.ckpt`` (or a run folder), a Cerebras ``.mdl`` or a Hugging Face
GPT-2 folder. Prompts come from ``--prompt`` / ``--prompt-file`` (each may repeat: one batch), or,
when neither is given and stdin is a terminal, from an interactive loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import torch

from gigagpt.checkpoint import find_checkpoint, load_model, safe_load, training_tokenizer_file
from gigagpt.generate import NO_TOKEN, check_sampling, generate_stream
from gigagpt.mdl import is_hdf5
from gigagpt.run_folder import peek_checkpoint
from gigagpt.tokenizer import GPT2_VOCAB, Tokenizer, find_training_tokenizer, get_tokenizer

FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
         "max_new_tokens": "--max-new-tokens"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a Lightning .ckpt or a Cerebras .mdl (or a run folder holding last.ckpt / last.mdl), "
        "or a Hugging Face GPT-2 folder (config.json + weights)",
    )
    parser.add_argument(
        "--prompt", action="append", default=None, help="text to continue; repeat for a batch of prompts"
    )
    parser.add_argument(
        "--prompt-file",
        action="append",
        default=None,
        help="a file whose whole text is one prompt; repeatable",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt (one batch)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="'gpt2', 'bytes' or a GPT-2 .tiktoken file (default: from the model's vocabulary)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    parser.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0: all)")
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: keep the top p of probability"
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ..."
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights and activations; auto: bfloat16 on GPUs that support it, else float32",
    )
    parser.add_argument("--ignore-eot", action="store_true", help="keep going past the end-of-text token")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")


def default_tokenizer(vocab_size: int) -> str:
    if vocab_size == 256:
        return "bytes"
    if vocab_size == GPT2_VOCAB:
        return "gpt2"
    raise ValueError(
        f"the model's vocabulary of {vocab_size} tokens matches no built-in tokenizer; pass --tokenizer"
    )


def training_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer a checkpoint records it was trained with, found wherever the run is now."""
    if path.is_dir():
        return None  # a Hugging Face folder
    try:
        ckpt = safe_load(path) if is_hdf5(path) else peek_checkpoint(path)
    except Exception:  # unreadable here: load_model says why
        return None
    record = ckpt.get("tokenizer") if isinstance(ckpt, dict) else None
    if not isinstance(record, dict):
        return None
    data_path = (ckpt.get("datamodule_hyper_parameters") or {}).get("path")
    return find_training_tokenizer(record, path, str(data_path) if data_path else None)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class TextStream:
    """Writes the text of a growing token list, holding back a character still split across tokens."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO):
        self.tokenizer, self.out, self.ids, self.written = tokenizer, out, [], 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        self._write(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def close(self) -> str:
        text = self.tokenizer.decode(self.ids)
        self._write(text)
        return text

    def _write(self, text: str) -> None:
        if len(text) > self.written:
            self.out.write(text[self.written :])
            self.out.flush()
            self.written = len(text)


def encode_prompt(text: str, tokenizer: Tokenizer, context: int, err: TextIO | None = None) -> list[int]:
    ids = tokenizer.encode(text) or [tokenizer.eot_token]
    if len(ids) > context:
        (err or sys.stderr).write(
            f"gigagpt sample: warning: the prompt has {len(ids)} tokens, more than the model's "
            f"context of {context}; keeping its last {context} tokens\n"
        )
        ids = ids[-context:]
    return ids


def collect_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts given on the command line, or ``None`` for none given."""
    prompts = list(args.prompt or [])
    for name in args.prompt_file or []:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {name!r} does not exist")
        prompts.append(path.read_text(encoding="utf-8"))
    return prompts or None


def run_batch(
    model, tokenizer: Tokenizer, texts: list[str], args, device, out: TextIO | None = None
) -> list[str]:
    """Generate for every prompt x ``num_samples``; stream when there is a single row."""
    out = out or sys.stdout
    context = model.config.max_position_embeddings
    prompts = [encode_prompt(t, tokenizer, context) for t in texts for _ in range(args.num_samples)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stop = None if args.ignore_eot else tokenizer.eot_token
    streams = [TextStream(tokenizer, out if len(prompts) == 1 else _Sink()) for _ in prompts]
    if len(prompts) == 1:
        out.write(texts[0])
        out.flush()
    steps = generate_stream(
        model,
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        use_cache=not args.no_cache,
        generator=generator,
        stop_token=stop,
    )
    for step in steps:
        for i, token in enumerate(step[:, 0].tolist()):
            if token != NO_TOKEN and token != stop:
                streams[i].push(token)
    results = [s.close() for s in streams]
    if len(prompts) == 1:
        out.write("\n")
    else:
        for i, text in enumerate(results):
            prompt_text = texts[i // args.num_samples]
            out.write(f"----- sample {i + 1}/{len(results)} -----\n{prompt_text}{text}\n")
    out.flush()
    return results


class _Sink:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def interactive(model, tokenizer, args, device) -> None:
    sys.stderr.write("Type a prompt and press Enter (an empty line samples from nothing); Ctrl-D quits.\n")
    while True:
        try:
            text = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            sys.stderr.write("\n")
            return
        try:
            run_batch(model, tokenizer, [text.replace("\\n", "\n")], args, device)
        except KeyboardInterrupt:
            sys.stdout.write("\n")


def main(args: argparse.Namespace) -> list[str] | None:
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, names=FLAGS)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    prompts = collect_prompts(args)
    path = find_checkpoint(args.checkpoint)
    model = load_model(path, map_location="cpu").to(device=device, dtype=dtype)
    # The tokenizer: as given, else the one the checkpoint records (its ranks file found by hash,
    # offline), else the local ranks file the training data was prepared with, else the one the
    # vocabulary size implies.
    tokenizer = None if args.tokenizer else training_tokenizer(path)
    if tokenizer is None:
        spec = args.tokenizer or training_tokenizer_file(path) or default_tokenizer(model.config.vocab_size)
        tokenizer = get_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}; pass the --tokenizer the model was trained with"
        )
    if prompts is None and sys.stdin is not None and sys.stdin.isatty():
        interactive(model, tokenizer, args, device)
        return None
    # No prompt and no terminal: sample unconditionally, starting from end-of-text.
    return run_batch(model, tokenizer, prompts or [""], args, device)
