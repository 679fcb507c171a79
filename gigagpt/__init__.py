"""gigagpt: GPT training from a laptop CPU to a Cerebras wafer-scale cluster, on Lightning."""

from gigagpt.data import GPTDataModule
from gigagpt.model import GPT, GPTConfig
from gigagpt.module import GPTModule
from gigagpt.optim import OptimConfig, get_lr

__all__ = ["GPT", "GPTConfig", "GPTDataModule", "GPTModule", "OptimConfig", "get_lr"]
__version__ = "0.1.0"

# Registers Trainer(accelerator="cerebras") with Lightning; cstorch itself loads only when used.
import accelerators  # noqa: E402,F401
