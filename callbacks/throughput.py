"""Training throughput and model FLOPs utilisation (MFU).

``flops_per_token`` counts the FLOPs one training token costs this architecture; ``peak_flops`` looks
up what the device can do at the run's precision; :class:`ThroughputMFU` logs tokens/s, samples/s,
achieved FLOP/s and MFU to every logger of the Trainer.

The FLOP count (PaLM, Chowdhery et al. 2022, appendix B; the same estimate nanoGPT and litgpt use)::

    flops_per_token = 6 * N + 12 * depth * width * T

* ``N`` is every parameter that takes part in a matrix multiply: all parameters except the learned
  position embeddings (a lookup, no multiply). The token embedding *is* counted, once: tied to the
  LM head it costs ``2 * V * W`` FLOPs per token in the forward pass, and the input lookup is free.
  Biases and LayerNorm weights are included; they are < 0.1 % of ``N`` for the named sizes.
* ``6 = 2`` (multiply + add) ``x 3`` (forward, backward for activations, backward for weights).
* ``12 * depth * width * T`` is attention: ``Q K^T`` and ``A V`` each cost ``2 * T * width``
  per token and layer forward, times 3 for training. It counts the full ``T x T`` score matrix even
  though causal masking makes half of it zeros, the convention MFU figures in papers use.

Elementwise work (softmax, GELU, LayerNorm, the optimizer) is not counted, so MFU is a lower bound on
how busy the matrix units are.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput

from gigagpt.machine import cache_dir, cpu_peak_flops, measure_matmul_flops
from gigagpt.model import GPTConfig

PEAK_FLOPS_ENV = "GIGAGPT_PEAK_FLOPS"

# -- the FLOP count -----------------------------------------------------------------------------------


def matmul_params(config: GPTConfig) -> int:
    """Parameters that take part in a matrix multiply: all but the position embeddings."""
    return config.matmul_params()


def flops_per_token(config: GPTConfig, sequence_length: int) -> float:
    """Training FLOPs (forward + backward) per token: ``6 N + 12 depth width T`` (see module doc)."""
    return config.flops_per_token(sequence_length)


def flops_per_step(config: GPTConfig, sequence_length: int, tokens: int) -> float:
    """Training FLOPs of a step over ``tokens`` tokens of ``sequence_length``-long windows."""
    return flops_per_token(config, sequence_length) * tokens


# -- peak FLOP/s of a device --------------------------------------------------------------------------

# Dense (no structured sparsity) peak FLOP/s per device from the vendors' datasheets. The datasheets'
# tensor-core figures marked "with sparsity" are halved here. Memory size and SXM/PCIe form factor are
# listed separately only where they change the compute peak. Keys: precision of the matrix multiplies.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # NVIDIA Hopper (H100 / H200 datasheets)
    "h100 sxm": {"fp64": 67e12, "fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12,
                 "fp8": 1978.9e12},
    "h100 pcie": {"fp64": 51e12, "fp32": 51e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12,
                  "fp8": 1513e12},
    "h100 nvl": {"fp64": 60e12, "fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12,
                 "fp8": 1670.5e12},
    "h200 sxm": {"fp64": 67e12, "fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12,
                 "fp8": 1978.9e12},
    "h200 nvl": {"fp64": 60e12, "fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12,
                 "fp8": 1670.5e12},
    # NVIDIA Blackwell (HGX B200 datasheet, per GPU)
    "b200": {"fp64": 37e12, "fp32": 75e12, "tf32": 1.1e15, "bf16": 2.25e15, "fp16": 2.25e15, "fp8": 4.5e15},
    # NVIDIA Ampere (A100 datasheet: 40 GB and 80 GB, SXM4 and PCIe share the compute peak)
    "a100": {"fp64": 19.5e12, "fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    # A10 datasheet (AWS's A10G is the same GA102 part; it publishes no separate figures)
    "a10": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "a10g": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    # NVIDIA Ada (L4 / L40S datasheets)
    "l4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12, "fp8": 242.5e12},
    "l40": {"fp32": 90.5e12, "tf32": 90.5e12, "bf16": 181e12, "fp16": 181e12, "fp8": 362e12},
    "l40s": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362e12, "fp16": 362e12, "fp8": 733e12},
    # Older NVIDIA (V100 / T4 datasheets; no bf16 support)
    "v100 sxm": {"fp64": 7.8e12, "fp32": 15.7e12, "fp16": 125e12},
    "v100 pcie": {"fp64": 7e12, "fp32": 14e12, "fp16": 112e12},
    "t4": {"fp32": 8.1e12, "fp16": 65e12},
    # AMD Instinct (MI300X / MI250X datasheets, dense matrix)
    "mi300x": {"fp64": 163.4e12, "fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12,
               "fp16": 1307.4e12, "fp8": 2614.9e12},
    "mi250x": {"fp64": 95.7e12, "fp32": 95.7e12, "bf16": 383e12, "fp16": 383e12},
}

# Device-name spellings (lower case, as torch.cuda.get_device_name reports them) -> table key.
# Checked in order: the first matching rule wins, so specific names come before general ones.
_NAME_RULES: list[tuple[tuple[str, ...], str]] = [
    (("h200", "nvl"), "h200 nvl"),
    (("h200",), "h200 sxm"),
    (("h100", "nvl"), "h100 nvl"),
    (("h100", "pcie"), "h100 pcie"),
    (("h100",), "h100 sxm"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("gh200",), "h200 sxm"),
    (("b200",), "b200"),
    (("a100",), "a100"),
    (("a10g",), "a10g"),
    (("a10",), "a10"),
    (("l40s",), "l40s"),
    (("l40",), "l40"),
    (("l4",), "l4"),
    (("v100", "sxm"), "v100 sxm"),
    (("v100",), "v100 pcie"),
    (("t4",), "t4"),
    (("mi300x",), "mi300x"),
    (("mi250x",), "mi250x"),
]

# Lightning precision strings / dtypes -> the precision the matrix multiplies run in.
_PRECISIONS = {
    "64": "fp64", "64-true": "fp64", "float64": "fp64", "fp64": "fp64", "double": "fp64",
    "32": "fp32", "32-true": "fp32", "float32": "fp32", "fp32": "fp32",
    "tf32": "tf32", "tfloat32": "tf32",
    "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16", "bfloat16": "bf16",
    "16": "fp16", "16-mixed": "fp16", "16-true": "fp16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp8": "fp8", "transformer-engine": "fp8", "transformer-engine-float16": "fp8",
}


def normalize_precision(precision: str | torch.dtype) -> str:
    """``fp64 | fp32 | tf32 | bf16 | fp16 | fp8`` from a Lightning precision string or a dtype."""
    key = str(precision).removeprefix("torch.").lower()
    if key not in _PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; use a Lightning precision such as '32-true', "
            f"'bf16-mixed', '16-mixed', or one of {sorted(set(_PRECISIONS.values()))}"
        )
    return _PRECISIONS[key]


def device_key(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key for a device name, or None when the device is not listed."""
    name = device_name.lower().replace("-", " ").replace("_", " ")
    if name in PEAK_FLOPS:
        return name
    for parts, key in _NAME_RULES:
        # Short parts ("l4", "t4") must be whole words; longer ones may sit inside one ("sxm2").
        if all(part in name.split() or (len(part) >= 3 and part in name) for part in parts):
            return key
    return None


