"""Registration and pairing of the Cerebras accelerator and strategy (no backend is created here)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry

import gigagpt.accelerators  # noqa: F401  (registers "cerebras")

pytest.importorskip("cerebras.pytorch")

from gigagpt.accelerators import CerebrasAccelerator, CerebrasError, CerebrasPrecision, CerebrasStrategy


def trainer(**kw) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **kw)


def test_registered_names():
    assert "cerebras" in AcceleratorRegistry
    for name in ("cerebras", "cerebras_csx", "cerebras_cpu", "cerebras_gpu", "cerebras_validate"):
        assert name in StrategyRegistry


def test_accelerator_alone_is_one_clear_line():
    """Lightning chooses the strategy of accelerator="cerebras" alone itself (a SingleDeviceStrategy, in its
    accelerator connector's _choose_strategy); the accelerator refuses to run under it, naming the setting."""
    t = trainer(accelerator="cerebras")
    assert isinstance(t.accelerator, CerebrasAccelerator)
    with pytest.raises(CerebrasError, match="runs only with a Cerebras strategy: set trainer.strategy"):
        t.strategy.setup_environment()


@pytest.mark.parametrize("strategy,backend", [("cerebras_cpu", "CPU"), ("cerebras_gpu", "GPU"), ("instance", "CPU")])
@pytest.mark.parametrize("accelerator", ["auto", "cerebras", "cpu"])
def test_strategy_brings_its_own_accelerator(strategy, backend, accelerator):
    strategy = CerebrasStrategy(backend="CPU") if strategy == "instance" else strategy
    t = trainer(strategy=strategy, accelerator=accelerator)
    assert isinstance(t.accelerator, CerebrasAccelerator) and t.accelerator.paired
    assert t.strategy.backend_type == backend


def test_cerebras_accelerator_under_another_strategy_is_refused():
    t = trainer(accelerator="cerebras", strategy="ddp")
    with pytest.raises(CerebrasError, match="Cerebras strategy"):
        t.accelerator.setup_device(torch.device("cpu"))


def test_no_lightning_class_is_patched():
    from lightning.pytorch.trainer.connectors import accelerator_connector, checkpoint_connector

    for module in (accelerator_connector, checkpoint_connector):
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == module.__name__:
                for name, value in vars(cls).items():
                    assert getattr(value, "__module__", module.__name__).startswith("lightning"), (cls, name)


def test_precision_maps_onto_cstorch_amp():
    t = trainer(strategy="cerebras_cpu", precision="bf16-mixed")
    assert isinstance(t.precision_plugin, CerebrasPrecision) and t.precision_plugin.precision == "bf16-mixed"
    with pytest.raises(ValueError, match="32-true"):
        trainer(strategy="cerebras_cpu", precision="16-true")


def test_bad_settings():
    with pytest.raises(ValueError, match="backend"):
        CerebrasStrategy(backend="TPU")
    with pytest.raises(ValueError, match="CSX"):
        CerebrasStrategy(backend="CPU", validate_only=True)
    with pytest.raises(ValueError, match="devices"):
        trainer(accelerator="cerebras", devices=4)


@pytest.mark.parametrize("size,num_csx", [("111m", 1), ("1p3b", 1), ("13b", 4), ("70b", 8), ("175b", 16)])
def test_cerebras_configs_compose_with_the_plain_ones(size, num_csx, tmp_path, monkeypatch):
    from gigagpt.cli import cli_main

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[2] / "configs"
    base = ["--config", str(root / f"{size}.yaml"), "--config", str(root / "cerebras" / f"{size}.yaml")]
    cli = cli_main(base, run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, CerebrasStrategy) and isinstance(cli.trainer.accelerator, CerebrasAccelerator)
    assert strategy.backend_type == "CSX" and strategy.cluster.num_csx == num_csx
    assert cli.trainer.precision_plugin.precision == "bf16-mixed"
    plain = cli_main(["--config", str(root / f"{size}.yaml")], run=False)
    assert cli.model.config == plain.model.config and cli.model.optim == plain.model.optim
    assert cli.datamodule.batch_size == plain.datamodule.batch_size
    assert cli.trainer.max_steps == plain.trainer.max_steps
    # scaling to 16 systems is one setting; a cluster file adds to the strategy without repeating it
    scaled = cli_main([*base, "--config", str(root / "cerebras" / "cluster.yaml"),
                       "--trainer.strategy.init_args.cluster.num_csx", "16",
                       "--trainer.strategy.init_args.cluster.mgmt_address", "cluster.example:9000"], run=False)
    assert scaled.trainer.strategy.cluster.num_csx == 16
    assert scaled.trainer.strategy.cluster.mgmt_address == "cluster.example:9000"
    assert scaled.trainer.strategy.micro_batch_size == "auto"


def test_users_own_callbacks_and_accelerators_files_do_not_break_the_cerebras_names(tmp_path):
    """A script beside its own callbacks.py / accelerators.py still gets gigagpt's Cerebras names."""
    import subprocess
    import sys

    for name in ("callbacks.py", "accelerators.py"):
        (tmp_path / name).write_text(f"raise ImportError('the user {name} was imported')\n")
    code = ("import lightning as L\nimport gigagpt.accelerators\n"
            "kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)\n"
            "print(type(L.Trainer(accelerator='cerebras', **kw).accelerator).__name__)\n"
            "print(type(L.Trainer(strategy='cerebras', **kw).strategy).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CerebrasAccelerator", "CerebrasStrategy"], proc.stdout
