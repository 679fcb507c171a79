"""What ``prepare`` reads: text files (read lazily in blocks), ``.jsonl`` lines' ``text`` fields,
and the built-in corpus, each as (document, bytes) pairs; inputs that are not text are refused.
Inputs are local paths or fsspec URLs (``s3://bucket/corpus/``, with the file system's package)."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")  # what a folder is read for, unless --ext
BLOCK_CHARS = 1 << 20  # text files are read this many characters at a time


def builtin_documents() -> Iterator[str]:
    """CPython's own reference documentation (``pydoc_data.topics``): ~465 kB of English, offline."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def is_url(name: str | os.PathLike) -> bool:
    return "://" in str(name)


def open_binary(name: str | os.PathLike):
    if is_url(name):
        import fsspec

        return fsspec.open(str(name), "rb").open()
    return open(name, "rb")


def file_size(name: str | os.PathLike) -> int:
    if is_url(name):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(name))
        return int(fs.size(path))
    return os.stat(name).st_size


def suffix(name: str | os.PathLike) -> str:
    return PurePosixPath(str(name)).suffix


def _url_files(url: str) -> list[str] | None:
    """The files under an fsspec URL, sorted (``[url]`` for a file), or None if nothing is there."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.isdir(root):
        return sorted(fs.unstrip_protocol(p) for p in fs.find(root))
    return [url] if fs.isfile(root) else None


def input_files(inputs: Iterable[str | os.PathLike], suffixes: Iterable[str] = TEXT_SUFFIXES,
                skipped: Counter | None = None) -> list:
    """The files ``inputs`` name: files as given, folders' files with one of ``suffixes``, sorted
    (``Path``s, or ``str`` URLs for inputs in an fsspec file system).

    A folder's other files are counted by suffix in ``skipped`` (where given), for the report.
    """
    suffixes = tuple(suffixes)
    files = []
    for item in inputs:
        path = Path(item)
        listed = _url_files(str(item)) if is_url(item) else None
        if is_url(item) and listed is None:
            raise FileNotFoundError(f"input {str(item)!r} does not exist")
        if (listed is not None and listed != [str(item)]) or (listed is None and path.is_dir()):
            found = []
            for p in listed if listed is not None else sorted(p for p in path.rglob("*") if p.is_file()):
                if suffix(p) in suffixes:
                    found.append(p)
                elif skipped is not None:
                    skipped[suffix(p) or "(no extension)"] += 1
            if not found:
                raise FileNotFoundError(f"folder {str(path)!r} holds no text files ({', '.join(suffixes)}); "
                                        "choose the extensions read with --ext")
            files.extend(found)
        elif listed is not None:
            files.append(str(item))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
    for path in files:
        check_text(path)
    return files


def parse_extensions(spec: str) -> tuple[str, ...]:
    """``--ext .txt,md`` -> ``(".txt", ".md")``."""
    exts = tuple(e if e.startswith(".") else f".{e}" for e in (x.strip() for x in spec.split(",")) if e)
    if not exts or any(len(e) < 2 or "/" in e for e in exts):
        raise ValueError(f"--ext {spec!r}: give file extensions separated by commas, e.g. --ext .txt,.md,.jsonl")
    return exts


def describe_skipped(skipped: Counter) -> str:
    """``"3 .py, 1 .png"``: the most common kinds first."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


BINARY_MAGIC = (b"\x7fELF", b"MZ", b"\x89PNG", b"PK\x03\x04", b"\x1f\x8b", b"%PDF", b"\x89HDF")


def check_text(path: Path, head_bytes: int = 1 << 13) -> None:
    """Refuse a file whose start shows it is not text (NUL bytes, a binary format's magic number)."""
    with open_binary(path) as f:
        head = f.read(head_bytes)
    if head.startswith(BINARY_MAGIC) or b"\x00" in head:
        raise ValueError(f"input {str(path)!r} is not text (it holds NUL bytes or starts like a binary "
                         "file); pass only text files (UTF-8 .txt, .md, .jsonl ...)")


