"""The Lightning <-> cerebras.pytorch bridge.

Importing this package (``import gigagpt`` does) registers ``Trainer(accelerator="cerebras")`` and the
strategies ``cerebras`` (CSX), ``cerebras_cpu``, ``cerebras_gpu`` and ``cerebras_validate`` with
Lightning. cerebras-pytorch itself is imported only when a Cerebras run starts.
"""

if __name__ != "gigagpt.accelerators":  # the repository's folder reached as a top-level package: a second copy
    raise ImportError(f"this package installs as gigagpt.accelerators; import that, not {__name__}")


from gigagpt.accelerators.bridge_errors import (
    CerebrasCheckpointError,
    CerebrasClusterError,
    CerebrasError,
    CerebrasNotInstalledError,
)
from gigagpt.accelerators.cerebras import CerebrasAccelerator
from gigagpt.accelerators.checkpoint_io import CerebrasCheckpointIO
from gigagpt.accelerators.checkpointing import CerebrasModelCheckpoint
from gigagpt.accelerators.precision import CerebrasPrecision
from gigagpt.accelerators.registration import register
from gigagpt.accelerators.settings import ClusterSettings
from gigagpt.accelerators.strategy import CerebrasStrategy

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
