"""What ``prepare`` reads: text files (read lazily in blocks), ``.jsonl`` lines' ``text`` fields,
and the built-in corpus, each as (document, bytes) pairs; inputs that are not text are refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
BLOCK_CHARS = 1 << 20  # text files are read this many characters at a time


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
    for path in files:
        check_text(path)
    return files


BINARY_MAGIC = (b"\x7fELF", b"MZ", b"\x89PNG", b"PK\x03\x04", b"\x1f\x8b", b"%PDF", b"\x89HDF")


def check_text(path: Path, head_bytes: int = 1 << 13) -> None:
    """Refuse a file whose start shows it is not text (NUL bytes, a binary format's magic number)."""
    with open(path, "rb") as f:
        head = f.read(head_bytes)
    if head.startswith(BINARY_MAGIC) or b"\x00" in head:
        raise ValueError(f"input {str(path)!r} is not text (it holds NUL bytes or starts like a binary "
                         "file); pass only text files (UTF-8 .txt, .md, .jsonl ...)")


def text_blocks(path: str | os.PathLike, block_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """A text file as consecutive blocks of at most ``block_chars`` characters, read lazily (the file
    is opened on the first ``next``). Decoded as ``read_text`` would: UTF-8, invalid bytes replaced,
    universal newlines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(block_chars):
            yield block


def file_documents(files: Iterable[Path], block_chars: int = BLOCK_CHARS
                   ) -> Iterator[tuple[str | Iterator[str], int]]:
    """(document, bytes) pairs: a ``.jsonl`` line's ``text`` field (a ``str``), or a text file as
    an iterator of blocks (``text_blocks``: never read whole)."""
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    yield from _jsonl_text(path, line_no, raw)
        else:
            yield text_blocks(path, block_chars), path.stat().st_size


def _jsonl_text(path: Path, line_no: int, raw: bytes) -> Iterator[tuple[str, int]]:
    """The ``text`` string of one ``.jsonl`` line (nothing for a blank line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte {err.start + 1} of the line); "
                         "save the file as UTF-8") from None
    if not line.strip():
        return
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}:{line_no}: each .jsonl line must be a JSON object with a 'text' field") from None
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: the 'text' field must be a string, got {json.dumps(text)[:40]}")
    yield text, len(raw)
