"""One AdamW step on the CPU: torch's default loop, ``foreach=True`` and ``fused=True``, side by side.

With FSDP CPU offload (the largest model on one GPU) the host runs every optimizer step, so its speed
bounds the step.

    python benchmarks/bench_adamw.py                 # 4 x 4096 x 4096 float32 (67M parameters)
    python benchmarks/bench_adamw.py --size 8192 --tensors 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="each tensor is size x size")
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.size, args.size, dtype=dtype)) for _ in range(args.tensors)]
    for param in params:
        param.grad = torch.randn_like(param)
    n = sum(p.numel() for p in params)
    print(f"torch {torch.__version__} | {n / 1e6:.0f}M {args.dtype} parameters | {torch.get_num_threads()} threads")
    times = {}
    for name, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        try:
            optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
            optimizer.step()  # state allocation, outside the timing
        except (RuntimeError, ValueError) as err:
            print(f"{name:8s} unavailable: {err}")
            continue
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        times[name] = (time.perf_counter() - start) / args.steps * 1000
    for name, ms in times.items():
        print(f"{name:8s} {ms:8.1f} ms/step  ({times['default'] / ms:.1f}x the default)")
    return times


if __name__ == "__main__":
    main()
