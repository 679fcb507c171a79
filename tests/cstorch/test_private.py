"""Every private name of Lightning or cstorch the bridge reaches (accelerators/private.py) still exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("cerebras.pytorch")

from gigagpt.accelerators.private import NAMES

ROOT = Path(__file__).resolve().parents[2]


def _owners() -> dict[str, object]:
    import lightning.pytorch.trainer.connectors.logger_connector.logger_connector as logger_connector
    from cerebras.pytorch.backend import Backend
    from cerebras.pytorch.backend.base_backend import BaseBackend
    from cerebras.pytorch.core import function_mode
    from cerebras.pytorch.experimental import listener
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.loops.optimization.automatic import Closure
    from lightning.pytorch.strategies import Strategy

    return {
        "cstorch BackendImpl": BaseBackend, "cstorch Backend": Backend,
        "cstorch function_mode": function_mode, "cstorch experimental.listener": listener,
        "Lightning Trainer": Trainer,
        "Lightning _LoggerConnector": logger_connector._LoggerConnector,
        "Lightning LightningModule": LightningModule, "Lightning Closure": Closure,
        "Lightning LightningOptimizer": LightningOptimizer, "Lightning ModelCheckpoint": ModelCheckpoint,
        "Lightning Strategy": Strategy,
    }


def _instance_attributes(cls) -> set[str]:
    """Attributes a class's ``__init__`` (or any method) assigns on ``self``, read from its source."""
    import inspect
    import textwrap

    names = set()
    for klass in cls.__mro__:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return names


@pytest.mark.parametrize("owner,name,why", NAMES, ids=[f"{o}.{n}" for o, n, _ in NAMES])
def test_private_name_exists(owner, name, why):
    target = _owners()[owner]
    if hasattr(target, name):
        return
    assert isinstance(target, type) and name in _instance_attributes(target), f"{owner}.{name} ({why}) is gone"


def test_no_other_private_access_in_the_bridge():
    """Outside private.py, accelerators/ reaches no underscored attribute of another object."""
    offenders = []
    for path in (ROOT / "accelerators").glob("*.py"):
        if path.name in ("private.py",):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offenders == []
