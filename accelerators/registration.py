"""Registers the Cerebras accelerator and strategies with Lightning (public registries only).

A Cerebras strategy brings its own accelerator (``CerebrasStrategy.accelerator``), so
``strategy="cerebras_cpu"`` (or a ``CerebrasStrategy`` instance) needs nothing else.
``accelerator="cerebras"`` alone cannot choose the strategy: Lightning picks the strategy of an
accelerator that is not one of its own in its accelerator connector's ``_choose_strategy``
(``lightning/pytorch/trainer/connectors/accelerator_connector.py``), which returns a
``SingleDeviceStrategy`` for one device; the Cerebras accelerator then refuses to run under it with
a one-line message naming the setting.
"""

from __future__ import annotations

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

from gigagpt.accelerators.cerebras import CerebrasAccelerator
from gigagpt.accelerators.strategy import CerebrasStrategy


def register() -> None:
    """Idempotent: registering twice is a no-op (Lightning itself would raise)."""
    if "cerebras" not in AcceleratorRegistry:
        CerebrasAccelerator.register_accelerators(AcceleratorRegistry)
    if "cerebras" not in StrategyRegistry:
        CerebrasStrategy.register_strategies(StrategyRegistry)
