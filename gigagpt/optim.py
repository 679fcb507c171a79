"""The optimizer and learning-rate schedule, described once as plain data.

Both training paths build from this description: plain Lightning builds ``torch.optim.AdamW`` and a
``LambdaLR`` over :func:`get_lr`; the Cerebras bridge builds cstorch's AdamW and
LinearLR -> CosineDecayLR from the same numbers. A parameter group may carry ``lr_scale`` (absent
means 1.0): every path gives that group the scheduled learning rate times its ``lr_scale`` (μP).
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
        if not math.isfinite(self.lr):
            raise ConfigError(f"model.optim.lr must be a finite number, got {self.lr}")
        if self.lr <= 0:
            raise ConfigError(f"model.optim.lr must be > 0, got {self.lr}")
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


def mup_hidden_weights(model: nn.Module) -> tuple[set[int], float]:
    """Ids of the μP hidden (matrix-like) weights of the GPTs in ``model``, and their ``lr_scale``.

    Adam's learning rate of hidden weights is divided by ``width_mult`` while embeddings (and so
    the tied head), biases and LayerNorms keep the base rate: Tensor Programs V, Table 3 (Adam,
    hidden weights 1/fan_in; input weights and biases constant) and Cerebras-GPT's μP table
    (eta_base / m_d for hidden weights). Without μP: no ids, scale 1.
    """
    from gigagpt.model import GPT

    ids, scale = set(), 1.0
    for gpt in (m for m in model.modules() if isinstance(m, GPT) and m.config.mup):
        scale = 1.0 / gpt.config.width_mult
        ids |= {id(m.weight) for m in gpt.blocks.modules() if isinstance(m, nn.Linear)}
    return ids, scale


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (dim >= 2) and not decayed (biases, LayerNorm), each tensor once.

    A parameter sharded by FSDP is a flat view of its shard, so the weights of linear and
    embedding layers count as matrices whatever their current shape. Under μP the hidden weights
    form a third, decayed group with ``lr_scale = 1 / width_mult`` (see :func:`mup_hidden_weights`);
    it comes last, so group 0 keeps the base learning rate that training logs.
    """
    hidden, lr_scale = mup_hidden_weights(model)
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
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if hidden:
        groups[0]["params"] = [p for p in decay if id(p) not in hidden]
        groups.append({"params": [p for p in decay if id(p) in hidden], "weight_decay": weight_decay,
                       "lr_scale": lr_scale})
    return groups


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
    groups = param_groups(model, cfg.weight_decay)
    for group in groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)  # LambdaLR scales each group's own rate
    optimizer = torch.optim.AdamW(
        groups,
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
