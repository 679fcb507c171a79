"""Every private attribute of Lightning or cstorch that the bridge touches, in one place.

Nothing else in ``accelerators/`` reaches a name with a leading underscore of either library.
``tests/cstorch/test_private.py`` checks each name below against the installed versions, so an
upgrade that renames one fails there, loudly, instead of somewhere in a run.
"""

from __future__ import annotations

from typing import Any

# (owner, attribute, what the bridge uses it for)
NAMES: tuple[tuple[str, str, str], ...] = (
    ("cstorch BackendImpl", "_compiled_models", "the model id cstorch.compile gave a network"),
    ("cstorch Backend", "_impl", "the backend implementation (register_active_model, run_step_closures)"),
    ("cstorch function_mode", "_global_function_mode_forward_pre_hooks", "eager fast path: mute the listener"),
    ("cstorch function_mode", "_global_function_mode_forward_hooks", "eager fast path: mute the listener"),
    ("cstorch experimental.listener", "_listener_mode", "eager fast path: the listener to mute"),
    ("cstorch experimental.listener", "_global_traced_tensor_hooks", "eager fast path: only when no hook listens"),
    ("Lightning Trainer", "_logger_connector", "hand step-closure values to callback_metrics and loggers"),
    ("Lightning _LoggerConnector", "_callback_metrics", "values of a step that left the device"),
    ("Lightning _LoggerConnector", "_progress_bar_metrics", "values of a step that left the device"),
    ("Lightning LightningModule", "_current_fx_name", "evaluation values logged as from their hook"),
    ("Lightning Closure", "_result", "the traced step's result when the body is replayed"),
    ("Lightning LightningOptimizer", "_optimizer", "the cstorch optimizer inside Lightning's wrapper"),
    ("Lightning ModelCheckpoint", "_every_n_train_steps", "the checkpoint schedule of the executors"),
    ("Lightning ModelCheckpoint", "_train_time_interval", "refuse time-based saves on Cerebras"),
    ("Lightning Strategy", "_accelerator", "the strategy's own accelerator (set through its property)"),
    ("Lightning Strategy", "_precision_plugin", "the strategy's precision plugin (set through its property)"),
)


def backend_impl(backend) -> Any:
    return backend._impl


def compiled_model_id(backend, net) -> int:
    return backend._impl._compiled_models[net]


def function_mode_hook_tables() -> tuple[dict, dict]:
    from cerebras.pytorch.core import function_mode

    return (function_mode._global_function_mode_forward_pre_hooks,
            function_mode._global_function_mode_forward_hooks)


def traced_tensor_listener() -> tuple[Any, bool]:
    """(the listener's function mode or None, whether any traced-tensor hook is registered)."""
    from cerebras.pytorch.experimental import listener

    return getattr(listener, "_listener_mode", None), bool(getattr(listener, "_global_traced_tensor_hooks", None))


def logger_connector(trainer):
    return trainer._logger_connector


def publish_step_metrics(trainer, callback: dict, progress_bar: dict) -> None:
    connector = trainer._logger_connector
    connector._callback_metrics.update(callback)
    connector._progress_bar_metrics.update(progress_bar)


def set_current_fx_name(module, name: str | None) -> None:
    module._current_fx_name = name


def closure_result(closure):
    return closure._result


def set_closure_result(closure, result) -> None:
    closure._result = result


def unwrap_optimizer(optimizer):
    return optimizer._optimizer


def checkpoint_every_n_train_steps(callback) -> int:
    return getattr(callback, "_every_n_train_steps", 0) or 0


def checkpoint_train_time_interval(callback):
    return getattr(callback, "_train_time_interval", None)
