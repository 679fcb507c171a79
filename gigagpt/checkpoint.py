r"""Checkpoint files: atomic writes, safe loading, and Lightning checkpoints into a bare :class:`GPT`.

:class:`AtomicCheckpointIO` is the Trainer's checkpoint plugin for plain Lightning (CPU, GPU,
DDP): it writes to a temporary file beside the target, ``fsync``\ s it, renames it over the target
and ``fsync``\ s the folder, so a crash at any moment leaves either the previous complete file or
the new complete file under the checkpoint's name, never a truncated one. It loads with
``torch.load(weights_only=True)``: tensors and plain data only, no code from the file runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from gigagpt.errors import ConfigError
from gigagpt.model import GPT, GPTConfig

TMP_SUFFIX = ".tmp"


class CheckpointError(ConfigError):
    """A checkpoint file that is not loaded (code inside, empty, truncated, foreign): one line."""


# -- atomic writes ------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` goes to first: hidden, never ending in ``.ckpt``, naming
    the writer's pid so that only temporary files of ended writers are ever removed."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _writer_ended(tmp: Path) -> bool:
    """Whether the process a temporary file's name records has ended (or is this process)."""
    pid = tmp.name[: -len(TMP_SUFFIX)].rpartition(".")[2]
    if not pid.isdigit():
        return False  # not a name this module makes
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove the temporary files of ``path`` left by writers that were killed mid-write."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        if _writer_ended(stale):
            stale.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync, then rename over ``path``.

    Readers see the old file or the complete new one. A crash leaves at most a hidden
    ``.<name>.<pid>.tmp`` beside it, which the next successful write of the same name removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    remove_stale_temps(path)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, fsynced local writes and ``weights_only`` loading.

    Use it with ``Trainer(plugins=[AtomicCheckpointIO()])`` (the ``gigagpt`` command installs it
    for every strategy that uses Lightning's default checkpoint plugin). Remote paths (``s3://``
    and the like) fall back to Lightning's own writer.

    Args:
        weights_only: what ``torch.load`` may unpickle when the Trainer does not say; ``True``
            (the default) allows tensors and plain Python data only.
    """

    def __init__(self, weights_only: bool = True):
        super().__init__()
        self.weights_only = weights_only

    def write(self, checkpoint: dict[str, Any], f: io.BufferedWriter) -> None:
        """Serialise ``checkpoint`` into the open temporary file."""
        torch.save(checkpoint, f)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        atomic_write(path, lambda f: self.write(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = str(path)
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        if weights_only is None:
            weights_only = self.weights_only
        return safe_load(path, map_location=map_location or "cpu", weights_only=weights_only)


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Any checkpoint file gigagpt reads, as tensors and plain data only, with clear errors.

    The one loading function of every command (``fit --ckpt_path`` and auto-resume, ``validate``,
    ``sample``, ``export``, conversion): ``torch.save`` files (``.ckpt``, ``.pt``, a Hugging Face
    ``pytorch_model.bin``) through ``torch.load(weights_only=True)``, cstorch's HDF5 ``.mdl`` files
    (whatever their name) through :func:`gigagpt.mdl.read_mdl`. No code from the file runs.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (a write was interrupted); use an earlier checkpoint")
    from gigagpt.mdl import is_hdf5, read_mdl

    if is_hdf5(path):
        ckpt = read_mdl(path)
        if map_location not in (None, "cpu"):
            ckpt = torch.utils._pytree.tree_map(
                lambda v: v.to(map_location) if isinstance(v, torch.Tensor) else v, ckpt)
        return ckpt
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not weights_only:
            raise
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain data, so it is not "
            f"loaded (weights_only=True{_unsupported(err)}); if you trust the file, load it with "
            "AtomicCheckpointIO(weights_only=False)"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable ({err}); it may be truncated or not a "
            "checkpoint. Use an earlier checkpoint"
        ) from None


def _unsupported(err: BaseException) -> str:
    """What torch's refusal names (e.g. ``GLOBAL builtins.open``), without its multi-line advice."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f"; it names {found.group(1)}" if found else ""


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or the newest "last" checkpoint under a run folder.

    "Last" checkpoints are ``last.ckpt`` and the ``last-vN.ckpt`` that Lightning's ModelCheckpoint
    writes beside an existing ``last.ckpt`` when a fresh run (``--resume never``) reuses its folder;
    the newest by modification time wins (ties: the highest ``N``, plain ``last.ckpt`` counting as
    0). Without any, the newest ``*.ckpt``.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        last = []
        for candidate in path.rglob("last*.ckpt"):
            match = re.fullmatch(r"last(?:-v(\d+))?", candidate.stem)
            if match and candidate.is_file():
                last.append((candidate.stat().st_mtime_ns, int(match.group(1) or 0), str(candidate), candidate))
        if last:
            return max(last)[-1]
        found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise FileNotFoundError(f"no .ckpt file under {str(path)!r}")
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, no code."""
    return safe_load(find_checkpoint(path), map_location=map_location, weights_only=True)


def model_state_dict(state_dict: dict, prefix: str = "model.") -> dict:
    """The GPT's own keys from a LightningModule state dict."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# The GPTConfig fields that fix tensor shapes; the others (dropout, activation, vocab padding,
