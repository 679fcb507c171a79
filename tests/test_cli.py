"""The gigagpt command end to end, in fresh processes, on data made by the tests."""

import csv
import math

import pytest
import torch
from conftest import ROOT, run_gigagpt

from gigagpt.checkpoint import load_checkpoint, load_model
from gigagpt.module import GPTModule


def read_metrics(folder):
    rows = list(csv.DictReader(open(next(folder.rglob("metrics.csv")))))
    series = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None) and key != "step":
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


@pytest.fixture(scope="module")
def tiny_run(builtin_bytes, tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny_run")
    proc = run_gigagpt(
        "fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}",
        "--trainer.max_steps=80", "--trainer.val_check_interval=40", "--trainer.log_every_n_steps=5",
        f"--trainer.default_root_dir={run}", f"--checkpoint.dirpath={run}/checkpoints",
        "--checkpoint.every_n_train_steps=40",
        f"--trainer.logger=[{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: '{run}'}}}}]",
        cwd=run,
    )
    return run, proc


def test_tiny_fit_loss_falls_and_logs(tiny_run):
    run, _ = tiny_run
    m = read_metrics(run)
    assert {"train/loss", "train/lr", "train/tokens", "val/loss", "val/ppl"} <= set(m)
    first_train = m["train/loss"][0][1]
    assert first_train == pytest.approx(math.log(256), rel=0.1)  # starts at chance
    val = [v for _, v in m["val/loss"]]
    assert val[-1] < 0.65 * math.log(256)
    assert m["val/ppl"][-1][1] == pytest.approx(math.exp(val[-1]), rel=1e-4)
    assert m["train/tokens"][-1][1] == 80 * 16 * 256
    lrs = dict(m["train/lr"])
    assert lrs[max(lrs)] < 2e-3  # decaying towards 0.1 x lr by the end


def test_checkpoint_rebuilds_the_model(tiny_run):
    run, _ = tiny_run
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000040.ckpt", "step0000080.ckpt"]
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")  # weights_only=True
    assert ckpt["hyper_parameters"]["config"]["width"] == 128
    module = GPTModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    gpt = load_model(run / "checkpoints" / "last.ckpt")
    idx = torch.randint(0, 256, (1, 32))
    torch.testing.assert_close(module.model(idx), gpt(idx))
    assert gpt.lm_head.weight is gpt.wte.weight


def test_auto_resume_into_a_differently_shaped_model_is_one_clear_line(tiny_run, tmp_path):
    run, _ = tiny_run
    proc = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.path=unused",
                       "--model.config.width=64", "--model.config.depth=2", "--trainer.logger=false",
                       f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={run}/checkpoints",
                       cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot resume from" in proc.stderr and "depth 4 -> 2, width 128 -> 64" in proc.stderr
    assert "--resume never" in proc.stderr


def test_explicit_resume_keeps_the_given_settings_and_the_checkpoints_shape(tiny_run, builtin_bytes, tmp_path):
    """--ckpt_path: a new learning rate takes effect; a different width gives way to the checkpoint's."""
    run, _ = tiny_run
    proc = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}",
                       f"--ckpt_path={run}/checkpoints/last.ckpt", "--trainer.max_steps=82",
                       "--model.optim.lr=1e-4", "--model.config.width=64", "--trainer.logger=false",
                       "--samples.every_n_steps=0", f"--checkpoint.dirpath={tmp_path}/ckpt",
                       f"--trainer.default_root_dir={tmp_path}", cwd=tmp_path)
    assert "the model's shape comes from" in proc.stdout + proc.stderr and "width 64 -> 128" in proc.stdout + proc.stderr
    hparams = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["hyper_parameters"]
    assert hparams["optim"]["lr"] == 1e-4 and hparams["config"]["width"] == 128
    missing = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}",
                          f"--ckpt_path={tmp_path}/nope.ckpt", "--trainer.logger=false", cwd=tmp_path, check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert "--ckpt_path" in missing.stderr and "does not exist" in missing.stderr


def test_config_saved_beside_the_run(tiny_run):
    run, _ = tiny_run
    assert list(run.rglob("config.yaml"))


