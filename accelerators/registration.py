"""Registers the Cerebras accelerator and strategies with Lightning and pairs them.

Lightning would give ``accelerator="cerebras"`` a plain single-device strategy and a Cerebras
strategy a CPU accelerator; the pairing below makes either one imply the other and rejects a
mismatched pair with a clear message. ``ckpt_path="last"`` is resolved before any strategy hook runs,
so ModelCheckpoint's ``.mdl`` suffix is set just before that resolution.
"""

from __future__ import annotations

import functools

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.connectors import accelerator_connector, checkpoint_connector

from accelerators.cerebras import CerebrasAccelerator
from accelerators.errors import CerebrasError
from accelerators.strategy import CerebrasStrategy

_STRATEGY_NAMES = ("cerebras", "cerebras_csx", "cerebras_cpu", "cerebras_gpu", "cerebras_validate")


def _is_cerebras_accelerator(flag) -> bool:
    return flag == "cerebras" or isinstance(flag, CerebrasAccelerator)


def _is_cerebras_strategy(flag) -> bool:
    return (isinstance(flag, str) and flag in _STRATEGY_NAMES) or isinstance(flag, CerebrasStrategy)


def _pair_flags(connector) -> None:
    accelerator, strategy = connector._accelerator_flag, connector._strategy_flag
    if _is_cerebras_accelerator(accelerator):
        if strategy == "auto":
            connector._strategy_flag = "cerebras"
        elif not _is_cerebras_strategy(strategy):
            name = strategy if isinstance(strategy, str) else type(strategy).__name__
            raise CerebrasError(
                f'accelerator="cerebras" runs only with a Cerebras strategy, got strategy={name!r}; set '
                "trainer.strategy to cerebras / cerebras_cpu / cerebras_gpu or a CerebrasStrategy (or auto)"
            )
    elif _is_cerebras_strategy(strategy):
        if accelerator == "auto":
            connector._accelerator_flag = "cerebras"
        else:
            name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__
            raise CerebrasError(
                f'a Cerebras strategy runs only with accelerator="cerebras", got accelerator={name!r}; set '
                "trainer.accelerator: cerebras (or auto)"
            )


def _name_checkpoints_mdl(checkpoint_connector) -> None:
    """Give ModelCheckpoint callbacks the ``.mdl`` suffix before Lightning resolves ``ckpt_path="last"``."""
    trainer = checkpoint_connector.trainer
    if isinstance(trainer.strategy, CerebrasStrategy):
        trainer.strategy._align_checkpoint_callbacks(trainer)


def register() -> None:
    """Idempotent: registering twice is a no-op (Lightning itself would raise)."""
    if "cerebras" not in AcceleratorRegistry:
        CerebrasAccelerator.register_accelerators(AcceleratorRegistry)
    if "cerebras" not in StrategyRegistry:
        CerebrasStrategy.register_strategies(StrategyRegistry)
    cls = accelerator_connector._AcceleratorConnector
    original = cls._check_config_and_set_final_flags
    if getattr(original, "_cerebras_pairing", False):
        return

    @functools.wraps(original)
    def check_config_and_set_final_flags(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _pair_flags(self)

    check_config_and_set_final_flags._cerebras_pairing = True
    cls._check_config_and_set_final_flags = check_config_and_set_final_flags

    connector_cls = checkpoint_connector._CheckpointConnector
    select = connector_cls._select_ckpt_path

    @functools.wraps(select)
    def select_ckpt_path(self, *args, **kwargs):
        _name_checkpoints_mdl(self)
        return select(self, *args, **kwargs)

    connector_cls._select_ckpt_path = select_ckpt_path
