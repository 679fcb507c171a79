"""Every shipped YAML loads through the CLI parser and builds its model on the meta device."""

from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_model import REFERENCE_PARAMS

from gigagpt.cli import cli_main
from gigagpt.model import GPTConfig

TOP_LEVEL = sorted((ROOT / "configs").glob("*.yaml"))


def test_all_named_sizes_are_shipped():
    assert {p.stem for p in TOP_LEVEL} >= set(REFERENCE_PARAMS) | {"tiny"}


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.stem)
def test_config_parses_and_builds_on_meta(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(path)], run=False)
    module = cli.model
    with torch.device("meta"):
        module.configure_model()
    n = sum(p.numel() for p in module.parameters())
    assert n == module.config.num_params()
    if path.stem in REFERENCE_PARAMS:
        assert n == REFERENCE_PARAMS[path.stem]
        assert module.config == GPTConfig.from_name(path.stem)
        assert cli.datamodule.sequence_length == 2048
        assert cli.trainer.gradient_clip_val == 1.0
        assert module.optim.beta1 == 0.9 and module.optim.beta2 == 0.95
        assert module.optim.min_lr_ratio == 0.1
    assert any(type(cb).__name__ == "ModelCheckpoint" for cb in cli.trainer.callbacks)


def test_recipes_match_reference_table():
    expected = {  # lr, warmup, steps, batch, eps
        "111m": (6.0e-4, 1525, 9037, 120, 1e-8),
        "1p3b": (2.0e-4, 346, 24334, 528, 1e-8),
        "13b": (1.2e-4, 581, 116223, 1080, 1e-9),
        "70b": (1.0e-4, 3317, 663425, 1472, 1e-9),
        "175b": (5.0e-6, 3317, 663425, 1472, 1e-10),
    }
    import yaml

    for name, (lr, warmup, steps, batch, eps) in expected.items():
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        optim = cfg["model"]["optim"]
        assert (optim["lr"], optim["warmup_steps"], cfg["trainer"]["max_steps"],
                cfg["data"]["batch_size"], optim["eps"]) == (lr, warmup, steps, batch, eps), name


def _run_folders(cli) -> tuple:
    trainer = cli.trainer
    dirpaths = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return Path(trainer.default_root_dir).resolve(), {Path(lg.save_dir).resolve() for lg in trainer.loggers}, dirpaths


def test_one_run_setting_places_logs_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = str(ROOT / "configs" / "tiny.yaml")
    root, logs, ckpts = _run_folders(cli_main(["--config", tiny], run=False))  # the config's own run folder
    assert root == tmp_path / "runs" / "tiny" and logs == {root} and ckpts == [root / "checkpoints"]
    cli = cli_main(["--config", tiny, "--run", "runs/other"], run=False)
    root, logs, ckpts = _run_folders(cli)
    assert root == tmp_path / "runs" / "other" and logs == {root} and ckpts == [root / "checkpoints"]
    assert {type(lg).__name__ for lg in cli.trainer.loggers} == {"CSVLogger", "TensorBoardLogger"}
    # each folder can still be set on its own
    root, logs, ckpts = _run_folders(cli_main(["--config", tiny, "--run", "runs/other", "--checkpoint.dirpath",
                                                "elsewhere"], run=False))
    assert root == tmp_path / "runs" / "other" and ckpts == [tmp_path / "elsewhere"]