# init) may change when a run is resumed.
SHAPE_FIELDS = ("vocab_size", "max_position_embeddings", "depth", "width", "heads", "bias")


def peek_checkpoint(path: str | os.PathLike) -> dict | None:
    """A ``.ckpt``'s dictionary with its tensors memory-mapped, not read: cheap at any model size.
    ``None`` for what is not a zip checkpoint (Lightning's own loading reports those)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) else None


def checkpoint_info(path: str | os.PathLike) -> dict | None:
    """``{"step", "hdf5", "cstorch_optimizer"}`` for a complete Lightning checkpoint that loads; ``None``
    for a truncated, foreign or (HDF5 without h5py) unverifiable file. Reads headers only."""
    from gigagpt.mdl import is_hdf5, mdl_global_step

    path = Path(path)
    try:
        hdf5 = is_hdf5(path)
    except OSError:
        return None
    if hdf5:
        step = mdl_global_step(path)
        return None if step is None else {"step": step, "hdf5": True, "cstorch_optimizer": True}
    ckpt = peek_checkpoint(path)
    if not ckpt or "state_dict" not in ckpt or not isinstance(ckpt.get("global_step"), int):
        return None
    return {"step": ckpt["global_step"], "hdf5": False, "cstorch_optimizer": cstorch_optimizer_state(ckpt)}


def run_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint files (``*.ckpt``, ``*.mdl``; not hidden temporary files) directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".ckpt", ".mdl") and not p.name.startswith(".") and p.is_file())


def newest_complete_checkpoint(folders: list[Path]) -> tuple[Path | None, dict | None, list[Path]]:
    """The checkpoint of the highest step that is complete and loads (``last`` and step checkpoints
    alike; the newer file on a tie), its :func:`checkpoint_info`, and the files passed over as broken."""
    best, broken = None, []
    for folder in folders:
        for path in run_checkpoints(folder):
            info = checkpoint_info(path)
            if info is None:
                broken.append(path)
                continue
            key = (info["step"], path.stat().st_mtime_ns)
            if best is None or key > best[0]:
                best = (key, path, info)
    return (best[1], best[2], broken) if best else (None, None, broken)


def saved_model_config(ckpt: dict | None) -> dict | None:
    """The ``GPTConfig`` fields a GPTModule checkpoint (from :func:`peek_checkpoint`) was trained with."""
    saved = ((ckpt or {}).get("hyper_parameters") or {}).get("config")
    return saved if isinstance(saved, dict) else None


def cstorch_optimizer_state(ckpt: dict | None) -> bool:
    """Whether the checkpoint's optimizer state is cstorch's Adam layout (a converted ``.mdl``:
    ``beta1_power`` per parameter where torch's AdamW keeps ``step``)."""
    states = (ckpt or {}).get("optimizer_states") or []
    return any("beta1_power" in entry for state in states if isinstance(state, dict)
               for entry in (state.get("state") or {}).values() if isinstance(entry, dict))


def shape_differences(path: str | os.PathLike, config: GPTConfig) -> list[str]:
    """``field: checkpoint value -> config value`` for every shape setting that differs."""
    saved = saved_model_config(peek_checkpoint(path))
    if saved is None:
        return []
    current = config.to_dict()
    return [f"{name} {saved[name]} -> {current[name]}" for name in SHAPE_FIELDS
            if name in saved and saved[name] != current[name]]


def training_tokenizer_file(path: str | os.PathLike) -> str | None:
    """The local tokenizer ranks file the checkpoint's training data was prepared with, if it
    still exists (from the DataModule's ``path`` and that folder's ``meta.json``)."""
    try:
        ckpt = peek_checkpoint(find_checkpoint(path)) or {}
        folder = Path(ckpt["datamodule_hyper_parameters"]["path"])
        local = json.loads((folder / "meta.json").read_text()).get("tokenizer_file")
    except Exception:  # no DataModule hparams, data moved, no meta.json: nothing to suggest
        return None
    return local if local and Path(local).is_file() else None


def check_shapes(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Raise a clear error naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key not in state_dict:
            problems.append(f"missing {key} {tuple(tensor.shape)}")
        elif tuple(state_dict[key].shape) != tuple(tensor.shape):
            problems.append(
                f"{key}: {source} has {tuple(state_dict[key].shape)}, model expects {tuple(tensor.shape)}"
            )
    problems += [f"unexpected {key}" for key in state_dict if key not in expected]
    if problems:
        listing = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(
            f"the {source} does not match the model configuration "
            f"({len(problems)} problems):\n  {listing}\n"
            "Use the model.config the checkpoint was trained with."
        )


def load_gpt(path: str | os.PathLike, map_location="cpu") -> GPT:
    """A :class:`GPT` rebuilt from a Lightning checkpoint's hyperparameters and weights."""
    ckpt = load_checkpoint(path, map_location)
    try:
        config = GPTConfig.from_dict(ckpt["hyper_parameters"]["config"])
    except KeyError:
        raise ValueError(f"{path} has no gigagpt hyperparameters; was it written by GPTModule?") from None
    with torch.device("meta"):
        model = GPT(config)
    weights = model_state_dict(ckpt["state_dict"])
    check_shapes(model, weights)
    model.load_state_dict(weights, assign=True)
    model.lm_head.weight = model.wte.weight  # re-tie after assign
    return model.to(map_location).eval()
