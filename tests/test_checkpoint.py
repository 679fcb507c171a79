"""Checkpoint files: atomic writes, weights_only loading, clear errors for bad or mismatched files."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from gigagpt.checkpoint import (
    AtomicCheckpointIO,
    atomic_save,
    check_shapes,
    load_model,
    safe_load,
    temp_path_for,
)
from gigagpt.model import GPT, GPTConfig


def test_atomic_save_replaces_whole_file_and_cleans_stale_temp(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save({"x": torch.ones(3)}, target)
    stale = target.with_name(f".{target.name}.99999.tmp")
    stale.write_bytes(b"half a checkpoint")
    atomic_save({"x": torch.zeros(3)}, target)
    assert torch.equal(safe_load(target)["x"], torch.zeros(3))
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_failed_write_keeps_previous_file(tmp_path):
    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"step": 1}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError, match="serialisation failed"):
        io_plugin.save_checkpoint({"step": 2, "bad": Boom()}, target)
    assert io_plugin.load_checkpoint(target) == {"step": 1}
    assert not temp_path_for(target).exists()


def test_sigkill_mid_write_leaves_previous_file(tmp_path):
    """A process killed while writing a 40 MB checkpoint leaves the old complete file in place."""
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.zeros(4)}, target)
    script = (
        "import sys, time, torch\n"
        "from gigagpt.checkpoint import atomic_write\n"
        "data = torch.ones(10_000_000)\n"
        "def slow(f):\n"
        "    torch.save({'step': 2, 'w': data}, f); f.flush(); print('written', flush=True); time.sleep(60)\n"
        f"atomic_write({str(target)!r}, slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "written"  # bytes are out, rename not yet done
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert safe_load(target)["step"] == 1
    assert temp_path_for(target).with_name(f".last.ckpt.{proc.pid}.tmp").exists()


def test_weights_only_refuses_code(tmp_path):
    path = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": Payload()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_empty_and_truncated_files_have_clear_errors(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        safe_load(empty)
    full = tmp_path / "full.ckpt"
    torch.save({"w": torch.ones(1000)}, full)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated"):
        safe_load(cut)
    with pytest.raises(FileNotFoundError):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_shape_mismatch_names_keys_and_sizes(tmp_path):
    small = GPT(GPTConfig(vocab_size=256, max_position_embeddings=32, depth=1, width=32, heads=2))
    big = GPT(GPTConfig(vocab_size=256, max_position_embeddings=32, depth=1, width=64, heads=2))
    with pytest.raises(ValueError) as info:
        check_shapes(big, small.state_dict())
    assert "wte.weight: checkpoint has (256, 32), model expects (256, 64)" in str(info.value)


def test_lightning_checkpoint_loads_weights_only(builtin_bytes, tmp_path):
    """A real Lightning checkpoint of GPTModule holds only tensors and plain data."""
    import resume_harness as H

    H.fit(tmp_path, builtin_bytes, 3)
    ckpt = safe_load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and "optimizer_states" in ckpt
    model = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert model.config == H.CONFIG


def test_find_checkpoint_picks_the_newest_last_version(tmp_path):
    """A fresh run (``--resume never``) in an old run's folder writes ``last-v1.ckpt`` beside the
    old ``last.ckpt``; a run folder must resolve to the new one."""
    from gigagpt.checkpoint import find_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    files = {}
    for name, step, mtime in [
        ("last.ckpt", 9, 1_000_000),           # the old run
        ("step0000009.ckpt", 9, 1_000_000),
        ("last-v1.ckpt", 3, 2_000_000),        # the fresh run
        ("step0000003-v1.ckpt", 3, 2_000_000),
        ("lastly.ckpt", 0, 3_000_000),          # newer, but not a "last" checkpoint
    ]:
        files[name] = folder / name
        atomic_save({"global_step": step, "state_dict": {}}, files[name])
        os.utime(files[name], (mtime, mtime))

    found = find_checkpoint(tmp_path)
    assert found == files["last-v1.ckpt"]
    assert safe_load(found)["global_step"] == 3

    # the old run resumed later: its last.ckpt is newest again
    os.utime(files["last.ckpt"], (2_500_000, 2_500_000))
    assert find_checkpoint(tmp_path) == files["last.ckpt"]

    # equal times: the highest version number
    v2 = folder / "last-v2.ckpt"
    atomic_save({"global_step": 5, "state_dict": {}}, v2)
    for path in (files["last.ckpt"], files["last-v1.ckpt"], v2):
        os.utime(path, (4_000_000, 4_000_000))
    assert find_checkpoint(tmp_path) == v2
    assert find_checkpoint(v2) == v2  # a file is itself
