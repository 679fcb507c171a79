"""The training benchmark runs on CPU and prints its table; its variants train the same model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_train():
    yield load("bench_train")
    sys.modules.pop("bench_train", None)


def test_bench_train_table_and_padded_head_trains_identically(bench_train, capsys, tmp_path):
    results = bench_train.main([
        "--depth", "1", "--width", "32", "--heads", "2", "--vocab", "97", "--seq", "16", "--batch", "2",
        "--precision", "32-true", "--vocab-pad", "1,64", "--modes", "raw,lightning",
        "--steps", "3", "--warmup", "1", "--rounds", "1", "--threads", "1",
        "--markdown", str(tmp_path / "table.md"),
    ])
    assert [(r.mode, r.vocab_pad) for r in results] == [("raw", 1), ("lightning", 1), ("raw", 64), ("lightning", 64)]
    assert all(r.error is None and r.tokens_per_s > 0 for r in results), [r.error for r in results]
    out = capsys.readouterr().out
    assert "| mode | precision | compile | vocab pad |" in out and "vocab pad 64 / unpadded" in out
    assert "| raw | 32-true | off | 64 | 2 x 16 |" in (tmp_path / "table.md").read_text()
    # Same initialisation and batches: padding the head's compute leaves every step's loss alone.
    unpadded, padded = (r.losses for r in results if r.mode == "raw")
    assert len(unpadded) == 4
    assert padded == pytest.approx(unpadded, rel=1e-5)


def test_profile_step_accounts_for_the_step(capsys):
    profile_step = load("profile_step")
    try:
        report = profile_step.main(["--depth", "1", "--width", "32", "--heads", "2", "--vocab", "97", "--seq", "16",
                                    "--batch", "2", "--precision", "32-true", "--vocab-pad", "64",
                                    "--warmup", "1", "--steps", "1", "--device", "cpu"])
    finally:
        sys.modules.pop("profile_step", None)
    out = capsys.readouterr().out
    assert "(head 128)" in out and "| category | ms per step |" in out
    assert report["tokens_per_s"] > 0 and 0 < report["busy_fraction"] <= 1.5
    assert report["categories"]["matmul"] > 0 and report["categories"]["attention"] > 0


def test_bench_adamw_times_every_variant():
    bench_adamw = load("bench_adamw")
    try:
        times = bench_adamw.main(["--size", "64", "--tensors", "2", "--steps", "2"])
    finally:
        sys.modules.pop("bench_adamw", None)
    assert {"default", "foreach"} <= set(times) and all(ms > 0 for ms in times.values())
