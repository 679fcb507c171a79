"""The bridge under CS-X semantics (csx_emulation.py) against plain Lightning on the CPU.

One run of validation every 7 steps (Lightning's default check_val_every_n_epoch=1), a monitored
ModelCheckpoint plus every_n_train_steps=5, max_steps=23, log_every_n_steps=4; each training runs in
its own process (harness.py): cstorch allows one backend per process.
"""

from __future__ import annotations

import math

import pytest
import torch
from cs_helpers import result, run_harness

pytest.importorskip("cerebras.pytorch")

STEPS = 23
RUN = ("--steps", str(STEPS), "--val-every", "7", "--val-epoch", "--ckpt-every", "5", "--monitor", "--warmup", "5")


def expected_lr(step, optim, max_steps):
    from gigagpt.optim import get_lr

    return get_lr(step, optim.lr, optim.warmup_steps, optim.resolve_decay_steps(max_steps), optim.min_lr)


@pytest.fixture(scope="module")
def runs(builtin_bytes, tmp_path_factory):
    root = tmp_path_factory.mktemp("csx_semantics")
    run_harness("cpu", builtin_bytes, root / "plain", *RUN, "--log-every", "1", "--save-final")
    # no checkpoint schedule and 24 steps: cstorch keeps activation_steps=4 (DataExecutor reduces it to
    # the gcd with the checkpoint steps)
    run_harness("cpu", builtin_bytes, root / "plain24", "--steps", "24", "--warmup", "5", "--log-every", "1")
    run_harness("cerebras_cpu", builtin_bytes, root / "csx_logs", "--steps", "24", "--warmup", "5",
                "--log-every", "4", "--emulate-csx")
    run_harness("cerebras_cpu", builtin_bytes, root / "csx", *RUN, "--log-every", "4", "--emulate-csx")
    return root


def test_no_executor_closed_early(runs):
    """Point 3: validations inside an executor must not close it early (next executor fails on CSX)."""
    res = result(runs / "csx")
    assert res["global_step"] == STEPS
    assert res["emulation"]["closed_early"] == []
    assert res["emulation"]["replays"] > 0  # the emulation did replay the traced step


def test_losses_sit_at_their_true_steps(runs):
    """Point 5: each logged loss belongs to the step it is labelled with."""
    for name, plain_name, steps in (("csx_logs", "plain24", 24), ("csx", "plain", STEPS)):
        csx, plain = result(runs / name), result(runs / plain_name)
        assert csx["losses"] and steps - 1 in csx["losses"], name
        for step, loss in csx["losses"].items():
            assert abs(loss - plain["losses"][step]) / abs(plain["losses"][step]) <= 1e-5, (name, step)
    assert sorted(result(runs / "csx_logs")["losses"]) == [3, 7, 11, 15, 19, 23]


def test_lr_and_tokens_follow_the_step(runs):
    """Point 5: lr from the scheduler's device value, tokens from the step index, at every logged step."""
    from gigagpt.optim import OptimConfig

    optim = OptimConfig(lr=2e-3, warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.1)
    csx = result(runs / "csx_logs")
    assert sorted(csx["lrs"]) == sorted(csx["losses"])
    for step, lr in csx["lrs"].items():
        assert lr == pytest.approx(expected_lr(step, optim, 24), rel=1e-6, abs=1e-12), step
    assert sorted(csx["tokens"]) == sorted(csx["losses"])
    for step, tokens in csx["tokens"].items():
        assert tokens == (step + 1) * 4 * 64, step


def test_step_checkpoints_and_final_step_saved(runs):
    """Points 1 and 4: saves through a no-argument checkpoint closure; the final step always saved."""
    files = sorted(p.name for p in (runs / "csx" / "ckpt").iterdir())
    assert {"step0005.mdl", "step0010.mdl", "step0015.mdl", "step0020.mdl", "step0023.mdl"} <= set(files)
    import cerebras.pytorch as cstorch

    final = cstorch.load(str(runs / "csx" / "ckpt" / "step0023.mdl"))
    plain = torch.load(runs / "plain" / "final.ckpt", weights_only=True)
    plain20 = torch.load(runs / "plain" / "ckpt" / "step0020.ckpt", weights_only=True)
    assert final["global_step"] == STEPS
    for key, value in plain["state_dict"].items():
        got = torch.as_tensor(final["state_dict"][key]).clone()
        # float32 rounding differs between the backends; three steps of training differ far more
        assert torch.linalg.norm(got - value) <= 0.1 * torch.linalg.norm(value - plain20["state_dict"][key]) + 1e-4, key


def test_monitored_checkpoint_saved_between_executors(runs):
    """Point 4: ModelCheckpoint(monitor=...) saves at on_validation_end, between executors."""
    best = sorted(p.name for p in (runs / "csx" / "best").iterdir())
    plain = sorted(p.name for p in (runs / "plain" / "best").iterdir())
    assert [n.replace(".ckpt", ".mdl") for n in plain] == best


def test_resume_from_the_final_step_gives_the_same_next_loss(runs, builtin_bytes):
    """Points 2 and 4: resume keeps cstorch's optimizer state placement; the next step's loss matches."""
    more = ("--steps", str(STEPS + 1), "--log-every", "1", "--warmup", "5")
    run_harness("cpu", builtin_bytes, runs / "plain_resumed", *more, "--resume", str(runs / "plain" / "final.ckpt"))
    run_harness("cerebras_cpu", builtin_bytes, runs / "csx_resumed", *more, "--emulate-csx",
                "--resume", str(runs / "csx" / "ckpt" / "step0023.mdl"))
    plain, csx = result(runs / "plain_resumed"), result(runs / "csx_resumed")
    assert sorted(csx["losses"]) == [STEPS]
    assert abs(csx["losses"][STEPS] - plain["losses"][STEPS]) / plain["losses"][STEPS] <= 1e-5
    assert csx["emulation"]["closed_early"] == []


def test_learning_rate_monitor_logs_the_schedule(builtin_bytes, tmp_path):
    """Point 5: LearningRateMonitor gets the scheduled rate at each logged step."""
    from gigagpt.optim import OptimConfig

    run_harness("cerebras_cpu", builtin_bytes, tmp_path, "--steps", "6", "--warmup", "3", "--log-every", "1",
                "--lr-monitor", "--emulate-csx")
    res = result(tmp_path)
    optim = OptimConfig(lr=2e-3, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.1)
    assert sorted(res["lr_monitor"]) == list(range(6)), "LearningRateMonitor logged nothing"
    assert res["lrs"][0] == 0.0 == res["lr_monitor"][0]  # warmup starts at 0, not at the peak
    for step, lr in res["lr_monitor"].items():
        assert lr == pytest.approx(expected_lr(step, optim, 6), rel=1e-6, abs=1e-12), step
        assert res["lrs"][step] == pytest.approx(lr, rel=1e-6, abs=1e-12), step
    assert not math.isnan(res["losses"][5])


def test_metrics_updated_in_training_step_need_every_activation(builtin_bytes, tmp_path):
    """Point 5: torchmetrics updated in training_step would lose every non-activation step's update."""
    proc = run_harness("cerebras_cpu", builtin_bytes, tmp_path, "--steps", "8", "--log-every", "4", "--train-metric",
                       "--emulate-csx", check=False)
    assert proc.returncode != 0
    assert "torchmetrics updated in training_step" in proc.stderr and "activation_steps: 1" in proc.stderr
    run_harness("cerebras_cpu", builtin_bytes, tmp_path / "every", "--steps", "8", "--log-every", "1",
                "--train-metric", "--emulate-csx")
