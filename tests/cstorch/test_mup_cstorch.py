"""μP through the Cerebras bridge: the CPU backend trains like plain Lightning, and 111m lowers for CSX.

Each training runs in its own process (harness.py): cstorch allows one backend per process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from cs_helpers import ROOT, result, run_harness, subprocess_env

pytest.importorskip("cerebras.pytorch")

STEPS = 20


def test_mup_parity_with_plain_lightning(builtin_bytes, tmp_path):
    """width 64 over base 16: the hidden weights learn at lr / 4, the rest at lr, on both paths."""
    args = ("--steps", str(STEPS), "--width", "64", "--heads", "4", "--mup-base-width", "16", "--lr", "4e-3")
    run_harness("cpu", builtin_bytes, tmp_path / "plain", *args)
    run_harness("cerebras_cpu", builtin_bytes, tmp_path / "cs", *args)
    plain, cs = result(tmp_path / "plain"), result(tmp_path / "cs")
    assert sorted(plain["losses"]) == sorted(cs["losses"]) == list(range(STEPS))
    rel = max(abs(plain["losses"][k] - cs["losses"][k]) / abs(plain["losses"][k]) for k in range(STEPS))
    print(f"μP: max relative loss difference over {STEPS} steps: {rel:.3e}")
    assert rel <= 1e-4
    for k in range(STEPS):  # group 0 (embeddings) keeps the base rate on both paths
        assert cs["lrs"][k] == pytest.approx(plain["lrs"][k], rel=1e-6, abs=1e-12)
    assert cs["losses"][STEPS - 1] < cs["losses"][0] - 0.5  # and it learns


@pytest.mark.slow
def test_validate_only_lowers_111m_with_mup(tmp_path):
    """The shipped 111m recipe with the μP overlay, validate_only at T=2048 (lazy init: about a minute)."""
    from gigagpt.prepare import builtin_documents, prepare
    from gigagpt.tokenizer import gpt2_from_file

    data = tmp_path / "gpt2_2048"
    docs = ((d, len(d.encode("utf-8"))) for d in builtin_documents())
    prepare(docs, data, gpt2_from_file(ROOT / "tests" / "data" / "gpt2.tiktoken"), val_fraction=0.3, seed=2357,
            progress=False)
    configs = [ROOT / "configs" / "111m.yaml", ROOT / "configs" / "mup" / "mup.yaml",
               ROOT / "configs" / "cerebras" / "111m.yaml", ROOT / "configs" / "cerebras" / "validate.yaml"]
    args = [a for c in configs for a in ("--config", str(c))]
    proc = subprocess.run([sys.executable, "-m", "gigagpt", "fit", *args, "--data.path", str(data),
                           "--data.batch_size", "16", "--print_config"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mup: true" in proc.stdout  # the μP overlay reached the model
    proc = subprocess.run([sys.executable, "-m", "gigagpt", "fit", *args, "--data.path", str(data),
                           "--data.batch_size", "16"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    executors = sorted((tmp_path / "runs" / "111m" / "cerebras" / "executors").glob("0*"))
    assert len(executors) == 2
    for ex in executors:
        assert (ex / "cirh.mlir").stat().st_size > 0
