"""A plain run prints what gigagpt means to say: no warning or tip the project did not write."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_gigagpt

TINY = str(ROOT / "configs" / "tiny.yaml")
# A line someone else's code printed as a warning or a tip: Python's warning format (``file.py:12: ...``),
# a named warning class, a deprecation, Lightning's tips, and a model summary's empty FLOP count.
NOISE = re.compile(r"\.py:\d+: |Warning\b|deprecat|\bTip\b|Total FLOPs: 0\b|MeanMetric|not empty", re.IGNORECASE)


def _noise(proc) -> list[str]:
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if NOISE.search(line) and not line.startswith("gigagpt")]


@pytest.mark.slow
def test_plain_fit_validate_sample_on_tiny_print_no_foreign_warnings(builtin_bytes, tmp_path):
    short = ["--config", TINY, f"--data.path={builtin_bytes}", "--trainer.limit_val_batches=1",
             "--data.val_batches=1", "--trainer.val_check_interval=2", "--model.optim.warmup_steps=1",
             "--samples.every_n_steps=0"]
    runs = {
        "fit": run_gigagpt("fit", *short, "--trainer.max_steps=2", cwd=tmp_path, fresh=True),
        "fit (resumed)": run_gigagpt("fit", *short, "--trainer.max_steps=4", cwd=tmp_path, fresh=True),
        "validate": run_gigagpt("validate", *short, cwd=tmp_path, fresh=True),
        "sample": run_gigagpt("sample", "runs/tiny", "--max-new-tokens", "8", cwd=tmp_path, fresh=True),
    }
    noise = {name: lines for name, proc in runs.items() if (lines := _noise(proc))}
    assert not noise, noise
    assert "training FLOPs per token" in runs["fit"].stderr  # gigagpt's summary, not Lightning's table
    assert "resuming from" in runs["fit (resumed)"].stderr + runs["fit (resumed)"].stdout
    events = list((tmp_path / "runs" / "tiny" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and not any(b"hp_metric" in path.read_bytes() for path in events)