_CPU_PROBE: dict[str, float] = {}


def _cpu_peak(dtype: torch.dtype) -> float:
    """The machine's cached matmul peak (best of several probes; gigagpt.machine.cpu_peak_flops)."""
    return cpu_peak_flops(dtype, probe=lambda d, n: measure_matmul_flops(d, size=n, seconds=0.1))


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def peak_flops(device_name: str, precision: str | torch.dtype = "32-true", *,
               configured: float | None = None, measure_cpu: bool = True) -> float | None:
    """Peak FLOP/s of one device at ``precision``, or None (with a warning saying why).

    Order: ``configured`` (an explicit number) > the ``GIGAGPT_PEAK_FLOPS`` environment variable >
    the :data:`PEAK_FLOPS` datasheet table for accelerators. A CPU (``device_name`` "cpu") has no
    datasheet entry: its peak is the best of several short matrix-multiply probes, measured once per
    machine and cached (:func:`gigagpt.machine.cpu_peak_flops`), unless ``measure_cpu=False``.
    """
    if configured is None and os.environ.get(PEAK_FLOPS_ENV):
        raw = os.environ[PEAK_FLOPS_ENV]
        try:
            configured = float(raw)
        except ValueError:
            raise ValueError(f"{PEAK_FLOPS_ENV}={raw!r} is not a number; set it to FLOP/s, e.g. 1.5e12") from None
    if configured is not None:
        if not configured > 0 or not math.isfinite(configured):
            raise ValueError(f"the configured peak FLOP/s must be a positive number, got {configured!r}")
        return float(configured)
    prec = normalize_precision(precision)
    if device_name.lower().strip() == "cpu":
        if not measure_cpu:
            _warn(f"no peak FLOP/s for the CPU: set {PEAK_FLOPS_ENV} or allow the matmul probe; MFU is not logged")
            return None
        dtype = {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
        if prec not in _CPU_PROBE:
            _CPU_PROBE[prec] = _cpu_peak(dtype)
        return _CPU_PROBE[prec]
    key = device_key(device_name)
    if key is None:
        _warn(
            f"no peak FLOP/s known for device {device_name!r}; MFU is not logged (tokens/s still are). "
            f"Set {PEAK_FLOPS_ENV}=<FLOP/s> or ThroughputMFU(peak_flops=...) to log it"
        )
        return None
    table = PEAK_FLOPS[key]
    if prec not in table:
        _warn(
            f"{device_name!r} ({key}) has no {prec} matrix peak in the datasheet table (it has "
            f"{sorted(table)}); MFU is not logged. Set {PEAK_FLOPS_ENV} to log it"
        )
        return None
    return table[prec]


def device_name_of(device: torch.device) -> str:
    """A name :func:`peak_flops` understands for a torch device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


# -- the callback -------------------------------------------------------------------------------------


class ThroughputMFU(L.Callback):
    """Log tokens/s, samples/s, FLOP/s and MFU of training to every logger.

    Every ``log_every_n_steps`` optimizer steps (the Trainer's value by default) it reads a clock,
    synchronising CUDA only then, and feeds Lightning's :class:`~lightning.fabric.utilities.throughput.Throughput`
    rolling window; the rates are averages over the last ``window`` such intervals. Validation time
    is excluded. Logged keys (``perf/`` prefix): ``tokens_per_sec``, ``samples_per_sec``,
    ``flops_per_sec`` (whole run), ``device/tokens_per_sec``, ``device/flops_per_sec``,
    ``device/mfu``, and ``flops_per_token`` once.

    Args:
        peak_flops: peak FLOP/s of one device; default from :func:`peak_flops` (table or CPU probe).
        window: number of logging intervals averaged (at least 1).
        log_every_n_steps: steps between measurements (default: the Trainer's).
    """

    def __init__(self, peak_flops: float | None = None, window: int = 4, log_every_n_steps: int | None = None):
        super().__init__()
        if window < 1:
            raise ValueError(f"ThroughputMFU window must be >= 1 logging interval, got {window}")
        self.configured_peak = peak_flops
        self.window = window
        self.log_every_n_steps = log_every_n_steps
        self.flops_per_token: float | None = None
        self.available_flops: float | None = None
        self.last_metrics: dict[str, float] = {}
        self._told_mfu = self._peak_probed = False
        self._throughput: Throughput | None = None
        self._config: GPTConfig | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._t0 = None
        self._paused_at = None
        self._samples = self._tokens = self._batches = 0
        self._flops_since = 0.0
        self._seq_len = None

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        config = getattr(pl_module, "config", None)
        if not isinstance(config, GPTConfig):
            _warn("ThroughputMFU needs a GPTModule (a module with a GPTConfig `config`); FLOPs are not logged")
            config = None
        self._config = config
        precision = trainer.precision
        device = trainer.strategy.root_device
        prec = normalize_precision(precision)
        if prec == "fp32" and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
            prec = "tf32"
        if getattr(trainer.strategy, "measures_own_throughput", False):
            # The host's clock and a host matmul probe say nothing of the device (a Cerebras cluster
            # behind a CPU root_device): MFU is n/a; the strategy logs its own rates.
            self.available_flops = self.configured_peak
        else:
            self.available_flops = peak_flops(device_name_of(device), prec, configured=self.configured_peak)
        self._peak_probed = (device.type == "cpu" and self.configured_peak is None
                             and not os.environ.get(PEAK_FLOPS_ENV))
        self._throughput = Throughput(available_flops=self.available_flops, world_size=trainer.world_size,
                                      window_size=self.window + 1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_counters()
        if self._throughput is not None:
            self._throughput.reset()

    # -- measurement ------------------------------------------------------------------------------
    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        samples, seq_len = int(inputs.shape[0]), int(inputs.shape[-1])  # shapes only: no device sync
        self._samples += samples
        self._tokens += samples * seq_len
        self._batches += 1
        if self._config is not None:
            self._flops_since += flops_per_token(self._config, seq_len) * samples * seq_len
            if self.flops_per_token is None:
                self.flops_per_token = flops_per_token(self._config, seq_len)
        if self._t0 is None:
            # The first step includes compilation and warm-up: the clock starts after it.
            self._t0 = self._now(trainer)
            self._samples = self._tokens = self._batches = 0
            self._flops_since = 0.0
            self._throughput.update(time=0.0, batches=0, samples=0, lengths=0,
                                flops=0 if self._config is not None else None)
            return
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        accumulating = (batch_idx + 1) % trainer.accumulate_grad_batches != 0
        if accumulating or trainer.global_step % every != 0:
            return
        self._throughput.update(time=self._now(trainer) - self._t0, batches=self._batches,
                                samples=self._samples, lengths=self._tokens,
                                flops=self._flops_since if self._config is not None else None)
        self._flops_since = 0.0
        metrics = self._compute()
        if metrics:
            self.last_metrics = metrics
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    # the step index Lightning uses for the train/ metrics of this step
                    logger.log_metrics(metrics, step=trainer.global_step - 1)

    # Lightning's Throughput keys -> ours (it counts tokens as "items").
    _KEYS: ClassVar[dict[str, str]] = {
        "samples_per_sec": "perf/samples_per_sec",
        "items_per_sec": "perf/tokens_per_sec",
        "flops_per_sec": "perf/flops_per_sec",
        "device/samples_per_sec": "perf/device/samples_per_sec",
        "device/items_per_sec": "perf/device/tokens_per_sec",
        "device/flops_per_sec": "perf/device/flops_per_sec",
        "device/mfu": "perf/device/mfu",
    }

    def _compute(self) -> dict[str, float]:
        """Rates over the last ``window`` intervals, once the window is full (empty before)."""
        raw = self._throughput.compute()
        out = {ours: float(raw[theirs]) for theirs, ours in self._KEYS.items() if theirs in raw}
        if not out:
            return {}
        if self._throughput.world_size == 1:  # Lightning reports whole-run rates only for several ranks
            for key in ("samples_per_sec", "tokens_per_sec", "flops_per_sec"):
                if f"perf/device/{key}" in out:
                    out[f"perf/{key}"] = out[f"perf/device/{key}"]
        if self.flops_per_token is not None:
            out["perf/flops_per_token"] = float(self.flops_per_token)
        mfu = out.get("perf/device/mfu")
        if mfu is not None and not 0 <= mfu <= 1:
            del out["perf/device/mfu"]  # a peak measured too low (a busy machine), not a real figure
            if not self._told_mfu:
                self._told_mfu = True
                why = (f"a matmul probe on a busy machine reads low; delete {cache_dir() / 'cpu_peak.json'} "
                       "to measure again" if self._peak_probed else "the device's peak is set too low")
                _warn(f"MFU is not shown: this run reaches {out['perf/device/flops_per_sec']:.3g} FLOP/s, "
                      f"above the peak of {self.available_flops:.3g} it is measured against ({why}), "
                      f"or set {PEAK_FLOPS_ENV}")
        return out

    def bar_metrics(self) -> dict[str, str]:
        """tokens/s and MFU of the last measurement, for a progress bar (host numbers: no sync)."""
        shown = {}
        if "perf/tokens_per_sec" in self.last_metrics:
            shown["tok/s"] = f"{self.last_metrics['perf/tokens_per_sec']:,.0f}"
        if "perf/device/mfu" in self.last_metrics:
            shown["MFU"] = f"{100 * self.last_metrics['perf/device/mfu']:.1f}%"
        return shown

    # -- validation does not count as training time ---------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._t0 is None:
            return
        self._paused_at = self._now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused_at is None:
            return
        self._t0 += self._now(trainer) - self._paused_at
        self._paused_at = None
