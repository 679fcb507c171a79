"""The Lightning <-> cerebras.pytorch bridge.

Importing this package (``import gigagpt`` does) registers ``Trainer(accelerator="cerebras")`` and the
strategies ``cerebras`` (CSX), ``cerebras_cpu``, ``cerebras_gpu`` and ``cerebras_validate`` with
Lightning. cerebras-pytorch itself is imported only when a Cerebras run starts.
"""

from accelerators.cerebras import CerebrasAccelerator
from accelerators.checkpoint_io import CerebrasCheckpointIO
from accelerators.checkpointing import CerebrasModelCheckpoint
from accelerators.errors import (
    CerebrasCheckpointError,
    CerebrasClusterError,
    CerebrasError,
    CerebrasNotInstalledError,
)
from accelerators.precision import CerebrasPrecision
from accelerators.registration import register
from accelerators.settings import ClusterSettings
from accelerators.strategy import CerebrasStrategy

__all__ = [
    "CerebrasAccelerator",
    "CerebrasCheckpointError",
    "CerebrasCheckpointIO",
    "CerebrasClusterError",
    "CerebrasError",
    "CerebrasModelCheckpoint",
    "CerebrasNotInstalledError",
    "CerebrasPrecision",
    "CerebrasStrategy",
    "ClusterSettings",
]

register()
