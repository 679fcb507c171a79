"""``gigagpt prepare``: its arguments, and the choice between one dataset folder
(:func:`gigagpt.prepare.prepare`) and a sharded store (:mod:`gigagpt.shards`)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from gigagpt.prepare import PIECE_BYTES, prepare, warn_small_val
from gigagpt.sources import (
    TEXT_SUFFIXES,
    builtin_documents,
    describe_skipped,
    file_documents,
    file_size,
    input_files,
    parse_extensions,
)
from gigagpt.tokenizer import get_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="text files, folders of them, or .jsonl files with a 'text' field; local paths or "
                        "fsspec URLs (s3://bucket/corpus/ ...)")
    parser.add_argument("--builtin", action="store_true",
                        help="use the built-in corpus (CPython's reference docs); needs no download")
    parser.add_argument("--output", "-o", default=None, help="output folder (default: data/builtin with --builtin)")
    parser.add_argument("--tokenizer", default=None,
                        help="'gpt2' (default), 'bytes', or a path to a GPT-2 .tiktoken file "
                             "(default with --builtin: bytes)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="share of the text held out for validation, drawn piece by piece (default "
                             "0.0005; 0.1 with --builtin; 0: no validation split)")
    parser.add_argument("--piece-bytes", type=int, default=PIECE_BYTES,
                        help="documents are cut into pieces of at most this many bytes, at newlines "
                             f"where possible, the unit of the train/val split (default {PIECE_BYTES})")
    parser.add_argument("--seed", type=int, default=2357, help="seed of the train/val split")
    parser.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true",
                        help="replace a different dataset already in --output (the same one is rebuilt freely)")
    add_store_arguments(parser)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ext", default=None,
                        help="extensions read from folders, comma-separated (default: "
                             f"{','.join(TEXT_SUFFIXES)}); other files are skipped and counted")
    store = parser.add_argument_group("sharded store (docs/data.md)")
    store.add_argument("--shard-mb", type=float, default=None,
                       help="write a sharded store: shards of about this many MB of text, and manifest.json")
    store.add_argument("--workers", type=int, default=0,
                       help="make the shards on a local Dask cluster of this many processes (pip install "
                            "'gigagpt[data]')")
    store.add_argument("--scheduler", default=None,
                       help="make the shards on a running Dask cluster, e.g. tcp://host:8786")
    store.add_argument("--num-nodes", type=int, default=1,
                       help="machines sharing the work without a cluster: each makes every N-th shard")
    store.add_argument("--node-rank", type=int, default=0, help="this machine's rank among --num-nodes")


def main(args: argparse.Namespace) -> dict:
    if args.builtin == bool(args.inputs):
        raise SystemExit("gigagpt prepare: give input files/folders, or --builtin (not both)")
    sharded = (args.shard_mb is not None or args.workers or args.scheduler or args.num_nodes != 1
               or args.node_rank != 0)
    if args.builtin:
        if sharded:
            raise SystemExit("gigagpt prepare: a sharded store is made from input files, not --builtin")
        output, spec = args.output or "data/builtin", args.tokenizer or "bytes"
        docs = ((d, len(d.encode("utf-8"))) for d in builtin_documents())
        files, source = None, "builtin:pydoc_data.topics"
        val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
    else:
        if not args.output:
            raise SystemExit("gigagpt prepare: --output is required with input files")
        output, spec = args.output, args.tokenizer or "gpt2"
        files = _input_files(args)
        docs = file_documents(files)
        source = ",".join(str(i) for i in args.inputs)
        val_fraction = 0.0005 if args.val_fraction is None else args.val_fraction
    if sharded:
        from gigagpt.shards import main as main_store

        return main_store(args, files, output, spec, val_fraction, source)
    meta = prepare(docs, output, get_tokenizer(spec), val_fraction=val_fraction, seed=args.seed,
                   num_threads=args.threads, total_bytes=files and sum(map(file_size, files)),
                   piece_bytes=args.piece_bytes, progress=not args.no_progress and sys.stderr.isatty(),
                   source=source, force=args.force)
    mb = meta["text_bytes"] / 1e6
    print(
        f"wrote {output}/train.bin ({meta['train_tokens']:,} tokens) and val.bin "
        f"({meta['val_tokens']:,} tokens), {meta['dtype']}, tokenizer {meta['tokenizer']}: "
        f"{mb:.1f} MB of text in {meta['seconds']:.1f} s ({mb / max(meta['seconds'], 1e-9):.1f} MB/s)"
    )
    warn_small_val(meta["val_tokens"], val_fraction)
    return meta


def _input_files(args: argparse.Namespace) -> list[Path]:
    skipped = Counter()
    files = input_files(args.inputs, parse_extensions(args.ext) if args.ext else TEXT_SUFFIXES, skipped)
    if skipped:
        print(f"skipped {describe_skipped(skipped)} (not read; choose the extensions read with --ext)")
    return files
