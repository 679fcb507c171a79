"""A dataset folder (``train.bin``, ``val.bin``, ``meta.json``) replaced as a whole, never in part.

``prepare`` writes the whole set into a temporary folder beside the target, fsyncs every file and
the folder, then puts it in place with one rename (onto a missing or empty target), or one atomic
exchange with the old folder (``renameat2(RENAME_EXCHANGE)``; where the kernel lacks it, two
renames, between which the target is briefly absent but never partial). A reader therefore sees
the old set, the new set, or no set, and a killed run leaves only a hidden temporary folder that
the next run on the same target removes.

(A manifest written last would leave readers to check hashes of every file on every start; a
folder rename costs them nothing.)
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
from pathlib import Path

DATASET_FILES = ("train.bin", "val.bin", "meta.json")
# what decides the dataset a folder holds; a rerun with the same recipe may replace it
RECIPE_KEYS = ("tokenizer", "vocab_size", "val_fraction", "seed", "piece_bytes", "source")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _temp_names(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(?:prepare|old)-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove the temporary folders killed runs on ``out`` left; refuse while another run writes."""
    if not out.parent.is_dir():
        return
    pattern = _temp_names(out)
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            raise ValueError(f"another gigagpt prepare (pid {pid}) is writing --output {out}; wait for it "
                             f"to end, or choose another --output")
        shutil.rmtree(entry, ignore_errors=True)


def check_output(out: Path, recipe: dict, force: bool) -> None:
    """Refuse, before any work, an output that is a file, holds other files, or holds a different
    dataset (without ``force``)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; give a folder (a new one, or one made by gigagpt prepare)")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ValueError(f"--output {out} cannot be made: {blocked} is a file, not a folder")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    others = [n for n in names if n not in DATASET_FILES and n.removesuffix(".partial") not in DATASET_FILES]
    if others:
        raise ValueError(f"--output {out} holds files that are not a gigagpt dataset ({', '.join(others[:3])}); "
                         "choose a new or empty folder")
    if not names or force:
        return
    try:
        old = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        old = {}
    if not isinstance(old, dict) or any(old.get(k) != recipe.get(k) for k in RECIPE_KEYS):
        was = ", ".join(f"{k} {old.get(k)!r}" for k in ("source", "tokenizer") if isinstance(old, dict))
        raise ValueError(f"--output {out} already holds a different dataset ({was or 'no readable meta.json'}); "
                         "pass --force to replace it, or choose another --output")


def make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it made, outermost first (to remove them on failure)."""
    made = []
    for parent in reversed([folder, *folder.parents]):
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    return made


def temp_folder(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.prepare-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    return tmp


def remove_made(made: list[Path]) -> None:
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def commit(tmp: Path, out: Path) -> None:
    """Put the complete, fsynced folder ``tmp`` in place of ``out`` in one step."""
    for name in DATASET_FILES:
        fsync_file(tmp / name)
    fsync_dir(tmp)
    if out.is_dir() and any(out.iterdir()):
        if _exchange(tmp, out):
            old = tmp  # the old set now lies under the temporary name
        else:
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(out, old)
            os.rename(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # onto nothing, or an empty folder
        fsync_dir(out.parent)
