"""Token files and their ``meta.json``: opened with clear errors, and checked against each other
(sizes against token counts and dtype, the largest id on a bounded sample) so a stale or foreign
``meta.json`` is named instead of trusted."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from gigagpt.errors import ConfigError


class DataConfigError(ConfigError):
    """A data setting is wrong; the message names the setting and the fix."""


# -- token files ------------------------------------------------------------------------------------
def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataConfigError(f"{path} is not valid JSON ({err}); re-run `gigagpt prepare`") from None
    if not isinstance(meta, dict):
        raise DataConfigError(f"{path} does not hold a JSON object; re-run `gigagpt prepare`")
    return meta


def open_tokens(path: str | os.PathLike, dtype: str = "uint16") -> np.memmap:
    """Memory-map a token file, with clear errors for missing, empty or truncated files."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(
            f"token file {str(path)!r} does not exist; make it with `gigagpt prepare --output "
            f"{path.parent}` (or point data.path at a folder holding train.bin and val.bin)"
        )
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise DataConfigError(f"token file {str(path)!r} is empty; re-run `gigagpt prepare`")
    if size % itemsize:
        raise DataConfigError(
            f"token file {str(path)!r} has {size} bytes, not a multiple of {itemsize} ({dtype}): "
            "it is truncated or not a token file; re-run `gigagpt prepare`"
        )
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    return int(max(tokens[i : i + chunk].max() for i in range(0, len(tokens), chunk)))


# -- writing ---------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenFile:
    """Appends token arrays to ``path`` (inside a temporary folder, put in place whole when complete)."""

    def __init__(self, path: Path, dtype: str):
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.file = open(path, "wb")
        self.count, self.max_id = 0, -1

    def write(self, pieces: list[list[int]], ends: list[bool], eot: int) -> None:
        """Appends ``pieces``, each followed by ``eot`` where ``ends`` says it ends a document."""
        if not pieces:
            return
        total = sum(map(len, pieces)) + sum(ends)
        if total == 0:
            return
        arr = np.fromiter(
            itertools.chain.from_iterable(
                itertools.chain(p, (eot,)) if e else p for p, e in zip(pieces, ends)
            ),
            self.dtype,
            total,
        )
        arr.tofile(self.file)
        self.count += total
        self.max_id = max(self.max_id, int(arr.max()))

    def close(self) -> None:
        self.file.close()


# -- meta.json checked against the files -------------------------------------------------------------
TOKEN_DTYPES = ("uint16", "uint32")
SAMPLE_TOKENS = 1 << 20  # tokens read at each end of a file to check meta.json's largest id


def meta_dtype(meta: dict, folder: Path) -> str:
    dtype = meta.get("dtype", "uint16")
    if dtype not in TOKEN_DTYPES:
        raise DataConfigError(f"{folder / 'meta.json'} says dtype {dtype!r}, not a token dtype "
                              f"({' or '.join(TOKEN_DTYPES)}); re-run `gigagpt prepare --output {folder}`")
    return dtype


def check_size(path: Path, meta: dict, split: str) -> None:
    """The file's size against meta.json's token count and dtype (a stale or foreign meta.json)."""
    count, dtype = meta.get(f"{split}_tokens"), meta.get("dtype", "uint16")
    if not isinstance(count, int) or not path.is_file():
        return  # no count recorded; a missing file is open_tokens' to name
    size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
    if size == count * itemsize:
        return
    fits = [d for d in TOKEN_DTYPES if size == count * np.dtype(d).itemsize]
    hint = f" (the size fits {fits[0]}: meta.json's dtype is wrong)" if fits else ""
    raise DataConfigError(
        f"{path.parent / 'meta.json'} does not match {path.name}: it says {split}_tokens={count} of "
        f"{dtype} ({count * itemsize} bytes) but the file has {size} bytes{hint}; the files come from "
        f"different runs of prepare: re-run `gigagpt prepare --output {path.parent} --force ...`"
    )


def checked_max_id(path: Path, tokens: np.ndarray, meta: dict, split: str) -> int:
    """The largest token id: meta.json's, checked against the first and last ``SAMPLE_TOKENS`` of
    the file (a full scan only for files made without it)."""
    recorded = meta.get(f"{split}_max_token_id")
    if not isinstance(recorded, int):
        return max_token_id(tokens)
    seen = max(int(tokens[:SAMPLE_TOKENS].max()), int(tokens[-SAMPLE_TOKENS:].max()))
    if seen > recorded:
        raise DataConfigError(
            f"{path} holds token id {seen}, above the largest meta.json records "
            f"({split}_max_token_id={recorded}): meta.json is stale or edited; re-run "
            f"`gigagpt prepare --output {path.parent} --force ...`"
        )
    return recorded
