"""A training run's folders: one ``fit`` at a time (an advisory lock) and checks before step 0.

Also which checkpoint of a run resumes it: the newest complete one, read by headers only.

The lock is ``fcntl.flock`` on ``<checkpoint folder>.lock``, which records the holder's pid and
host. The kernel drops it when the holder's process ends, however it ends (``kill -9``
included), so a lock file left by a dead run never blocks the next one. A run that ends, well or
refused, removes the lock file and the folders it made for it that stayed empty, so a refused run
leaves nothing behind. Where ``fcntl`` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
from pathlib import Path

from gigagpt.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunLock:
    """An exclusive, non-blocking lock on a checkpoint folder, held until :meth:`release` or exit."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        self.path = folder.with_name(folder.name + ".lock")
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        self._made = _make_parents(self.path.parent)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(
                    f"another `gigagpt fit` ({holder}) is using {self.path.with_suffix('')}: wait for it to "
                    "end, or give this run another checkpoint.dirpath") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the one now at the path
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        atexit.register(self.release)  # a run refused after this point still leaves nothing behind
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still held: a waiting run then locks a fresh file
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        for folder in reversed(self._made):
            try:
                folder.rmdir()  # only when empty: the run's files stay
            except OSError:
                break

    __del__ = release


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``, returning the folders it created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for each in missing:
        each.mkdir(exist_ok=True)
    return missing


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _writable(folder: Path, setting: str) -> None:
    """``folder``, or the nearest folder above it that exists, takes a probe file; or one line saying
    why not. Nothing is created: the run makes its folders when it writes into them."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".gigagpt-write-probe.{os.getpid()}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{setting} {str(folder)!r} is not writable ({err.strerror or err}); choose a "
                          f"folder you can write to, or fix its permissions") from None


def checkpoint_bytes(module) -> int:
    """A checkpoint's size, estimated: float32 weights plus AdamW's two float32 moments per parameter
    (the model need not be built yet: GPTModule builds it in ``configure_model``)."""
    config = getattr(module, "config", None)
    count = config.num_params() if hasattr(config, "num_params") else sum(p.numel() for p in module.parameters())
    return count * (4 + 8)


def preflight(checkpoint_dirs: list[Path], log_dirs: list[Path], module, saves: bool = True) -> None:
    """Before step 0: every checkpoint and log folder writable, room for two checkpoints (``saves``:
    whether the run writes checkpoints at all; a run that only lowers or compiles the model does not)."""
    for folder in checkpoint_dirs:
        _writable(folder, "checkpoint.dirpath")
    for folder in log_dirs:
        _writable(folder, "the log folder")
    if not saves:
        return
    need = 2 * checkpoint_bytes(module)
    for folder in checkpoint_dirs:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free < need:
            raise ConfigError(
                f"checkpoint.dirpath {str(folder)!r} has {free / 2**20:.0f} MiB free, less than two "
                f"checkpoints of this model need (about {need / 2**20:.0f} MiB); free space there or choose "
                "another checkpoint.dirpath")


# -- which checkpoint of a run folder resumes -------------------------------------------------------
def peek_checkpoint(path: str | os.PathLike) -> dict | None:
    """A ``.ckpt``'s dictionary with its tensors memory-mapped, not read: cheap at any model size.
    ``None`` for what is not a zip checkpoint (Lightning's own loading reports those)."""
    import torch

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


def shape_differences(path: str | os.PathLike, config) -> list[str]:
    """``field: checkpoint value -> config value`` for every shape setting (of ``config``, a
    :class:`~gigagpt.model.GPTConfig`) that differs."""
    from gigagpt.model import SHAPE_FIELDS

    saved = saved_model_config(peek_checkpoint(path))
    if saved is None:
        return []
    current = config.to_dict()
    return [f"{name} {saved[name]} -> {current[name]}" for name in SHAPE_FIELDS
            if name in saved and saved[name] != current[name]]
