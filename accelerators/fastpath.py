"""On cstorch's eager CPU/GPU backends, mute the traced-tensor listener while nobody listens.

``cstorch.trace`` runs every op of the step through a function mode; with no traced-tensor hook
registered (``cerebras.pytorch.experimental.register_traced_tensor_hook``) its listener only pays two
pytree walks per op, which dominates the step time of small models. CSX is never touched.
"""

from __future__ import annotations

from contextlib import contextmanager

from gigagpt.accelerators import private


@contextmanager
def eager_fast_path(backend_type: str):
    if backend_type == "CSX":
        yield
        return
    try:
        tables = private.function_mode_hook_tables()
        mode, hooked = private.traced_tensor_listener()
    except ImportError:
        yield
        return
    if mode is None or hooked:
        yield
        return
    muted = []
    for table in tables:
        for key, hook in list(table.items()):
            if getattr(hook, "__self__", None) is mode:
                muted.append((table, key, table.pop(key)))
    try:
        yield
    finally:
        for table, key, hook in muted:
            table[key] = hook
