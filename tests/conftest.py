"""Shared fixtures: small token data made on the spot (never the network)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from gigagpt.prepare import builtin_documents, prepare
from gigagpt.tokenizer import bytes_tokenizer, gpt2_from_file

ROOT = Path(__file__).resolve().parents[1]
GPT2_TIKTOKEN = ROOT / "tests" / "data" / "gpt2.tiktoken"

# GIGAGPT_TEST_THREADS: run.sh runs two suites side by side, one thread each
torch.set_num_threads(int(os.environ.get("GIGAGPT_TEST_THREADS", min(2, os.cpu_count() or 1))))


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


class ForkServer:
    """A ``cli_fork.py`` process shared by the session: each request runs ``python -m gigagpt ARGS`` in a
    forked child of one interpreter that has imported the CLI once (see ``cli_fork.py``)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_fork.py")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out),
                                              "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:  # the child and its server go together; the next request starts a new server
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self.proc = None
                raise subprocess.TimeoutExpired(["gigagpt", *argv], timeout)
            reply = json.loads(self.proc.stdout.readline())
            return reply["rc"], out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


_FORK_SERVER = ForkServer()


@pytest.fixture(scope="session", autouse=True)
def _close_fork_server():
    yield
    _FORK_SERVER.close()


def run_gigagpt(*args: str, cwd: Path | None = None, timeout: float = 600, check: bool = True,
                env: dict | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m gigagpt ARGS`` against this checkout: in a forked child of the session's fork
    server (the real entry point, its own process, cwd and environment, without paying the imports
    again), or with ``fresh=True`` in a new interpreter (for what happens at import time, or runs
    that launch processes of their own)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    cwd = Path(cwd or ROOT)
    if fresh:
        done = subprocess.run([sys.executable, "-m", "gigagpt", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    else:
        rc, stdout, stderr = _FORK_SERVER.run(list(args), cwd, full_env, timeout)
    proc = subprocess.CompletedProcess(["gigagpt", *args], rc, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"gigagpt {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
