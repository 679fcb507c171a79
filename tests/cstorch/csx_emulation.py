"""CS-X semantics on cstorch's CPU backend, for tests.

cstorch's CPU backend runs a step eagerly: the traced Python body runs every step, every step closure
runs every step with cloned arguments, executors may be closed at any time. A CS-X cluster does none
of that. :func:`install` changes the CPU backend of this process so that a bridge that is correct
here is correct there too. Each rule cites the cstorch 2.10 function it reproduces:

1. ``core/compile.py: trace.generated_trace_fn``: on CSX the body runs only on an executor's initial
   step (under ``RepeatStepClosure``); later steps replay the compiled graph and return the first
   step's outputs. Here the body still runs (the CPU must compute), but as a replay: its host-side
   effects are dropped (``LightningModule.log`` and callback hooks called inside the step), the step
   closures it queues are not queued again, and their tensor arguments refresh the tensors the
   trace-time closures hold (the graph's outputs). Host values read while tracing are constants of
   the graph: a tensor made from Python values inside the step (``torch.tensor(float(step))``, and
   what is computed from such tensors alone) keeps its trace-time value in every replay.
2. ``LtcBackendImpl.run_step_closures``: closures run only when ``run_context.is_activation_step``;
   only repeating closures are queued again.
3. ``LtcBackendImpl.add_step_closure`` -> ``mark_output`` and ``_get_cpu_tensor``: a weight tensor
   passed to a step closure (a checkpoint closure too) is refused ("Please use cstorch.save()").
4. ``DataExecutor.__iter__`` / ``LtcBackendImpl.on_run_end``: closing an executor before its last
   step exits the run with ``GeneratorExit``, which shuts the appliance down
   (``shutdown_appliance``) without moving the weights to the tensor repository; the next executor
   then fails. Here the next ``on_run_start`` raises.
5. Optimizer state stays on the backend device where cstorch's ``Optimizer.load_state_dict`` put it;
   ``Strategy.load_optimizer_state_dict`` -> ``_optimizer_to_device(optimizer, root_device)`` would
   move it to the host CPU on CSX (``root_device`` is the CPU there).
6. ``LtcBackendImpl.save_tensors`` / ``to_cpu``: weights are fetched from the cluster only inside a
   running executor; ``cstorch.save`` of weights with no executor running does not read the
   trained values. Here it raises.

``CSX_EMULATION_SKIP=3,6`` (environment) leaves rules out, to see what each one catches alone.
``EMULATION`` records what happened (closed executors, replays) for the tests to inspect.
"""

from __future__ import annotations

import json
import os

import torch

EMULATION = {"executors": 0, "closed_early": [], "replays": 0, "dropped_logs": 0}


class CSXEmulationError(RuntimeError):
    """What the cluster would have failed with."""


def _weight_storages(impl) -> set[int]:
    ptrs = set()
    for model in list(impl._compiled_models):
        for p in model.parameters():
            ptrs.add(p.untyped_storage().data_ptr())
    for opt in list(impl.optimizer_registry):
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.numel() > 1:
                    ptrs.add(v.untyped_storage().data_ptr())
    return ptrs


def _check_no_weights(impl, args, kwargs, what: str) -> None:
    ptrs = _weight_storages(impl)
    for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.numel() > 0 and leaf.untyped_storage().data_ptr() in ptrs:
            raise CSXEmulationError(
                f"Attempting to get weight tensor in a step closure ({what}) but this is not supported "
                'yet. Please use "cstorch.save()" API to save model weights. (LtcBackendImpl._get_cpu_tensor)'
            )


class _Tracing:
    constants = None
    added: dict = {}


class _Replay:
    active = False


_FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.full, torch.zeros, torch.ones,
              torch.empty, torch.arange}


class _Constants(torch.overrides.TorchFunctionMode):
    """Tags tensors made from host values inside the traced step (constants of the compiled graph)."""

    def __init__(self):
        super().__init__()
        self.ids: set[int] = set()
        self.keep: list[torch.Tensor] = []  # keep the tagged tensors alive so their ids stay theirs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if func in _FACTORIES or (inputs and all(id(t) in self.ids for t in inputs)):
                self.ids.add(id(out))
                self.keep.append(out)
        return out


