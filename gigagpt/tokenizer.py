"""Tokenizers: GPT-2 BPE through tiktoken (online or from a local file) and plain bytes.

``get_tokenizer(spec)`` accepts:

- ``"gpt2"``: tiktoken's GPT-2 encoding. tiktoken downloads its files at first use and caches
  them (``TIKTOKEN_CACHE_DIR``); with ``GIGAGPT_GPT2_TIKTOKEN`` set to a local ``.tiktoken`` file,
  that file is used instead and nothing is downloaded.
- a path to a ``.tiktoken`` file holding the GPT-2 ranks: the same encoding, fully offline.
- ``"bytes"``: UTF-8 bytes, vocabulary 256, needs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

EOT_TEXT = "<|endoftext|>"
GPT2_EOT = 50256
GPT2_VOCAB = 50257
# tiktoken's GPT-2 split pattern (equivalent to the original release's, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@dataclass(frozen=True)
class Tokenizer:
    """What the rest of gigagpt needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_token: int
    _encoding: object = None
    # The local ranks file the encoding came from, if any (recorded in meta.json by prepare).
    source_file: str | None = None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        if self._encoding is None:
            return [list(t.encode("utf-8")) for t in texts]
        return self._encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._encoding is None:
            return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")
        return self._encoding.decode(ids, errors="replace")


def bytes_tokenizer() -> Tokenizer:
    # Byte 0 (NUL) never occurs in text, so it serves as the end-of-text separator.
    return Tokenizer(name="bytes", vocab_size=256, eot_token=0)


