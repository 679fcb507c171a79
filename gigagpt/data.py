"""Token files, step-indexed sampling and the LightningDataModule.

A token file is a flat little-endian array of token ids (uint16, or uint32 for vocabularies over
65536) made by ``gigagpt prepare``; ``meta.json`` beside it names the tokenizer and dtype. Window
``i`` is tokens ``[i*T, (i+1)*T + 1)``: inputs are its first ``T`` tokens, labels its last ``T``.

Batch ``k`` of a run is a pure function of ``(seed, k)``: the global batch ``k`` holds positions
``k*G .. (k+1)*G - 1`` of a seeded, per-epoch permutation of the windows, where ``G`` is the global
batch size; rank ``r`` takes its slice of it. A run resumed at step ``k`` therefore sees exactly the
batches an uninterrupted run would have, and the same global batch does not depend on the number
of ranks.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gigagpt.sampling import StepSampler, window_order  # noqa: F401  (part of the data interface)
from gigagpt.store import (
    DEFAULT_CACHE_GB,
    MANIFEST,
    TokenStream,
    default_cache_dir,
    is_remote,
    read_manifest,
    shard_hashes,
    split_shards,
)
from gigagpt.token_files import (  # noqa: F401  (part of the data interface)
    DataConfigError,
    check_size,
    checked_max_id,
    max_token_id,
    meta_dtype,
    open_tokens,
    read_meta,
)

MAX_SEED = 2**32 - 1  # numpy's seeds (window_order)
PLACEHOLDER_MARKERS = ("/path/to", "<path", "path/to/", "changeme", "YOUR_")


class WindowDataset(Dataset):
    """Non-overlapping windows of ``sequence_length + 1`` tokens from one token stream: a token
    file's path, or a store split's shards ``[[location, tokens], ...]`` (:mod:`gigagpt.store`)."""

    def __init__(self, path: str | os.PathLike | list, sequence_length: int, dtype: str = "uint16",
                 cache: dict | None = None):
        self.path, self.sequence_length, self.dtype = path, sequence_length, dtype
        # shards are opened lazily: each worker process maps (or fetches) only those its windows touch
        self.tokens = TokenStream(path, dtype, cache)
        self.num_tokens = len(self.tokens)

    def __len__(self) -> int:
        return max((self.num_tokens - 1) // self.sequence_length, 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.sequence_length
        window = torch.from_numpy(self.tokens.read(i * t, (i + 1) * t + 1).astype(np.int64))
        return window[:-1], window[1:]


def build_train_loader(
    path: str,
    sequence_length: int,
    batch_size: int,
    seed: int,
    dtype: str = "uint16",
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_steps: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    cache: dict | None = None,
) -> DataLoader:
    """The training loader from plain, picklable arguments.

    Module-level on purpose: the Cerebras bridge ships this function and its arguments to remote
    input workers, which rebuild the loader there.
    """
    dataset = WindowDataset(path, sequence_length, dtype, cache)
    sampler = StepSampler(len(dataset), batch_size, seed, start_step, rank, world_size, num_steps)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def build_eval_loader(
    path: str,
    sequence_length: int,
    batch_size: int,
    dtype: str = "uint16",
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    cache: dict | None = None,
) -> DataLoader:
    """Validation/test loader: the first windows in order, split round-robin across ranks.

    Whole global batches only, so every rank runs the same number of full batches.
    """
    dataset = WindowDataset(path, sequence_length, dtype, cache)
    n = len(dataset) // (batch_size * world_size) * batch_size * world_size
    if max_batches is not None:
        n = min(n, max_batches * batch_size * world_size)
    indices = list(range(n))[rank::world_size]
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory)


# -- the DataModule ----------------------------------------------------------------------------------
@dataclass
class ResolvedData:
    """Where each split's tokens are: a token file's path, or a store's shards ``[[location, tokens], ...]``."""

    train: str | list
    val: str | list
    dtype: str
    meta: dict
    cache: dict | None = None  # for remote shards: {"dir", "max_bytes", "hashes"}


