"""CerebrasStrategy: Lightning's fit / validate loops driven through cerebras.pytorch (cstorch).

What happens where:

- ``setup_environment``: one cstorch backend (``CSX``, ``CPU`` or ``GPU``) per process.
- ``tensor_init_context``: the LightningModule's ``configure_model`` builds the network under
  ``backend.device`` (lazy on CSX: with ``debug.lazy_initialization`` no weight is materialised).
- ``setup``: ``cstorch.compile``; cstorch's AdamW + LinearLR/CosineDecayLR/SequentialLR built from
  the module's ``optim`` description.
- ``process_dataloader``: the training loader becomes ``cstorch.utils.data.DataLoader`` over the
  DataModule's module-level factory, fed by one long-lived ``DataExecutor`` per segment of training
  between validations; validation gets its own executor.
- ``optimizer_step``: Lightning's whole step (training_step, zero_grad, backward, clipping,
  optimizer step, scheduler step) runs inside one ``cstorch.trace``d function. On CSX the body is
  traced on the first step of an executor only; later steps replay the compiled graph.
- Values logged with tensors inside a traced step, and torchmetrics updates, reach Lightning
  through ``cstorch.step_closure`` at the end of the step (when the executor next advances):
  loggers get them at the step they belong to, the progress bar one step later.
- ``save_checkpoint``: ``cstorch.checkpoint_closure`` + :class:`CerebrasCheckpointIO` (``.mdl``),
  only on the executor's checkpoint steps (aligned with ``ModelCheckpoint.every_n_train_steps``);
  a save anywhere else is refused loudly instead of silently skipped.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.types import LRSchedulerConfig

from accelerators.checkpoint_io import MDL_SUFFIX, CerebrasCheckpointIO
from accelerators.errors import CerebrasCheckpointError, CerebrasClusterError, CerebrasError, import_cstorch
from accelerators.precision import CerebrasPrecision

log = logging.getLogger(__name__)

BACKENDS = ("CSX", "CPU", "GPU")


@dataclass
class ClusterSettings:
    """Fields of ``cstorch.distributed.ClusterConfig`` (``None``: cstorch's default)."""

    mgmt_address: str | None = None
    mgmt_namespace: str | None = None
    credentials_path: str | None = None
    num_csx: int = 1
    max_wgt_servers: int | None = None
    max_act_per_csx: int | None = None
    num_workers_per_csx: int | None = None
    mount_dirs: list[str] = field(default_factory=list)
    python_paths: list[str] = field(default_factory=list)
    job_labels: list[str] = field(default_factory=list)
    job_priority: str | None = None
    job_time_sec: int | None = None
    disable_version_check: bool | None = None

    def to_cluster_config(self):
        cstorch = import_cstorch()
        values = {k: v for k, v in asdict(self).items() if v is not None and v != []}
        return cstorch.distributed.ClusterConfig(**values)


def apply_csx_settings(settings: dict[str, Any]) -> None:
    """Set ``cstorch.backends.csx.<group>.<name>`` from ``{"<group>.<name>": value}``."""
    cstorch = import_cstorch()
    for key, value in settings.items():
        group_name, _, name = key.rpartition(".")
        group = getattr(cstorch.backends.csx, group_name, None) if group_name else None
        if group is None or not hasattr(group, name):
            raise ValueError(
                f"unknown Cerebras setting csx_settings[{key!r}]; use '<group>.<name>' with group one of "
                "performance, precision, debug (e.g. 'debug.lazy_initialization' or "
                "'debug.compile_crd_memory_gi')"
            )
        setattr(group, name, value)


def _cstorch_lr_scheduler(optimizer, optim, max_steps: int | None):
    """Warmup (LinearLR 0 -> lr) then cosine (CosineDecayLR lr -> min_lr), as :func:`gigagpt.optim.get_lr`."""
    cstorch = import_cstorch()
    sched = cstorch.optim.lr_scheduler
    decay_steps = optim.resolve_decay_steps(max_steps)
    parts, milestones = [], []
    if optim.warmup_steps > 0:
        parts.append(sched.LinearLR(optimizer, initial_learning_rate=0.0, end_learning_rate=optim.lr,
                                    total_iters=optim.warmup_steps))
        milestones.append(optim.warmup_steps)
    if decay_steps > 0:
        parts.append(sched.CosineDecayLR(optimizer, initial_learning_rate=optim.lr,
                                         end_learning_rate=optim.min_lr, total_iters=decay_steps))
    else:
        parts.append(sched.ConstantLR(optimizer, learning_rate=optim.lr))
    scheduler = parts[0] if len(parts) == 1 else sched.SequentialLR(optimizer, parts, milestones=milestones)
    if any("adjust_learning_rate" in group for group in optimizer.param_groups):
        # Each group gets the schedule times its own adjust_learning_rate (the groups' lr_scale).
        scheduler = sched.ScalePerParamLR(optimizer, scheduler)
    return scheduler


def build_cstorch_optimizer(model: torch.nn.Module, optim, max_steps: int | None):
    """cstorch's AdamW and schedule from a :class:`gigagpt.optim.OptimConfig`."""
    cstorch = import_cstorch()
    from gigagpt.optim import param_groups

    groups = param_groups(model, optim.weight_decay)
    for group in groups:  # a group's lr_scale (μP) is what cstorch's ScalePerParamLR reads here
        if "lr_scale" in group:
            group["adjust_learning_rate"] = group["lr_scale"]
    optimizer = cstorch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        correct_bias=True,
    )
    return optimizer, _cstorch_lr_scheduler(optimizer, optim, max_steps)