def text_blocks(path: str | os.PathLike, block_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """A text file as consecutive blocks of at most ``block_chars`` characters, read lazily (the file
    is opened on the first ``next``). Decoded as ``read_text`` would: UTF-8, invalid bytes replaced,
    universal newlines."""
    with (io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace") if is_url(path)
          else open(path, encoding="utf-8", errors="replace")) as f:
        while block := f.read(block_chars):
            yield block


def file_documents(files: Iterable[Path], block_chars: int = BLOCK_CHARS
                   ) -> Iterator[tuple[str | Iterator[str], int]]:
    """(document, bytes) pairs: a ``.jsonl`` line's ``text`` field (a ``str``), or a text file as
    an iterator of blocks (``text_blocks``: never read whole)."""
    for path in files:
        if suffix(path) == ".jsonl":
            with open_binary(path) as f:
                for line_no, raw in enumerate(f, 1):
                    yield from _jsonl_text(path, line_no, raw)
        else:
            yield text_blocks(path, block_chars), file_size(path)


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


# -- parts of files: the units of a sharded store ----------------------------------------------------
def plan_shards(files: list[Path], shard_bytes: int) -> list[list[tuple[str, int, int]]]:
    """The inputs, in order, cut into shards of about ``shard_bytes`` bytes of text.

    A shard is a list of ``(file, start, end)`` byte ranges; a cut inside a file falls just after a
    newline (so a ``.jsonl`` line, a UTF-8 character or a ``\\r\\n`` is never split). The plan is a
    pure function of the files' list and contents: every machine that plans it gets the same shards.
    """
    if shard_bytes < 1:
        raise ValueError(f"--shard-mb must be positive, got {shard_bytes / 1e6}")
    shards, current, filled = [], [], 0
    for path in files:
        size = file_size(path)
        if size == 0:
            current.append((str(path), 0, 0))  # an empty document still gets its end-of-text
        pos = 0
        while pos < size:
            cut = size if size - pos <= shard_bytes - filled else _line_end(path, pos + shard_bytes - filled, size)
            current.append((str(path), pos, cut))
            filled += cut - pos
            pos = cut
            if filled >= shard_bytes:
                shards.append(current)
                current, filled = [], 0
    if current:
        shards.append(current)
    return shards


def _line_end(path: Path, at: int, size: int, chunk: int = 1 << 16) -> int:
    """The first position ``>= at`` just after a newline (or the file's end)."""
    with open_binary(path) as f:
        pos = at - 1
        f.seek(pos)
        while block := f.read(chunk):
            found = block.find(b"\n")
            if found >= 0:
                return pos + found + 1
            pos += len(block)
    return size


class _Range(io.RawIOBase):
    """Bytes ``[start, end)`` of a file, as a file."""

    def __init__(self, path: Path, start: int, end: int):
        self.file = open_binary(path)
        self.file.seek(start)
        self.left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.file.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def range_blocks(path: Path, start: int, end: int, block_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """Bytes ``[start, end)`` of a text file as blocks of text, decoded as :func:`text_blocks` does."""
    with io.TextIOWrapper(io.BufferedReader(_Range(path, start, end)), encoding="utf-8", errors="replace") as f:
        while block := f.read(block_chars):
            yield block


def segment_documents(segments: Iterable[tuple[str, int, int]], block_chars: int = BLOCK_CHARS
                      ) -> Iterator[tuple]:
    """(document, bytes, does it end there) for byte ranges of files (:func:`plan_shards`).

    A whole text file reads as :func:`file_documents` reads it; a text file cut into ranges is one
    document whose end-of-text follows only its last range; a ``.jsonl`` range holds whole lines.
    """
    for name, start, end in segments:
        path = name if is_url(name) else Path(name)
        size = file_size(path)
        if suffix(path) == ".jsonl":
            with _Range(path, start, end) as raw, io.BufferedReader(raw) as f:
                for line_no, line in enumerate(f, 1):
                    yield from _jsonl_text(path if start == 0 else f"{path} (from byte {start})", line_no, line)
        elif start == 0 and end == size:
            yield text_blocks(path, block_chars), size
        else:
            yield range_blocks(path, start, end, block_chars), end - start, end == size


# -- documents cut into pieces, the unit of the train/val split -------------------------------------
def _cut(blocks: Iterable[str | bytes], piece_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """A document given as blocks of text (or of valid UTF-8) -> (UTF-8 piece, is it the
    document's last) pairs.

    Each piece but the last holds more than zero and at most ``piece_bytes`` bytes, ending after
    its last newline when it holds one, else at a character boundary. The last piece is the rest
    (empty only for an empty document). At most ``piece_bytes`` plus one block is held at a time.
    """
    buf = b""
    for block in blocks:
        data = block.encode("utf-8", "surrogatepass") if isinstance(block, str) else block
        buf = buf + data if buf else data
        pos = 0
        while len(buf) - pos > piece_bytes:
            limit = pos + piece_bytes
            end = buf.rfind(b"\n", pos, limit) + 1
            if end == 0:  # no newline: back off continuation bytes (10xxxxxx) to a character start
                end = limit
                while (buf[end] & 0xC0) == 0x80:
                    end -= 1
            yield buf[pos:end], False
            pos = end
        buf = buf[pos:]
    yield buf, True


def _pieces(documents: Iterable[tuple], piece_bytes: int) -> Iterator[tuple[str, int, bool]]:
    """(piece text, bytes, is it its document's last piece) for every piece of ``documents``:
    ``(text, bytes)`` pairs, or ``(text, bytes, ends)`` where ``ends`` False says the document goes
    on in the next part (a file cut into shards), so its last piece here takes no end-of-text.

    A piece's bytes are its UTF-8 length, but the last piece of a document is counted as what is
    left of the document's given size (so the sizes add up to the input's, for the progress bar).
    """
    quick = piece_bytes // 4  # a str of at most this many characters fits in one piece
    for doc, nbytes, *more in documents:
        ends = more[0] if more else True
        if isinstance(doc, str):
            if len(doc) <= quick:
                yield doc, nbytes, ends
                continue
            data = doc.encode("utf-8", "surrogatepass")  # JSON may hold lone surrogates
            if len(data) <= piece_bytes:
                yield doc, nbytes, ends
                continue
            doc = (data,)
        counted = 0
        for piece, last in _cut(doc, piece_bytes):
            size = max(nbytes - counted, 0) if last else len(piece)
            counted += size
            yield piece.decode("utf-8", "surrogatepass"), size, last and ends


def _batches(pieces: Iterable[tuple[str, int, bool]], batch_bytes: int
             ) -> Iterator[tuple[list[str], list[bool], int]]:
    batch, ends, size = [], [], 0
    for text, nbytes, last in pieces:
        batch.append(text)
        ends.append(last)
        size += nbytes
        if size >= batch_bytes:
            yield batch, ends, size
            batch, ends, size = [], [], 0
    if batch:
        yield batch, ends, size
