"""Text -> ``train.bin`` / ``val.bin`` token files (+ ``meta.json``).

Streaming: text files are read in blocks, documents are cut into *pieces* of at most
``PIECE_BYTES`` bytes (at a newline where the piece holds one), and pieces are tokenized and
appended in batches of about a MB, so memory stays bounded on a corpus (or a single file) larger
than RAM. Tokenization runs on all cores (tiktoken's batch encoder releases the GIL) and overlaps
with writing. The piece is the unit of the train/val split, so a single ``input.txt`` splits too;
the end-of-text token follows only the last piece of each document. The three outputs are written
into a temporary folder and put in place together (:mod:`gigagpt.dataset_folder`), so an
interrupted run never leaves a set that looks finished, nor one file of a new set beside old ones.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gigagpt import dataset_folder as folder
from gigagpt.sources import (  # noqa: F401  (the sources are part of prepare's interface)
    BLOCK_CHARS,
    TEXT_SUFFIXES,
    _batches,
    _pieces,
    builtin_documents,
    check_text,
    describe_skipped,
    file_documents,
    file_size,
    input_files,
    parse_extensions,
    text_blocks,
)
from gigagpt.token_files import TokenFile, token_dtype  # noqa: F401  (token_dtype: part of the interface)
from gigagpt.tokenizer import Tokenizer

# The unit of the train/val split. Small enough that a ~1 MB file splits with roughly the asked
# proportions and that a batch holds several pieces to tokenize in parallel; large enough that the
# per-piece work (a draw, a cut) is nothing next to tokenizing it.
PIECE_BYTES = 1 << 16


# -- writing ---------------------------------------------------------------------------------------
def prepare(
    documents: Iterable[tuple],
    output: str | os.PathLike,
    tokenizer: Tokenizer,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    num_threads: int | None = None,
    batch_bytes: int = 1 << 20,
    total_bytes: int | None = None,
    progress: bool = True,
    source: str = "",
    piece_bytes: int = PIECE_BYTES,
    force: bool = False,
) -> dict:
    """Tokenize ``documents`` into ``output/{train,val}.bin`` and ``meta.json``; returns the meta.

    ``documents`` yields (text, bytes) pairs, the text a ``str`` or an iterable of ``str`` blocks
    (``text_blocks``: a file read lazily). Each document is cut into pieces of at most
    ``piece_bytes`` UTF-8 bytes (at a newline where one exists), and the last piece of each is
    followed by the tokenizer's end-of-text token. Each piece goes to val with probability
    ``val_fraction`` (a seeded, deterministic draw in piece order). The latest piece is held back
    until the next one comes: if, at the end, val (with ``val_fraction > 0``) or train is still
    empty, that last piece goes there instead, so with 2 pieces or more neither split is empty.

    The three files are written into a temporary folder and put in place together
    (:mod:`gigagpt.dataset_folder`); an ``output`` holding a different dataset is refused unless
    ``force``.
    """
    check_settings(val_fraction, piece_bytes)
    out = Path(output)
    recipe = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "val_fraction": val_fraction,
              "seed": seed, "piece_bytes": piece_bytes, "source": source}
    folder.clean_stale(out)
    folder.check_output(out, recipe, force)
    tmp, made = None, []
    try:
        made = folder.make_parents(out.parent)
        tmp = folder.temp_folder(out)
        start = time.perf_counter()
        stats = _tokenize(documents, tmp, tokenizer, val_fraction, seed, num_threads or os.cpu_count() or 1,
                          batch_bytes, _progress(progress, total_bytes), piece_bytes)
        meta = dataset_meta(tokenizer, stats, val_fraction, seed, source)
        meta["seconds"] = round(time.perf_counter() - start, 3)
        folder.write_json(tmp / "meta.json", meta)
        folder.commit(tmp, out)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        folder.remove_made(made)
        if isinstance(err, OSError) and (tmp is None or str(tmp) in str(err.filename)):
            # the output side: name --output, not the temporary folder
            raise ValueError(f"cannot write --output {out}: {err.strerror or err}; check that its folder is "
                             "writable and has free space, or choose another --output") from None
        raise
    return meta


def check_settings(val_fraction: float, piece_bytes: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if piece_bytes < 4:
        raise ValueError(f"--piece-bytes must be at least 4 (one UTF-8 character), got {piece_bytes}")


def dataset_meta(tokenizer: Tokenizer, stats: dict, val_fraction: float, seed: int, source: str) -> dict:
    """What ``meta.json`` (and a store's manifest) says of the tokens: tokenizer, dtype, counts, recipe."""
    return {
        "tokenizer": tokenizer.name,
        # the local ranks file, if any: what the training-time TextSamples load offline
        "tokenizer_file": tokenizer.source_file,
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot_token,
        "dtype": token_dtype(tokenizer.vocab_size),
        **stats,
        "val_fraction": val_fraction,
        "seed": seed,
        "source": source,
    }


class _Splits:
    """Pieces' tokens drawn into train or val and appended to ``out/{train,val}.bin``.

    The latest non-empty piece is held back until the next one comes, so :meth:`finish` can give
    it to a split that would otherwise stay empty.
    """

    def __init__(self, out: Path, tokenizer: Tokenizer, val_fraction: float, seed: int | str):
        self.eot, self.val_fraction = tokenizer.eot_token, val_fraction
        self.files = {s: TokenFile(out / f"{s}.bin", token_dtype(tokenizer.vocab_size)) for s in ("train", "val")}
        self.rng = random.Random(seed)
        self.n_docs = {"train": 0, "val": 0}
        self.n_pieces = {"train": 0, "val": 0}
        self.held = None  # (ids, ends the document, drawn split) of the latest piece, not yet written

    def write(self, split: str, pieces: list[list[int]], ends: list[bool]) -> None:
        self.files[split].write(pieces, ends, self.eot)
        self.n_pieces[split] += len(pieces)
        self.n_docs[split] += sum(ends)

    def take(self, encoded: list[list[int]], ends: list[bool]) -> None:
        splits = {"train": ([], []), "val": ([], [])}
        for ids, last in zip(encoded, ends):
            drawn = "val" if self.rng.random() < self.val_fraction else "train"
            if not ids:  # an empty document: only its end-of-text, never the held piece
                splits[drawn][0].append(ids)
                splits[drawn][1].append(last)
                continue
            if self.held is not None:
                split_ids, split_ends = splits[self.held[2]]
                split_ids.append(self.held[0])
                split_ends.append(self.held[1])
            self.held = (ids, last, drawn)
        for split, (pieces, piece_ends) in splits.items():
            self.write(split, pieces, piece_ends)

    def finish(self, whole: bool, piece_bytes: int) -> None:
        """Writes the held piece. ``whole``: this is the whole dataset, so neither split may stay
        empty (a shard of a store may hold no val, or no text at all)."""
        if self.held is None:
            if whole:
                raise ValueError("no training text: the inputs were empty")
            return
        if whole and self.val_fraction > 0 and sum(self.n_pieces.values()) == 0:
            raise ValueError(
                f"the text fits in one piece (at most {piece_bytes:,} bytes; pieces are the unit of "
                f"the train/val split), so it cannot be split for --val-fraction {self.val_fraction}: "
                "give more text, a smaller --piece-bytes, or --val-fraction 0"
            )
        ids, last, split = self.held
        if whole and self.val_fraction > 0 and self.n_pieces["val"] == 0:
            split = "val"
        elif whole and self.n_pieces["train"] == 0:
            split = "train"
        self.write(split, [ids], [last])
        if whole and self.files["train"].count == 0:
            raise ValueError("no training text: the inputs were empty")

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def stats(self, piece_bytes: int, text_bytes: int) -> dict:
        return {
            "train_tokens": self.files["train"].count,
            "val_tokens": self.files["val"].count,
            "train_documents": self.n_docs["train"],  # documents that end in each split (their end-of-text tokens)
            "val_documents": self.n_docs["val"],
            "pieces": dict(self.n_pieces),
            "piece_bytes": piece_bytes,
            "train_max_token_id": self.files["train"].max_id,
            "val_max_token_id": self.files["val"].max_id,
            "text_bytes": text_bytes,
        }


def _tokenize(documents, out: Path, tokenizer: Tokenizer, val_fraction: float, seed: int | str,
              num_threads: int, batch_bytes: int, bar: _progress, piece_bytes: int, whole: bool = True) -> dict:
    """Writes ``out/{train,val}.bin``; returns their counts for meta.json (or a shard's record)."""
    splits = _Splits(out, tokenizer, val_fraction, seed)
    read = 0

    def encode(batch: list[str]) -> list[list[int]]:
        return tokenizer.encode_batch(batch, num_threads=num_threads)

    try:
        batches = _batches(_pieces(documents, piece_bytes), batch_bytes)
        with ThreadPoolExecutor(1) as pool:
            pending = None  # encode batch n+1 while batch n is converted and written
            for texts, ends, nbytes in itertools.chain(batches, [(None, None, 0)]):
                future = pool.submit(encode, texts) if texts is not None else None
                if pending is not None:
                    done_ends, done_bytes, done_future = pending
                    splits.take(done_future.result(), done_ends)
                    read += done_bytes
                    bar.update(read)
                pending = (ends, nbytes, future) if texts is not None else None
        splits.finish(whole, piece_bytes)
    finally:
        splits.close()
        bar.close()
    return splits.stats(piece_bytes, read)


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
SMALLEST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def smallest_val_batch() -> tuple[int, int]:
    """(batch size, sequence length) of the smallest shipped config (the DataModule's defaults
    where the configs are not installed)."""
    try:
        import yaml

        data = yaml.safe_load(SMALLEST_CONFIG.read_text())["data"]
        return int(data["batch_size"]), int(data["sequence_length"])
    except (OSError, KeyError, TypeError, ValueError, ImportError):
        import inspect

        from gigagpt.data import GPTDataModule

        params = inspect.signature(GPTDataModule).parameters
        return params["batch_size"].default, params["sequence_length"].default


def warn_small_val(val_tokens: int, val_fraction: float) -> None:
    """One line when validation would refuse the split: fewer tokens than one batch of windows."""
    if val_fraction <= 0:
        return
    batch, seq = smallest_val_batch()
    need = batch * seq + 1  # `batch` windows of `seq` tokens, each with its next token as label
    if val_tokens < need:
        print(f"gigagpt prepare: warning: the validation split holds {val_tokens:,} tokens, fewer than one batch "
              f"of {SMALLEST_CONFIG.stem} ({batch} x {seq} + 1 = {need:,}); raise --val-fraction (now "
              f"{val_fraction}) or validation will refuse it", file=sys.stderr)
