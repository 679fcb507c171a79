"""gigagpt: GPT training from a laptop CPU to a Cerebras wafer-scale cluster, on Lightning.

Names are imported on first use, so light commands (``gigagpt prepare``) do not load torch and
Lightning. The core (this package's modules other than the command line) never imports the
Cerebras bridge or the callbacks: ``import gigagpt.accelerators`` registers
``Trainer(accelerator="cerebras")`` and the Cerebras strategies with Lightning (the command line does
it for you); cerebras-pytorch itself loads only when a Cerebras run starts.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "gigagpt.model",
    "GPTConfig": "gigagpt.model",
    "GPTDataModule": "gigagpt.data",
    "GPTModule": "gigagpt.module",
    "OptimConfig": "gigagpt.optim",
    "get_lr": "gigagpt.optim",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gigagpt' has no attribute {name!r}")
