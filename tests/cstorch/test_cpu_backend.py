"""Training through cstorch's CPU backend against plain Lightning on the CPU, and .mdl checkpoints.

Each training runs in its own process (harness.py): cstorch allows one backend per process.
"""

from __future__ import annotations

import pytest
import torch
from cs_helpers import result, run_harness

pytest.importorskip("cerebras.pytorch")

STEPS = 20


@pytest.fixture(scope="module")
def runs(builtin_bytes, tmp_path_factory):
    """Plain CPU, Cerebras CPU (checkpoints every 10 steps), and Cerebras CPU resumed from step 10."""
    root = tmp_path_factory.mktemp("cpu_backend")
    common = ("--steps", str(STEPS), "--val-every", "10")
    # A sanity check of 2 batches before validations of 4: each pass must run its own count.
    checked = ("--sanity", "2", "--val-batches", "4")
    run_harness("cpu", builtin_bytes, root / "plain", *common, *checked)
    run_harness("cerebras_cpu", builtin_bytes, root / "cs", *common, *checked, "--ckpt-every", "10")
    run_harness("cerebras_cpu", builtin_bytes, root / "resumed", *common, *checked, "--ckpt-every", "10",
                "--resume", str(root / "cs" / "ckpt" / "step0010.mdl"))
    return root


def test_parity_with_plain_lightning(runs):
    plain, cs = result(runs / "plain"), result(runs / "cs")
    assert sorted(plain["losses"]) == sorted(cs["losses"]) == list(range(STEPS))
    rel = max(abs(plain["losses"][k] - cs["losses"][k]) / abs(plain["losses"][k]) for k in range(STEPS))
    print(f"max relative loss difference over {STEPS} steps: {rel:.3e}")
    assert rel <= 1e-4
    # step 0 runs before any optimizer update: identical weights and batch give the identical loss
    assert plain["losses"][0] == cs["losses"][0]
    for k in range(STEPS):  # cstorch's schedule (float32 on the device) matches get_lr
        assert cs["lrs"][k] == pytest.approx(plain["lrs"][k], rel=1e-6, abs=1e-12)
    assert sorted(cs["val"]) == sorted(plain["val"]) == [9, 19]
    assert cs["val_batches_run"] == plain["val_batches_run"] == 2 * 4
    assert cs["metric_warnings"] == plain["metric_warnings"] == []  # e.g. compute before update
    for k in plain["val"]:
        assert abs(plain["val"][k] - cs["val"][k]) / plain["val"][k] <= 1e-4
    # the loss falls, and the values reach Lightning's callback_metrics and progress bar
    assert cs["losses"][STEPS - 1] < cs["losses"][0] - 1.0
    assert cs["callback_metrics"]["train/loss"] == pytest.approx(cs["losses"][STEPS - 1])
    assert cs["progress_bar"]["train/loss"] == pytest.approx(cs["losses"][STEPS - 1])
    assert cs["callback_metrics"]["val/loss"] == pytest.approx(cs["val"][19])


def test_model_checkpoint_writes_mdl_at_requested_steps(runs):
    files = sorted(p.name for p in (runs / "cs" / "ckpt").iterdir())
    assert files == ["last.mdl", "step0010.mdl", "step0020.mdl"]
    with open(runs / "cs" / "ckpt" / "step0010.mdl", "rb") as f:
        assert f.read(4) == b"\x89HDF"


def test_resume_from_mdl_is_exact(runs):
    full, resumed = result(runs / "cs"), result(runs / "resumed")
    assert sorted(resumed["losses"]) == list(range(10, STEPS))
    for k in range(10, STEPS):
        assert resumed["losses"][k] == full["losses"][k], k  # bit-exact
    assert resumed["val"][19] == full["val"][19]


def test_converter_round_trip(runs, tmp_path):
    import cerebras.pytorch as cstorch

    from gigagpt.accelerators.checkpoint_io import convert_checkpoint
    from gigagpt.checkpoint import load_model

    mdl = runs / "cs" / "ckpt" / "step0020.mdl"
    ckpt = convert_checkpoint(mdl, tmp_path / "step20.ckpt")
    plain = torch.load(ckpt, weights_only=True)
    assert plain["global_step"] == STEPS
    model = load_model(ckpt)
    assert model.lm_head.weight is model.wte.weight
    back = convert_checkpoint(ckpt, tmp_path / "back.mdl")
    original, again = cstorch.load(str(mdl)), cstorch.load(str(back))
    for key, value in original["state_dict"].items():
        assert torch.equal(torch.as_tensor(again["state_dict"][key]).clone(), torch.as_tensor(value).clone()), key
    with pytest.raises(ValueError, match=".ckpt or .mdl"):
        convert_checkpoint(mdl, tmp_path / "x.bin")


def test_cerebras_checkpoints_on_a_plain_trainer_are_one_clear_line(runs, builtin_bytes, tmp_path):
    """A .mdl, or a .ckpt converted from one (cstorch's optimizer state), cannot resume torch's AdamW."""
    from cs_helpers import ROOT, run_cli

    from gigagpt.accelerators.checkpoint_io import convert_checkpoint

    mdl = runs / "cs" / "ckpt" / "step0010.mdl"
    converted = convert_checkpoint(mdl, tmp_path / "step10.ckpt")
    base = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.path", str(builtin_bytes),
            "--trainer.logger", "false", "--trainer.max_steps", "12"]
    for path, message in ((mdl, "is a Cerebras checkpoint: use it with the Cerebras accelerator"),
                          (converted, "was converted from a Cerebras .mdl: its optimizer state is cstorch's")):
        proc = run_cli(*base, "--ckpt_path", str(path), cwd=tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert message in proc.stderr


def test_save_off_schedule_is_refused(builtin_bytes, tmp_path):
    proc = run_harness("cerebras_cpu", builtin_bytes, tmp_path, "--steps", "5", "--ckpt-every", "10",
                       "--save-at", "3", check=False)
    assert proc.returncode != 0
    assert "CerebrasCheckpointError: refusing to save" in proc.stderr
    assert "every 10 steps" in proc.stderr


def test_bf16_and_manual_save_on_schedule(builtin_bytes, tmp_path):
    run_harness("cerebras_cpu", builtin_bytes, tmp_path, "--steps", "4", "--ckpt-every", "2", "--save-at", "4",
                "--precision", "bf16-mixed")
    res = result(tmp_path)
    assert sorted(res["losses"]) == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for v in res["losses"].values())
    assert (tmp_path / "manual.mdl").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.mdl", "step0002.mdl", "step0004.mdl"]


def test_early_stop_finishes_the_executor(builtin_bytes, tmp_path):
    """Stopping after 5 of 20 planned steps closes the executor and still writes the step-5 checkpoint."""
    run_harness("cerebras_cpu", builtin_bytes, tmp_path, "--steps", "5", "--max-steps", "20", "--ckpt-every", "5")
    res = result(tmp_path)
    assert sorted(res["losses"]) == [0, 1, 2, 3, 4] and res["global_step"] == 5
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.mdl", "step0005.mdl"]
