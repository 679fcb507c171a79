"""Values leaving the device: ``self.log`` calls and metric updates inside a traced step.

On CS-X the traced body runs once per executor (``core/compile.py: trace``) and the step closures it
queues repeat, running only on activation steps (``LtcBackendImpl.run_step_closures``). So nothing
per step may be decided in the body: values go out through one repeating step closure, and the
closure itself finds out which step it is delivering (``executor.run_context.iteration``). Host
values the body reads (``self.global_step``, Python numbers) are constants of the traced graph;
per-step host values come from the module's ``step_counters(step)`` in the closure instead.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from gigagpt.accelerators import private
from gigagpt.accelerators.bridge_errors import CerebrasError, import_cstorch


class _Captured:
    def __init__(self, metrics: dict):
        self.metrics = metrics
        self.logged: dict[str, tuple[torch.Tensor, dict]] = {}
        self.host: dict[str, tuple[object, dict]] = {}
        self.updates: list[tuple[str, tuple, dict]] = []


class CaptureMixin:
    """Log/metric capture of :class:`~gigagpt.accelerators.strategy.CerebrasStrategy`."""

    @contextmanager
    def _capture(self, module, fx: str):
        """Inside a traced step: hold back logs and metric updates, deliver them by a step closure."""
        from torchmetrics import Metric

        metrics = {name: m for name, m in module.named_modules() if isinstance(m, Metric)}
        captured = _Captured(metrics)
        original_log = module.log
        device_type = self.backend.torch_device.type

        def log(name, value, *a, **kw):
            if a:
                raise CerebrasError(f"pass self.log({name!r}, ...) options by keyword on Cerebras")
            if isinstance(value, torch.Tensor) and value.device.type == device_type:
                captured.logged[name] = (value.detach(), kw)
            elif fx == "training_step":
                captured.host[name] = (value, kw)
            else:
                original_log(name, value, **kw)

        def recorder(name):
            def update(*a, **kw):
                captured.updates.append((name, a, kw))
            return update

        module.log = log
        # torchmetrics keeps its bookkeeping wrapper (update counts, cache reset) as an instance
        # attribute: put that exact object back afterwards, not the bare class method.
        originals = {name: metric.__dict__.get("update") for name, metric in metrics.items()}
        for name, metric in metrics.items():
            metric.update = recorder(name)
        try:
            yield captured
        finally:
            del module.log
            for name, metric in metrics.items():
                if originals[name] is None:
                    del metric.update
                else:
                    metric.update = originals[name]

    def _deliver(self, module, fx: str, captured: _Captured) -> None:
        """Queue the step closure that hands this step's values to Lightning."""
        cstorch = import_cstorch()
        training = fx == "training_step"
        if training and captured.updates and self._activation_steps() > 1:
            raise CerebrasError(
                "torchmetrics updated in training_step lose the updates of every step but the activation "
                "steps on Cerebras; set the strategy's activation_steps: 1, or update them in validation_step"
            )
        names = list(captured.logged)
        options = [captured.logged[n][1] for n in names]
        update_meta = [(name, len(a), sorted(kw)) for name, a, kw in captured.updates]
        tensors = {
            "logged": [captured.logged[n][0] for n in names],
            "updates": [(list(a), [kw[k] for k in sorted(kw)]) for _, a, kw in captured.updates],
        }
        host, metrics = dict(captured.host), captured.metrics
        executor, start = (self._train_executor, self._executor_start) if training else (None, 0)

        @cstorch.step_closure
        def publish(values):
            step = start + executor.run_context.iteration if executor is not None else None
            self._publish(fx, module, names, options, values["logged"], host, step, executor)
            for (name, _, keys), (a, kv) in zip(update_meta, values["updates"]):
                metrics[name].update(*a, **dict(zip(keys, kv)))

        publish(tensors)

    def _log_learning_rates(self, optimizer, captured) -> None:
        """What a LearningRateMonitor logs, as device values of this step (its own hook never sees one)."""
        from lightning.pytorch.callbacks import LearningRateMonitor

        if not any(isinstance(cb, LearningRateMonitor) for cb in self.lightning_module.trainer.callbacks):
            return
        groups = optimizer.param_groups
        for i, group in enumerate(groups):
            name = f"lr-{type(optimizer).__name__}" + (f"/pg{i + 1}" if len(groups) > 1 else "")
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                captured.logged[name] = (lr.detach(), {"logger": True})

    def _activation_steps(self) -> int:
        executor = self._train_executor
        return executor.run_context.activation_steps if executor is not None else 1

    def _publish(self, fx, module, names, options, values, host, step, executor) -> None:
        """Hand values of one finished step to Lightning's loggers, progress bar and callback_metrics."""
        scalars = {n: v.detach().float().cpu().reshape(()) for n, v in zip(names, values)}
        opts = dict(zip(names, options))
        if fx != "training_step":
            # evaluation: aggregate as Lightning would (epoch means) through its result collection
            for name, value in scalars.items():
                private.set_current_fx_name(module, fx)
                try:
                    module.log(name, value, **opts[name])
                finally:
                    private.set_current_fx_name(module, None)
            return
        counters = module.step_counters(step) if hasattr(module, "step_counters") else {}
        for name, (value, kw) in host.items():
            if name not in counters:
                self._warn_host_value(name)
            scalars[name] = torch.as_tensor(counters.get(name, value), dtype=torch.float64).reshape(())
            opts[name] = kw
        for name, value in counters.items():  # per-step host values: the step's own, not the traced one
            scalars[name] = torch.as_tensor(value, dtype=torch.float64).reshape(())
            opts.setdefault(name, {})
        trainer = module.trainer
        private.publish_step_metrics(
            trainer, scalars, {n: v for n, v in scalars.items() if opts[n].get("prog_bar")})
        if executor.run_context.is_activation_step:
            to_log = {n: v.item() for n, v in scalars.items() if opts[n].get("logger", True)}
            to_log.update(self._rates())
            if to_log and trainer.loggers:
                private.logger_connector(trainer).log_metrics(to_log, step=step)

    def _warn_host_value(self, name: str) -> None:
        if name in self._warned_host:
            return
        self._warned_host.add(name)
        warnings.warn(
            f"self.log({name!r}, <host value>) inside training_step: on CS-X the step body runs once per "
            "executor, so this value is the one read then; log a device tensor, or return it from the "
            "module's step_counters(step)", stacklevel=2)

    def _rates(self) -> dict[str, float]:
        """Samples per second from the executor's profiler (cstorch's own rate tracker)."""
        executor = self._train_executor
        profiler = getattr(executor, "profiler", None) if executor is not None else None
        tracker = getattr(profiler, "rate_tracker", None) if profiler is not None else None
        if tracker is None:
            return {}
        try:  # (profiler.RateTrackerActivity computes on read)
            rate, global_rate = float(tracker.rate), float(tracker.global_rate)
        except (RuntimeError, ZeroDivisionError, KeyError):
            return {}
        return {"perf/cerebras/samples_per_sec": rate, "perf/cerebras/global_samples_per_sec": global_rate}