class _Stream:
    """What Lightning iterates in place of a DataLoader: batches from cstorch executors.

    ``__len__`` lets Lightning's fetcher skip its look-ahead: each Lightning batch advances the
    executor exactly once, so the step closures of step k run when batch k+1 is fetched.
    """

    def __init__(self, length: int, next_batch, on_iter=None):
        self.length, self.next_batch, self.on_iter = length, next_batch, on_iter

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if self.on_iter is not None:
            self.on_iter()
        for _ in range(self.length):
            try:
                batch = self.next_batch()
            except StopIteration:
                return
            yield batch


class CerebrasStrategy(Strategy):
    """Train and evaluate a LightningModule through a cstorch backend.

    Args:
        backend: ``"CSX"`` (a Cerebras cluster), ``"CPU"`` or ``"GPU"`` (cstorch's eager backends).
        validate_only: CSX: trace and lower one step to Cerebras IR locally, then stop (no cluster).
        compile_only: CSX: trace, lower and compile on the cluster, then stop (needs ``cluster``).
        cluster: the ``cstorch.distributed.ClusterConfig`` fields (``mgmt_address``, ``num_csx``,
            ``mount_dirs``, ``python_paths``, ...). Scaling 1 -> 16 systems is ``cluster.num_csx``.
        micro_batch_size: CSX gradient-accumulation micro batch (``"auto"``, ``"explore"``, an int,
            or ``None`` to disable); ``cstorch.backends.csx.performance.micro_batch_size``.
        csx_settings: further ``cstorch.backends.csx`` settings as ``{"<group>.<name>": value}``,
            e.g. ``{"debug.lazy_initialization": true, "debug.compile_crd_memory_gi": 64}``.
        artifact_dir: where cstorch writes its artifacts (default ``<default_root_dir>/cerebras``).
        compile_dir: CSX compile cache folder on the cluster.
        activation_steps: CSX: fetch logged values every this many steps (default: the Trainer's
            ``log_every_n_steps``).
        gpu_options: extra keyword arguments for ``cstorch.backend("GPU", ...)``.
        init_on_device: build the network under ``backend.device`` (default: on CSX only; see
            :meth:`tensor_init_context`).
    """

    strategy_name = "cerebras"

    def __init__(
        self,
        backend: str = "CSX",
        validate_only: bool = False,
        compile_only: bool = False,
        cluster: ClusterSettings | None = None,
        micro_batch_size: int | str | None = "auto",
        csx_settings: dict[str, Any] | None = None,
        artifact_dir: str | None = None,
        compile_dir: str | None = None,
        activation_steps: int | None = None,
        gpu_options: dict[str, Any] | None = None,
        init_on_device: bool | None = None,
        accelerator=None,
        checkpoint_io=None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            checkpoint_io=checkpoint_io or CerebrasCheckpointIO(),
            precision_plugin=precision_plugin,
        )
        backend = str(backend).upper()
        if backend not in BACKENDS:
            raise ValueError(f"CerebrasStrategy backend must be one of {BACKENDS}, got {backend!r}")
        if (validate_only or compile_only) and backend != "CSX":
            raise ValueError(
                f"validate_only / compile_only are CSX modes; got backend={backend!r}: set backend: CSX"
            )
        if validate_only and compile_only:
            raise ValueError("set only one of validate_only and compile_only")
        if isinstance(cluster, dict):
            cluster = ClusterSettings(**cluster)
        self.backend_type = backend
        self.validate_only = validate_only
        self.compile_only = compile_only
        self.cluster = cluster or ClusterSettings()
        self.micro_batch_size = micro_batch_size
        self.csx_settings = dict(csx_settings or {})
        self.artifact_dir = artifact_dir
        self.compile_dir = compile_dir
        self.activation_steps = activation_steps
        self.gpu_options = dict(gpu_options or {})
        self.init_on_device = init_on_device

        self.backend = None  # the cstorch backend, created in setup_environment
        self._model_ids: dict[int, int] = {}
        self._traced_train = None
        self._traced_eval = None
        self._train_iter = None  # iterator over the current training DataExecutor
        self._train_executor = None
        self._eval_iter = None
        self._eval_executor = None
        self._log_step = 0  # Lightning step the next delivered training values belong to
        self._in_trace = False

    # -- Lightning plumbing -------------------------------------------------------------------------
    @property
    def root_device(self) -> torch.device:
        # Lightning's own bookkeeping tensors live here. On CSX that is the host: the lazy device
        # cannot hand values back outside a step closure.
        if self.backend is not None and self.backend_type == "GPU":
            return self.backend.torch_device
        return torch.device("cpu")

    @property
    def is_global_zero(self) -> bool:
        return True

    # One Lightning process drives the whole cluster; data parallelism across CS-X systems happens
    # inside cstorch (each input worker streams its share of the global batch).
    global_rank = local_rank = node_rank = 0
    world_size = 1

    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else CerebrasPrecision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        # Lightning hands every strategy its own precision plugin (e.g. MixedPrecision for
        # "bf16-mixed"); on Cerebras the same setting maps onto cstorch.amp.
        if plugin is not None and not isinstance(plugin, CerebrasPrecision):
            plugin = CerebrasPrecision(getattr(plugin, "precision", "32-true"))
        self._precision_plugin = plugin

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load weights after cstorch.compile placed the model on the backend

    def module_to_device(self, module: torch.nn.Module) -> None:
        pass  # the network is built under backend.device; cstorch.compile moves what is left

    def model_to_device(self) -> None:
        pass

    def batch_to_device(self, batch: Any, device=None, dataloader_idx: int = 0) -> Any:
        return batch  # executors hand out batches already on the backend's device

    def barrier(self, name: str | None = None) -> None:
        pass

    def broadcast(self, obj, src: int = 0):
        return obj

    def all_gather(self, tensor, group=None, sync_grads: bool = False):
        return tensor

    def reduce(self, tensor, group=None, reduce_op="mean"):
        return tensor

    # -- backend -----------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        from accelerators.cerebras import CerebrasAccelerator

        if not isinstance(self.accelerator, CerebrasAccelerator):
            raise CerebrasError(
                f"CerebrasStrategy needs accelerator=\"cerebras\", got {type(self.accelerator).__name__}; "
                "set trainer.accelerator: cerebras (or leave it at auto)"
            )
        if self.backend is None:
            self.backend = self._create_backend()
        super().setup_environment()

    def _create_backend(self):
        cstorch = import_cstorch()
        existing = cstorch.current_backend(raise_exception=False, raise_warning=False)
        if existing is not None:
            if existing.backend_type.name.upper() != self.backend_type:
                raise CerebrasError(
                    f"this process already runs a cstorch {existing.backend_type.name} backend; cstorch "
                    f"allows one backend per process, so a {self.backend_type} run needs a new process"
                )
            return existing
        artifact_dir = self.artifact_dir or str(Path(self._root_dir()) / "cerebras")
        if self.backend_type == "CSX":
            if self.micro_batch_size != "auto":
                cstorch.backends.csx.performance.micro_batch_size = self.micro_batch_size
            apply_csx_settings(self.csx_settings)
            kwargs = {
                "artifact_dir": artifact_dir,
                "compile_only": self.compile_only,
                "validate_only": self.validate_only,
                "cluster_config": self.cluster.to_cluster_config(),
            }
            if self.compile_dir:
                kwargs["compile_dir"] = self.compile_dir
            backend = cstorch.backend("CSX", **kwargs)
        elif self.backend_type == "GPU":
            backend = cstorch.backend("GPU", artifact_dir=artifact_dir, **self.gpu_options)
        else:
            backend = cstorch.backend("CPU", artifact_dir=artifact_dir)
        self.precision_plugin.configure()
        return backend

    def _root_dir(self) -> str:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return trainer.default_root_dir if trainer is not None else "."

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None):
        """Where ``configure_model`` builds the network.

        CSX: under ``backend.device`` (lazy; with ``debug.lazy_initialization`` nothing is
        materialised). cstorch's device context draws every random initialisation from a fresh
        generator seeded by the global one, so weights are reproducible but differ from eager
        PyTorch's; on the eager CPU/GPU backends the network is therefore built on the plain torch
        device (``init_on_device=True`` forces the cstorch device there too), which gives exactly
        the weights plain Lightning gives for the same seed.
        """
        if self.backend is None:
            self.backend = self._create_backend()
        on_device = self.init_on_device if self.init_on_device is not None else self.backend_type == "CSX"
        with self.backend.device if on_device else self.backend.torch_device:
            yield

    # -- setup: compile, optimizer, schedule ------------------------------------------------------
    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._compile(module)
        if trainer.state.fn == "fit":
            if trainer.accumulate_grad_batches != 1:
                raise CerebrasError(
                    f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported on "
                    "Cerebras: set it to 1 and put the global batch in data.batch_size (CSX splits it into "
                    "micro batches itself: strategy micro_batch_size)"
                )
            self.setup_optimizers(trainer)
            self._align_checkpoint_callbacks(trainer)
        self.setup_precision_plugin()

    def _networks(self, module) -> list[torch.nn.Module]:
        """The networks to compile: ``module.model`` when the module keeps one there, else the module."""
        net = getattr(module, "model", None)
        return [net] if isinstance(net, torch.nn.Module) else [module]

    def _compile(self, module) -> None:
        cstorch = import_cstorch()
        for net in self._networks(module):
            if id(net) in self._model_ids:
                continue
            tied = self._tied_pairs(net)
            cstorch.compile(net, self.backend)
            self._model_ids[id(net)] = self.backend._impl._compiled_models[net]
            for owner, name, source in tied:  # keep weight tying (LM head = token embedding)
                if getattr(owner, name) is not source():
                    setattr(owner, name, source())
            for owner, name, source in tied:
                if getattr(owner, name) is not source():
                    raise CerebrasError(f"weight tying of {name} was lost when moving to the Cerebras device")

    @staticmethod
    def _tied_pairs(net: torch.nn.Module):
        """(module, attribute, getter of the first owner's tensor) for every shared parameter."""
        first: dict[int, tuple[torch.nn.Module, str]] = {}
        pairs = []
        for _, mod in net.named_modules(remove_duplicate=False):
            for name, param in mod.named_parameters(recurse=False):
                owner = first.setdefault(id(param), (mod, name))
                if owner[0] is not mod or owner[1] != name:
                    pairs.append((mod, name, lambda o=owner: getattr(o[0], o[1])))
        return pairs

    def setup_optimizers(self, trainer) -> None:
        module = self.lightning_module
        optim = getattr(module, "optim", None)
        from gigagpt.optim import OptimConfig

        if not isinstance(optim, OptimConfig):
            raise CerebrasError(
                f"{type(module).__name__} has no `optim: OptimConfig`; on Cerebras the optimizer and "
                "schedule are built from it (cstorch's AdamW + warmup/cosine)"
            )
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        optimizer, scheduler = build_cstorch_optimizer(module, optim, max_steps)
        self.optimizers = [optimizer]
        # interval "cerebras": Lightning's loop never steps it; the traced step does.
        self.lr_scheduler_configs = [LRSchedulerConfig(scheduler, interval="cerebras", name="lr")]

    # -- checkpoint schedule -----------------------------------------------------------------------
    def _checkpoint_every(self, trainer) -> list[int]:
        every = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if getattr(cb, "_train_time_interval", None):
                    raise CerebrasCheckpointError(
                        "ModelCheckpoint(train_time_interval=...) cannot be honoured on Cerebras: weights "
                        "are fetched only at scheduled steps; use checkpoint.every_n_train_steps instead"
                    )
                n = getattr(cb, "_every_n_train_steps", 0) or 0
                if n > 0:
                    every.append(n)
        return sorted(set(every))

    def _align_checkpoint_callbacks(self, trainer) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.FILE_EXTENSION = MDL_SUFFIX
        self._checkpoint_every(trainer)

    def _checkpoint_schedule(self, start: int, num_steps: int):
        """Executor steps k (0-based) at which global step start+k+1 is a multiple of some every_n."""
        cstorch = import_cstorch()
        Schedule = cstorch.utils.data.utils.Schedule
        ranges = []
        for n in self._checkpoint_every(self.lightning_module.trainer):
            first = (n - start % n) - 1
            if first < num_steps:
                ranges.append(Schedule.Range(start=first, end=num_steps, step=n, include_last=True))
        return Schedule(ranges) if ranges else num_steps  # int num_steps: only the final step

    # -- data --------------------------------------------------------------------------------------
    def process_dataloader(self, dataloader):
        trainer = self.lightning_module.trainer
        if trainer.training:
            return self._train_stream(trainer)
        if trainer.validating or trainer.sanity_checking or trainer.testing:
            return self._eval_stream(trainer, dataloader)
        raise CerebrasError(
            f'Trainer(accelerator="cerebras") supports fit, validate and test; {trainer.state.fn} is not '
            "supported: use a plain Trainer for prediction (`gigagpt sample` / `gigagpt export`)"
        )

    def _train_stream(self, trainer) -> _Stream:
        if not trainer.max_steps or trainer.max_steps < 0:
            raise CerebrasError(
                'Trainer(accelerator="cerebras") needs trainer.max_steps: a Cerebras run is planned in '
                "steps (set e.g. --trainer.max_steps=1000)"
            )
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_loader_args"):
            raise CerebrasError(
                "on Cerebras the training data must come from a DataModule with train_loader_args() "
                "(plain, picklable arguments of a module-level loader factory), such as GPTDataModule"
            )
        if self.validate_only or self.compile_only:
            length = 1
        else:
            length = trainer.max_steps
        return _Stream(length, self._next_train_batch)

    def _segment_end(self, trainer, start: int) -> int:
        """Global step at which the current executor ends: the next validation, or max_steps."""
        end = trainer.max_steps
        interval = trainer.val_check_batch if trainer.enable_validation else None
        if isinstance(interval, int) and interval > 0 and trainer.check_val_every_n_epoch is None:
            end = min(end, (start // interval + 1) * interval)
        return end

    def _open_train_executor(self):
        cstorch = import_cstorch()
        trainer = self.lightning_module.trainer
        start = trainer.global_step
        num_steps = max(self._segment_end(trainer, start) - start, 1)
        args = dict(trainer.datamodule.train_loader_args())
        args.update(start_step=start, num_steps=None)
        loader = cstorch.utils.data.DataLoader(cerebras_train_loader, args)
        activation = self.activation_steps or trainer.log_every_n_steps or 1
        self._train_executor = cstorch.utils.data.DataExecutor(
            loader,
            num_steps=num_steps,
            checkpoint_steps=self._checkpoint_schedule(start, num_steps),
            activation_steps=min(activation, num_steps),
        )
        self._log_step = start
        return iter(self._train_executor)

    def _next_train_batch(self):
        if self._train_iter is not None:
            try:
                return self._advance(self._train_iter)
            except StopIteration:
                self._train_iter = self._train_executor = None
            if self.validate_only or self.compile_only:
                raise StopIteration
        self._train_iter = self._open_train_executor()
        return self._advance(self._train_iter)

    def _advance(self, iterator):
        with _cluster_guard():
            return next(iterator)

    def _drain(self, iterator, executor) -> None:
        """End an executor: run the pending step's closures (and compile/execute on CSX)."""
        with _cluster_guard():
            if executor.on_final_iteration:
                for _ in iterator:
                    raise CerebrasError("a Cerebras executor yielded more batches than planned")
            else:
                self.backend._impl.run_step_closures()
                iterator.close()

    def _finish_train_executor(self) -> None:
        """Run the last step's closures and end the executor (normal end, validation, early stop)."""
        if self._train_iter is None:
            return
        it, executor = self._train_iter, self._train_executor
        self._train_iter = self._train_executor = None
        self._drain(it, executor)

    def _eval_stream(self, trainer, dataloader) -> _Stream:
        """Evaluation batches through a cstorch executor made afresh at each pass over the stream.

        Lightning asks for the loader once per fit and reuses it for the sanity check and every
        validation, deriving its own batch limits from ``len()``. So the stream's length is the
        loader's, and the number of steps of each pass is decided when the pass starts: the sanity
        check's ``num_sanity_val_steps``, ``limit_val_batches`` / ``limit_test_batches`` otherwise,
        exactly as Lightning counts them.
        """
        dm = trainer.datamodule
        one_step = self.validate_only or self.compile_only  # lower the evaluation step once, then stop
        stream = _Stream(1 if one_step else len(dataloader), None)

        def start():
            self._close_eval_executor()
            n = 1 if one_step else _eval_batches(trainer, len(dataloader))
            if n == 0 or (one_step and self._traced_eval is not None):
                return
            factory, args = cerebras_eval_factory(dm, dataloader, n)
            cstorch = import_cstorch()
            loader = cstorch.utils.data.DataLoader(factory, args)
            self._eval_executor = cstorch.utils.data.DataExecutor(loader, num_steps=n)
            self._eval_iter = iter(self._eval_executor)

        def next_batch():
            if self._eval_iter is None:
                raise StopIteration
            return self._advance(self._eval_iter)

        stream.next_batch, stream.on_iter = next_batch, start
        return stream

    def _close_eval_executor(self) -> None:
        if self._eval_iter is None:
            return
        it, executor = self._eval_iter, self._eval_executor
        self._eval_iter = self._eval_executor = None
        self._drain(it, executor)

    # -- the traced steps --------------------------------------------------------------------------
    def _register_active_models(self) -> None:
        impl = self.backend._impl
        for net in self._networks(self.lightning_module):
            impl.register_active_model(net, self._model_ids[id(net)])

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if self._traced_train is None:
            cstorch = import_cstorch()
            self._traced_train = cstorch.trace(self._train_step_body)
        with self._eager_fast_path(), _cluster_guard():
            result = self._traced_train(optimizer, closure, model, kwargs)
        # On CSX later steps replay the graph without running the body: hand Lightning the
        # traced step's result as if its closure had run.
        if isinstance(closure, Closure) and closure._result is None:
            closure._result = result
        if self.validate_only or self.compile_only:
            self.lightning_module.trainer.should_stop = True  # one step is all these modes run
        return None if result is None else result.loss

    @contextmanager
    def _eager_fast_path(self):
        """On the eager CPU/GPU backends, mute cstorch's traced-tensor listener while nobody listens.

        ``cstorch.trace`` runs every op of the step through a function mode; with no traced-tensor hook
        registered (``cerebras.pytorch.experimental.register_traced_tensor_hook``) its listener only
        pays two pytree walks per op, which dominates the step time of small models. CSX is untouched.
        """
        if self.backend_type == "CSX":
            yield
            return
        try:
            from cerebras.pytorch.core import function_mode
            from cerebras.pytorch.experimental import listener
        except ImportError:
            yield
            return
        mode = getattr(listener, "_listener_mode", None)
        if mode is None or getattr(listener, "_global_traced_tensor_hooks", None):
            yield
            return
        muted = []
        for table in (function_mode._global_function_mode_forward_pre_hooks,
                      function_mode._global_function_mode_forward_hooks):
            for key, hook in list(table.items()):
                if getattr(hook, "__self__", None) is mode:
                    muted.append((table, key, table.pop(key)))
        try:
            yield
        finally:
            for table, key, hook in muted:
                table[key] = hook

    def _train_step_body(self, optimizer, closure, model, kwargs):
        self._register_active_models()
        module = self.lightning_module
        with self._capture(module, "training_step") as deliver:
            self.precision_plugin.optimizer_step(optimizer, model=model or module, closure=closure, **kwargs)
            for config in self.lr_scheduler_configs:
                config.scheduler.step()
            result = closure._result if isinstance(closure, Closure) else None
            deliver()
        return result

    def training_step(self, *args, **kwargs):
        with self.precision_plugin.train_step_context():
            return self.lightning_module.training_step(*args, **kwargs)

    def _eval_call(self, hook: str, args, kwargs):
        if self._traced_eval is None:
            cstorch = import_cstorch()
            self._traced_eval = cstorch.trace(self._eval_step_body)
        with self._eager_fast_path(), _cluster_guard():
            out = self._traced_eval(hook, args, kwargs)
        if self._eval_executor is not None and self._eval_executor.on_final_iteration:
            self._close_eval_executor()  # deliver the last step's values before the epoch ends
        return out

    def _eval_step_body(self, hook: str, args, kwargs):
        self._register_active_models()
        module = self.lightning_module
        with torch.inference_mode(False), torch.no_grad(), self._capture(module, hook) as deliver:
            with self.precision_plugin.val_step_context():
                out = getattr(module, hook)(*args, **kwargs)
            deliver()
        return out

    def validation_step(self, *args, **kwargs):
        return self._eval_call("validation_step", args, kwargs)

    def test_step(self, *args, **kwargs):
        return self._eval_call("test_step", args, kwargs)

    # -- values leaving the device -----------------------------------------------------------------
    @contextmanager
    def _capture(self, module, fx: str):
        """Inside a traced step: hold back tensor logs and metric updates, deliver them by step closure."""
        cstorch = import_cstorch()
        from torchmetrics import Metric

        logged: dict[str, tuple[torch.Tensor, dict]] = {}
        updates: list[tuple[str, tuple, dict]] = []
        metrics = {name: m for name, m in module.named_modules() if isinstance(m, Metric)}
        original_log = module.log

        device_type = self.backend.torch_device.type

        def log(name, value, *a, **kw):
            # Values on the backend's device leave it by step closure; host values go straight to
            # Lightning (on CSX the traced body runs once, so those are logged for the first step only).
            if isinstance(value, torch.Tensor) and value.device.type == device_type:
                if a:
                    raise CerebrasError(f"pass self.log({name!r}, ...) options by keyword on Cerebras")
                logged[name] = (value.detach(), kw)
            else:
                original_log(name, value, *a, **kw)

        def recorder(name):
            def update(*a, **kw):
                updates.append((name, a, kw))
            return update

        module.log = log
        # torchmetrics keeps its bookkeeping wrapper (update counts, cache reset) as an instance
        # attribute: put that exact object back afterwards, not the bare class method.
        originals = {name: metric.__dict__.get("update") for name, metric in metrics.items()}
        for name, metric in metrics.items():
            metric.update = recorder(name)
        self._in_trace = True

        def deliver():
            names = list(logged)
            options = [logged[n][1] for n in names]
            update_meta = [(name, len(a), sorted(kw)) for name, a, kw in updates]
            tensors = {
                "logged": [logged[n][0] for n in names],
                "updates": [(list(a), [kw[k] for k in sorted(kw)]) for _, a, kw in updates],
            }

            @cstorch.step_closure
            def publish(values):
                self._publish(fx, module, names, options, values["logged"])
                for (name, _, keys), (a, kv) in zip(update_meta, values["updates"]):
                    metrics[name].update(*a, **dict(zip(keys, kv)))

            publish(tensors)

        try:
            yield deliver
        finally:
            self._in_trace = False
            del module.log
            for name, metric in metrics.items():
                if originals[name] is None:
                    del metric.update
                else:
                    metric.update = originals[name]

    def _publish(self, fx: str, module, names, options, values) -> None:
        """Hand values of one finished step to Lightning's loggers, progress bar and callback_metrics."""
        if not names:
            return
        trainer = module.trainer
        connector = trainer._logger_connector
        scalars = {n: v.detach().float().cpu().reshape(()) for n, v in zip(names, values)}
        if fx == "training_step":
            step = self._log_step
            self._log_step += 1
            connector._callback_metrics.update(scalars)
            connector._progress_bar_metrics.update(
                {n: v for (n, v), opts in zip(scalars.items(), options) if opts.get("prog_bar")}
            )
            every = max(trainer.log_every_n_steps, 1)
            if (step + 1) % every == 0 or step + 1 >= trainer.max_steps:
                to_log = {n: v for (n, v), opts in zip(scalars.items(), options) if opts.get("logger", True)}
                to_log.update(self._rates())
                if to_log and trainer.loggers:
                    connector.log_metrics({n: v.item() for n, v in to_log.items()}, step=step)
        else:
            # evaluation: aggregate as Lightning would (epoch means) through its result collection
            for (name, value), opts in zip(scalars.items(), options):
                module._current_fx_name = fx
                try:
                    module.log(name, value, **opts)
                finally:
                    module._current_fx_name = None

    def _rates(self) -> dict[str, torch.Tensor]:
        """Samples per second from the executor's profiler (cstorch's own rate tracker)."""
        executor = self._train_executor
        profiler = getattr(executor, "profiler", None) if executor is not None else None
        tracker = getattr(profiler, "rate_tracker", None) if profiler is not None else None
        if tracker is None:
            return {}
        try:
            if getattr(tracker, "_cached_result", None) is None:
                tracker.compute()
            rate, global_rate = float(tracker.rate), float(tracker.global_rate)
        except (RuntimeError, ZeroDivisionError, KeyError):
            return {}
        return {"perf/cerebras/samples_per_sec": torch.tensor(rate),
                "perf/cerebras/global_samples_per_sec": torch.tensor(global_rate)}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        executor = self._train_executor
        if executor is None:
            if self.backend_type == "CSX" and not (self.validate_only or self.compile_only):
                raise CerebrasCheckpointError(
                    f"cannot save {filepath} outside a training step on CSX: weights are fetched from the "
                    "cluster only at executor checkpoint steps (use ModelCheckpoint.every_n_train_steps)"
                )
            if self.backend_type == "CSX":
                return  # validate/compile only: there are no trained weights to save
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options)
            return
        run = executor.run_context
        if not run.is_checkpoint_step:
            every = self._checkpoint_every(self.lightning_module.trainer)
            raise CerebrasCheckpointError(
                f"refusing to save {filepath} at step {self.lightning_module.trainer.global_step}: the Cerebras "
                f"executor fetches weights only every {', '.join(map(str, every)) or 'no'} steps (from "
                "ModelCheckpoint.every_n_train_steps), before each validation and at the end of training, so "
                "this save would be silently skipped; save at those steps or set checkpoint.every_n_train_steps"
            )
        if self.validate_only or self.compile_only:
            return
        cstorch = import_cstorch()
        io = self.checkpoint_io

        @cstorch.checkpoint_closure
        def save(state):
            io.save_checkpoint(state, filepath, storage_options)

        save(checkpoint)

    # -- end of a stage -----------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._finish_train_executor()  # executors do not nest: end the training segment first

    def on_validation_end(self) -> None:
        self._close_eval_executor()

    def on_test_end(self) -> None:
        self._close_eval_executor()

    def on_train_end(self) -> None:
        self._finish_train_executor()

    def teardown(self) -> None:
        for it in (self._train_iter, self._eval_iter):
            if it is not None:
                it.close()
        self._train_iter = self._train_executor = self._eval_iter = self._eval_executor = None
        # Not Strategy.teardown: moving lazy (CSX) tensors to the CPU would materialise them outside a
        # step closure. Weights stay on the backend; checkpoints carry them to the host.
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register("cerebras", cls, description="cstorch on a Cerebras cluster (CSX)")
        strategy_registry.register("cerebras_csx", cls, description="cstorch CSX backend", backend="CSX")
        strategy_registry.register("cerebras_cpu", cls, description="cstorch CPU backend", backend="CPU")
        strategy_registry.register("cerebras_gpu", cls, description="cstorch GPU backend", backend="GPU")
        strategy_registry.register(
            "cerebras_validate", cls, description="CSX: trace and lower locally", backend="CSX", validate_only=True
        )


@contextmanager
def _cluster_guard():
    """Turn "no cluster configured / reachable" failures into one CerebrasClusterError line."""
    try:
        yield
    except (StopIteration, CerebrasError):
        raise
    except Exception as err:
        wrapped = _cluster_error(err)
        if wrapped is None:
            raise
        raise wrapped from None


def _cluster_error(err: BaseException) -> CerebrasClusterError | None:
    text = f"{type(err).__name__}: {err}"
    if "ClusterConfigError" in text or "mgmt_address" in text or re.search(r"\bping(ed)?\b", text, re.IGNORECASE):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return CerebrasClusterError(
            f"no Cerebras cluster reachable ({first}); set the strategy's cluster.mgmt_address (and "
            "credentials_path, mount_dirs, python_paths) in the cluster config, e.g. configs/cerebras/cluster.yaml, "
            "or use validate_only: true to lower locally"
        )
    return None


def cerebras_train_loader(args: dict):
    """Module-level input function shipped to Cerebras input workers (picklable arguments only).

    On a streamer each worker takes its share of the global batch; elsewhere the whole batch.
    """
    from gigagpt.data import build_train_loader

    args = dict(args)
    try:
        import cerebras.pytorch.distributed as dist

        if dist.is_streamer():
            args.update(
                batch_size=dist.get_streaming_batch_size(args["batch_size"]),
                rank=dist.get_streaming_rank(),
                world_size=dist.num_streamers(),
            )
    except ImportError:
        pass
    return build_train_loader(**args)


def cerebras_eval_loader(args: dict):
    """Module-level evaluation input function (see :func:`cerebras_train_loader`)."""
    from gigagpt.data import build_eval_loader

    return build_eval_loader(**args)


def _eval_batches(trainer, length: int) -> int:
    """How many batches Lightning takes from a loader of ``length`` in the running evaluation."""
    limit = trainer.limit_test_batches if trainer.testing else trainer.limit_val_batches
    n = min(length, limit) if isinstance(limit, int) else int(length * limit)
    if trainer.sanity_checking:
        n = min(n, trainer.num_sanity_val_steps)  # -1 ("all") is float("inf") in the Trainer
    return max(int(n), 0)


def cerebras_eval_factory(dm, dataloader, num_batches: int):
    """A picklable (factory, args) pair for evaluation batches."""
    files = getattr(dm, "files", None)
    if files is not None and hasattr(dm, "sequence_length"):
        return cerebras_eval_loader, {
            "path": files.val, "sequence_length": dm.sequence_length, "batch_size": dm.batch_size,
            "dtype": files.dtype, "max_batches": max(num_batches, 1),
        }
    return _return_loader, dataloader


def _return_loader(loader):
    return loader
