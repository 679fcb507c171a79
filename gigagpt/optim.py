"""The optimizer and learning-rate schedule, described once as plain data.

Both training paths build from this description: plain Lightning builds ``torch.optim.AdamW`` and a
``LambdaLR`` over :func:`get_lr`; the Cerebras bridge builds cstorch's AdamW and
LinearLR -> CosineDecayLR from the same numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gigagpt.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW with linear warmup from 0 and cosine decay to ``min_lr_ratio * lr``.

    ``decay_steps`` defaults to ``trainer.max_steps - warmup_steps``. Weight decay applies only
    to tensors with two or more dimensions (matrices and embeddings), never biases or norms.
    """

    lr: float = 6e-4
    warmup_steps: int = 0
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    fused: bool | None = None  # torch's fused AdamW kernel; None picks it where torch has one (CUDA, CPU)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):  # NaN compares false to everything
            raise ConfigError(f"model.optim.lr must be > 0, got {self.lr}; set a finite learning rate, e.g. 6e-4")
        if self.warmup_steps < 0:
            raise ConfigError(f"model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < 0:
            raise ConfigError(f"model.optim.decay_steps must be >= 0, got {self.decay_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"model.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    def resolve_decay_steps(self, max_steps: int | None) -> int:
        """``decay_steps``, or what remains of ``max_steps`` after warmup."""
        if self.decay_steps is not None:
            return self.decay_steps
        if max_steps is None or max_steps < 0:
            raise ConfigError(
                "the learning-rate schedule needs a length: set trainer.max_steps "
                "(e.g. --trainer.max_steps=1000) or model.optim.decay_steps"
            )
        return max(max_steps - self.warmup_steps, 0)

    def to_dict(self) -> dict:
        return asdict(self)


def get_lr(step: int, lr: float, warmup_steps: int, decay_steps: int, min_lr: float) -> float:
    """Learning rate used by optimizer step ``step`` (0-based).

    Linear from 0 to ``lr`` over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` over
    ``decay_steps``, then flat at ``min_lr``.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    step -= warmup_steps
    if decay_steps == 0 or step >= decay_steps:
        return min_lr if decay_steps else lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (dim >= 2) and not decayed (biases, LayerNorm), each tensor once.

    A parameter sharded by FSDP is a flat view of its shard, so the weights of linear and
    embedding layers count as matrices whatever their current shape.
    """
    matrices = {
        id(module.weight) for module in model.modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(module.weight, nn.Parameter)
    }
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 or id(param) in matrices else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@functools.cache
def fused_adamw_available(device_type: str) -> bool:
    """Whether this torch has a fused AdamW kernel for ``device_type`` (CUDA; CPU since torch 2.4)."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_torch_optimizer(model: nn.Module, cfg: OptimConfig, max_steps: int | None):
    """``torch.optim.AdamW`` and a per-step ``LambdaLR`` following :func:`get_lr`.

    ``cfg.fused=None`` picks the fused kernel where this torch has one for the parameters' device:
    one pass over parameters, gradients and Adam state instead of several (on CPU, e.g. with FSDP
    CPU offload where the host runs the update, several times faster than the default loop).
    """
    fused = cfg.fused
    if fused is None:
        devices = {p.device.type for p in model.parameters()}
        fused = len(devices) == 1 and fused_adamw_available(devices.pop())
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )
    decay_steps = cfg.resolve_decay_steps(max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: get_lr(step, cfg.lr, cfg.warmup_steps, decay_steps, cfg.min_lr) / cfg.lr,
    )
    return optimizer, scheduler