class GPTDataModule(L.LightningDataModule):
    """Token windows from a folder made by ``gigagpt prepare``: ``train.bin`` and ``val.bin``, or a
    sharded store (``manifest.json`` and its shards; a folder or an ``s3://``, ``gs://`` ... URL).

    Args:
        path: the folder (or store URL) made by ``gigagpt prepare``.
        sequence_length: tokens per training window (must not exceed the model's context).
        batch_size: sequences per step on each device.
        seed: seeds the window order; batch ``k`` depends only on ``(seed, k)``.
        num_workers: loader worker processes per device.
        val_batches: validation batches per evaluation (``None``: the whole validation split).
        cache_dir: where shards of a remote store are kept (default: ``~/.cache/gigagpt/shards/<store>``).
        cache_gb: the most those shards may take, in GB; the least recently used go first.
    """

    def __init__(
        self,
        path: str = "data/builtin",
        sequence_length: int = 256,
        batch_size: int = 16,
        seed: int = 1337,
        num_workers: int = 0,
        val_batches: int | None = 20,
        cache_dir: str | None = None,
        cache_gb: float = DEFAULT_CACHE_GB,
    ):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise DataConfigError(f"data.seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
        if not isinstance(cache_gb, (int, float)) or not cache_gb > 0:
            raise DataConfigError(f"data.cache_gb must be a positive number of GB, got {cache_gb!r}")
        self.path = path
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.val_batches = val_batches
        self.cache_dir, self.cache_gb = cache_dir, cache_gb
        self.save_hyperparameters()
        self.files: ResolvedData | None = None

    # -- validation of settings ------------------------------------------------------------------
    def resolve(self, vocab_size: int | None = None, max_positions: int | None = None,
                world_size: int = 1, check_val: bool = True) -> ResolvedData:
        """Check every setting against the files and the model; raise DataConfigError if wrong.

        ``check_val=False`` (training without validation) leaves the validation split unchecked.
        """
        path = self._check_path()
        self._check_numbers(max_positions)
        if is_remote(path) or (Path(path) / MANIFEST).is_file():
            return self._resolve_store(path, vocab_size, world_size, check_val)
        folder = Path(path)
        meta = read_meta(folder)
        dtype = meta_dtype(meta, folder)
        files = ResolvedData(str(folder / "train.bin"), str(folder / "val.bin"), dtype, meta)
        for split in ("train", "val") if check_val else ("train",):
            self._check_val_not_empty(split, meta)
            check_size(Path(getattr(files, split)), meta, split)
            tokens = open_tokens(getattr(files, split), dtype)
            self._check_windows(len(tokens), f"{split}.bin", split, world_size)
            if vocab_size is not None:
                largest = checked_max_id(Path(getattr(files, split)), tokens, meta, split)
                self._check_vocab(largest, f"{split}.bin", meta, vocab_size)
        return files

    def _check_path(self) -> str:
        path = str(self.path)
        if any(marker.lower() in path.lower() for marker in PLACEHOLDER_MARKERS):
            raise DataConfigError(
                f"data.path is still the placeholder {path!r}; set it to a folder made by "
                "`gigagpt prepare` (e.g. --data.path data/builtin after `gigagpt prepare --builtin`)"
            )
        if is_remote(path):
            return path
        folder = Path(path)
        if folder.is_file():
            raise DataConfigError(
                f"data.path {path!r} is a file, not a folder: point data.path at the folder holding "
                f"train.bin, val.bin and meta.json (e.g. --data.path {folder.parent})"
            )
        if not folder.is_dir():
            raise DataConfigError(
                f"data.path {path!r} does not exist; run `gigagpt prepare --output {path} ...` "
                "first, or point data.path at such a folder"
            )
        return path

    def _check_numbers(self, max_positions: int | None) -> None:
        for name in ("sequence_length", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise DataConfigError(f"data.{name} must be a positive integer, got {value!r}")
        if max_positions is not None and self.sequence_length > max_positions:
            raise DataConfigError(
                f"data.sequence_length={self.sequence_length} exceeds the model's "
                f"max_position_embeddings={max_positions}; lower data.sequence_length or raise "
                "model.config.max_position_embeddings"
            )

    def _resolve_store(self, root: str, vocab_size: int | None, world_size: int, check_val: bool) -> ResolvedData:
        """A sharded store: checked on its manifest, and local shards on their sizes (no shard is read)."""
        manifest = read_manifest(root)
        dtype = meta_dtype(manifest, Path(root))
        cache = None
        if is_remote(root):
            cache = {"dir": self.cache_dir or default_cache_dir(root), "max_bytes": int(self.cache_gb * 1e9),
                     "hashes": shard_hashes(root, manifest)}
        files = ResolvedData(split_shards(root, manifest, "train"), split_shards(root, manifest, "val"),
                             dtype, manifest, cache)
        for split in ("train", "val") if check_val else ("train",):
            self._check_val_not_empty(split, manifest, "the validation split of")
            shards, label = getattr(files, split), f"the {split} split of {root}"
            if not is_remote(root):
                for location, count in shards:
                    check_size(Path(location), {"train_tokens": count, "dtype": dtype}, "train")
            self._check_windows(sum(n for _, n in shards), label, split, world_size)
            if vocab_size is not None:
                self._check_vocab(int(manifest.get(f"{split}_max_token_id", -1)), label, manifest, vocab_size)
        return files

    def _check_val_not_empty(self, split: str, meta: dict, where: str = "val.bin in") -> None:
        if split == "val" and meta.get("val_tokens") == 0:
            raise DataConfigError(
                f"{where} {str(self.path)!r} is empty: it was prepared with --val-fraction "
                f"{meta.get('val_fraction', 0)}; train without validation "
                "(--trainer.limit_val_batches 0) or prepare again with --val-fraction > 0"
            )

    @staticmethod
    def _check_vocab(largest: int, label: str, meta: dict, vocab_size: int) -> None:
        if largest >= vocab_size:
            raise DataConfigError(
                f"{label} contains token id {largest} but the model's vocab_size is "
                f"{vocab_size}; set model.config.vocab_size >= {largest + 1} (tokenizer "
                f"{meta.get('tokenizer', 'unknown')!r} has {meta.get('vocab_size', '?')}) "
                "or prepare the data with the model's tokenizer"
            )

    def _check_windows(self, num_tokens: int, label: str, split: str, world_size: int) -> None:
        windows = (num_tokens - 1) // self.sequence_length
        if windows < self.batch_size * world_size:
            batch = (f"data.batch_size={self.batch_size}" if world_size == 1 else
                     f"data.batch_size={self.batch_size} on each of {world_size} devices")
            more = ("prepare more text or a larger --val-fraction (the share of text in the validation split)"
                    if split == "val" else "prepare more text")
            raise DataConfigError(
                f"{label} holds {num_tokens} tokens = {windows} windows of "
                f"data.sequence_length={self.sequence_length}, fewer than one batch "
                f"({batch}); lower data.batch_size or data.sequence_length, or {more}"
            )

    def prepare_data(self) -> None:
        # Lightning calls this before the loggers make their folders: refused data leaves none behind.
        self.setup(self.trainer.state.fn.value if self.trainer is not None and self.trainer.state.fn else None)

    def setup(self, stage: str | None = None) -> None:
        model_config = None
        if self.trainer is not None and self.trainer.lightning_module is not None:
            model_config = getattr(self.trainer.lightning_module, "config", None)
        self.files = self.resolve(
            getattr(model_config, "vocab_size", None),
            getattr(model_config, "max_position_embeddings", None),
            world_size=self._rank_world()[1],
            # fit without validation needs no val.bin (e.g. data prepared with --val-fraction 0)
            check_val=not (stage == "fit" and self.trainer is not None and self.trainer.limit_val_batches == 0),
        )

    # -- loaders -----------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _start_step(self) -> int:
        """Batches already consumed by the restored run (0 for a fresh one)."""
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def train_loader_args(self) -> dict:
        """Plain arguments for :func:`build_train_loader` (what the Cerebras bridge ships)."""
        rank, world = self._rank_world()
        return dict(
            path=self.files.train,
            sequence_length=self.sequence_length,
            batch_size=self.batch_size,
            seed=self.seed,
            dtype=self.files.dtype,
            start_step=self._start_step(),
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            cache=self.files.cache,
        )

    def train_dataloader(self) -> DataLoader:
        if self.files is None:
            self.setup("fit")
        # Lightning warns that a mid-epoch resume is unreliable unless the loader saves its state;
        # this one needs none: it starts at batch global_step (batch k is a function of seed and k).
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        return build_train_loader(**self.train_loader_args())

    def _eval_loader(self, path: str | list) -> DataLoader:
        rank, world = self._rank_world()
        return build_eval_loader(
            path, self.sequence_length, self.batch_size, self.files.dtype, self.val_batches,
            rank, world, self.num_workers, torch.cuda.is_available(), self.files.cache,
        )

    def val_dataloader(self) -> DataLoader:
        if self.files is None:
            self.setup("validate")
        return self._eval_loader(self.files.val)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
