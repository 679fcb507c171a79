"""CerebrasCheckpointIO: Lightning checkpoints as cstorch ``.mdl`` files (HDF5)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

MDL_SUFFIX = ".mdl"


class CerebrasCheckpointIO(CheckpointIO):
    """Writes with ``cstorch.save`` (atomically: temp file + rename), reads with ``cstorch.load``.

    ``cstorch.load`` reads both ``.mdl`` files and plain ``torch.save`` files (Lightning ``.ckpt``),
    so a Cerebras run can also resume from a checkpoint written by plain Lightning.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "CerebrasCheckpointIO.save_checkpoint takes no storage_options; remove them from the "
                "trainer.save_checkpoint call"
            )
        import cerebras.pytorch as cstorch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            cstorch.save(checkpoint, str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Not cstorch.load: it unpickles with dill and falls back to torch.load(weights_only=False).
        from accelerators.errors import CerebrasCheckpointError
        from gigagpt.checkpoint import safe_load

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        try:
            return safe_load(path, map_location=map_location or "cpu")
        except ValueError as err:
            raise CerebrasCheckpointError(str(err).splitlines()[0]) from None

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        if path.is_file():
            path.unlink()
