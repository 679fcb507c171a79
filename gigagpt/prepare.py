"""Text -> ``train.bin`` / ``val.bin`` token files (+ ``meta.json``).

Streaming: documents are read, tokenized and appended in batches of a few MB, so memory stays
bounded on a corpus larger than RAM. Tokenization runs on all cores (tiktoken's batch encoder
releases the GIL) and overlaps with writing. Each output is written under a temporary name and
renamed only when complete, so an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gigagpt.tokenizer import Tokenizer, get_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")


# -- sources -----------------------------------------------------------------------------------------
def builtin_documents() -> Iterator[str]:
    """CPython's own reference documentation (``pydoc_data.topics``): ~465 kB of English, offline."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {str(path)!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
    return files


def file_documents(files: Iterable[Path]) -> Iterator[tuple[str, int]]:
    """(document, bytes read) pairs: a ``.jsonl`` line's ``text`` field, or a whole text file."""
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(
                            f"{path}:{line_no}: each .jsonl line must be a JSON object with a "
                            "'text' field"
                        ) from None
                    yield text, len(line.encode("utf-8"))
        else:
            yield path.read_text(encoding="utf-8", errors="replace"), path.stat().st_size


# -- writing -----------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class _AtomicTokenFile:
    """Appends token arrays to ``<name>.partial``; ``commit`` renames it into place."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.tmp = path, path.with_name(path.name + ".partial")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.file = open(self.tmp, "wb")
        self.count, self.max_id = 0, -1

    def write(self, docs: list[list[int]], eot: int) -> None:
        if not docs:
            return
        total = sum(map(len, docs)) + len(docs)
        arr = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(d, (eot,)) for d in docs), self.dtype, total
        )
        arr.tofile(self.file)
        self.count += total
        self.max_id = max(self.max_id, int(arr.max()))

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _batches(docs: Iterable[tuple[str, int]], batch_bytes: int) -> Iterator[tuple[list[str], int]]:
    batch, size = [], 0
    for text, nbytes in docs:
        batch.append(text)
        size += nbytes
        if size >= batch_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def prepare(
    documents: Iterable[tuple[str, int]],
    output: str | os.PathLike,
    tokenizer: Tokenizer,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    num_threads: int | None = None,
    batch_bytes: int = 1 << 20,
    total_bytes: int | None = None,
    progress: bool = True,
    source: str = "",
) -> dict:
    """Tokenize ``documents`` into ``output/{train,val}.bin`` and ``meta.json``; returns the meta.

    Each document goes to val with probability ``val_fraction`` (a seeded, deterministic draw in
    document order) and ends with the tokenizer's end-of-text token.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    num_threads = num_threads or os.cpu_count() or 1
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    files = {s: _AtomicTokenFile(out / f"{s}.bin", dtype) for s in ("train", "val")}
    rng = random.Random(seed)
    n_docs = {"train": 0, "val": 0}
    read = 0
    start = time.perf_counter()
    bar = _progress(progress, total_bytes)

    def encode(batch: list[str]) -> list[list[int]]:
        return tokenizer.encode_batch(batch, num_threads=num_threads)

    try:
        with ThreadPoolExecutor(1) as pool:
            pending = None  # encode batch n+1 while batch n is converted and written
            for texts, nbytes in itertools.chain(_batches(documents, batch_bytes), [(None, 0)]):
                future = pool.submit(encode, texts) if texts is not None else None
                if pending is not None:
                    done_texts, done_bytes, done_future = pending
                    ids = done_future.result()
                    splits = {"train": [], "val": []}
                    for doc in ids:
                        split = "val" if rng.random() < val_fraction else "train"
                        splits[split].append(doc)
                    for split, docs in splits.items():
                        files[split].write(docs, tokenizer.eot_token)
                        n_docs[split] += len(docs)
                    read += done_bytes
                    bar.update(read)
                pending = (texts, nbytes, future) if texts is not None else None
        if files["train"].count == 0:
            raise ValueError("no training text: the inputs were empty")
        if val_fraction > 0 and files["val"].count == 0:
            raise ValueError(
                f"no document fell into the validation split ({n_docs['train']} documents, "
                f"--val-fraction {val_fraction}); raise --val-fraction or add documents"
            )
        for f in files.values():
            f.commit()
    except BaseException:
        for f in files.values():
            f.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    meta = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot_token,
        "dtype": dtype,
        "train_tokens": files["train"].count,
        "val_tokens": files["val"].count,
        "train_documents": n_docs["train"],
        "val_documents": n_docs["val"],
        "train_max_token_id": files["train"].max_id,
        "val_max_token_id": files["val"].max_id,
        "val_fraction": val_fraction,
        "seed": seed,
        "source": source,
        "text_bytes": read,
        "seconds": round(seconds, 3),
    }
    write_json_atomic(out / "meta.json", meta)
    return meta


class _progress:
    """A rich progress bar over bytes of text, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int | None):
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress("[bold]tokenizing", BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("text", total=total)
            self._bar.start()

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# -- command line ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="text files, folders of them, or .jsonl files with a 'text' field")
    parser.add_argument("--builtin", action="store_true",
                        help="use the built-in corpus (CPython's reference docs); needs no download")
    parser.add_argument("--output", "-o", default=None, help="output folder (default: data/builtin with --builtin)")
    parser.add_argument("--tokenizer", default=None,
                        help="'gpt2' (default), 'bytes', or a path to a GPT-2 .tiktoken file "
                             "(default with --builtin: bytes)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="share of documents held out for validation (default 0.0005; 0.1 with --builtin)")
    parser.add_argument("--seed", type=int, default=2357, help="seed of the train/val split")
    parser.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> dict:
    if args.builtin == bool(args.inputs):
        raise SystemExit("gigagpt prepare: give input files/folders, or --builtin (not both)")
    if args.builtin:
        output = args.output or "data/builtin"
        tokenizer = get_tokenizer(args.tokenizer or "bytes")
        docs = ((d, len(d.encode("utf-8"))) for d in builtin_documents())
        total, source, val_fraction = None, "builtin:pydoc_data.topics", args.val_fraction or 0.1
    else:
        if not args.output:
            raise SystemExit("gigagpt prepare: --output is required with input files")
        output = args.output
        files = input_files(args.inputs)
        tokenizer = get_tokenizer(args.tokenizer or "gpt2")
        docs = file_documents(files)
        total = sum(f.stat().st_size for f in files)
        source = ",".join(str(i) for i in args.inputs)
        val_fraction = 0.0005 if args.val_fraction is None else args.val_fraction
    meta = prepare(docs, output, tokenizer, val_fraction=val_fraction, seed=args.seed,
                   num_threads=args.threads, total_bytes=total,
                   progress=not args.no_progress and sys.stderr.isatty(), source=source)
    mb = meta["text_bytes"] / 1e6
    print(
        f"wrote {output}/train.bin ({meta['train_tokens']:,} tokens) and val.bin "
        f"({meta['val_tokens']:,} tokens), {meta['dtype']}, tokenizer {meta['tokenizer']}: "
        f"{mb:.1f} MB of text in {meta['seconds']:.1f} s ({mb / max(meta['seconds'], 1e-9):.1f} MB/s)"
    )
    return meta