def install() -> None:
    skip = set(os.environ.get("CSX_EMULATION_SKIP", "").split(","))
    import cerebras.pytorch as cstorch
    import lightning.pytorch.core.module as lightning_module
    import lightning.pytorch.strategies.strategy as lightning_strategy
    import lightning.pytorch.trainer.call as lightning_call
    from cerebras.pytorch.backend import current_backend_impl
    from cerebras.pytorch.backend.cpu_backend import CpuBackendImpl as BaseBackendImpl
    from cerebras.pytorch.utils.step_closures import RepeatStepClosure

    original_trace = cstorch.trace
    original_log = lightning_module.LightningModule.log
    original_hooks = lightning_call._call_callback_hooks

    def log(self, *args, **kwargs):
        if _Replay.active:
            EMULATION["dropped_logs"] += 1
            return None
        return original_log(self, *args, **kwargs)

    def call_callback_hooks(*args, **kwargs):
        if _Replay.active:
            return None
        return original_hooks(*args, **kwargs)

    lightning_module.LightningModule.log = log
    lightning_call._call_callback_hooks = call_callback_hooks

    # Rule 1
    def trace(step_fn):
        inner = original_trace(step_fn)
        state = {"outputs": None, "closures": [], "constants": []}

        def traced(*args, **kwargs):
            impl = current_backend_impl()
            if not impl.in_run_context or impl.run_context.is_initial_step:
                mark = len(impl.step_closures)
                constants = _Constants()
                _Tracing.constants = constants
                try:
                    with RepeatStepClosure(), constants:
                        state["outputs"] = inner(*args, **kwargs)
                finally:
                    _Tracing.constants = None
                state["closures"] = list(impl.step_closures[mark:])
                state["constants"] = [_Tracing.added.pop(id(c[0]), []) for c in state["closures"]]
                _Tracing.added.clear()
                return state["outputs"]
            EMULATION["replays"] += 1
            mark = len(impl.step_closures)
            _Replay.active = True
            try:
                inner(*args, **kwargs)
            finally:
                _Replay.active = False
            fresh = impl.step_closures[mark:]
            del impl.step_closures[mark:]
            if len(fresh) != len(state["closures"]):
                raise CSXEmulationError("the traced step queued different step closures than at trace time")
            for (_, a0, k0, _), (_, a1, k1, _), frozen in zip(state["closures"], fresh, state["constants"]):
                leaves = zip(torch.utils._pytree.tree_leaves((a0, k0)), torch.utils._pytree.tree_leaves((a1, k1)))
                for i, (t0, t1) in enumerate(leaves):
                    if isinstance(t0, torch.Tensor) and i not in frozen:
                        t0.copy_(t1)
            return state["outputs"]

        return traced

    cstorch.trace = trace

    # Rule 3 (checked where the arguments are taken, before the CPU backend clones them)
    original_add = BaseBackendImpl.add_step_closure

    def add_step_closure(self, closure, args, kwargs, run_async=False, repeat=False):
        if "3" not in skip:
            _check_no_weights(self, args, kwargs, getattr(closure, "__name__", "closure"))
        if _Tracing.constants is not None:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            _Tracing.added[id(closure)] = {i for i, t in enumerate(leaves) if id(t) in _Tracing.constants.ids}
        return original_add(self, closure, args, kwargs, run_async=run_async, repeat=repeat)

    # Rule 2
    def run_step_closures(self):
        closures, self.step_closures = self.step_closures, []
        for closure, args, kwargs, repeat in closures:
            if self.run_context.is_activation_step:
                closure(*args, **kwargs)
            if repeat:
                self.step_closures.append((closure, args, kwargs, repeat))

    # Rule 4
    original_start, original_end = BaseBackendImpl.on_run_start, BaseBackendImpl.on_run_end
    broken = {}

    def on_run_start(self):
        if broken:
            raise CSXEmulationError(
                f"the appliance session ended when an executor was closed at step {broken['step']} of "
                f"{broken['num_steps']} (LtcBackendImpl.on_run_end -> shutdown_appliance); weights were not "
                "moved to the tensor repository, so this executor cannot start"
            )
        EMULATION["executors"] += 1
        return original_start(self)

    def on_run_end(self, exec_type=None, exec_value=None, traceback=None):
        run = self.run_context
        if exec_type is not None or run.step < run.num_steps:
            broken.update(step=run.step, num_steps=run.num_steps)
            EMULATION["closed_early"].append([run.step, run.num_steps])
        return original_end(self, exec_type, exec_value, traceback)

    BaseBackendImpl.add_step_closure = add_step_closure
    BaseBackendImpl.run_step_closures = run_step_closures
    BaseBackendImpl.on_run_start = on_run_start
    BaseBackendImpl.on_run_end = on_run_end

    # Rule 5
    original_to_device = lightning_strategy._optimizer_to_device

    def optimizer_to_device(optimizer, device):
        if isinstance(optimizer, cstorch.optim.Optimizer):
            raise CSXEmulationError(
                f"optimizer state moved to {device} after cstorch's Optimizer.load_state_dict placed it on the "
                "backend device (Strategy.load_optimizer_state_dict -> _optimizer_to_device)"
            )
        return original_to_device(optimizer, device)

    if "5" not in skip:
        lightning_strategy._optimizer_to_device = optimizer_to_device

    # Rule 6
    import cerebras.pytorch.storage.save as save_module

    original_save = cstorch.save

    def save(state_dict, path):
        impl = current_backend_impl(raise_exception=False)
        if impl is not None and not impl.data_executor_stack:
            ptrs = _weight_storages(impl)
            for leaf in torch.utils._pytree.tree_leaves(state_dict):
                if isinstance(leaf, torch.Tensor) and leaf.numel() > 1 and leaf.untyped_storage().data_ptr() in ptrs:
                    raise CSXEmulationError(
                        f"cstorch.save({path!r}) of weights with no executor running: the trained weights are "
                        "on the cluster (LtcBackendImpl.save_tensors fetches them only inside an executor)"
                    )
        return original_save(state_dict, path)

    if "6" not in skip:
        cstorch.save = save
        save_module.save = save


def dump(path) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(EMULATION, f)
    os.replace(tmp, path)
