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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from gigagpt import hf
from gigagpt.errors import ConfigError, ConversionError
from gigagpt.model import GPT, GPTConfig
from gigagpt.run_folder import peek_checkpoint

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


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None], *,
                 by_name: bool = False) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync, then rename over ``path``.

    The one writer of every file gigagpt produces (checkpoints, exports, plots; the dataset folder
    swaps whole folders its own way). Readers see the old file or the complete new one. A crash
    leaves at most a hidden ``.<name>.<pid>.tmp`` beside it, which the next successful write of the
    same name removes. ``by_name=True`` calls ``write(temp_path)`` instead, for writers that open
    the file themselves (``cstorch.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        if by_name:
            write(tmp)
        with open(tmp, "r+b" if by_name else "wb") as f:
            if not by_name:
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
    """``path`` itself (a file, or a Hugging Face folder), or the newest "last" checkpoint under a run folder.

    "Last" checkpoints are ``last.ckpt`` / ``last.mdl`` and the ``last-vN`` copies that Lightning's
    ModelCheckpoint writes beside an existing one when a fresh run (``--resume never``) reuses its
    folder; the newest by modification time wins (ties: the highest ``N``, plain ``last`` counting as
    0). Without any, the newest ``*.ckpt`` / ``*.mdl``.
    """
    path = Path(path)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return path
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.suffix in (".ckpt", ".mdl") and p.is_file()]
        last = []
        for candidate in found:
            match = re.fullmatch(r"last(?:-v(\d+))?", candidate.stem)
            if match:
                last.append((candidate.stat().st_mtime_ns, int(match.group(1) or 0), str(candidate), candidate))
        if last:
            return max(last)[-1]
        if found:
            return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))
        raise FileNotFoundError(f"no .ckpt or .mdl file under {str(path)!r}; pass a checkpoint file")
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, no code."""
    return safe_load(find_checkpoint(path), map_location=map_location, weights_only=True)


def model_state_dict(state_dict: dict, prefix: str = "model.") -> dict:
    """The GPT's own keys from a LightningModule state dict."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


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


# -- Hugging Face folders -----------------------------------------------------------------------------
def save_hf(model: GPT, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads,
    with ``tokenizer`` (a :class:`~gigagpt.tokenizer.Tokenizer`) its files for ``AutoTokenizer``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; give a folder for the Hugging Face model")
    for name, data in hf.hf_files(model, dtype, tokenizer).items():
        atomic_write(out_dir / name, lambda f, data=data: f.write(data))
    return out_dir


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an HF model folder: safetensors (single or sharded) or ``pytorch_model.bin``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or index.is_file():
        st = hf.need_safetensors()
        files = ([folder / "model.safetensors"] if not index.is_file() else
                 [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))])
        out = {}
        for f in files:
            out.update(st.load_file(str(f)))
        return out
    if (folder / "pytorch_model.bin").is_file():
        return safe_load(folder / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{folder} has a config.json but no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin; download the weights next to config.json"
    )


def _load_hf(folder: Path, map_location) -> GPT:
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{folder / 'config.json'} is not valid JSON: {err}") from None
    config = hf.from_hf_config(hf_config)
    weights = hf.from_hf_state_dict(read_hf_weights(folder), config)
    return build_gpt(config, weights, source=f"Hugging Face model {folder}", map_location=map_location)


# -- a GPT from any file ------------------------------------------------------------------------------
def build_gpt(config: GPTConfig, state_dict: dict, source: str = "checkpoint", map_location="cpu") -> GPT:
    """A :class:`GPT` holding ``state_dict`` (checked key by key), head re-tied, in eval mode."""
    state_dict = dict(state_dict)
    state_dict.setdefault("lm_head.weight", state_dict.get("wte.weight"))
    with torch.device("meta"):
        model = GPT(config)
    check_shapes(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    model.lm_head.weight = model.wte.weight  # re-tie after assign
    return model.to(map_location).eval()


def load_model(path: str | os.PathLike, map_location="cpu") -> GPT:
    """A :class:`GPT` from any file gigagpt reads: a Lightning ``.ckpt`` (or a run folder), a
    Cerebras ``.mdl`` (data only; needs h5py, not cerebras-pytorch) or a Hugging Face folder."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf(path, map_location)
    from gigagpt.mdl import is_hdf5

    path = find_checkpoint(path)
    if is_hdf5(path):  # by content: Cerebras runs may write HDF5 under .ckpt names
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ConversionError(f"{path} does not hold a Lightning checkpoint (no state_dict)")
    else:
        try:
            ckpt = load_checkpoint(path, "cpu")
        except (RuntimeError, ValueError, EOFError, OSError, AttributeError) as err:
            # torch reports truncated and foreign files cryptically
            raise ConversionError(
                f"cannot read {path} as a Lightning checkpoint ({type(err).__name__}: {err}); "
                "give a .ckpt written by `gigagpt fit`, a Cerebras .mdl, or a Hugging Face folder"
            ) from None
    hparams = ckpt.get("hyper_parameters") or {}
    if "config" not in hparams:
        raise ConversionError(
            f"{path} has no gigagpt hyperparameters (hyper_parameters.config); was it written by GPTModule?"
        )
    config = GPTConfig.from_dict(hparams["config"])
    return build_gpt(config, model_state_dict(ckpt["state_dict"]), source=str(path), map_location=map_location)


def lightning_checkpoint(model: GPT) -> dict:
    """A checkpoint dict that ``GPTModule.load_from_checkpoint`` and ``gigagpt sample`` read."""
    import lightning

    from gigagpt.optim import OptimConfig

    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": asdict(model.config), "optim": asdict(OptimConfig()), "compile": False},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }


def save_lightning_checkpoint(model: GPT, path: str | os.PathLike) -> Path:
    return atomic_save(lightning_checkpoint(model), path)
