"""Shared fixtures: small token data made on the spot (never the network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gigagpt.prepare import builtin_documents, prepare
from gigagpt.tokenizer import bytes_tokenizer, gpt2_from_file

ROOT = Path(__file__).resolve().parents[1]
GPT2_TIKTOKEN = ROOT / "tests" / "data" / "gpt2.tiktoken"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """Step-by-step decoding of tiny models: one thread avoids oversubscribing shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _private_machine_cache(tmp_path_factory):
    """Measured CPU peaks go to a test folder, never the user's ~/.cache/gigagpt (session-wide, so
    module fixtures that train and subprocesses see it too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GIGAGPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gigagpt-cache"))
        yield


def _docs():
    return ((d, len(d.encode("utf-8"))) for d in builtin_documents())


@pytest.fixture(scope="session")
def builtin_bytes(tmp_path_factory) -> Path:
    """The built-in corpus, byte-level (vocab 256), 10% held out."""
    out = tmp_path_factory.mktemp("builtin_bytes")
    prepare(_docs(), out, bytes_tokenizer(), val_fraction=0.1, seed=2357, progress=False)
    return out


@pytest.fixture(scope="session")
def builtin_gpt2(tmp_path_factory) -> Path:
    """The built-in corpus with real GPT-2 BPE from the shipped ranks file."""
    out = tmp_path_factory.mktemp("builtin_gpt2")
    prepare(_docs(), out, gpt2_from_file(GPT2_TIKTOKEN), val_fraction=0.1, seed=2357, progress=False)
    return out


def run_gigagpt(*args: str, cwd: Path | None = None, timeout: float = 600, check: bool = True,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m gigagpt ARGS`` in a fresh process against this checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "gigagpt", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gigagpt {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
