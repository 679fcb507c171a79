"""CerebrasAccelerator: the Lightning accelerator for cerebras.pytorch (cstorch) backends.

The device work (backend, compile, lazy tensors) belongs to :class:`~gigagpt.accelerators.strategy.CerebrasStrategy`;
the accelerator only tells Lightning that one logical device drives a whole cluster.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator

from gigagpt.accelerators.bridge_errors import CerebrasError, cstorch_available, import_cstorch


class CerebrasAccelerator(Accelerator):
    """One logical device: a Cerebras cluster (CSX), or the cstorch CPU/GPU backend."""

    def __init__(self) -> None:
        super().__init__()
        import_cstorch()  # fails here, in one line, when cerebras-pytorch is missing
        self.paired = False  # set by the CerebrasStrategy that runs on this accelerator

    def setup_device(self, device: torch.device) -> None:
        if not self.paired:
            # Lightning chooses the strategy for accelerator="cerebras" alone itself (a
            # SingleDeviceStrategy on the CPU); only a Cerebras strategy can drive cstorch.
            raise CerebrasError(
                'accelerator="cerebras" runs only with a Cerebras strategy: set trainer.strategy to '
                "cerebras (CSX) / cerebras_cpu / cerebras_gpu or a CerebrasStrategy (e.g. --config "
                "configs/cerebras/tiny.yaml)"
            )

    def teardown(self) -> None:
        pass

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return {}

    @staticmethod
    def parse_devices(devices: Any) -> int:
        if devices not in ("auto", 1, "1", -1, "-1", None):
            raise ValueError(
                f'Trainer(accelerator="cerebras") drives a whole cluster as one device; got devices={devices!r}. '
                "Set trainer.devices to 1 and scale with the strategy's cluster.num_csx"
            )
        return 1

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("cpu")]

    @staticmethod
    def auto_device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return cstorch_available()

    @classmethod
    def name(cls) -> str:
        return "cerebras"

    @classmethod
    def register_accelerators(cls, accelerator_registry) -> None:
        accelerator_registry.register(
            "cerebras", cls, description="Cerebras wafer-scale systems through cerebras.pytorch"
        )
