"""Reading a token store: shards listed by ``manifest.json``, locally or in object storage, as one
token stream.

A store is a folder (or an fsspec URL: ``s3://``, ``gs://``, ``memory://`` ...) holding
``manifest.json`` and the shards it names (``train-00000.bin``, ``val-00000.bin`` ...: the same
little-endian token files as ``train.bin``). The single-file layout (``train.bin``, ``val.bin``,
``meta.json``) reads as a one-shard store. A split's shards, in manifest order, are one stream of
tokens, so window ``i`` is the same tokens whether the data is one file or many shards.

Local shards are memory-mapped where they lie. Remote shards are fetched on first use into a local
cache bounded in bytes (least recently used shards are removed first) and checked against the
manifest's SHA-256; each process maps only the shards its windows touch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from gigagpt.token_files import DataConfigError, open_tokens

MANIFEST = "manifest.json"
STORE_FORMAT = "gigagpt-token-store"
DEFAULT_CACHE_GB = 100.0  # room for the remote shards a run has touched; least recently used go first
COPY_BYTES = 1 << 22


def is_remote(location: str) -> bool:
    return "://" in str(location)


def join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


def read_manifest(root: str) -> dict:
    """The store's manifest, checked for the fields readers rely on."""
    where = join(root, MANIFEST)
    try:
        if is_remote(root):
            import fsspec

            with fsspec.open(where, "rb") as f:
                manifest = json.loads(f.read())
        else:
            manifest = json.loads(Path(where).read_text())
    except FileNotFoundError:
        raise DataConfigError(f"{where} does not exist; make the store with `gigagpt prepare --shard-mb ...`, "
                              "or point data.path at a folder made by gigagpt prepare") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataConfigError(f"{where} is not valid JSON ({err}); prepare the store again") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if manifest.get("format") != STORE_FORMAT or not isinstance(shards, dict) or "train" not in shards:
        raise DataConfigError(f"{where} is not a gigagpt token store manifest; prepare the store again")
    return manifest


def split_shards(root: str, manifest: dict, split: str) -> list[list]:
    """``[[location, tokens], ...]`` of a split's non-empty shards, in stream order (plain, picklable)."""
    return [[join(root, s["file"]), int(s["tokens"])] for s in manifest["shards"].get(split, []) if s["tokens"]]


def shard_hashes(root: str, manifest: dict) -> dict[str, str]:
    return {join(root, s["file"]): s["sha256"] for split in manifest["shards"].values() for s in split}


# -- the bounded cache of remote shards --------------------------------------------------------------
class ShardCache:
    """Remote shards copied into ``folder``, at most ``max_bytes`` of them (least recently used out).

    Processes may share the folder: a shard is downloaded to a private temporary name and renamed
    into place, so a reader never sees part of one. A shard being read stays readable after it is
    removed from the folder (its mapping holds it), so eviction never breaks a running reader.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int, hashes: dict[str, str] | None = None):
        self.folder, self.max_bytes, self.hashes = Path(folder), int(max_bytes), hashes or {}

    def local_path(self, url: str) -> Path:
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.folder / f"{key}-{url.rstrip('/').rsplit('/', 1)[-1]}"

    def fetch(self, url: str) -> Path:
        path = self.local_path(url)
        if path.is_file():
            os.utime(path)  # most recently used
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
        import fsspec

        digest = hashlib.sha256()
        try:
            with fsspec.open(url, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(COPY_BYTES):
                    digest.update(block)
                    dst.write(block)
            expected = self.hashes.get(url)
            if expected is not None and digest.hexdigest() != expected:
                raise DataConfigError(f"shard {url} does not match the SHA-256 its manifest records: the store "
                                      "was changed after it was made; prepare or upload it again")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(keep=path)
        return path

    def _entries(self) -> list[tuple[int, int, Path]]:
        """(last use, bytes, path) of the cached shards; other processes may remove some meanwhile."""
        entries = []
        for p in self.folder.iterdir() if self.folder.is_dir() else ():
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, p))
        return sorted(entries)

    def evict(self, keep: Path) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if total <= self.max_bytes:
                return
            if p != keep:
                total -= size
                p.unlink(missing_ok=True)

    def cached_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())


def default_cache_dir(root: str) -> str:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gigagpt" / "shards"
    return str(base / hashlib.sha256(str(root).encode()).hexdigest()[:16])


# -- one token stream over shards --------------------------------------------------------------------
class TokenStream:
    """The tokens of ``shards`` (a path, or ``[[location, tokens], ...]``) as one array-like stream.

    Picklable and cheap to ship: shards are opened lazily, in each process, when a read touches them.
    ``cache`` (``{"dir", "max_bytes", "hashes"}``) is used for remote locations.
    """

    def __init__(self, shards: str | list, dtype: str = "uint16", cache: dict | None = None):
        if isinstance(shards, (str, os.PathLike)):
            shards = [[str(shards), len(open_tokens(shards, dtype))]]
        if not shards:
            raise DataConfigError("the token store lists no tokens for this split; prepare it again")
        self.locations = [str(loc) for loc, _ in shards]
        self.starts = np.concatenate([[0], np.cumsum([int(n) for _, n in shards])]).astype(np.int64)
        self.dtype, self.cache = dtype, cache
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_open": OrderedDict()}

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (crossing shards where the range does)."""
        parts, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            end = min(stop, int(self.starts[i + 1]))
            parts.append(self._shard(i)[pos - self.starts[i] : end - self.starts[i]])
            pos = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _shard(self, i: int) -> np.ndarray:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        location = self.locations[i]
        if is_remote(location):
            settings = self.cache or {"dir": default_cache_dir(location.rsplit("/", 1)[0]),
                                      "max_bytes": int(DEFAULT_CACHE_GB * 1e9)}
            cache = ShardCache(settings["dir"], settings["max_bytes"], settings.get("hashes"))
            tokens = open_tokens(cache.fetch(location), self.dtype)
            # bound what stays mapped as the cache bounds what stays on disk
            while len(self._open) > 1 and sum(a.nbytes for a in self._open.values()) + tokens.nbytes > cache.max_bytes:
                self._open.popitem(last=False)
        else:
            tokens = open_tokens(location, self.dtype)
        expected = int(self.starts[i + 1] - self.starts[i])
        if len(tokens) != expected:
            raise DataConfigError(f"shard {location} holds {len(tokens)} tokens but the manifest says {expected}: "
                                  "the store was changed after it was made; prepare it again")
        self._open[i] = tokens
        return tokens