def test_111m_starts_training_on_cpu(builtin_gpt2, tmp_path):
    # 32-true: bf16 autocast on a CPU without AMX runs this step several times slower (minutes)
    proc = run_gigagpt(
        "fit", "--config", str(ROOT / "configs/111m.yaml"), f"--data.path={builtin_gpt2}",
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        "--data.batch_size=1", "--data.sequence_length=256", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path}/ckpt", "--samples.every_n_steps=0",
        f"--trainer.default_root_dir={tmp_path}", cwd=tmp_path,
    )
    assert "max_steps=2` reached" in proc.stdout + proc.stderr


def test_progress_bar_can_be_switched_off(builtin_bytes, tmp_path):
    proc = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}",
                       "--trainer.enable_progress_bar=false", "--trainer.max_steps=2", "--trainer.logger=false",
                       "--trainer.limit_val_batches=0", "--samples.every_n_steps=0",
                       f"--checkpoint.dirpath={tmp_path}/ckpt", f"--trainer.default_root_dir={tmp_path}",
                       cwd=tmp_path)
    assert "max_steps=2` reached" in proc.stdout + proc.stderr
    assert "train/loss" not in proc.stdout  # no bar drew the metrics


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/111m.yaml"], "data.path is still the placeholder '/path/to/openwebtext'"),
    (["--config", "configs/tiny.yaml", "--data.path=/nonexistent/data"], "data.path '/nonexistent/data' does not exist"),
])
def test_bad_data_settings_end_with_one_clear_line(args, message, tmp_path):
    proc = run_gigagpt("fit", *[a if not a.startswith("configs/") else str(ROOT / a) for a in args],
                       "--trainer.logger=false", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--model.config.width=50"], "gigagpt: model.config.width (50) must be divisible by model.config.heads (4)"),
    (["--model.optim.lr=-1"], "gigagpt: model.optim.lr must be > 0, got -1.0"),
    (["--trainer.max_steps=-1", "--trainer.max_epochs=1"],
     "gigagpt: the learning-rate schedule needs a length: set trainer.max_steps"),
])
def test_bad_model_and_schedule_settings_end_with_one_clear_line(builtin_bytes, tmp_path, args, message):
    proc = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}", *args,
                       "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path}/ckpt", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("args", [["--trainer.accelerator=gpu"],
                                  ["--trainer.accelerator=cpu", "--trainer.strategy=fsdp"]])
def test_gpu_settings_on_a_cpu_machine_are_one_clear_line(builtin_bytes, tmp_path, args):
    proc = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}",
                       *args, "--trainer.logger=false", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "gigagpt: trainer settings:" in proc.stderr and "--trainer.accelerator cpu" in proc.stderr


def test_sequence_longer_than_context_is_refused(builtin_bytes, tmp_path):
    proc = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}",
                       "--data.sequence_length=512", "--trainer.logger=false", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "data.sequence_length=512 exceeds the model's max_position_embeddings=256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_warmup_longer_than_the_run_is_one_warning_line(builtin_bytes, tmp_path):
    """A smoke run of a real config is meant; a schedule that never reaches its peak is said, once."""
    proc = run_gigagpt("fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={builtin_bytes}",
                       "--trainer.max_steps=2", "--model.optim.warmup_steps=10", "--trainer.logger=false",
                       "--trainer.limit_val_batches=0", "--samples.every_n_steps=0", "--model.config.depth=1",
                       "--data.batch_size=2", "--data.sequence_length=64", f"--checkpoint.dirpath={tmp_path}/ckpt",
                       f"--trainer.default_root_dir={tmp_path}", cwd=tmp_path)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("gigagpt: warning:")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "model.optim.warmup_steps=10 is longer than the run (trainer.max_steps=2)" in warnings[0]
    assert "max_steps=2` reached" in proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["fit", "prepare"])
def test_help_still_prints_the_usage(command):
    proc = run_gigagpt(command, "--help")
    assert proc.stdout.startswith("usage: gigagpt") and "--help" in proc.stdout
