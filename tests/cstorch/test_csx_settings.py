"""CS-X settings, input sharding and the lr_scale contract (no CSX backend is created in this process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("cerebras.pytorch")

from cs_helpers import ROOT, subprocess_env

from gigagpt.accelerators import CerebrasError, CerebrasPrecision, ClusterSettings
from gigagpt.data import StepSampler, WindowDataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIZES = [("111m", 32), ("1p3b", 32), ("13b", 32), ("70b", 32), ("175b", 100)]


def test_32_true_on_csx_is_refused():
    """Point 6: CS-X computes in a half type, float16 by default; 32-true would mean fp16 without scaling."""
    with pytest.raises(CerebrasError, match="bf16-mixed"):
        CerebrasPrecision("32-true").check_backend("CSX")
    CerebrasPrecision("bf16-mixed").check_backend("CSX")
    CerebrasPrecision("32-true").check_backend("CPU")  # the eager backends run float32 as asked


@pytest.mark.parametrize("size,execute", SIZES)
def test_csx_configs_set_the_cluster_defaults(size, execute, tmp_path, monkeypatch):
    """Points 7, 8, 9: no sanity check, save_last link, gigaGPT's coordinator memory per size."""
    from gigagpt.cli import cli_main

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(CONFIGS / f"{size}.yaml"), "--config", str(CONFIGS / "cerebras" / f"{size}.yaml"),
                    "--config", str(CONFIGS / "cerebras" / "cluster.yaml")], run=False)
    assert cli.trainer.num_sanity_val_steps == 0
    assert cli.trainer.checkpoint_callback.save_last == "link"
    assert cli.trainer.strategy.csx_settings == {"debug.compile_crd_memory_gi": 50,
                                                 "debug.execute_crd_memory_gi": execute}
    assert cli.trainer.precision_plugin.precision == "bf16-mixed"


def test_cluster_settings_reach_every_cluster_config_field():
    """Point 9: workflow_id, automount, cbcore_image pass through to cstorch's ClusterConfig."""
    config = ClusterSettings(mgmt_address="host:1", workflow_id="wf-1", automount=False, cbcore_image="img:1",
                             num_workers_per_csx=2).to_cluster_config()
    assert (config.workflow_id, config.automount, config.cbcore_image) == ("wf-1", False, "img:1")
    assert config.num_workers_per_csx == 2


def _train_args(data: Path, batch: int) -> dict:
    from gigagpt.data import GPTDataModule

    dm = GPTDataModule(path=str(data), sequence_length=64, batch_size=batch, seed=1337)
    dm.setup("fit")
    return dict(dm.train_loader_args())


