"""CerebrasStrategy: Lightning's fit / validate loops driven through cerebras.pytorch (cstorch).

What happens where (one concern a file):

- here: the Lightning wiring — backend set-up, building the network under the backend's device,
  ``cstorch.compile``, and the traced steps: Lightning's whole optimizer step (training_step,
  zero_grad, backward, clipping, optimizer step, scheduler step) in one ``cstorch.trace``.
- :mod:`gigagpt.accelerators.executors`: one ``DataExecutor`` per stretch of training between Lightning's
  validations, never closed before its last step; evaluation executors.
- :mod:`gigagpt.accelerators.capture`: logs and metric updates leave the device by repeating step closures
  that know their true step.
- :mod:`gigagpt.accelerators.checkpointing`: no-argument checkpoint closures, queued saves, the final step.
- :mod:`gigagpt.accelerators.schedule`: cstorch's AdamW and schedule; :mod:`gigagpt.accelerators.feeding`: input
  functions of the cluster's workers.

On CSX the traced body runs on the first step of each executor only; later steps replay the
compiled graph. Nothing in the body may therefore differ per step except device tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.types import LRSchedulerConfig

from gigagpt.accelerators import private
from gigagpt.accelerators.bridge_errors import CerebrasError, import_cstorch
from gigagpt.accelerators.capture import CaptureMixin
from gigagpt.accelerators.cerebras import CerebrasAccelerator
from gigagpt.accelerators.checkpoint_io import CerebrasCheckpointIO
from gigagpt.accelerators.checkpointing import CheckpointsMixin
from gigagpt.accelerators.executors import ExecutorsMixin, cluster_guard
from gigagpt.accelerators.fastpath import eager_fast_path
from gigagpt.accelerators.precision import CerebrasPrecision
from gigagpt.accelerators.schedule import build_cstorch_optimizer
from gigagpt.accelerators.settings import BACKENDS, ClusterSettings, apply_csx_settings


class CerebrasStrategy(CaptureMixin, CheckpointsMixin, ExecutorsMixin, Strategy):
    """Train and evaluate a LightningModule through a cstorch backend.

    Args:
        backend: ``"CSX"`` (a Cerebras cluster), ``"CPU"`` or ``"GPU"`` (cstorch's eager backends).
        validate_only: CSX: trace and lower one step to Cerebras IR locally, then stop (no cluster).
        compile_only: CSX: trace, lower and compile on the cluster, then stop (needs ``cluster``).
        cluster: the ``cstorch.distributed.ClusterConfig`` fields (``mgmt_address``, ``num_csx``,
            ``mount_dirs``, ``python_paths``, ``workflow_id``, ``automount``, ``cbcore_image``, ...).
        micro_batch_size: CSX gradient-accumulation micro batch (``"auto"``, ``"explore"``, an int,
            or ``None`` to disable); ``cstorch.backends.csx.performance.micro_batch_size``.
        compile_crd_memory_gi / execute_crd_memory_gi: memory (GiB) of the cluster's compile and
            execute coordinators (``cstorch.backends.csx.debug``).
        csx_settings: further ``cstorch.backends.csx`` settings as ``{"<group>.<name>": value}``.
        artifact_dir: where cstorch writes its artifacts (default ``<default_root_dir>/cerebras``).
        compile_dir: CSX compile cache folder on the cluster.
        activation_steps: CSX: fetch logged values every this many steps of an executor (default:
            the Trainer's ``log_every_n_steps``; cstorch lowers it to divide the checkpoint steps).
        gpu_options: extra keyword arguments for ``cstorch.backend("GPU", ...)``.
        init_on_device: build the network under ``backend.device`` (default: on CSX only).
    """

    strategy_name = "cerebras"
    # ThroughputMFU: the host clock and a host matmul probe say nothing of a cluster's speed.
    measures_own_throughput = True

    def __init__(
        self,
        backend: str = "CSX",
        validate_only: bool = False,
        compile_only: bool = False,
        cluster: ClusterSettings | None = None,
        micro_batch_size: int | str | None = "auto",
        compile_crd_memory_gi: int | None = None,
        execute_crd_memory_gi: int | None = None,
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
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io or CerebrasCheckpointIO(),
                         precision_plugin=precision_plugin)
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
        self.validate_only, self.compile_only = validate_only, compile_only
        self.cluster = cluster or ClusterSettings()
        self.micro_batch_size = micro_batch_size
        memory = {"debug.compile_crd_memory_gi": compile_crd_memory_gi,
                  "debug.execute_crd_memory_gi": execute_crd_memory_gi}
        self.csx_settings = {**{k: v for k, v in memory.items() if v is not None}, **dict(csx_settings or {})}
        self.artifact_dir, self.compile_dir = artifact_dir, compile_dir
        self.activation_steps = activation_steps
        self.gpu_options = dict(gpu_options or {})
        self.init_on_device = init_on_device

        self.backend = None  # the cstorch backend, created in setup_environment
        self._model_ids: dict[int, int] = {}
        self._traced_train = self._traced_eval = None
        self._train_iter = self._train_executor = self._eval_iter = self._eval_executor = None
        self._executor_start, self._stream_length = 0, 0
        self._pending_saves: list[tuple[dict, str]] = []
        self._saved_steps: set = set()
        self._written: dict = {}
        self._final_last = None
        self._warned_host: set[str] = set()

    # -- Lightning plumbing -------------------------------------------------------------------------
    @property
    def accelerator(self):
        return self._accelerator

    @accelerator.setter
    def accelerator(self, accelerator) -> None:
        # A Cerebras strategy brings its own accelerator: Lightning picks one before it looks at the
        # strategy (accelerator="auto" becomes "cpu" or "cuda") and then hands it over here.
        if not isinstance(accelerator, CerebrasAccelerator):
            accelerator = CerebrasAccelerator() if accelerator is not None else None
        if accelerator is not None:
            accelerator.paired = True
        self._accelerator = accelerator

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
        self.precision_plugin.check_backend(self.backend_type)
        artifact_dir = self.artifact_dir or str(Path(self._root_dir()) / "cerebras")
        if self.backend_type == "CSX":
            if self.micro_batch_size != "auto":
                cstorch.backends.csx.performance.micro_batch_size = self.micro_batch_size
            apply_csx_settings(self.csx_settings)
            kwargs = {"artifact_dir": artifact_dir, "compile_only": self.compile_only,
                      "validate_only": self.validate_only, "cluster_config": self.cluster.to_cluster_config()}
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
        generator seeded by the global one, so on the eager CPU/GPU backends the network is built on
        the plain torch device (``init_on_device=True`` forces the cstorch device there too), which
        gives exactly the weights plain Lightning gives for the same seed.
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
        self._compile(self.lightning_module)
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
            tied = _tied_pairs(net)
            cstorch.compile(net, self.backend)
            self._model_ids[id(net)] = private.compiled_model_id(self.backend, net)
            for owner, name, source in tied:  # keep weight tying (LM head = token embedding)
                if getattr(owner, name) is not source():
                    setattr(owner, name, source())
            for owner, name, source in tied:
                if getattr(owner, name) is not source():
                    raise CerebrasError(f"weight tying of {name} was lost when moving to the Cerebras device")

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
        self.lr_scheduler_configs = [LRSchedulerConfig(scheduler, interval="cerebras")]

    # -- the traced steps --------------------------------------------------------------------------
    def _register_active_models(self) -> None:
        impl = private.backend_impl(self.backend)
        for net in self._networks(self.lightning_module):
            impl.register_active_model(net, self._model_ids[id(net)])

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        if isinstance(optimizer, LightningOptimizer):
            optimizer = private.unwrap_optimizer(optimizer)
        if self._traced_train is None:
            self._traced_train = import_cstorch().trace(self._train_step_body)
        with eager_fast_path(self.backend_type), cluster_guard():
            result = self._traced_train(optimizer, closure, model, kwargs)
        # On CSX later steps replay the graph without running the body: hand Lightning the
        # traced step's result as if its closure had run.
        if isinstance(closure, Closure) and private.closure_result(closure) is None:
            private.set_closure_result(closure, result)
        if self.validate_only or self.compile_only:
            self.lightning_module.trainer.should_stop = True  # one step is all these modes run
        return None if result is None else result.loss

    def _train_step_body(self, optimizer, closure, model, kwargs):
        self._register_active_models()
        module = self.lightning_module
        # The rate of this step as a device value of the graph (cstorch's schedulers set it on the
        # host only at construction off CS, Scheduler._post_init, and by step closures afterwards).
        for config in self.lr_scheduler_configs:
            config.scheduler.update_last_value()
        with self._capture(module, "training_step") as captured:
            self._log_learning_rates(optimizer, captured)
            self.precision_plugin.optimizer_step(optimizer, model=model or module, closure=closure, **kwargs)
            for config in self.lr_scheduler_configs:
                config.scheduler.step()
            result = private.closure_result(closure) if isinstance(closure, Closure) else None
            self._deliver(module, "training_step", captured)
        return result

    def training_step(self, *args, **kwargs):
        with self.precision_plugin.train_step_context():
            return self.lightning_module.training_step(*args, **kwargs)

    def _eval_call(self, hook: str, args, kwargs):
        if self._traced_eval is None:
            self._traced_eval = import_cstorch().trace(self._eval_step_body)
        with eager_fast_path(self.backend_type), cluster_guard():
            out = self._traced_eval(hook, args, kwargs)
        if self._eval_executor is not None and self._eval_executor.on_final_iteration:
            self._close_eval_executor()  # deliver the last step's values before the epoch ends
        return out

    def _eval_step_body(self, hook: str, args, kwargs):
        self._register_active_models()
        module = self.lightning_module
        with torch.inference_mode(False), torch.no_grad(), self._capture(module, hook) as captured:
            with self.precision_plugin.val_step_context():
                out = getattr(module, hook)(*args, **kwargs)
            self._deliver(module, hook, captured)
        return out

    def validation_step(self, *args, **kwargs):
        return self._eval_call("validation_step", args, kwargs)

    def test_step(self, *args, **kwargs):
        return self._eval_call("test_step", args, kwargs)

    # -- end of a stage -----------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._finish_train_executor()  # executors do not nest: the training segment ends here

    def on_validation_end(self) -> None:
        self._close_eval_executor()

    def on_test_end(self) -> None:
        self._close_eval_executor()

    def on_train_end(self) -> None:
        self._finish_train_executor()
        self._write_after_last_executor()

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
