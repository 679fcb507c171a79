"""Errors of the Cerebras bridge: each message names the setting and the fix in one line."""

from __future__ import annotations

from gigagpt.errors import GigagptError

INSTALL_HINT = 'pip install "gigagpt[cerebras]"'


class CerebrasError(GigagptError, RuntimeError):
    """A Cerebras setting or environment problem; the message says what to change."""


class CerebrasNotInstalledError(CerebrasError, ImportError):
    """``accelerator="cerebras"`` was asked for but cerebras-pytorch is not installed."""


class CerebrasClusterError(CerebrasError):
    """The run needs a Cerebras cluster that is not configured or not reachable."""


class CerebrasCheckpointError(CerebrasError):
    """A checkpoint was requested at a step where the cluster cannot provide the weights."""


def import_cstorch():
    """``cerebras.pytorch``, or one clear line telling how to install it."""
    try:
        import cerebras.pytorch as cstorch
    except ModuleNotFoundError as err:
        if err.name and not err.name.startswith("cerebras"):
            raise
        raise CerebrasNotInstalledError(
            f'accelerator="cerebras" needs cerebras-pytorch, which is not installed: run `{INSTALL_HINT}` '
            "(Python 3.11; it pins torch 2.4, so use a separate environment)"
        ) from None
    return cstorch


def cstorch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("cerebras.pytorch") is not None
    except ModuleNotFoundError:
        return False
