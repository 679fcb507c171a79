"""Step-indexed sampling: batch ``k`` of a run is a pure function of ``(seed, k)``.

The global batch ``k`` holds positions ``k*G .. (k+1)*G - 1`` of a seeded, per-epoch permutation of
the windows (``G``: the global batch size); rank ``r`` takes its slice of it.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from gigagpt.token_files import DataConfigError


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
