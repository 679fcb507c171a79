"""Helpers of the cstorch tests (run only where cerebras-pytorch is installed: .venv-cerebras).

cstorch allows one backend per process, so every test that creates a backend runs in a fresh process
(``harness.py`` or the ``gigagpt`` command); the pytest process itself never creates one. (No conftest.py
here: the suite's own ``tests/conftest.py`` is imported as ``conftest`` by other tests.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("harness.py")


def subprocess_env(**extra) -> dict:
    """This checkout importable, the environment's bin/ on PATH (CSX lowering runs torch-cirh-opt)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def run_harness(kind: str, data: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(HARNESS), kind, str(data), str(out), *args],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {kind} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def result(out: Path) -> dict:
    res = json.loads((out / "result.json").read_text())
    for key in ("losses", "lrs", "val", "tokens", "lr_monitor"):
        res[key] = {int(k): v for k, v in res.get(key, {}).items()}
    return res


def run_cli(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gigagpt", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
