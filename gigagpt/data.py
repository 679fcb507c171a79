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
from torch.utils.data import DataLoader, Dataset, Sampler

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
    """Non-overlapping windows of ``sequence_length + 1`` tokens from one token file."""

    def __init__(self, path: str | os.PathLike, sequence_length: int, dtype: str = "uint16"):
        self.path, self.sequence_length, self.dtype = str(path), sequence_length, dtype
        self._tokens = None  # opened lazily: each worker process maps the file itself
        self.num_tokens = len(open_tokens(path, dtype))

    def __len__(self) -> int:
        return max((self.num_tokens - 1) // self.sequence_length, 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = open_tokens(self.path, self.dtype)
        t = self.sequence_length
        window = torch.from_numpy(self._tokens[i * t : (i + 1) * t + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


def window_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    """The seeded permutation of windows for one pass over the data."""
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


class StepSampler(Sampler[list[int]]):
    """Yields the batches of one rank for steps ``start_step, start_step+1, ...``.

    ``batch k`` is a pure function of ``(seed, k)``; ``num_steps=None`` yields forever (training
    length is the Trainer's ``max_steps``).
    """

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_steps: int | None = None,
    ):
        global_batch = batch_size * world_size
        if num_windows < global_batch:
            raise DataConfigError(
                f"the training file holds {num_windows} windows, fewer than one global batch of "
                f"{global_batch} (data.batch_size={batch_size} x {world_size} ranks); lower "
                "data.batch_size or data.sequence_length, or prepare more text"
            )
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.start_step, self.rank, self.world_size, self.num_steps = start_step, rank, world_size, num_steps
        self._epoch, self._order = None, None

    def batch_indices(self, step: int) -> list[int]:
        global_batch = self.batch_size * self.world_size
        first = step * global_batch + self.rank * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, offset = divmod(pos, self.num_windows)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, window_order(self.seed, epoch, self.num_windows)
            out.append(int(self._order[offset]))
        return out

    def __iter__(self):
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch_indices(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StepSampler has no length")
        return self.num_steps


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
) -> DataLoader:
    """The training loader from plain, picklable arguments.

    Module-level on purpose: the Cerebras bridge ships this function and its arguments to remote
    input workers, which rebuild the loader there.
    """
    dataset = WindowDataset(path, sequence_length, dtype)
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
) -> DataLoader:
    """Validation/test loader: the first windows in order, split round-robin across ranks.

    Whole global batches only, so every rank runs the same number of full batches.
    """
    dataset = WindowDataset(path, sequence_length, dtype)
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
    train: str
    val: str
    dtype: str
    meta: dict


class GPTDataModule(L.LightningDataModule):
    """Token windows from a folder made by ``gigagpt prepare`` (``train.bin``, ``val.bin``).

    Args:
        path: the folder holding ``train.bin``, ``val.bin`` and ``meta.json``.
        sequence_length: tokens per training window (must not exceed the model's context).
        batch_size: sequences per step on each device.
        seed: seeds the window order; batch ``k`` depends only on ``(seed, k)``.
        num_workers: loader worker processes per device.
        val_batches: validation batches per evaluation (``None``: the whole ``val.bin``).
    """

    def __init__(
        self,
        path: str = "data/builtin",
        sequence_length: int = 256,
        batch_size: int = 16,
        seed: int = 1337,
        num_workers: int = 0,
        val_batches: int | None = 20,
    ):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise DataConfigError(f"data.seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
        self.path = path
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.val_batches = val_batches
        self.save_hyperparameters()
        self.files: ResolvedData | None = None

    # -- validation of settings ------------------------------------------------------------------
    def resolve(self, vocab_size: int | None = None, max_positions: int | None = None,
                world_size: int = 1, check_val: bool = True) -> ResolvedData:
        """Check every setting against the files and the model; raise DataConfigError if wrong.

        ``check_val=False`` (training without validation) leaves ``val.bin`` unchecked.
        """
        path = str(self.path)
        if any(marker.lower() in path.lower() for marker in PLACEHOLDER_MARKERS):
            raise DataConfigError(
                f"data.path is still the placeholder {path!r}; set it to a folder made by "
                "`gigagpt prepare` (e.g. --data.path data/builtin after `gigagpt prepare --builtin`)"
            )
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
        meta = read_meta(folder)
        dtype = meta_dtype(meta, folder)
        files = ResolvedData(str(folder / "train.bin"), str(folder / "val.bin"), dtype, meta)
        for split in ("train", "val") if check_val else ("train",):
            if split == "val" and meta.get("val_tokens") == 0:
                raise DataConfigError(
                    f"val.bin in {path!r} is empty: it was prepared with --val-fraction "
                    f"{meta.get('val_fraction', 0)}; train without validation "
                    "(--trainer.limit_val_batches 0) or prepare again with --val-fraction > 0"
                )
            check_size(Path(getattr(files, split)), meta, split)
            tokens = open_tokens(getattr(files, split), dtype)
            self._check_windows(tokens, split, world_size)
            if vocab_size is not None:
                largest = checked_max_id(Path(getattr(files, split)), tokens, meta, split)
                if largest >= vocab_size:
                    raise DataConfigError(
                        f"{split}.bin contains token id {largest} but the model's vocab_size is "
                        f"{vocab_size}; set model.config.vocab_size >= {largest + 1} (tokenizer "
                        f"{meta.get('tokenizer', 'unknown')!r} has {meta.get('vocab_size', '?')}) "
                        "or prepare the data with the model's tokenizer"
                    )
        return files

    def _check_windows(self, tokens: np.ndarray, split: str, world_size: int) -> None:
        windows = (len(tokens) - 1) // self.sequence_length
        if windows < self.batch_size * world_size:
            batch = (f"data.batch_size={self.batch_size}" if world_size == 1 else
                     f"data.batch_size={self.batch_size} on each of {world_size} devices")
            more = ("prepare more text or a larger --val-fraction (the share of text in val.bin)"
                    if split == "val" else "prepare more text")
            raise DataConfigError(
                f"{split}.bin holds {len(tokens)} tokens = {windows} windows of "
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
        )

    def train_dataloader(self) -> DataLoader:
        if self.files is None:
            self.setup("fit")
        # Lightning warns that a mid-epoch resume is unreliable unless the loader saves its state;
        # this one needs none: it starts at batch global_step (batch k is a function of seed and k).
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        return build_train_loader(**self.train_loader_args())

    def _eval_loader(self, path: str) -> DataLoader:
        rank, world = self._rank_world()
        return build_eval_loader(
            path, self.sequence_length, self.batch_size, self.files.dtype, self.val_batches,
            rank, world, self.num_workers, torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        if self.files is None:
            self.setup("validate")
        return self._eval_loader(self.files.val)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
