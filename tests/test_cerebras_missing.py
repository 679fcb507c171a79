"""accelerator="cerebras" without cerebras-pytorch: one line telling how to install it.

Runs in both environments: where cerebras-pytorch is installed, a fresh process hides it first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HIDE = "import sys; sys.modules['cerebras'] = None; sys.modules['cerebras.pytorch'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_trainer_says_how_to_install():
    proc = _run(
        "import lightning as L, gigagpt\n"
        "from gigagpt.accelerators import CerebrasNotInstalledError\n"
        "try:\n"
        "    L.Trainer(accelerator='cerebras', logger=False)\n"
        "except CerebrasNotInstalledError as err:\n"
        "    print('ERR', err)\n"
    )
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("ERR ")]
    assert len(line) == 1, proc.stdout
    assert 'pip install "gigagpt[cerebras]"' in line[0]


def test_cli_fails_in_one_line(tmp_path):
    proc = _run(
        "from gigagpt.cli import cli_main\n"
        f"cli_main(['fit', '--config', 'configs/tiny.yaml', '--trainer.accelerator', 'cerebras', "
        f"'--trainer.default_root_dir', {str(tmp_path)!r}, '--data.path', {str(tmp_path)!r}])\n"
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gigagpt: ") and 'pip install "gigagpt[cerebras]"' in last, proc.stderr


def test_importing_gigagpt_does_not_import_cstorch():
    code = ("import sys, gigagpt, gigagpt.accelerators\n"
            "print('LOADED', sorted(m for m in sys.modules if m.startswith('cerebras')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout
