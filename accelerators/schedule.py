"""cstorch's AdamW and learning-rate schedule from a :class:`gigagpt.optim.OptimConfig`.

The schedule is warmup (``LinearLR`` 0 -> lr) then cosine (``CosineDecayLR`` lr -> min_lr), as
:func:`gigagpt.optim.get_lr`. Parameter groups that carry ``lr_scale`` get the scheduled rate times
that scale through cstorch's own mechanism: the group key ``adjust_learning_rate`` read by
``ScalePerParamLR`` (``cerebras/pytorch/optim/scheduler.py: ScalePerParamScheduler.__init__``).
"""

from __future__ import annotations

import torch

from gigagpt.accelerators.bridge_errors import import_cstorch


def cstorch_lr_scheduler(optimizer, optim, max_steps: int | None):
    cstorch = import_cstorch()
    sched = cstorch.optim.lr_scheduler
    decay_steps = optim.resolve_decay_steps(max_steps)
    parts, milestones = [], []
    if optim.warmup_steps > 0:
        parts.append(sched.LinearLR(optimizer, initial_learning_rate=0.0, end_learning_rate=optim.lr,
                                    total_iters=optim.warmup_steps))
        milestones.append(optim.warmup_steps)
    if decay_steps > 0:
        parts.append(sched.CosineDecayLR(optimizer, initial_learning_rate=optim.lr,
                                         end_learning_rate=optim.min_lr, total_iters=decay_steps))
    else:
        parts.append(sched.ConstantLR(optimizer, learning_rate=optim.lr))
    schedule = parts[0] if len(parts) == 1 else sched.SequentialLR(optimizer, parts, milestones=milestones)
    if any(group.get("adjust_learning_rate", 1.0) != 1.0 for group in optimizer.param_groups):
        schedule = sched.ScalePerParamLR(optimizer, schedule)
    return schedule


def scaled_groups(groups: list[dict]) -> list[dict]:
    """``lr_scale`` (gigagpt's key, default 1.0) as cstorch's ``adjust_learning_rate``."""
    out = []
    for group in groups:
        group = dict(group)
        scale = float(group.pop("lr_scale", 1.0))
        if scale != 1.0:
            group["adjust_learning_rate"] = scale
        out.append(group)
    return out


def build_cstorch_optimizer(model: torch.nn.Module, optim, max_steps: int | None, groups: list[dict] | None = None):
    """cstorch's AdamW and schedule; ``groups`` defaults to :func:`gigagpt.optim.param_groups`."""
    cstorch = import_cstorch()
    if groups is None:
        from gigagpt.optim import param_groups

        groups = param_groups(model, optim.weight_decay)
    optimizer = cstorch.optim.AdamW(
        scaled_groups(groups),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        correct_bias=True,
    )
    return optimizer, cstorch_lr_scheduler(optimizer, optim, max_steps)
