"""gigagpt's Lightning callbacks: FLOP count and peak table, MFU logging, text samples, NaN guard, StepSeed."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import resume_harness as H
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from gigagpt.callbacks import NonFiniteGuard, NonFiniteLossError, StepSeed, TextSamples, ThroughputMFU
from gigagpt.callbacks.rng import step_seed
from gigagpt.callbacks.throughput import (
    PEAK_FLOPS_ENV,
    device_key,
    flops_per_token,
    matmul_params,
    peak_flops,
)
from gigagpt.model import GPT, GPTConfig


# -- FLOPs per token -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "seq", "expected"),
    [
        # tiny: V=256 P=256 W=128 D=4: N = 858880 - 256*128 = 826112; 6N + 12*4*128*256
        ("tiny", 256, 6 * 826_112 + 12 * 4 * 128 * 256),
        # 111m: V=50257 P=2048 W=768 D=10: N = 111050496 - 2048*768 = 109477632
        ("111m", 2048, 6 * 109_477_632 + 12 * 10 * 768 * 2048),
    ],
)
def test_flops_per_token_matches_formula(name, seq, expected):
    config = GPTConfig.from_name(name)
    assert flops_per_token(config, seq) == expected
    # N from the formula equals the parameters of a real model minus its position table
    if name == "tiny":
        model = GPT(config)
        assert matmul_params(config) == model.num_params() - model.wpe.weight.numel()


def test_flops_per_token_against_torch_flop_counter():
    """6N + attention is within 1% of torch's FLOP counter over a real forward + backward.

    The math attention kernel runs attention as plain matmuls, which the counter sees; the 0.7%
    left is biases and LayerNorm weights, counted in N though they do no matmul.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = GPTConfig(vocab_size=512, max_position_embeddings=128, depth=2, width=128, heads=4)
    model, seq, batch = GPT(config), 128, 2
    idx = torch.randint(0, 512, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    measured = counter.get_total_flops() / (batch * seq)  # 3_145_728 vs 3_167_232
    assert measured == pytest.approx(flops_per_token(config, seq), rel=0.01)


def test_flops_per_token_rejects_bad_length():
    with pytest.raises(ValueError, match="sequence_length"):
        flops_per_token(GPTConfig.from_name("tiny"), 0)


# -- peak FLOP/s -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),
        ("H100 SXM", "bf16-true", 989.4e12),
        ("NVIDIA H100 PCIe", "bf16-mixed", 756e12),
        ("NVIDIA H200", "16-mixed", 989.4e12),
        ("NVIDIA A100-SXM4-40GB", "bf16-mixed", 312e12),
        ("NVIDIA A100 80GB PCIe", "32-true", 19.5e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
        ("NVIDIA L4", "bf16-mixed", 121e12),
        ("NVIDIA A10G", "16-mixed", 125e12),
        ("Tesla V100-SXM2-16GB", "16-mixed", 125e12),
    ],
)
def test_peak_flops_known_devices(device, precision, expected, monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert peak_flops(device, precision) == expected


def test_peak_flops_unknown_device_is_none_with_a_note(monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="no peak FLOP/s known for device 'Imaginary X1'"):
        assert peak_flops("Imaginary X1", "bf16-mixed") is None
    with pytest.warns(RuntimeWarning, match="no bf16 matrix peak"):
        assert peak_flops("Tesla T4", "bf16-mixed") is None  # T4 has no bf16
    assert device_key("NVIDIA L40S") == "l40s" and device_key("NVIDIA L4") == "l4"


def test_peak_flops_configured_and_cpu(monkeypatch):
    monkeypatch.setenv(PEAK_FLOPS_ENV, "2.5e12")
    assert peak_flops("cpu") == 2.5e12
    assert peak_flops("Imaginary X1") == 2.5e12
    assert peak_flops("cpu", configured=1e9) == 1e9
    monkeypatch.setenv(PEAK_FLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_FLOPS_ENV):
        peak_flops("cpu")
    monkeypatch.delenv(PEAK_FLOPS_ENV)
    measured = peak_flops("cpu", "32-true")  # the matmul probe
    assert 1e8 < measured < 1e14
    with pytest.raises(ValueError, match="unknown precision"):
        peak_flops("cpu", "fp7")


# -- the callbacks in a real run -------------------------------------------------------------------------
def _fit(tmp_path, data, callbacks, max_steps=8, **overrides):
    torch.set_num_threads(1)
    module, dm = H.make_module_and_data(data)
    overrides.setdefault("logger", [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")])
    trainer = H.make_trainer(tmp_path, max_steps, callbacks, log_every_n_steps=2, **overrides)
    trainer.fit(module, dm)
    return trainer, module


def test_throughput_mfu_logs_to_every_logger(builtin_bytes, tmp_path):
    monitor = ThroughputMFU(peak_flops=1e11, window=2)
    trainer, _ = _fit(tmp_path, builtin_bytes, [monitor], max_steps=10)
    metrics = monitor.last_metrics
    assert metrics["perf/flops_per_token"] == flops_per_token(H.CONFIG, H.SEQ)
    assert metrics["perf/tokens_per_sec"] > 0
    assert metrics["perf/samples_per_sec"] == pytest.approx(metrics["perf/tokens_per_sec"] / H.SEQ)
    assert metrics["perf/device/mfu"] == pytest.approx(metrics["perf/device/flops_per_sec"] / 1e11)
    assert metrics["perf/device/flops_per_sec"] == pytest.approx(
        metrics["perf/tokens_per_sec"] * flops_per_token(H.CONFIG, H.SEQ))
    with open(trainer.loggers[0].log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    mfu = [float(r["perf/device/mfu"]) for r in rows if r.get("perf/device/mfu")]
    assert mfu and all(0 < m < 1 for m in mfu)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and b"perf/device/mfu" in b"".join(p.read_bytes() for p in events)


def test_mfu_above_100_percent_is_never_shown(builtin_bytes, tmp_path, monkeypatch):
    """A CPU peak probed while the machine was busy is far too low: the MFU against it would read
    hundreds of percent. Such a value is not shown; one warning says why."""
    import gigagpt.callbacks.throughput as throughput

    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setenv("GIGAGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(throughput, "_CPU_PROBE", {}, raising=False)
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda *a, **k: 1e6)  # a contended probe
    monitor = ThroughputMFU(window=1)
    with pytest.warns(RuntimeWarning, match="MFU is not shown") as caught:
        trainer, _ = _fit(tmp_path, builtin_bytes, [monitor], max_steps=8)
    assert sum("MFU is not shown" in str(w.message) for w in caught) == 1
    assert monitor.last_metrics["perf/device/flops_per_sec"] > 1e6  # the rates themselves are logged
    assert "perf/device/mfu" not in monitor.last_metrics
    with open(trainer.loggers[0].log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert not [r["perf/device/mfu"] for r in rows if r.get("perf/device/mfu")]


def test_text_samples_log_and_leave_training_untouched(builtin_bytes, tmp_path):
    """With samples every 2 steps the per-step losses equal a run without them (dropout is on)."""
    _fit(tmp_path / "plain", builtin_bytes, [])
    samples = TextSamples(prompt="The ", every_n_steps=2, max_new_tokens=12)
    _, module = _fit(tmp_path / "samples", builtin_bytes, [samples])
    assert H.read_record(tmp_path / "plain")["train"] == H.read_record(tmp_path / "samples")["train"]
    assert [s for s, _ in samples.samples] == [2, 4, 6, 8]
    assert all(isinstance(text, str) and text for _, text in samples.samples)
    assert module.model.training  # put back in training mode
    text_file = list((tmp_path / "samples").rglob("samples.txt"))
    assert text_file and "--- step 8" in text_file[0].read_text()
    events = list((tmp_path / "samples" / "tb").rglob("events.out.tfevents.*"))
    assert b"samples" in b"".join(p.read_bytes() for p in events)


def test_text_samples_without_a_tokenizer_warn_once_and_training_goes_on(builtin_bytes, tmp_path):
    samples = TextSamples(every_n_steps=2, max_new_tokens=4, tokenizer=str(tmp_path / "missing.tiktoken"))
    with pytest.warns(UserWarning, match="TextSamples is turned off.*missing.tiktoken.*--samples.tokenizer"):
        trainer, _ = _fit(tmp_path, builtin_bytes, [samples], max_steps=4)
    assert trainer.global_step == 4 and samples.samples == []


def test_text_samples_use_the_local_ranks_file_the_data_was_prepared_with(tmp_path):
    from types import SimpleNamespace

    # GPTDataModule exposes the data's meta.json as datamodule.files.meta
    ranks = Path(__file__).parent / "data" / "gpt2.tiktoken"
    files = SimpleNamespace(meta={"tokenizer": "gpt2", "tokenizer_file": str(ranks)})
    trainer = SimpleNamespace(datamodule=SimpleNamespace(files=files))
    module = SimpleNamespace(config=SimpleNamespace(vocab_size=50257))
    tokenizer = TextSamples()._get_tokenizer(trainer, module)
    assert tokenizer.source_file == str(ranks.resolve()) and tokenizer.decode(tokenizer.encode("Hello")) == "Hello"


def test_progress_bar_reads_the_metrics_every_log_interval_only(builtin_bytes, tmp_path):
    """Each readout of train/loss is a device synchronisation: at log intervals, not every step."""
    from lightning.pytorch.callbacks import RichProgressBar

    from gigagpt.callbacks import ThrottledRichProgressBar

    def counting(cls):
        class Counting(cls):
            reads: list[int] = []

            def get_metrics(self, trainer, pl_module):
                if trainer.training:
                    self.reads.append(trainer.global_step)
                return super().get_metrics(trainer, pl_module)
        Counting.reads = []
        return Counting()

    plain, throttled = counting(RichProgressBar), counting(ThrottledRichProgressBar)
    _fit(tmp_path / "plain", builtin_bytes, [plain], max_steps=12, enable_progress_bar=True)
    _fit(tmp_path / "throttled", builtin_bytes, [throttled], max_steps=12, enable_progress_bar=True)
    assert len(plain.reads) >= 12  # Lightning's bar: every step
    steps = sorted(set(throttled.reads))
    assert steps and all(s % 2 == 0 for s in steps) and 12 in steps  # log_every_n_steps=2, and the end
    assert len(throttled.reads) <= len(plain.reads) // 2 + 2
    # A run bounded by max_steps (max_epochs -1) has no "Epoch 0/-2".
    throttled._trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False)
    assert throttled._get_train_description(0).strip() == "Epoch 0"



def test_progress_bar_shows_throughput_and_samples_print_on_their_own_lines(builtin_bytes, tmp_path, capsys):
    """tokens/s and MFU sit in the bar beside the loss; a text sample is printed through the bar's
    console (above it), not written behind its line."""
    from gigagpt.callbacks import ThrottledRichProgressBar

    bar = ThrottledRichProgressBar()
    monitor = ThroughputMFU(peak_flops=1e11, window=1)
    samples = TextSamples(prompt="The ", every_n_steps=4, max_new_tokens=4)
    trainer, module = _fit(tmp_path, builtin_bytes, [bar, monitor, samples], max_steps=8, enable_progress_bar=True)
    shown = bar.get_metrics(trainer, module)
    tokens = monitor.last_metrics["perf/tokens_per_sec"]
    assert shown["tok/s"] == f"{tokens:,.0f}"
    assert shown["MFU"] == f"{100 * monitor.last_metrics['perf/device/mfu']:.1f}%"
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert any(line.startswith("[sample @ step 4] 'The ' -> ") for line in lines), out[-2000:]


class _PoisonAt(L.Callback):
    """Makes the forward pass produce NaN from optimizer step ``step`` on."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.ln_f.weight.fill_(float("nan"))


def test_nonfinite_guard_names_step_and_last_checkpoint(builtin_bytes, tmp_path):
    guard = NonFiniteGuard()
    with pytest.raises(NonFiniteLossError) as info:
        _fit(tmp_path, builtin_bytes, [_PoisonAt(7), guard], max_steps=12)
    message = str(info.value)
    assert "optimizer step 7" in message
    assert "step0006.ckpt" in message or "last.ckpt" in message
    assert "--ckpt_path" in message
    # the bad step was never saved: the newest checkpoint is still step 6
    from gigagpt.checkpoint import safe_load

    assert safe_load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_nonfinite_guard_without_checkpoint(builtin_bytes, tmp_path):
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        _fit(tmp_path, builtin_bytes, [_PoisonAt(1), NonFiniteGuard()], max_steps=4)


def test_nonfinite_guard_lets_the_fp16_loss_scaler_skip_overflowing_steps(builtin_bytes, tmp_path):
    """An overflow under fp16 loss scaling is routine: the scaler skips the step, training goes on."""
    from lightning.pytorch.plugins import MixedPrecision

    from gigagpt.checkpoint import AtomicCheckpointIO

    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # high enough to overflow at first
    except (AttributeError, TypeError, RuntimeError) as err:
        pytest.skip(f"this torch has no CPU GradScaler: {err}")
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler), AtomicCheckpointIO()]
    trainer, _ = _fit(tmp_path, builtin_bytes, [NonFiniteGuard()], max_steps=6, precision=None, plugins=plugins)
    assert trainer.global_step == 6
    assert scaler.get_scale() < 2.0**24  # at least one step overflowed and was skipped by the scaler


@pytest.mark.parametrize("algorithm, clip", [("value", 1e-3), ("norm", 1e-2)])
def test_gradient_clipping_with_fused_adamw_under_bf16_autocast(builtin_bytes, tmp_path, algorithm, clip):
    """Lightning's AMP plugin refuses to clip for fused optimizers; GPTModule clips them itself."""

    class ClippedGrads(L.Callback):
        worst = 0.0

        def on_before_zero_grad(self, trainer, pl_module, optimizer):  # the last step's clipped grads
            assert optimizer.defaults["fused"]
            grads = [p.grad.float() for p in pl_module.parameters() if p.grad is not None]
            if not grads:  # the first step: nothing computed yet
                return
            size = (max(g.abs().max().item() for g in grads) if algorithm == "value"
                    else torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            self.worst = max(self.worst, size)

    check = ClippedGrads()
    trainer, _ = _fit(tmp_path, builtin_bytes, [check], max_steps=3, precision="bf16-mixed",
                      gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    assert trainer.global_step == 3 and 0 < check.worst <= clip * (1 + 1e-3)


def test_step_seed_is_pure_function_and_saved():
    assert step_seed(1, 5) == step_seed(1, 5)
    assert len({step_seed(1, s) for s in range(100)} | {step_seed(2, 0), step_seed(1, 0, rank=1)}) == 102
    cb = StepSeed(seed=11)
    restored = StepSeed(seed=99)
    restored.load_state_dict(cb.state_dict())
    assert restored.seed == 11


def test_callbacks_reject_bad_settings():
    with pytest.raises(ValueError, match="window"):
        ThroughputMFU(window=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        NonFiniteGuard(every_n_steps=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        TextSamples(max_new_tokens=0)
    assert math.isfinite(flops_per_token(GPTConfig.from_name("175b"), 2048))
