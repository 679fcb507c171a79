"""The model summary at the start of ``fit``: one line with the parameters and the FLOPs per token.

Lightning's table counts FLOPs by running the model on an example input, which a GPTModule does not
declare, so it shows ``Total FLOPs: 0`` and lists the ``val_loss`` metric as a layer. The FLOPs here
are the ones MFU is computed from (:meth:`gigagpt.model.GPTConfig.flops_per_token`).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from gigagpt.model import GPTConfig


class GPTSummary(ModelSummary):
    """``gigagpt: model: 858 K parameters (3.4 MB), 5.3 M training FLOPs per token at sequence length 256``."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        config = getattr(pl_module, "config", None)
        if not isinstance(config, GPTConfig):
            super().on_fit_start(trainer, pl_module)
            return
        params = sum(p.numel() for p in pl_module.parameters())
        size = sum(p.numel() * p.element_size() for p in pl_module.parameters()) / 1e6
        line = f"gigagpt: model: {get_human_readable_count(params)} parameters ({size:.1f} MB)"
        sequence_length = getattr(trainer.datamodule, "sequence_length", None)
        if isinstance(sequence_length, int) and sequence_length > 0:
            flops = config.flops_per_token(sequence_length)
            line += f", {get_human_readable_count(int(flops))} training FLOPs per token at sequence length " \
                    f"{sequence_length}"
        rank_zero_info(line)
