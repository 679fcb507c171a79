"""Fine-tuning: a fresh run that starts from the weights of a .ckpt, a .mdl or a Hugging Face GPT-2 folder."""

import shutil

import pytest
import torch
from conftest import ROOT, run_gigagpt

from gigagpt.checkpoint import load_checkpoint, load_model, save_lightning_checkpoint

# tiny.yaml's width and heads, two layers, the byte-level vocabulary: a fine-tune of a random GPT-2
SHAPE = ["--model.config.depth=2", "--data.sequence_length=64", "--data.batch_size=4",
         "--model.config.max_position_embeddings=64", "--model.config.activation=gelu_tanh"]


def random_hf_gpt2(folder, depth=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=depth, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def fit(run, data, *args, steps=2, check=True):
    return run_gigagpt(
        "fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={data}", *SHAPE,
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--data.val_batches=1", "--model.optim.warmup_steps=1", "--model.optim.lr=1e-4",
        f"--trainer.default_root_dir={run}", f"--checkpoint.dirpath={run}/checkpoints",
        f"--trainer.logger=[{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: '{run}'}}}}]",
        "--samples.every_n_steps=0", *args, cwd=run, check=check,
    )


def max_difference(a, b) -> float:
    a, b = a.state_dict(), b.state_dict()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fine_tune_from_a_hugging_face_folder_then_resume_it(builtin_bytes, tmp_path):
    source = load_model(random_hf_gpt2(tmp_path / "hf"))
    run = tmp_path / "run"
    run.mkdir()
    proc = fit(run, builtin_bytes, f"--model.init_from={tmp_path / 'hf'}")
    assert f"starting from the weights of {tmp_path / 'hf'}" in proc.stderr + proc.stdout
    tuned = load_model(run / "checkpoints/last.ckpt")
    # two AdamW steps at lr 1e-4 move each weight by about 2e-4; a random start differs by ~0.1
    assert max_difference(tuned, source) < 2e-3
    ckpt = load_checkpoint(run / "checkpoints/last.ckpt")
    assert ckpt["global_step"] == 2  # a fresh schedule: the source has no steps of its own
    # the fine-tune's own folder resumes (it does not start again from the source)
    proc = fit(run, builtin_bytes, f"--model.init_from={tmp_path / 'hf'}", steps=3)
    assert "resuming from" in proc.stderr + proc.stdout
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 3
    assert max_difference(load_model(run / "checkpoints/last.ckpt"), tuned) < 1e-3


def test_fine_tune_from_an_exported_checkpoint(builtin_bytes, tmp_path):
    """`gigagpt export HF x.ckpt` then `fit --ckpt_path x.ckpt`: one line pointing at model.init_from, which works."""
    random_hf_gpt2(tmp_path / "hf")
    run_gigagpt("export", str(tmp_path / "hf"), str(tmp_path / "x.ckpt"))
    run = tmp_path / "run"
    run.mkdir()
    proc = fit(run, builtin_bytes, f"--ckpt_path={tmp_path / 'x.ckpt'}", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("gigagpt: ") and "--model.init_from" in lines[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    fit(run, builtin_bytes, f"--model.init_from={tmp_path / 'x.ckpt'}")
    assert max_difference(load_model(run / "checkpoints/last.ckpt"), load_model(tmp_path / "x.ckpt")) < 2e-3


def test_weights_of_another_shape_are_one_clear_line(builtin_bytes, tmp_path):
    model = load_model(random_hf_gpt2(tmp_path / "hf", depth=3))
    save_lightning_checkpoint(model, tmp_path / "deep.ckpt")
    run = tmp_path / "run"
    run.mkdir()
    proc = fit(run, builtin_bytes, f"--model.init_from={tmp_path / 'deep.ckpt'}", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gigagpt: model.init_from") and "depth 2 vs 3" in last, proc.stderr[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    shutil.rmtree(run / "lightning_logs", ignore_errors=True)
    proc = fit(run, builtin_bytes, f"--model.init_from={tmp_path / 'missing'}", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("gigagpt: model.init_from") and "missing" in last
    assert not (run / "lightning_logs").exists()  # refused before the run makes its folders
