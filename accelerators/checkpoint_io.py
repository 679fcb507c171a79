"""Cerebras checkpoints: the ``.mdl`` (HDF5) plugin of a Cerebras run and conversion to and from ``.ckpt``.

:class:`CerebrasCheckpointIO` writes with ``cstorch.save`` and reads without running code from the file.
:func:`convert_checkpoint` moves a whole Lightning checkpoint dictionary (``state_dict``,
``hyper_parameters``, loops, optimizer and scheduler states) between ``.mdl`` and ``.ckpt``, so a
converted ``.ckpt`` works with ``gigagpt.checkpoint.load_model`` / ``gigagpt sample`` / ``gigagpt export``
and a converted ``.mdl`` resumes a Cerebras run. Optimizer and scheduler states keep the layout of
the side that wrote them (cstorch's AdamW vs ``torch.optim.AdamW``): weights move freely between the
two training paths; resume the optimizer only on the side that wrote it.

Python: ``convert_checkpoint("step0001000.mdl", "step0001000.ckpt")`` (direction from the suffixes).
Writing ``.mdl`` needs cerebras-pytorch (``pip install "gigagpt[cerebras]"``); reading needs h5py only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO

from gigagpt.accelerators.bridge_errors import import_cstorch
from gigagpt.checkpoint import atomic_save, atomic_write, safe_load, save_lightning_checkpoint
from gigagpt.mdl import is_hdf5
from gigagpt.model import GPT

MDL_SUFFIX = MDL = ".mdl"
CKPT = ".ckpt"


class CerebrasCheckpointIO(CheckpointIO):
    """Writes with ``cstorch.save`` (atomically: temp file + rename), reads data only.

    Reading takes both ``.mdl`` files and plain ``torch.save`` files (Lightning ``.ckpt``), so a
    Cerebras run can also resume from a checkpoint written by plain Lightning.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "CerebrasCheckpointIO.save_checkpoint takes no storage_options; remove them from the "
                "trainer.save_checkpoint call"
            )
        import cerebras.pytorch as cstorch

        atomic_write(path, lambda tmp: cstorch.save(checkpoint, str(tmp)), by_name=True)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Not cstorch.load: it unpickles with dill and falls back to torch.load(weights_only=False).
        from gigagpt.accelerators.bridge_errors import CerebrasCheckpointError

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


# -- conversion -------------------------------------------------------------------------------------
def _to_host(value: Any) -> Any:
    """Nested dicts/lists with every tensor a plain, materialised CPU ``torch.Tensor``."""
    if isinstance(value, torch.Tensor):
        out = torch.empty(value.shape, dtype=value.dtype, device="cpu")
        out.copy_(value)
        return out
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_host(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_host(v) for v in value)
    return value


def load_mdl(path: str | os.PathLike) -> dict:
    """A ``.mdl`` checkpoint as plain Python data and CPU tensors, read without running code from it
    (:func:`gigagpt.checkpoint.safe_load`, not ``cstorch.load``)."""
    return _to_host(safe_load(path))


def mdl_to_ckpt(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``.mdl`` -> Lightning ``.ckpt`` readable with ``torch.load(weights_only=True)``."""
    return atomic_save(load_mdl(src), dst)


def ckpt_to_mdl(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Lightning ``.ckpt`` -> ``.mdl`` (what ``ckpt_path`` of a Cerebras run reads fastest)."""
    cstorch = import_cstorch()
    state = torch.load(str(src), map_location="cpu", weights_only=True)
    return atomic_write(dst, lambda tmp: cstorch.save(state, str(tmp)), by_name=True)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert ``src`` to ``dst``; the direction comes from ``dst``'s suffix (``.ckpt`` or ``.mdl``)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint {str(src)!r} does not exist")
    if src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same file: {str(src)!r}")
    if dst.suffix == CKPT:
        if not is_hdf5(src):
            raise ValueError(f"{str(src)!r} is not a cstorch .mdl (HDF5) file; nothing to convert to {CKPT}")
        return mdl_to_ckpt(src, dst)
    if dst.suffix == MDL:
        if is_hdf5(src):
            raise ValueError(f"{str(src)!r} is already a .mdl file")
        return ckpt_to_mdl(src, dst)
    raise ValueError(f"destination {str(dst)!r} must end in {CKPT} or {MDL}")


def save_mdl(model: GPT, path: str | os.PathLike) -> Path:
    """A Cerebras ``.mdl`` checkpoint of ``model`` (a Cerebras run can start from it)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.is_dir() else None) as tmp:
        return ckpt_to_mdl(save_lightning_checkpoint(model, Path(tmp) / "model.ckpt"), path)