def gpt2_from_file(path: str | os.PathLike) -> Tokenizer:
    """GPT-2 BPE from a local ``.tiktoken`` ranks file (e.g. ``whisper/assets/gpt2.tiktoken``)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(path)!r} does not exist; pass a GPT-2 '.tiktoken' ranks file "
            "(50256 ranks) or 'gpt2' to let tiktoken download it"
        )
    ranks = load_tiktoken_bpe(str(path))
    if len(ranks) != GPT2_EOT:
        raise ValueError(f"{path} holds {len(ranks)} ranks; GPT-2's file holds {GPT2_EOT}")
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB,
    )
    return Tokenizer(name="gpt2", vocab_size=GPT2_VOCAB, eot_token=GPT2_EOT, _encoding=encoding,
                     source_file=str(path.resolve()))


def gpt2() -> Tokenizer:
    local = os.environ.get("GIGAGPT_GPT2_TIKTOKEN")
    if local:
        return gpt2_from_file(local)
    import tiktoken

    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as err:  # network failures surface as many exception types
        raise RuntimeError(
            "could not load tiktoken's 'gpt2' encoding (it downloads its files on first use): "
            f"{err}. Offline, point GIGAGPT_GPT2_TIKTOKEN (or --tokenizer) at a local GPT-2 "
            "'.tiktoken' file, or set TIKTOKEN_CACHE_DIR to a folder with tiktoken's cached files"
        ) from None
    return Tokenizer(name="gpt2", vocab_size=GPT2_VOCAB, eot_token=GPT2_EOT, _encoding=encoding)


def get_tokenizer(spec: str = "gpt2") -> Tokenizer:
    if spec == "bytes":
        return bytes_tokenizer()
    if spec == "gpt2":
        return gpt2()
    if spec.endswith(".tiktoken") or Path(spec).is_file():
        return gpt2_from_file(spec)
    raise ValueError(
        f"unknown tokenizer {spec!r}; use 'gpt2', 'bytes' or a path to a GPT-2 '.tiktoken' file"
    )


# -- the tokenizer a checkpoint was trained with, found again wherever the run is now ------------------

_SHA256: dict[tuple[str, int, int], str] = {}
_SEARCH_DEPTH = 4  # run folder levels above a checkpoint searched for the data and the ranks file


def file_sha256(path: str | os.PathLike) -> str:
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def _ranks_sha256(ranks: dict[bytes, int]) -> str:
    """The sha256 the ranks would have as a ``.tiktoken`` file (tiktoken's own layout)."""
    digest = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        digest.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return digest.hexdigest()


def training_record(files) -> dict | None:
    """What a checkpoint stores of its tokenizer, from the data's resolved files (``meta`` and
    ``train``): the name, and for a ranks file its absolute path and sha256; ``None`` without data."""
    meta = getattr(files, "meta", None)
    if not isinstance(meta, dict) or not meta.get("tokenizer"):
        return None
    train = files.train  # a token file, or a store's shards [[location, tokens], ...]
    first = train[0][0] if isinstance(train, list) and train else train
    folder = Path(first).resolve().parent if isinstance(first, str) and "://" not in first else None
    record = {"name": str(meta["tokenizer"])}
    if folder is not None:
        record["data"] = str(folder)
    local = meta.get("tokenizer_file")
    if local and (folder is not None or Path(local).is_absolute()):
        path = Path(local) if Path(local).is_absolute() else folder / local
        record["file"] = str(path.resolve())
        if path.is_file():
            record["sha256"] = file_sha256(path)
    return record


def _candidates(record: dict, checkpoint: Path, data_path: str | None):
    """Where a moved or copied run's ranks file may be, most likely first."""
    stored = Path(record["file"]) if record.get("file") else None
    if stored is not None:
        yield stored
    ancestors = list(checkpoint.resolve().parents)[:_SEARCH_DEPTH]
    folders = [Path(record["data"])] if record.get("data") else []
    if data_path:
        folders += [a / data_path for a in ancestors] if not Path(data_path).is_absolute() else [Path(data_path)]
    for folder in folders:
        try:
            local = json.loads((folder / "meta.json").read_text()).get("tokenizer_file")
        except (OSError, ValueError, AttributeError):
            local = None
        if local:
            yield folder / local
        if stored is not None:
            yield folder / stored.name
    if stored is not None:  # the same place relative to a folder above the run (a moved project)
        for ancestor in ancestors:
            for depth in range(1, min(4, len(stored.parts))):
                yield ancestor.joinpath(*stored.parts[-depth:])
    if os.environ.get("GIGAGPT_GPT2_TIKTOKEN"):
        yield Path(os.environ["GIGAGPT_GPT2_TIKTOKEN"])


def find_training_tokenizer(record: dict, checkpoint: str | os.PathLike, data_path: str | None = None) -> Tokenizer:
    """The tokenizer of ``record`` (see :func:`training_record`): a ranks file with the recorded
    sha256 at the stored path, in the data folder beside the run, the same place under a folder
    above the run, ``GIGAGPT_GPT2_TIKTOKEN``, or tiktoken's cache (``TIKTOKEN_CACHE_DIR``); raises
    FileNotFoundError naming the file and how to pass it when none matches."""
    want = record.get("sha256")  # absent when the ranks file was already gone at training time
    if record.get("name") != "gpt2" or not (want or record.get("file")):
        return get_tokenizer(record.get("name") or "gpt2")
    seen = set()
    for candidate in _candidates(record, Path(checkpoint), data_path):
        key = str(candidate)
        if key in seen:
            continue
        seen.add(key)
        if candidate.is_file() and (want is None or file_sha256(candidate) == want):
            return gpt2_from_file(candidate)
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        import tiktoken

        try:
            encoding = tiktoken.get_encoding("gpt2")
        except Exception:  # not cached and offline
            encoding = None
        if encoding is not None and want is not None and _ranks_sha256(encoding._mergeable_ranks) == want:
            return Tokenizer(name="gpt2", vocab_size=GPT2_VOCAB, eot_token=GPT2_EOT, _encoding=encoding)
    name = Path(record.get("file") or "gpt2.tiktoken").name
    raise FileNotFoundError(
        f"the model was trained with the GPT-2 ranks file {name} (sha256 {(want or '?')[:12]}..., then at "
        f"{record.get('file')}), found neither there nor beside the run (nor via GIGAGPT_GPT2_TIKTOKEN, "
        f"TIKTOKEN_CACHE_DIR); pass it with --tokenizer PATH/{name} or set GIGAGPT_GPT2_TIKTOKEN"
    )
