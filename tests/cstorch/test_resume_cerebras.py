"""Auto-resume on the Cerebras path: from ``.ckpt`` files as from ``.mdl``, never silently from step 0."""

from __future__ import annotations

import pytest
from cs_helpers import ROOT, run_cli

pytest.importorskip("cerebras.pytorch")

from gigagpt.checkpoint import safe_load  # noqa: E402

BASE = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.config.depth", "1", "--model.config.width", "32",
        "--model.config.heads", "2", "--data.sequence_length", "32", "--data.batch_size", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--samples.every_n_steps", "0",
        "--checkpoint.every_n_train_steps", "2", "--trainer.val_check_interval", "2"]
CEREBRAS = ["--config", str(ROOT / "configs" / "cerebras" / "tiny.yaml")]


def test_resumes_from_a_plain_last_ckpt(builtin_bytes, tmp_path):
    """A Cerebras run's checkpoint converted to ``last.ckpt`` (the only file left) is resumed, not ignored."""
    from gigagpt.accelerators.checkpoint_io import convert_checkpoint

    data = ["--data.path", str(builtin_bytes)]
    proc = run_cli("fit", *BASE, *CEREBRAS, *data, "--trainer.max_steps", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "runs/tiny/checkpoints"
    convert_checkpoint(folder / "last.mdl", folder / "last.ckpt")
    for mdl in folder.glob("*.mdl"):
        mdl.unlink()
    proc = run_cli("fit", *BASE, *CEREBRAS, *data, "--trainer.max_steps", "6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"gigagpt: resuming from {folder / 'last.ckpt'} (step 4" in proc.stderr
    assert f"Restored all states from the checkpoint at {folder / 'last.ckpt'}" in proc.stderr, proc.stderr[-3000:]
    assert "no last checkpoint" not in proc.stderr
    assert safe_load(folder / "last.mdl")["global_step"] == 6
    assert sorted(p.name for p in folder.glob("step*")) == ["step0000006.mdl"]  # steps 2 and 4 not redone


def test_a_plain_trainer_checkpoint_is_refused_in_one_line(builtin_bytes, tmp_path):
    """torch AdamW state (a run on the plain Trainer) cannot continue under cstorch's optimizer: one line,
    not a fresh run over the folder."""
    data = ["--data.path", str(builtin_bytes)]
    proc = run_cli("fit", *BASE, *data, "--trainer.max_steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("fit", *BASE, *CEREBRAS, *data, "--trainer.max_steps", "4", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gigagpt: cannot resume from") and "--resume never" in last, last
    assert not list((tmp_path / "runs/tiny/checkpoints").glob("*.mdl"))
