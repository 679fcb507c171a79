"""gigagpt: GPT training from a laptop CPU to a Cerebras wafer-scale cluster, on Lightning.

Names are imported on first use, so light commands (``gigagpt prepare``) do not load torch and
Lightning. Importing the LightningModule (``from gigagpt import GPTModule``, ``gigagpt.module``) or
the CLI also registers ``Trainer(accelerator="cerebras")`` with Lightning, as ``import accelerators``
does; cerebras-pytorch itself loads only when a Cerebras run starts.
"""

from __future__ import annotations

import importlib
import sys

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
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        if name != "GPTModule":  # make sure the accelerator is registered whenever Lightning is in use
            importlib.import_module("gigagpt.module")
        return value
    raise AttributeError(f"module 'gigagpt' has no attribute {name!r}")


if "lightning" in sys.modules:  # Lightning already loaded: registering costs nothing
    importlib.import_module("gigagpt.module")
