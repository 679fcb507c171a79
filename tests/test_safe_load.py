"""No checkpoint runs code when it is loaded: every format, through every command of the core
environment. Each payload would create a file when unpickled with ``weights_only=False``; the file
must not appear, and the command must refuse in one ``gigagpt`` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_gigagpt

from gigagpt.checkpoint import load_model, safe_load

TINY = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.config.depth", "1", "--model.config.width", "32",
        "--model.config.heads", "2", "--data.sequence_length", "32", "--data.batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--samples.every_n_steps", "0", "--trainer.enable_model_summary", "false"]


class CreatesFile:
    """Unpickled (without weights_only), this calls ``open(marker, "w")``: the file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> Path:
    """A Lightning-looking checkpoint with the payload inside, as ``torch.save`` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.wte.weight": torch.zeros(2)}, "global_step": 5,
                "hyper_parameters": {"config": {}}, "payload": CreatesFile(marker)}, path)
    return path


def hf_folder(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                                    "vocab_size": 256, "n_positions": 32}))
    torch.save({"transformer.wte.weight": torch.zeros(256, 32), "payload": CreatesFile(marker)},
               folder / "pytorch_model.bin")
    return folder


def test_the_payload_does_create_a_file_when_trusted(tmp_path):
    """The payload is live: the check below would see the file if any loader ran it."""
    marker = tmp_path / "created"
    torch.load(write_payload(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "pytorch_model.bin", "evil.mdl"])
def test_safe_load_refuses_every_format(tmp_path, name):
    marker = tmp_path / "created"
    path = write_payload(tmp_path / name, marker)  # evil.mdl: a zip pickle under a Cerebras name
    with pytest.raises(ValueError, match="not loaded"):
        safe_load(path)
    with pytest.raises(ValueError):
        load_model(path)
    assert not marker.exists()


def _refused(proc, marker: Path) -> None:
    assert not marker.exists(), "the checkpoint ran code"
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("gigagpt"), proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "evil.mdl"])
@pytest.mark.parametrize("command", ["sample", "export"])
def test_sample_and_export_refuse(tmp_path, command, name):
    marker = tmp_path / "created"
    path = write_payload(tmp_path / name, marker)
    args = [str(path), "--prompt", "x", "--max-new-tokens", "2"] if command == "sample" else [str(path), str(tmp_path / "out")]
    _refused(run_gigagpt(command, *args, cwd=tmp_path, check=False), marker)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["sample", "export"])
def test_hugging_face_pytorch_model_bin_refused(tmp_path, command):
    marker = tmp_path / "created"
    folder = hf_folder(tmp_path / "hf", marker)
    args = [str(folder), "--prompt", "x"] if command == "sample" else [str(folder), str(tmp_path / "out.ckpt")]
    _refused(run_gigagpt(command, *args, cwd=tmp_path, check=False), marker)


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_ckpt_path_refused(builtin_bytes, tmp_path, command):
    marker = tmp_path / "created"
    path = write_payload(tmp_path / "evil.ckpt", marker)
    proc = run_gigagpt(command, *TINY, "--data.path", str(builtin_bytes), "--ckpt_path", str(path),
                       cwd=tmp_path, check=False)
    _refused(proc, marker)


def test_auto_resume_refuses_a_payload_last_ckpt(builtin_bytes, tmp_path):
    marker = tmp_path / "created"
    write_payload(tmp_path / "runs/tiny/checkpoints/last.ckpt", marker)
    proc = run_gigagpt("fit", *TINY, "--data.path", str(builtin_bytes), cwd=tmp_path, check=False)
    _refused(proc, marker)
    assert "last.ckpt" in proc.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "runs/tiny/checkpoints").glob("step*")), "it trained from step 0"


def test_real_checkpoints_still_load(builtin_bytes, tmp_path):
    """What `gigagpt fit` writes loads through the same function, and samples."""
    proc = run_gigagpt("fit", *TINY, "--data.path", str(builtin_bytes), "--checkpoint.every_n_train_steps", "1",
                       cwd=tmp_path)
    last = tmp_path / "runs/tiny/checkpoints/last.ckpt"
    assert safe_load(last)["global_step"] == 2, proc.stderr[-2000:]
    out = run_gigagpt("sample", str(last), "--prompt", "x", "--max-new-tokens", "3", cwd=tmp_path)
    assert out.stdout.strip()
