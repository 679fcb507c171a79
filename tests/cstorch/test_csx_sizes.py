"""CSX `validate_only` lowering of every shipped size at sequence length 2048, through `gigagpt fit`.

With ``debug.lazy_initialization`` no weight is materialised, so even 175B lowers on a laptop. Each
size is a fresh process; the test prints wall time and peak memory. These take minutes on a 2-core
machine, so they run when ``GIGAGPT_CSX_SIZES=1`` (``bash run.sh test`` sets it for CI, or run
``GIGAGPT_CSX_SIZES=1 pytest tests/cstorch/test_csx_sizes.py -s``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cs_helpers import ROOT, subprocess_env

pytest.importorskip("cerebras.pytorch")

SIZES = ["111m", "1p3b", "13b", "70b", "175b"]

MEASURE = """
import resource, sys, time
from gigagpt.cli import cli_main
start = time.perf_counter()
cli_main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"MEASURED wall_s={time.perf_counter() - start:.1f} peak_rss_mb={peak:.0f}", flush=True)
"""


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """The built-in corpus in GPT-2 BPE with 30% held out: >= 16 windows of 2048 tokens in each split."""
    from gigagpt.prepare import builtin_documents, prepare
    from gigagpt.tokenizer import gpt2_from_file

    out = tmp_path_factory.mktemp("gpt2_2048")
    docs = ((d, len(d.encode("utf-8"))) for d in builtin_documents())
    prepare(docs, out, gpt2_from_file(ROOT / "tests" / "data" / "gpt2.tiktoken"), val_fraction=0.3, seed=2357,
            progress=False)
    return out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GIGAGPT_CSX_SIZES") != "1", reason="set GIGAGPT_CSX_SIZES=1 (minutes per size)")
@pytest.mark.parametrize("size", SIZES)
def test_validate_only_lowers_shipped_size(size, gpt2_data, tmp_path):
    args = ["fit", "--config", str(ROOT / "configs" / f"{size}.yaml"),
            "--config", str(ROOT / "configs" / "cerebras" / f"{size}.yaml"),
            "--config", str(ROOT / "configs" / "cerebras" / "validate.yaml"),
            "--data.path", str(gpt2_data), "--data.batch_size", "16"]
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("MEASURED")]
    print(f"{size}: {line[-1] if line else '?'}")
    executors = sorted((tmp_path / "runs" / size / "cerebras" / "executors").glob("0*"))
    assert len(executors) == 2
    for ex in executors:
        assert (ex / "cirh.mlir").stat().st_size > 0
