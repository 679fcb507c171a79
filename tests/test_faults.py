"""Faults: ``kill -9`` of a real ``gigagpt fit`` at seeded random points, inside checkpoint writes too.

One run of 30 steps (dropout on, a checkpoint every 3 steps, validation every 6) is killed 5 times,
each time rerun with the same command (auto-resume); the run that finishes must end bit-identical
(weights, AdamW moments, LR schedule, step) to an uninterrupted run. After every kill each
checkpoint under a final name must load, and at the end no ``-v1`` duplicates or temporary files
are left. ``fault_fit.py`` is the real command with writes slowed and announced so that a kill can
land inside one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from gigagpt.checkpoint import safe_load

MAX_STEPS, EVERY = 30, 3
ARGS = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.config.depth", "2",
        "--model.config.width", "32", "--model.config.heads", "2", "--model.config.dropout", "0.1",
        "--data.sequence_length", "32", "--data.batch_size", "4", "--trainer.max_steps", str(MAX_STEPS),
        "--checkpoint.every_n_train_steps", str(EVERY), "--trainer.val_check_interval", "6",
        "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--samples.every_n_steps", "0", "--model.optim.warmup_steps", "5"]


def start(cwd: Path, data: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "GIGAGPT_FAULT_LOG": str(cwd / "fault.log"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_fit.py"), *ARGS, "--data.path", str(data)],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def events(cwd: Path) -> list[list[str]]:
    path = cwd / "fault.log"
    return [line.split(" ", 1) for line in path.read_text().splitlines()] if path.exists() else []


def run_until(proc: subprocess.Popen, cwd: Path, kind: str, count: int, timeout: float = 240) -> str | None:
    """Wait for the ``count``-th event of ``kind`` (``step`` or ``write-half``) of this process, then
    SIGKILL it; its argument (a temporary file for writes). ``None`` if the run ended first."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [arg for k, arg in events(cwd) if k == kind]
        if len(seen) >= count:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stderr.close()
            return seen[count - 1]
        if proc.poll() is not None:
            err = proc.stderr.read()
            assert proc.returncode == 0, err[-3000:]
            return None
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.005)


def final_state(cwd: Path) -> dict:
    return safe_load(cwd / "runs/tiny/checkpoints/last.ckpt")


def assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def reference(builtin_bytes, tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = start(cwd, builtin_bytes)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return final_state(cwd)


def test_kill9_at_random_points_then_rerun_is_bit_identical(reference, builtin_bytes, tmp_path):
    rng = random.Random(20261130)
    # Five kills: two or more inside a checkpoint write (the k-th write of that process), the others after
    # the n-th step of that process.
    plan = [("write-half", rng.randint(1, 4)) if i in (1, 3) or rng.random() < 0.3 else ("step", rng.randint(1, 7))
            for i in range(5)]
    folder = tmp_path / "runs/tiny/checkpoints"
    kills = []
    for kind, count in plan:
        (tmp_path / "fault.log").unlink(missing_ok=True)
        hit = run_until(start(tmp_path, builtin_bytes), tmp_path, kind, count)
        if hit is None:
            break
        kills.append((kind, count, hit))
        if kind == "write-half":
            assert Path(hit).exists(), "the kill should have left the half-written temporary file"
        for path in folder.glob("*.ckpt"):  # whatever is under a final name is complete
            assert safe_load(path)["global_step"] % EVERY == 0
    assert len(kills) == 5, f"the run finished after {len(kills)} kills: {kills}"
    assert sum(kind == "write-half" for kind, _, _ in kills) >= 2
    (tmp_path / "fault.log").unlink(missing_ok=True)
    proc = start(tmp_path, builtin_bytes)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    got = final_state(tmp_path)
    assert got["global_step"] == MAX_STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "global_step"):
        assert_identical(reference[key], got[key], key)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["last.ckpt", *[f"step{s:07d}.ckpt" for s in range(EVERY, MAX_STEPS + 1, EVERY)]], names
