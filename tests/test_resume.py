"""Exact resume: an interrupted run, resumed from its last checkpoint, repeats an uninterrupted run.

The run (tests/resume_harness.py) is a 2-block GPT with dropout 0.1, warmup + cosine, gradient
clipping, a checkpoint every 3 steps and validation every 4. Every per-step training loss and
learning rate and every validation loss is recorded as ``float.hex`` and compared for equality.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import resume_harness as H

from gigagpt.checkpoint import safe_load

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 16


class Crash(L.Callback):
    """Raises at optimizer step ``step``: after the step (before its checkpoint), or inside validation."""

    def __init__(self, step: int, during_validation: bool = False):
        self.step, self.during_validation = step, during_validation

    def on_train_batch_end(self, trainer, *args):
        if not self.during_validation and trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")

    def on_validation_batch_end(self, trainer, *args, **kwargs):
        if self.during_validation and trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash in validation at step {self.step}")


@pytest.fixture(scope="module")
def reference(builtin_bytes, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    H.fit(root, builtin_bytes, MAX_STEPS)
    record = H.read_record(root)
    assert sorted(record["train"]) == list(range(1, MAX_STEPS + 1))
    assert sorted(record["val"]) == [4, 8, 12, 16]
    return record


def assert_same_run(reference, got):
    for kind in ("train", "val"):
        differ = [s for s in reference[kind] if reference[kind][s] != got[kind].get(s)]
        assert not differ, f"{kind} differs from the uninterrupted run at steps {differ}"
        assert set(got[kind]) == set(reference[kind])


def last_step(root: Path) -> int:
    return safe_load(root / "checkpoints" / "last.ckpt")["global_step"]


@pytest.mark.parametrize(
    ("step", "during_validation", "expected_last"),
    [
        (7, False, 6),  # between checkpoints: steps 7 is redone
        (9, False, 6),  # at a checkpoint step, before its checkpoint is written
        (10, False, 9),  # right after a checkpoint, in the middle of a validation interval
        (8, True, 6),  # inside validation
    ],
)
def test_crash_then_resume_is_exact(reference, builtin_bytes, tmp_path, step, during_validation, expected_last):
    with pytest.raises(RuntimeError, match="simulated crash"):
        H.fit(tmp_path, builtin_bytes, MAX_STEPS, callbacks=[Crash(step, during_validation)])
    assert last_step(tmp_path) == expected_last
    H.fit(tmp_path, builtin_bytes, MAX_STEPS, ckpt_path="last")
    assert_same_run(reference, H.read_record(tmp_path))


def test_crash_in_validation_of_the_checkpoint_step(reference, builtin_bytes, tmp_path):
    """Step 12 is saved, then its validation crashes. Training resumes exactly; Lightning does not
    repeat the validation that was due at the restored step (it fast-forwards it), so that one
    validation loss is missing from the resumed run while every later one matches."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        H.fit(tmp_path, builtin_bytes, MAX_STEPS, callbacks=[Crash(12, during_validation=True)])
    assert last_step(tmp_path) == 12
    H.fit(tmp_path, builtin_bytes, MAX_STEPS, ckpt_path="last")
    got = H.read_record(tmp_path)
    assert got["train"] == reference["train"]
    assert 12 not in got["val"]
    assert got["val"] == {s: v for s, v in reference["val"].items() if s != 12}


def test_resume_twice_is_exact(reference, builtin_bytes, tmp_path):
    for step in (5, 11):
        with pytest.raises(RuntimeError):
            H.fit(tmp_path, builtin_bytes, MAX_STEPS, callbacks=[Crash(step)])
    H.fit(tmp_path, builtin_bytes, MAX_STEPS, ckpt_path="last")
    assert_same_run(reference, H.read_record(tmp_path))


def test_resume_without_checkpoint_starts_fresh(reference, builtin_bytes, tmp_path):
    """``ckpt_path="last"`` on an empty folder is a fresh run (what auto-resume relies on)."""
    with pytest.warns(UserWarning, match="no last checkpoint"):
        H.fit(tmp_path, builtin_bytes, MAX_STEPS, ckpt_path="last")
    assert_same_run(reference, H.read_record(tmp_path))


