"""gigagpt.machine: the CPU's facts, its cached matmul peak, and the training precision chosen from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gigagpt import machine
from gigagpt.machine import CPUFacts, choose_cpu_precision, cpu_peak_flops, parse_cpuinfo

ROOT = Path(__file__).resolve().parents[1]

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
COOPER_LAKE = "model name\t: Intel(R) Xeon(R) Gold 5320H\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
EPYC_ROME = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_precision_follows_the_cpu_flags():
    facts = parse_cpuinfo(SAPPHIRE_RAPIDS, cores=2)
    assert facts == CPUFacts("Intel(R) Xeon(R) Platinum 8488C", 2, facts.flags) and facts.amx
    assert choose_cpu_precision(facts)[0] == "bf16-mixed"
    precision, reason = choose_cpu_precision(parse_cpuinfo(COOPER_LAKE, cores=4))
    assert precision == "32-true" and "avx512_bf16" in reason and "no AMX" in reason
    precision, reason = choose_cpu_precision(parse_cpuinfo(EPYC_ROME, cores=2))
    assert precision == "32-true" and "no AMX" in reason
    assert choose_cpu_precision(parse_cpuinfo("", cores=1))[0] == "32-true"  # nothing known: float32


def test_cpu_peak_is_the_best_of_several_probes_and_cached_per_machine(tmp_path, monkeypatch):
    """A probe that ran on a busy core reads low: the best of several is kept, and measured once."""
    monkeypatch.setenv(machine.CACHE_ENV, str(tmp_path / "cache"))
    readings = iter([1e9, 3e9, 2e9, 5e8, 2.5e9, 1e9])  # busy, quiet, busy, ...
    calls = []

    def probe(dtype, size):
        calls.append((dtype, size))
        return next(readings)

    assert cpu_peak_flops(torch.float32, probe=probe) == 3e9
    assert len(calls) == 6  # 3 rounds x 2 sizes
    assert cpu_peak_flops(torch.float32, probe=probe) == 3e9 and len(calls) == 6  # from the cache
    saved = json.loads((tmp_path / "cache" / "cpu_peak.json").read_text())
    key = machine.machine_key()
    assert saved == {key: {"float32": 3e9}}
    assert f"torch {torch.__version__}" in key and str(machine.cpu_facts().cores) in key
    (tmp_path / "cache" / "cpu_peak.json").write_text("{not json")  # damaged: measured again
    readings = iter([4e9] * 6)
    assert cpu_peak_flops(torch.float32, probe=probe) == 4e9


def _fit_trainer(data, root, *extra):
    from gigagpt.cli import cli_main

    # run=False: the Trainer is built as `fit` would build it, nothing trains
    return cli_main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--data.path", str(data),
                     "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
                     "--checkpoint.dirpath", str(root / "ckpt"), *extra], run=False).trainer


@pytest.mark.parametrize(("cpuinfo", "expected"), [(SAPPHIRE_RAPIDS, "bf16-mixed"), (EPYC_ROME, "32-true")])
def test_a_cpu_fit_without_a_precision_picks_the_faster_one_and_says_why(
        builtin_bytes, tmp_path, monkeypatch, capsys, cpuinfo, expected):
    monkeypatch.setattr(machine, "cpu_facts", lambda: parse_cpuinfo(cpuinfo, cores=2))
    trainer = _fit_trainer(builtin_bytes, tmp_path, "--trainer.accelerator", "cpu", "--trainer.precision", "null")
    assert trainer.precision == expected
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("gigagpt:") and "trainer.precision" in line]
    assert len(lines) == 1 and expected in lines[0] and "AMX" in lines[0], lines
    # a precision the user set is kept, without a word
    trainer = _fit_trainer(builtin_bytes, tmp_path, "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-true")
    assert trainer.precision == "bf16-true"
    assert not [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("gigagpt:") and "trainer.precision" in line]
