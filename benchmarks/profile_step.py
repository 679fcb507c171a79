"""Where one training step's time goes: kernels by category, the busiest kernels, idle device time.

Runs ``--warmup`` plain PyTorch training steps (bf16 autocast by default, fused AdamW on CUDA, gradient
clipping), then profiles ``--steps`` more with ``torch.profiler`` and prints:

- step time, tokens/s and MFU (FLOPs per token and peak table of callbacks/throughput.py);
- device time per category (matrix multiplies, attention, loss/softmax, normalisation, optimizer,
  elementwise/other) and the share of the step's wall time the device was busy at all: a low
  share means the host (kernel launches, Python) is the limit, not the GPU;
- the top kernels (CUDA) or operators (CPU) by self time.

    python benchmarks/profile_step.py --model 111m --seq 2048 --batch 16 --vocab-pad 64
    python benchmarks/profile_step.py --model 111m --seq 2048 --batch 16 --vocab-pad 64 --compile
    python benchmarks/profile_step.py --depth 2 --width 128 --heads 4 --vocab 512 --seq 64 --batch 2  # CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_train import add_shape_args, shape_config, sync, train_step

from gigagpt.callbacks.throughput import device_name_of, flops_per_token, peak_flops
from gigagpt.model import GPT
from gigagpt.optim import OptimConfig, build_torch_optimizer

CPU_SHAPE = dict(vocab_size=512, max_position_embeddings=128, depth=2, width=128, heads=4)

# Kernel / operator name fragments -> category; the first match wins, in this order.
CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn_generated_fort_native_sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm")),
    ("loss/softmax", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("norm", ("layer_norm", "layernorm")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "clip")),
    ("embedding", ("embedding", "index", "scatter", "gather")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in lowered for f in fragments):
            return label
    return "elementwise/other"


def self_time_us(event, on_device: bool) -> float:
    if not on_device:
        return event.self_cpu_time_total
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4+
        value = getattr(event, attr, None)
        if value is not None:
            return value
    return 0.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="bf16-mixed", choices=("32-true", "bf16-mixed", "bf16-true"))
    p.add_argument("--vocab-pad", type=int, default=1, help="model.config.vocab_pad_multiple (64 on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks and the loss")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="how many kernels/operators to list")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_device = device.type == "cuda"
    config = replace(shape_config(args, CPU_SHAPE, args.seq), vocab_pad_multiple=args.vocab_pad)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if args.precision == "bf16-true":
        model.to(torch.bfloat16)
    if args.compile:
        from gigagpt.parallelize import compile_blocks

        compile_blocks(model)
    optimizer, scheduler = build_torch_optimizer(model, OptimConfig(warmup_steps=2), args.warmup + args.steps)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> None:
        train_step(model, optimizer, scheduler, x, y, args.precision, device)

    for _ in range(args.warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6

    # On CUDA the kernels themselves (device events); on CPU the leaf operators' own time.
    rows = []
    for event in prof.key_averages():
        if on_device and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        t = self_time_us(event, on_device)
        if t > 0:
            rows.append((event.key, t / args.steps, event.count // args.steps))
    rows.sort(key=lambda r: -r[1])
    busy_us = sum(t for _, t, _ in rows)
    step_us = wall_us / args.steps
    tokens_per_s = args.batch * args.seq / (step_us / 1e6)
    peak = peak_flops(device_name_of(device), args.precision)
    mfu = tokens_per_s * flops_per_token(config, args.seq) / peak if peak else None

    print(f"device {device_name_of(device)} | torch {torch.__version__} | depth={config.depth} width={config.width} "
          f"vocab={config.vocab_size} (head {config.padded_vocab_size}) | batch {args.batch} x {args.seq} | "
          f"{args.precision} | compile {'on' if args.compile else 'off'}")
    print(f"step {step_us / 1000:.1f} ms (profiled), {tokens_per_s:,.0f} tokens/s, "
          f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
    what = "kernel" if on_device else "operator self"
    print(f"{what} time {busy_us / 1000:.1f} ms per step = {100 * busy_us / step_us:.0f}% of the step"
          + (" (the rest: device idle, waiting on the host)" if on_device else ""))
    by_category: dict[str, float] = {}
    for name, t, _ in rows:
        by_category[category(name)] = by_category.get(category(name), 0.0) + t
    print("\n| category | ms per step | share of " + what + " time |\n|---|---:|---:|")
    for label, t in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {t / 1000:.2f} | {100 * t / busy_us:.1f}% |")
    print(f"\n| top {what}s | calls per step | ms per step | share |\n|---|---:|---:|---:|")
    for name, t, count in rows[: args.top]:
        print(f"| `{name[:90]}` | {count} | {t / 1000:.2f} | {100 * t / busy_us:.1f}% |")
    return {"step_ms": step_us / 1000, "tokens_per_s": tokens_per_s, "mfu": mfu, "busy_fraction": busy_us / step_us,
            "categories": by_category, "top": rows[: args.top]}


if __name__ == "__main__":
    main()
