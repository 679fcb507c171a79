"""Convert checkpoints between cstorch ``.mdl`` (HDF5) and Lightning ``.ckpt`` (``torch.save``).

Both directions keep the whole Lightning checkpoint dictionary (``state_dict``, ``hyper_parameters``,
loops, optimizer and scheduler states), so a converted ``.ckpt`` works with
``gigagpt.checkpoint.load_gpt`` / ``gigagpt sample`` / ``gigagpt export`` and a converted ``.mdl``
resumes a Cerebras run. Optimizer and scheduler states keep the layout of the side that wrote them
(cstorch's AdamW vs ``torch.optim.AdamW``): weights move freely between the two training paths;
resume the optimizer only on the side that wrote it.

Python: ``convert_checkpoint("step0001000.mdl", "step0001000.ckpt")`` (direction from the suffixes).
Reading or writing ``.mdl`` needs cerebras-pytorch (``pip install "gigagpt[cerebras]"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from accelerators.errors import import_cstorch

MDL, CKPT = ".mdl", ".ckpt"


def is_mdl(path: str | os.PathLike) -> bool:
    """True for cstorch's HDF5 checkpoints (by content, whatever the suffix)."""
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


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
    from gigagpt.checkpoint import safe_load

    return _to_host(safe_load(path))


def _atomic(dst: Path, write) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def mdl_to_ckpt(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``.mdl`` -> Lightning ``.ckpt`` readable with ``torch.load(weights_only=True)``."""
    state = load_mdl(src)
    dst = Path(dst)
    _atomic(dst, lambda tmp: torch.save(state, tmp))
    return dst


def ckpt_to_mdl(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Lightning ``.ckpt`` -> ``.mdl`` (what ``ckpt_path`` of a Cerebras run reads fastest)."""
    cstorch = import_cstorch()
    state = torch.load(str(src), map_location="cpu", weights_only=True)
    dst = Path(dst)
    _atomic(dst, lambda tmp: cstorch.save(state, str(tmp)))
    return dst


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert ``src`` to ``dst``; the direction comes from ``dst``'s suffix (``.ckpt`` or ``.mdl``)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint {str(src)!r} does not exist")
    if src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same file: {str(src)!r}")
    if dst.suffix == CKPT:
        if not is_mdl(src):
            raise ValueError(f"{str(src)!r} is not a cstorch .mdl (HDF5) file; nothing to convert to {CKPT}")
        return mdl_to_ckpt(src, dst)
    if dst.suffix == MDL:
        if is_mdl(src):
            raise ValueError(f"{str(src)!r} is already a .mdl file")
        return ckpt_to_mdl(src, dst)
    raise ValueError(f"destination {str(dst)!r} must end in {CKPT} or {MDL}")
