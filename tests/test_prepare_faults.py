"""``prepare`` killed (SIGKILL) at each commit boundary never leaves a half set that looks complete,
and a rerun of the same command completes.

The kill is deterministic: a child process runs the real ``gigagpt prepare`` with the file-system
calls that commit data (``os.fsync``, ``os.replace``, ``os.rename``, ``shutil.rmtree`` and the
atomic folder exchange) wrapped so that the k-th of them kills the process before it happens; k
runs over every such call of an uninterrupted run, so every boundary between two commit steps is
hit once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from gigagpt.data import DataConfigError, GPTDataModule

DRIVER = r"""
import atexit, os, shutil, signal, sys
kill_at, calls = int(sys.argv[1]), [0]

def hooked(fn):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped

os.fsync, os.replace, os.rename = hooked(os.fsync), hooked(os.replace), hooked(os.rename)
shutil.rmtree = hooked(shutil.rmtree)
try:
    import gigagpt.dataset_folder as folder
    folder._exchange = hooked(folder._exchange)
except ImportError:
    pass
atexit.register(lambda: print(f"commit calls: {calls[0]}", file=sys.stderr))
from gigagpt.commands import main
main(sys.argv[2:])
"""


def run_prepare(args: list[str], kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", DRIVER, str(kill_at), "prepare", *args, "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=120)


def dataset(folder: Path) -> dict | None:
    """The set in ``folder``: file name -> sha256 (meta.json without its timing), None if absent."""
    if not folder.exists():
        return None
    out = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.name == "meta.json":
            meta = json.loads(data)
            meta.pop("seconds", None)
            data = json.dumps(meta, sort_keys=True).encode()
        out[path.name] = hashlib.sha256(data).hexdigest()
    return out


def loads(folder: Path) -> bool:
    """Whether training would take ``folder`` as a complete dataset."""
    try:
        GPTDataModule(path=str(folder), sequence_length=32, batch_size=2).resolve(vocab_size=256)
    except DataConfigError:
        return False
    return True


def corpus(path: Path, word: str) -> Path:
    path.write_text("".join(f"{word} line {i}: some text to tokenize\n" for i in range(3000)))
    return path


@pytest.mark.parametrize("replacing", [False, True], ids=["fresh", "replacing"])
def test_prepare_killed_at_each_commit_boundary(tmp_path, replacing):
    new_text, old_text = corpus(tmp_path / "new.txt", "new"), corpus(tmp_path / "old.txt", "old")
    args = [str(new_text), "--output", str(tmp_path / "data"), "--tokenizer", "bytes", "--val-fraction", "0.1",
            "--piece-bytes", "1024", *(["--force"] if replacing else [])]
    ref = run_prepare([*args[:2], str(tmp_path / "ref"), *args[3:]])
    assert ref.returncode == 0, ref.stderr
    new = dataset(tmp_path / "ref")
    old = None
    if replacing:
        made = run_prepare([str(old_text), *args[1:-1]])
        assert made.returncode == 0, made.stderr
        old = dataset(tmp_path / "data")
        shutil.copytree(tmp_path / "data", tmp_path / "old_copy")
    boundaries = int(run_prepare([*args[:2], str(tmp_path / "count"), *args[3:]]).stderr.split("commit calls: ")[1])
    assert boundaries >= 5
    for k in range(1, boundaries + 1):
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        if replacing:
            shutil.copytree(tmp_path / "old_copy", tmp_path / "data")
        killed = run_prepare(args, kill_at=k)
        assert killed.returncode == -9, f"kill {k}: {killed.stderr}"
        state = dataset(tmp_path / "data")
        # the old set, the new set, or (without an old one) none: never a mix, never a part
        assert state in ([old, new] if replacing else [None, new]), f"kill before commit call {k}: {state}"
        assert loads(tmp_path / "data") == (state is not None), f"kill {k}"
        rerun = run_prepare(args)
        assert rerun.returncode == 0, f"rerun after kill {k}: {rerun.stderr}"
        assert dataset(tmp_path / "data") == new, f"rerun after kill {k}"
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert leftovers == [], f"rerun after kill {k} left {leftovers}"
