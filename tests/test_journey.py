"""A user's whole journey, offline, in a temporary folder: own text -> GPT-2 BPE -> train -> sample ->
Hugging Face -> the same greedy tokens -> fine-tune from the export -> sample again."""

import shutil

import pytest
from conftest import ROOT, run_gigagpt
from test_hf_export import greedy_new_tokens

from gigagpt.checkpoint import load_checkpoint
from gigagpt.tokenizer import gpt2_from_file

# A CPU-sized model; its vocabulary comes from the data (GPT-2's), its folders from the run name.
CONFIG = """\
trainer: {accelerator: cpu, devices: 1, precision: 32-true, max_steps: 4, val_check_interval: 4,
          check_val_every_n_epoch: null, limit_val_batches: 1, log_every_n_steps: 1, logger: false}
model:
  config: {max_position_embeddings: 64, depth: 1, width: 64, heads: 4}
  optim: {lr: 1.0e-3, warmup_steps: 1}
data: {sequence_length: 64, batch_size: 4, val_batches: 1}
checkpoint: {every_n_train_steps: 4}
samples: {every_n_steps: 0}
"""
PROMPT = "The model"


def sample(ckpt, cwd, n=8):
    return run_gigagpt("sample", str(ckpt), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(n),
                       "--ignore-eot", cwd=cwd).stdout


@pytest.mark.slow
def test_own_text_to_hugging_face_and_back_to_fine_tuning(tmp_path):
    pytest.importorskip("transformers")
    texts = tmp_path / "my_texts"
    texts.mkdir()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        shutil.copy(doc, texts / doc.name)
    ranks = tmp_path / "gpt2.tiktoken"
    shutil.copy(ROOT / "tests/data/gpt2.tiktoken", ranks)
    (tmp_path / "mine.yaml").write_text(CONFIG)
    run_gigagpt("prepare", "my_texts", "-o", "data/mine", "--tokenizer", str(ranks), "--val-fraction", "0.2",
                "--no-progress", cwd=tmp_path)
    run_gigagpt("fit", "--config", "mine.yaml", "--data.path", "data/mine", "--run", "runs/mine", cwd=tmp_path)
    ckpt = tmp_path / "runs/mine/checkpoints/last.ckpt"
    trained = sample(ckpt, tmp_path)
    assert trained.startswith(PROMPT)

    run_gigagpt("export", str(ckpt), "hf/mine", cwd=tmp_path)
    new = greedy_new_tokens(tmp_path / "hf/mine", PROMPT, 8)
    assert trained == PROMPT + gpt2_from_file(ranks).decode(new) + "\n"

    proc = run_gigagpt("fit", "--config", "mine.yaml", "--data.path", "data/mine", "--model.init_from", "hf/mine",
                       "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                       "--run", "runs/tuned", cwd=tmp_path)
    assert "starting from the weights of hf/mine" in proc.stdout + proc.stderr
    tuned = tmp_path / "runs/tuned/checkpoints/last.ckpt"
    assert load_checkpoint(tuned)["global_step"] == 2  # a fresh optimizer and schedule
    again = sample(tuned, tmp_path / "runs")  # from another folder: the tokenizer is found by its hash
    assert again.startswith(PROMPT) and len(again) > len(PROMPT)
