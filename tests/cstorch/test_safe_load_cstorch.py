"""No checkpoint runs code when loaded in the cstorch environment: ``.mdl`` (HDF5) files are read
with h5py and a restricted unpickler, never ``cstorch.load`` (dill, ``torch.load(weights_only=False)``).
Each payload creates a file when ``cstorch.load`` is used; the file must not appear, and every command
refuses in one ``gigagpt`` line. Checkpoints of real Cerebras runs still load, identical to ``cstorch.load``."""

from __future__ import annotations

import pytest
import torch
from cs_helpers import ROOT, run_cli

cstorch = pytest.importorskip("cerebras.pytorch")

from gigagpt.checkpoint import safe_load  # noqa: E402

TINY = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(ROOT / "configs" / "cerebras" / "tiny.yaml"),
        "--model.config.depth", "1", "--model.config.width", "32", "--model.config.heads", "2",
        "--data.sequence_length", "32", "--data.batch_size", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--samples.every_n_steps", "0"]


class CreatesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hdf5_payload(path, marker):
    """What cstorch.save writes for a Lightning-looking checkpoint holding the payload (dill inside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cstorch.save({"state_dict": {"model.wte.weight": torch.zeros(2)}, "global_step": 3,
                  "hyper_parameters": {"config": {}}, "payload": CreatesFile(marker)}, str(path))
    return path


def zip_payload(path, marker):
    """A torch.save pickle under a .mdl name: cstorch.load falls back to torch.load(weights_only=False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 3, "payload": CreatesFile(marker)}, path)
    return path


PAYLOADS = {"hdf5": hdf5_payload, "zip": zip_payload}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_payloads_are_live_under_cstorch_load(tmp_path, kind):
    """cstorch.load runs both payloads (so the checks below would see the file)."""
    marker = tmp_path / "created"
    ckpt = cstorch.load(str(PAYLOADS[kind](tmp_path / "evil.mdl", marker)))
    str(ckpt["payload"])  # cstorch defers dill objects until used
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_safe_load_refuses(tmp_path, kind):
    marker = tmp_path / "created"
    path = PAYLOADS[kind](tmp_path / "evil.mdl", marker)
    with pytest.raises(ValueError, match="not loaded"):
        safe_load(path)
    from gigagpt.accelerators.checkpoint_io import CerebrasCheckpointIO, load_mdl

    with pytest.raises(Exception, match="not loaded"):
        CerebrasCheckpointIO().load_checkpoint(path)
    with pytest.raises(ValueError, match="not loaded"):
        load_mdl(path)
    assert not marker.exists()


def _refused(proc, marker):
    assert not marker.exists(), "the checkpoint ran code"
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gigagpt") and "not loaded" in last, last


COMMANDS = {
    "sample": lambda p, tmp: ["sample", str(p), "--prompt", "x", "--max-new-tokens", "2"],
    "export": lambda p, tmp: ["export", str(p), str(tmp / "out")],
    "fit": lambda p, tmp: ["fit", *TINY, "--trainer.max_steps", "2", "--ckpt_path", str(p)],
    "validate": lambda p, tmp: ["validate", *TINY, "--ckpt_path", str(p)],
}


@pytest.mark.parametrize(("command", "kind"), [("sample", "hdf5"), ("export", "hdf5"), ("fit", "hdf5"),
                                               ("validate", "hdf5"), ("sample", "zip"), ("fit", "zip")])
def test_commands_refuse(builtin_bytes, tmp_path, command, kind):
    marker = tmp_path / "created"
    path = PAYLOADS[kind](tmp_path / "evil.mdl", marker)
    args = COMMANDS[command](path, tmp_path)
    if command in ("fit", "validate"):
        args += ["--data.path", str(builtin_bytes)]
    _refused(run_cli(*args, cwd=tmp_path), marker)
    assert not (tmp_path / "out").exists()


def test_auto_resume_refuses_a_payload_last_mdl(builtin_bytes, tmp_path):
    marker = tmp_path / "created"
    hdf5_payload(tmp_path / "runs/tiny/checkpoints/last.mdl", marker)
    proc = run_cli("fit", *TINY, "--trainer.max_steps", "2", "--data.path", str(builtin_bytes), cwd=tmp_path)
    assert not marker.exists(), "the checkpoint ran code"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("gigagpt"), proc.stderr[-3000:]
    assert not list((tmp_path / "runs/tiny/checkpoints").glob("step*")), "it trained from step 0"


def _same(a, b, where=""):
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b.to("cpu")), where
    elif isinstance(b, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for k in b:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def test_real_run_checkpoints_load_as_cstorch_load_reads_them(builtin_bytes, tmp_path):
    proc = run_cli("fit", *TINY, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2",
                   "--data.path", str(builtin_bytes), "--model.config.dropout", "0.1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "runs/tiny/checkpoints"
    for path in sorted(folder.glob("*.mdl")):
        ours = safe_load(path)
        _same(ours, cstorch.load(str(path)))
        assert ours["global_step"] in (2, 4) and ours["optimizer_states"][0]["state"]
    # export reads it too, into a Lightning checkpoint with the same weights
    out = run_cli("export", str(folder / "last.mdl"), str(tmp_path / "w.ckpt"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    exported = safe_load(tmp_path / "w.ckpt")["state_dict"]
    _same(exported, {k: v for k, v in safe_load(folder / "last.mdl")["state_dict"].items() if k in exported})
