"""Fine-tuning on the Cerebras path (CPU backend): a fresh run from a .ckpt's weights, then from the .mdl it wrote."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from cs_helpers import ROOT, run_cli

from gigagpt.checkpoint import load_model, save_lightning_checkpoint
from gigagpt.model import GPT, GPTConfig

pytest.importorskip("cerebras.pytorch")

SHAPE = ["--model.config.depth=2", "--model.config.max_position_embeddings=64", "--data.sequence_length=64",
         "--data.batch_size=4", "--model.optim.lr=1e-4", "--model.optim.warmup_steps=1",
         "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
         "--data.val_batches=1", "--samples.every_n_steps=0"]


def fine_tune(data, run, init_from):
    proc = run_cli("fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config",
                   str(ROOT / "configs/cerebras/tiny.yaml"), f"--data.path={data}", *SHAPE,
                   f"--model.init_from={init_from}", f"--trainer.default_root_dir={run}",
                   f"--checkpoint.dirpath={run}/checkpoints", "--trainer.logger=false", cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"starting from the weights of {init_from}" in proc.stdout + proc.stderr
    return load_model(run / "checkpoints/last.mdl")


def max_difference(a, b) -> float:
    a, b = a.state_dict(), b.state_dict()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_cerebras_fine_tune_from_ckpt_and_mdl(builtin_bytes, tmp_path):
    torch.manual_seed(0)
    source = GPT(replace(GPTConfig.from_name("tiny"), depth=2, max_position_embeddings=64))
    save_lightning_checkpoint(source, tmp_path / "source.ckpt")
    first = fine_tune(builtin_bytes, tmp_path / "a", tmp_path / "source.ckpt")
    # two AdamW steps at lr 1e-4 move each weight by about 2e-4; a random start differs by ~0.1
    assert 0 < max_difference(first, source) < 2e-3
    second = fine_tune(builtin_bytes, tmp_path / "b", tmp_path / "a/checkpoints/last.mdl")
    assert 0 < max_difference(second, first) < 2e-3
