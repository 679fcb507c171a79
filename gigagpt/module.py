"""GPTModule: the LightningModule that trains a :class:`~gigagpt.model.GPT`.

It holds the loss, the optimizer description and the metrics; nothing here knows whether it runs
on a CPU, GPUs under DDP/FSDP or a Cerebras cluster.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import MeanMetric

from gigagpt.checkpoint import load_model
from gigagpt.errors import ConfigError
from gigagpt.model import GPT, GPTConfig
from gigagpt.optim import OptimConfig, build_torch_optimizer
from gigagpt.parallelize import parallelize, sharding_device
from gigagpt.tokenizer import training_record


def _as_dataclass(value, cls, what: str):
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
        except TypeError as err:
            raise ValueError(f"{what}: {err}") from None
    raise TypeError(f"{what} must be a {cls.__name__} or a dict, got {type(value).__name__}")


# Fields that do not change the function the weights compute (or that only the training uses).
_FREE_FIELDS = ("dropout", "init_std", "vocab_pad_multiple")


def load_initial_weights(path: str, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The state dict of the network at ``path`` (any file :func:`~gigagpt.checkpoint.load_model`
    reads), refused in one line when it is not the network ``config`` describes."""
    try:
        source = load_model(path)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"model.init_from {path!r}: {' '.join(str(err).split())}") from None
    ours, theirs = asdict(config), asdict(source.config)
    changed = [f"{k} {ours[k]} vs {theirs[k]}" for k in ours if k not in _FREE_FIELDS and ours[k] != theirs[k]]
    if changed:
        raise ConfigError(
            f"model.init_from {path!r} holds a different network (model.config vs the weights: "
            f"{', '.join(changed)}); set model.config to the weights' shape (configs/finetune.yaml is GPT-2 124M's)"
        )
    return source.state_dict()


class GPTModule(L.LightningModule):
    """Train a GPT with AdamW, warmup + cosine decay, and token-level metrics.

    Args:
        config: the network's shape (a :class:`GPTConfig`, or a dict of its fields).
        optim: optimizer and schedule (an :class:`OptimConfig`, or a dict of its fields).
        compile: ``torch.compile`` each block (GPU speed; falls back with a message if it fails).
        init_from: a fresh ``fit`` starts from these weights (a ``.ckpt`` or run folder, a Cerebras
            ``.mdl``, a Hugging Face GPT-2 folder) with a fresh optimizer and schedule; ``config``
            must describe the same network. A run resuming its own checkpoint ignores it.
    """

    def __init__(
        self,
        config: GPTConfig | None = None,
        optim: OptimConfig | None = None,
        compile: bool = False,
        init_from: str | None = None,
    ):
        super().__init__()
        self.config = _as_dataclass(config or GPTConfig.from_name("tiny"), GPTConfig, "model.config")
        self.optim = _as_dataclass(optim or OptimConfig(), OptimConfig, "model.optim")
        self.compile = compile
        self.init_from = None if init_from is None else str(init_from)
        # Plain dicts only: a checkpoint then loads with torch.load(weights_only=True).
        self.save_hyperparameters({"config": asdict(self.config), "optim": asdict(self.optim),
                                   "compile": compile, "init_from": self.init_from})
        self.model: GPT | None = None
        self.val_loss = MeanMetric()

    # -- construction ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the network here, so strategies can create it on meta or sharded devices."""
        if self.model is None:
            self.model = parallelize(self.config, self._strategy(), compile=self.compile)
            if self.init_from and self._trainer is not None and self.trainer.state.fn == "fit":
                # (a checkpoint the Trainer resumes is restored after this and takes precedence)
                self._load_initial_weights()

    def _load_initial_weights(self) -> None:
        """Copy the weights of ``init_from`` into the freshly built network."""
        if sharding_device(self._strategy()) is not None:
            raise ConfigError("model.init_from is not supported with a sharding (FSDP) strategy: fine-tune "
                              "with DDP or a single device, or convert the weights with gigagpt export first")
        source = load_initial_weights(self.init_from, self.config)
        with torch.no_grad():
            for name, tensor in self.model.state_dict(keep_vars=True).items():
                tensor.copy_(source[name])
        rank_zero_info(f"gigagpt: starting from the weights of {self.init_from} (fresh optimizer and schedule)")

    def _strategy(self):
        return None if self._trainer is None else self.trainer.strategy

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by global norm under FSDP too, through FSDP's own sharded-norm ``clip_grad_norm_``.

        (Lightning's FSDP precision plugin refuses ``gradient_clip_algorithm='norm'``.)
        """
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            if sharding_device(self._strategy()) is not None:
                self.model.clip_grad_norm_(gradient_clip_val)  # the root FSDP module
                return
        if gradient_clip_val and optimizer.defaults.get("fused"):
            # Lightning's AMP plugin refuses to clip for fused optimizers (they may unscale fp16
            # gradients themselves). bf16 has no loss scaling and fp16 never gets a fused AdamW
            # (configure_optimizers), so the gradients here are true gradients.
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        optim = self.optim
        if self._trainer is not None and str(self.trainer.precision).startswith("16"):
            optim = replace(optim, fused=False)  # fp16 loss scaling: let Lightning unscale, then clip
        optimizer, scheduler = build_torch_optimizer(self, optim, max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the tokenizer's name and ranks file hash: sample / export find it wherever the run moves
        record = training_record(getattr(getattr(self._trainer, "datamodule", None), "files", None))
        if record is not None:
            checkpoint["tokenizer"] = record

    # -- steps ----------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(idx, targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = self.model(inputs, labels)
        self.log("train/loss", loss, prog_bar=True)
        # Host numbers go in as host tensors: self.log would copy a Python float to the device,
        # and that copy waits for the queued GPU work (a synchronisation every step).
        lr = self.optimizers().param_groups[0]["lr"]
        # Schedulers that run on the device (cstorch) keep the rate as a device tensor: log it as is.
        lr = lr.detach() if torch.is_tensor(lr) else torch.tensor(float(lr), dtype=torch.float64)
        self.log("train/lr", lr)  # to the loggers; the bar would round it to 0.000
        self._tokens_per_step = inputs.numel() * self.trainer.world_size * self.trainer.accumulate_grad_batches
        for name, value in self.step_counters(self.global_step).items():
            self.log(name, torch.tensor(value, dtype=torch.float64))
        return loss

    def step_counters(self, step: int) -> dict[str, float]:
        """Host values of optimizer step ``step`` (0-based) for the loggers.

        A function of the step alone, so a backend that runs training_step once and replays it (the
        Cerebras bridge) can ask for every step's values.
        """
        return {"train/tokens": float((step + 1) * getattr(self, "_tokens_per_step", 0))}

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = self.model(inputs, labels)
        self.val_loss.update(loss, weight=labels.numel())
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        # The metric already reduces across ranks (token-weighted mean), so no sync_dist here.
        loss = self.val_loss.compute()
        # validate/test run under inference mode: a state reset there would be made of inference
        # tensors, which a later fit's validation (under no_grad) may not update in place.
        with torch.inference_mode(False):
            self.val_loss.reset()
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val")
        self.log(f"{prefix}/ppl", torch.exp(loss.float()))
