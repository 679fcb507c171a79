"""A training run's folders: one ``fit`` at a time (an advisory lock) and checks before step 0.

The lock is ``fcntl.flock`` on ``<checkpoint folder>.lock``, which records the holder's pid and
host. The kernel drops it when the holder's process ends, however it ends (``kill -9``
included), so a lock file left by a dead run never blocks the next one. Where ``fcntl`` does not
exist (Windows) no lock is taken.
"""

from __future__ import annotations

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

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"another `gigagpt fit` ({holder}) is using {self.path.with_suffix('')}: wait for it to end, "
                "or give this run another checkpoint.dirpath") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    __del__ = release


def _writable(folder: Path, setting: str) -> None:
    """Create ``folder`` if needed and write a probe file into it, or one line saying why not."""
    probe = folder / f".gigagpt-write-probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
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


def preflight(checkpoint_dirs: list[Path], log_dirs: list[Path], module) -> None:
    """Before step 0: every checkpoint and log folder writable, room for two checkpoints."""
    for folder in checkpoint_dirs:
        _writable(folder, "checkpoint.dirpath")
    for folder in log_dirs:
        _writable(folder, "the log folder")
    need = 2 * checkpoint_bytes(module)
    for folder in checkpoint_dirs:
        free = shutil.disk_usage(folder).free
        if free < need:
            raise ConfigError(
                f"checkpoint.dirpath {str(folder)!r} has {free / 2**20:.0f} MiB free, less than two "
                f"checkpoints of this model need (about {need / 2**20:.0f} MiB); free space there or choose "
                "another checkpoint.dirpath")
