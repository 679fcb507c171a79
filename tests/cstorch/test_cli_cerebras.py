"""`gigagpt fit` with the shipped Cerebras configs: CPU backend training, CSX lowering, cluster errors."""

from __future__ import annotations

import csv

import pytest
from cs_helpers import ROOT, run_cli

pytest.importorskip("cerebras.pytorch")

TINY = ["--config", str(ROOT / "configs" / "tiny.yaml")]
CS_TINY = ["--config", str(ROOT / "configs" / "cerebras" / "tiny.yaml")]
VALIDATE = ["--config", str(ROOT / "configs" / "cerebras" / "validate.yaml")]
SMALL = ["--model.config.depth", "2", "--data.sequence_length", "64", "--data.batch_size", "8"]


def test_cpu_backend_fit_loss_falls_with_progress_bar_and_loggers(builtin_bytes, tmp_path):
    proc = run_cli("fit", *TINY, *CS_TINY, "--data.path", str(builtin_bytes), *SMALL,
                   "--trainer.max_steps", "30", "--trainer.val_check_interval", "15",
                   "--trainer.log_every_n_steps", "5", "--checkpoint.every_n_train_steps", "15",
                   "--model.optim.warmup_steps", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "train/loss" in proc.stdout and "val/loss" in proc.stdout  # the progress bar shows values
    with open(tmp_path / "runs/tiny/logs/version_0/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    val = {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}
    assert sorted(train) == [4, 9, 14, 19, 24, 29]
    assert train[29] < train[4] - 0.5
    assert sorted(val) == [14, 29] and val[29] < val[14]
    assert any((tmp_path / "runs/tiny/tensorboard").rglob("events.out.tfevents.*"))  # TensorBoard too
    ckpts = sorted(p.name for p in (tmp_path / "runs/tiny/checkpoints").iterdir())
    assert ckpts == ["last.mdl", "step0000015.mdl", "step0000030.mdl"]
    # the same command with a longer schedule continues from last.mdl (--resume auto)
    proc = run_cli("fit", *TINY, *CS_TINY, "--data.path", str(builtin_bytes), *SMALL,
                   "--trainer.max_steps", "32", "--trainer.val_check_interval", "15",
                   "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "15",
                   "--model.optim.warmup_steps", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Restored all states from the checkpoint at" in proc.stderr and "last.mdl" in proc.stderr
    # `gigagpt sample` on the Cerebras run folder (its last.mdl), from another folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("sample", str(tmp_path / "runs/tiny"), "--prompt", "The ", "--max-new-tokens", "8",
                   "--device", "cpu", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The ") and len(proc.stdout) > len("The \n")
    from gigagpt.checkpoint import safe_load

    assert safe_load(tmp_path / "runs/tiny/checkpoints/last.mdl")["tokenizer"]["name"] == "bytes"


def test_csx_validate_only_lowers_train_and_eval_steps(builtin_bytes, tmp_path):
    proc = run_cli("fit", *TINY, *CS_TINY, *VALIDATE, "--data.path", str(builtin_bytes), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    executors = sorted((tmp_path / "runs/tiny/cerebras/executors").glob("0*"))
    assert len(executors) == 2, executors  # the evaluation step (sanity check) and the training step
    for ex in executors:
        assert (ex / "cirh.mlir").stat().st_size > 0 and (ex / "torch.mlir").stat().st_size > 0
    train_ir = (executors[1] / "torch.mlir").read_text()
    assert "adam" in train_ir.lower() or "sqrt" in train_ir  # the optimizer update is in the train graph


def test_compile_only_without_cluster_is_one_clear_line(builtin_bytes, tmp_path):
    proc = run_cli("fit", *TINY, *CS_TINY, "--data.path", str(builtin_bytes),
                   "--trainer.strategy.init_args.backend", "CSX",
                   "--trainer.strategy.init_args.compile_only", "true", "--trainer.precision", "bf16-mixed",
                   cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gigagpt: no Cerebras cluster reachable") and "mgmt_address" in last, last