@pytest.mark.parametrize("num_csx,workers", [(1, 1), (1, 3), (2, 2), (4, 1)])
def test_every_window_read_once_over_validations_and_a_resume(builtin_bytes, num_csx, workers):
    """Point 10: executors [0,7), [7,14), then a resume at 14 for [14,23): each global step's windows
    are read exactly once, by the system and worker the appliance deals that step to."""
    from gigagpt.accelerators.feeding import train_loader_for

    steps, batch = 23, 8
    base = _train_args(builtin_bytes, batch)
    expected = StepSampler(len(WindowDataset(base["path"], 64, base["dtype"])), batch, 1337)
    read: dict[int, list[int]] = {}
    for start, end in ((0, 7), (7, 14), (14, steps)):
        args = {**base, "start_step": start, "num_csx": num_csx, "workers_per_csx": workers, "cluster_tokens": True}
        for wse in range(num_csx):
            for local in range(workers):
                loader = iter(train_loader_for(args, (wse, local)))
                for step in range(start + local, end, workers):  # steps dealt round-robin to this worker
                    inputs, labels = next(loader)
                    assert inputs.dtype == torch.int32 and inputs.shape == (batch // num_csx, 64)
                    read.setdefault(step, []).extend(_windows(base, inputs))
    assert sorted(read) == list(range(steps))
    for step in range(steps):
        assert sorted(read[step]) == sorted(expected.batch_indices(step)), step


def _windows(args, inputs) -> list[int]:
    dataset = WindowDataset(args["path"], 64, args["dtype"])
    index = {tuple(dataset[i][0].tolist()): i for i in range(len(dataset))}
    return [index[tuple(row.tolist())] for row in inputs]


@pytest.mark.parametrize("num_csx,workers", [(2, 1), (2, 2)])
def test_each_system_evaluates_its_own_windows(builtin_bytes, num_csx, workers):
    """Point 10: with num_csx > 1 the systems split every evaluation batch, none reads a window twice."""
    from gigagpt.accelerators.feeding import eval_loader_for

    base = _train_args(builtin_bytes, 4)
    args = {"path": base["path"].replace("train", "val"), "sequence_length": 64, "batch_size": 4,
            "dtype": base["dtype"], "max_batches": 4, "num_csx": num_csx, "workers_per_csx": workers,
            "cluster_tokens": True}
    seen = []
    for wse in range(num_csx):
        for local in range(workers):
            for inputs, _ in eval_loader_for(args, (wse, local)):
                assert inputs.dtype == torch.int32
                seen.extend(_windows(args, inputs))
    assert sorted(seen) == list(range(16))


def test_input_workers_read_a_sharded_store_like_the_single_file(builtin_bytes, tmp_path):
    """The same data as shards: each input worker streams the same batches, from plain picklable
    arguments, and maps only the shards its windows touch."""
    import pickle

    from gigagpt.accelerators.feeding import train_loader_for
    from gigagpt.shards import split_dataset

    split_dataset(builtin_bytes, tmp_path, 10_000)
    cluster = {"num_csx": 2, "workers_per_csx": 2, "cluster_tokens": True}
    single, sharded = _train_args(builtin_bytes, 8), _train_args(tmp_path, 8)
    assert isinstance(sharded["path"], list) and len(sharded["path"]) > 20
    pickle.dumps(sharded)
    for position in [(0, 0), (1, 1)]:
        a = iter(train_loader_for({**single, **cluster}, position))
        loader = train_loader_for({**sharded, **cluster}, position)
        b = iter(loader)
        for _ in range(3):
            (xa, ya), (xb, yb) = next(a), next(b)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert 0 < len(loader.dataset.tokens._open) <= 3 * 4 * 2  # 3 batches of 4 windows, each in 1-2 shards


def test_throughput_on_cerebras_reports_no_host_mfu():
    """Point 11: on a Cerebras strategy the MFU is n/a, never a host-CPU matmul probe."""
    import lightning as L

    from gigagpt import GPTModule
    from gigagpt.callbacks.throughput import ThroughputMFU

    trainer = L.Trainer(strategy="cerebras_cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, max_steps=1)
    callback = ThroughputMFU()
    callback.setup(trainer, GPTModule(), "fit")
    assert callback.available_flops is None


def test_lr_scale_multiplies_the_scheduled_rate(tmp_path):
    """μP contract: each group gets the scheduled rate times its lr_scale (cstorch's ScalePerParamLR)."""
    script = textwrap.dedent("""
        import cerebras.pytorch as cstorch, torch, json
        from gigagpt.accelerators.schedule import build_cstorch_optimizer
        from gigagpt.optim import OptimConfig, get_lr
        backend = cstorch.backend("CPU", artifact_dir=%r)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        optim = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.0)
        groups = [{"params": list(model[0].parameters()), "lr_scale": 0.25},
                  {"params": list(model[1].parameters())}]
        optimizer, scheduler = build_cstorch_optimizer(model, optim, 6, groups=groups)
        compiled = cstorch.compile(model, backend)
        data = cstorch.utils.data.DataLoader(lambda: [(torch.ones(2, 4),)] * 6)
        rates = []

        @cstorch.trace
        def step(x):
            scheduler.update_last_value()
            lrs = [g["lr"] for g in optimizer.param_groups]
            compiled(x).sum().backward()
            optimizer.step(); optimizer.zero_grad(); scheduler.step()
            record(lrs)

        @cstorch.step_closure
        def record(lrs):
            rates.append([float(v) for v in lrs])

        for (x,) in cstorch.utils.data.DataExecutor(data, num_steps=6):
            step(x)
        expected = [get_lr(k, 1e-2, 2, optim.resolve_decay_steps(6), optim.min_lr) for k in range(6)]
        print(json.dumps({"rates": rates, "expected": expected}))
    """) % str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for (scaled, plain), lr in zip(out["rates"], out["expected"]):
        assert plain == pytest.approx(lr, rel=1e-6, abs=1e-12)
        assert scaled == pytest.approx(0.25 * lr, rel=1e-6, abs=1e-12)


def test_nan_guard_says_when_it_cannot_read_gradients():
    """Point 11: gradients on a device the host cannot read inside the step are not skipped silently."""
    from types import SimpleNamespace

    from gigagpt.callbacks.guard import NonFiniteGuard

    module = torch.nn.Linear(2, 2, device="meta")
    for p in module.parameters():
        p.grad = torch.empty_like(p)
    trainer = SimpleNamespace(global_step=0, precision_plugin=None)
    with pytest.warns(UserWarning, match="only the loss is checked"):
        NonFiniteGuard().on_before_optimizer_step(trainer, module, None)
