"""Parallelisation applied from outside the model: ``torch.compile`` per block, and building a GPT
sharded for FSDP (:func:`parallelize` picks what the Trainer's strategy needs).

Both are opt-in and leave the network itself untouched: compiled blocks keep their class and
parameter names (checkpoints and FSDP wrap policies see the same modules), and a GPT built for FSDP
gets exactly the weights :meth:`GPT.init_weights` gives, with its head still tied.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from gigagpt.model import GPT, GPTConfig


def _say(message: str) -> None:
    """One line on stderr, from the first process only."""
    rank = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    if rank == 0:
        print(f"gigagpt: {message}", file=sys.stderr, flush=True)


def compile_available(device: torch.device | str | None = None, **compile_kwargs) -> str | None:
    """``None`` if ``torch.compile`` works on ``device``, else the reason it does not.

    Compilation is lazy, so a missing compiler (Triton on GPU, a C++ toolchain on CPU) would only
    surface at the first training step; compiling and running a two-element function finds out now.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "meta":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        probe = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2.0, **compile_kwargs)
        probe(torch.ones(2, device=device))
    except Exception as err:  # any compiler or backend failure means: train eagerly
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {text[:200]}"
    return None


def _can_compile(device: torch.device | str | None, **compile_kwargs) -> bool:
    reason = compile_available(device, **compile_kwargs)
    if reason is not None:
        _say(f"torch.compile is unavailable here ({reason}); training uncompiled "
             "(set model.compile: false to skip this check)")
    return reason is None


def compile_blocks(model: GPT, **compile_kwargs) -> bool:
    """``torch.compile`` each transformer block and the head's loss in place; ``False`` (and one
    line) if unavailable.

    Per block rather than the whole model: one graph compiled once and reused ``depth`` times,
    fast to compile, and compatible with per-block FSDP wrapping and activation checkpointing.
    The loss is compiled too: fused, it never writes the float32 logits out.
    """
    if not _can_compile(next(model.parameters()).device, **compile_kwargs):
        return False
    for block in model.blocks:
        block.compile(**compile_kwargs)
    model.head_loss.compile(**compile_kwargs)
    return True


def build_for_fsdp(config: GPTConfig, device: torch.device | str, compile: bool = False, wrap=None) -> nn.Module:
    """A GPT materialised one piece at a time on ``device``, each block handed to ``wrap`` at once,
    then the whole model (what is returned: with FSDP, the root FSDP module around the GPT).

    Inside Lightning's FSDP ``model_sharded_context``, ``torch.distributed.fsdp.wrap.wrap`` shards a
    block the moment it is built, so no process ever holds more than one unsharded block: a 13B or
    70B model never exists in full on any host or GPU. The network is first laid out on the meta
    device (no memory), then each piece is allocated and initialised in the order
    :meth:`GPT.init_weights` uses, so the weights equal those ``init_weights()`` gives the whole
    model from the same random state, and the head stays tied to the token embedding. ``compile`` compiles
    each block before it is wrapped, and the loss (FSDP then needs ``use_orig_params: true``).
    """
    if wrap is None:
        from torch.distributed.fsdp.wrap import wrap
    device = torch.device(device)
    compile = compile and _can_compile(device)
    with torch.device("meta"):
        model = GPT(config)

    def prepare(block: nn.Module) -> nn.Module:
        if compile:
            block.compile()
        return wrap(block)

    model.materialise(device, prepare)
    if compile:
        model.head_loss.compile()
    # The root unit (embeddings, final norm, tied head) must be an FSDP module too: Lightning does
    # not wrap a model that already holds FSDP modules, and unwrapped parameters would not sync.
    return wrap(model)


def sharding_device(strategy) -> torch.device | None:
    """The device to build on when ``strategy`` is Lightning's FSDPStrategy (each rank builds its
    shards there), else ``None``."""
    if strategy is None:
        return None
    from lightning.pytorch.strategies import FSDPStrategy

    return strategy.root_device if isinstance(strategy, FSDPStrategy) else None


def parallelize(config: GPTConfig, strategy=None, compile: bool = False) -> nn.Module:
    """The GPT of ``config`` as ``strategy`` trains it: sharded block by block as it is built under
    FSDP (13B+ never materialise in full), otherwise whole; each block compiled if ``compile``.

    The one place that applies compile / sharding, from outside the model and the LightningModule.
    """
    device = sharding_device(strategy)
    if device is not None:
        check_fsdp_strategy(strategy)
        return build_for_fsdp(config, device, compile=compile)
    model = GPT(config)
    if compile:
        compile_blocks(model)
    return model


def check_fsdp_strategy(strategy) -> None:
    """Settings of Lightning's FSDPStrategy that training a GPT depends on, with the fix."""
    if not strategy.kwargs.get("use_orig_params", False):
        raise ValueError(
            "FSDP training of a GPT needs use_orig_params=True (trainer.strategy.dict_kwargs."
            "use_orig_params: true in YAML; Lightning's default): weight decay applies to matrices "
            "only, which flat FSDP parameters cannot tell apart; see configs/gpu/fsdp.yaml"
        )
    if strategy.kwargs.get("auto_wrap_policy") is not None:
        raise ValueError(
            "GPTModule shards each gigagpt.model.Block itself as it builds it; remove "
            "trainer.strategy.init_args.auto_wrap_policy (activation_checkpointing_policy stays)"
        )
