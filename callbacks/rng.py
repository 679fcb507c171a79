"""Random numbers of a training step as a pure function of (seed, step): exact resume with dropout.

Lightning checkpoints do not hold the RNG state, and even a saved state would not make a resumed run
exact: between the save and the next step an uninterrupted run also draws from the global generator
(every DataLoader iterator takes a base seed from it when validation starts, for example), so the
two runs reach step ``k+1`` with different streams. :class:`StepSeed` instead reseeds the global
generators before every training micro-batch from ``(seed, global_step, micro-batch, rank)`` — the
same idea that makes batch ``k`` a pure function of ``(seed, k)`` in :mod:`gigagpt.data`. Dropout
masks then depend only on the step, whatever ran before it.
"""

from __future__ import annotations

import os
import random

import lightning as L
import numpy as np
import torch


def step_seed(seed: int, step: int, micro_batch: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for one micro-batch of one step on one rank, well mixed (numpy SeedSequence)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step, micro_batch, rank]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class StepSeed(L.Callback):
    """Reseed torch (CPU and every CUDA device), ``random`` and numpy before each training micro-batch.

    Args:
        seed: the base seed; default: the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0.
            It is saved in checkpoints, so a resumed run keeps the original seed even when the
            resuming command chose another.
    """

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed

    @property
    def state_key(self) -> str:
        return "StepSeed"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        micro = batch_idx % max(trainer.accumulate_grad_batches, 1)
        seed = step_seed(self.seed, trainer.global_step, micro, trainer.global_rank)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = int(state_dict["seed"])
