"""Tokenizers: GPT-2 BPE through tiktoken (online or from a local file) and plain bytes.

``get_tokenizer(spec)`` accepts:

- ``"gpt2"``: tiktoken's GPT-2 encoding. tiktoken downloads its files at first use and caches
  them (``TIKTOKEN_CACHE_DIR``); with ``GIGAGPT_GPT2_TIKTOKEN`` set to a local ``.tiktoken`` file,
  that file is used instead and nothing is downloaded.
- a path to a ``.tiktoken`` file holding the GPT-2 ranks: the same encoding, fully offline.
- ``"bytes"``: UTF-8 bytes, vocabulary 256, needs nothing.
"""

from __future__ import annotations

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
