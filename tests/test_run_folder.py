"""A run folder under ``gigagpt fit``: checks before step 0, resume from the newest complete
checkpoint, one ``fit`` at a time, temporary files of live writers left alone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from conftest import ROOT, run_gigagpt

from gigagpt.checkpoint import atomic_save, safe_load
from gigagpt.cli import cli_main

SMALL = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.config.depth", "1", "--model.config.width", "32",
         "--model.config.heads", "2", "--data.sequence_length", "32", "--data.batch_size", "2",
         "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--samples.every_n_steps", "0", "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]


def fit(data, cwd, *args, check=False):
    return run_gigagpt("fit", *SMALL, "--data.path", str(data), *args, cwd=cwd, check=check)


def one_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


# -- pre-flight -----------------------------------------------------------------------------------------
def test_unwritable_checkpoint_folder_is_refused_before_step_0(builtin_bytes, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    proc = fit(builtin_bytes, tmp_path, "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "1",
               "--checkpoint.dirpath", str(tmp_path / "a_file" / "checkpoints"))
    line = one_line(proc)
    assert line.startswith("gigagpt: checkpoint.dirpath") and "not writable" in line, line
    assert not list(tmp_path.rglob("metrics.csv")), "it trained before refusing"


def test_unwritable_log_folder_is_refused_before_step_0(builtin_bytes, tmp_path):
    (tmp_path / "runs").write_text("a file where the log folder's parent should be")
    proc = fit(builtin_bytes, tmp_path, "--trainer.max_steps", "2", "--checkpoint.dirpath", str(tmp_path / "ckpt"))
    line = one_line(proc)
    assert line.startswith("gigagpt: the log folder") and "runs/tiny" in line, line
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_full_disk_is_refused_before_step_0(builtin_bytes, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10_000, 10_000))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *SMALL, "--data.path", str(builtin_bytes), "--trainer.max_steps", "2"])
    message = str(exc.value.code)
    assert message.startswith("gigagpt: checkpoint.dirpath") and "free" in message and "\n" not in message, message
    assert not list(tmp_path.rglob("metrics.csv")) and not list(tmp_path.rglob("*.ckpt"))


# -- resume ---------------------------------------------------------------------------------------------
def test_resume_takes_the_newest_complete_checkpoint_step_files_included(builtin_bytes, tmp_path):
    """A kill during the write of ``last.ckpt`` at step 6 leaves ``last.ckpt`` of step 3 beside a complete
    ``step0000006.ckpt`` (and a truncated temporary file); a newer ``step`` file is truncated."""
    args = ["--checkpoint.every_n_train_steps", "3", "--trainer.val_check_interval", "3"]
    fit(builtin_bytes, tmp_path, "--trainer.max_steps", "6", *args, check=True)
    folder = tmp_path / "runs/tiny/checkpoints"
    shutil.copyfile(folder / "step0000003.ckpt", folder / "last.ckpt")
    (folder / ".last.ckpt.999999999.tmp").write_bytes((folder / "step0000006.ckpt").read_bytes()[:1000])
    (folder / "step0000009.ckpt").write_bytes((folder / "step0000006.ckpt").read_bytes()[:5000])
    proc = fit(builtin_bytes, tmp_path, "--trainer.max_steps", "9", *args, check=True)
    assert f"gigagpt: resuming from {folder / 'step0000006.ckpt'} (step 6" in proc.stderr + proc.stdout
    assert f"passing over {folder / 'step0000009.ckpt'}" in proc.stderr + proc.stdout
    assert safe_load(folder / "last.ckpt")["global_step"] == 9
    assert safe_load(folder / "step0000009.ckpt")["global_step"] == 9  # rewritten whole
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt",
                                                        "step0000009.ckpt"]  # no -v1 duplicates, no temp


def test_folder_with_only_broken_checkpoints_is_not_restarted_from_step_0(builtin_bytes, tmp_path):
    folder = tmp_path / "runs/tiny/checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    proc = fit(builtin_bytes, tmp_path, "--trainer.max_steps", "2")
    line = one_line(proc)
    assert "none is complete" in line and "--resume never" in line, line
    assert (folder / "last.ckpt").read_bytes() == b"PK\x03\x04 truncated"  # untouched


# -- one fit per folder ---------------------------------------------------------------------------------
def test_second_fit_on_the_same_folder_is_refused_and_a_dead_holder_does_not_block(builtin_bytes, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    first = subprocess.Popen([sys.executable, "-m", "gigagpt", "fit", *SMALL, "--data.path", str(builtin_bytes),
                              "--trainer.max_steps", "100000"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "runs/tiny/checkpoints.lock"
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first fit did not start"
            time.sleep(0.05)
        second = fit(builtin_bytes, tmp_path, "--trainer.max_steps", "2")
        line = one_line(second)
        assert line.startswith("gigagpt: another `gigagpt fit` (pid") and str(first.pid) in line, line
        assert "checkpoint.dirpath" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert f"pid {first.pid}" in lock.read_text()  # the dead holder's lock file is still there
    third = fit(builtin_bytes, tmp_path, "--trainer.max_steps", "1")
    assert third.returncode == 0, third.stderr[-3000:]


def test_stale_temp_cleanup_removes_only_temps_of_ended_writers(tmp_path):
    target = tmp_path / "last.ckpt"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tmp = target.with_name(f".last.ckpt.{int(ended.stdout)}.tmp")
        live_tmp = target.with_name(f".last.ckpt.{live.pid}.tmp")
        for tmp in (dead_tmp, live_tmp):
            tmp.write_bytes(b"half a checkpoint")
        atomic_save({"x": torch.ones(2)}, target)
        assert not dead_tmp.exists()
        assert live_tmp.exists(), "removed the temporary file a live writer is writing"
    finally:
        live.kill()
        live.wait()