def _script(root: Path, data: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "resume_harness.py"), str(root), str(data), str(MAX_STEPS), *flags],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training process exited early ({proc.returncode}):\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.01)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _resume_in_subprocess(root: Path, data: Path) -> None:
    proc = _script(root, data, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def test_kill9_then_resume_is_exact(reference, builtin_bytes, tmp_path):
    """SIGKILL a training process after step 8 has run (last checkpoint: step 6), then resume."""
    proc = _script(tmp_path, builtin_bytes)
    _wait_for(lambda: len(H.read_record(tmp_path)["train"]) >= 8, proc)
    _kill9(proc)
    killed_at = max(H.read_record(tmp_path)["train"])
    assert killed_at < MAX_STEPS, "the process finished before it was killed"
    assert last_step(tmp_path) <= killed_at
    _resume_in_subprocess(tmp_path, builtin_bytes)
    assert_same_run(reference, H.read_record(tmp_path))


def test_kill9_during_checkpoint_write_resumes_from_last_complete(reference, builtin_bytes, tmp_path):
    """SIGKILL while ``last.ckpt`` of step 9 is half written: ``last`` still names step 6's complete file."""
    proc = _script(tmp_path, builtin_bytes, "--slow-writes")
    marker = tmp_path / "writing"

    def writing_last_of_step_9() -> bool:
        # Each checkpoint step writes step<k>.ckpt then last.ckpt: write 6 is last.ckpt of step 9.
        text = marker.read_text() if marker.exists() else ""
        return text.startswith("6 ") and ".last.ckpt." in text

    _wait_for(writing_last_of_step_9, proc)
    _kill9(proc)
    partial = Path(marker.read_text().split(" ", 1)[1])
    assert partial.exists(), "the kill should have left the half-written temporary file"
    with pytest.raises(ValueError, match="truncated"):
        safe_load(partial)  # half a file: unreadable
    assert last_step(tmp_path) == 6  # the previous complete checkpoint, untouched
    _resume_in_subprocess(tmp_path, builtin_bytes)
    assert not partial.exists(), "the next write of last.ckpt removes the stale temporary file"
    assert last_step(tmp_path) == 15  # the last checkpoint step (every 3) of the resumed run
    assert_same_run(reference, H.read_record(tmp_path))


# -- the same run from a sharded token store ----------------------------------------------------------
SHARD_TOKENS = 10_000  # the built-in corpus's ~420k training tokens in ~42 shards; windows cross shard ends


@pytest.fixture(scope="module")
def builtin_shards(builtin_bytes, tmp_path_factory) -> Path:
    """``builtin_bytes`` cut into a sharded store: the same token streams, in many files."""
    from gigagpt.shards import split_dataset

    out = tmp_path_factory.mktemp("builtin_shards")
    manifest = split_dataset(builtin_bytes, out, SHARD_TOKENS)
    assert len(manifest["shards"]["train"]) > 20
    return out


def test_sharded_store_trains_like_the_single_file(reference, builtin_shards, tmp_path):
    """Every per-step training loss and validation loss equals the single-file run's."""
    H.fit(tmp_path, builtin_shards, MAX_STEPS)
    assert_same_run(reference, H.read_record(tmp_path))


def test_crash_then_resume_from_a_sharded_store_is_exact(reference, builtin_shards, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        H.fit(tmp_path, builtin_shards, MAX_STEPS, callbacks=[Crash(7)])
    assert last_step(tmp_path) == 6
    H.fit(tmp_path, builtin_shards, MAX_STEPS, ckpt_path="last")
    assert_same_run(reference, H.read_record(tmp_path))


def test_remote_store_trains_like_the_single_file_within_its_cache(reference, builtin_shards, tmp_path):
    """The store in an fsspec file system (``memory://``, in this process): shards are fetched into
    a local cache bounded to 3 shards' bytes, and the run is the single-file run."""
    import fsspec

    from gigagpt.store import ShardCache

    url = f"memory://gigagpt-test-{os.getpid()}/store"
    fs = fsspec.filesystem("memory")
    fs.put(str(builtin_shards), url.removeprefix("memory://"), recursive=True)
    cache, limit = tmp_path / "cache", 3 * 2 * SHARD_TOKENS  # uint16: 2 bytes a token
    sizes = []

    class Watch(L.Callback):
        def on_train_batch_end(self, *args):
            sizes.append(ShardCache(cache, limit).cached_bytes())

    try:
        H.fit(tmp_path, url, MAX_STEPS, callbacks=[Watch()],
              data_options={"cache_dir": str(cache), "cache_gb": limit / 1e9})
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)
    assert_same_run(reference, H.read_record(tmp_path))
    assert 0 < max(sizes) <= limit, sizes
