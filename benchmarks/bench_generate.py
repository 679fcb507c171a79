"""Tokens per second of generation with and without the KV cache, side by side in one run.

    python benchmarks/bench_generate.py                      # tiny and 111m, 256 new tokens, CPU
    python benchmarks/bench_generate.py --shapes 111m --device cuda --dtype bfloat16

Random weights (speed does not depend on them), batch 1, greedy decoding; both paths compute the
LM head for the last position only. The cached and uncached token sequences are compared too.
On a shared machine the absolute numbers move with the load; the ratio of the two, measured
back to back, is the result.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from gigagpt.generate import generate
from gigagpt.model import GPT, GPTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn) -> tuple[float, torch.Tensor]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench(shape: str, args) -> dict:
    config = GPTConfig.from_name(shape)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = GPT(config).to(DTYPES[args.dtype]).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    generate(model, prompt, 4, temperature=0.0)  # warm-up (allocator, kernels)
    generate(model, prompt, 4, temperature=0.0, use_cache=False)
    t_cached, cached = timed(lambda: generate(model, prompt, args.new_tokens, temperature=0.0))
    t_plain, plain = timed(lambda: generate(model, prompt, args.new_tokens, temperature=0.0, use_cache=False))
    new = args.batch * args.new_tokens
    return {
        "shape": shape,
        "params_m": model.num_params() / 1e6,
        "cached_tok_s": new / t_cached,
        "uncached_tok_s": new / t_plain,
        "speedup": t_plain / t_cached,
        "same_tokens": bool(torch.equal(cached, plain)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["tiny", "111m"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load:.1f} on {os.cpu_count()} cores; "
        f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy"
    )
    print(
        f"{'shape':>6} {'params':>8} {'cached tok/s':>13} {'uncached tok/s':>15} "
        f"{'speedup':>8} {'same tokens':>12}"
    )
    for shape in args.shapes:
        r = bench(shape, args)
        print(
            f"{r['shape']:>6} {r['params_m']:>7.1f}M {r['cached_tok_s']:>13.1f} {r['uncached_tok_s']:>15.1f} "
            f"{r['speedup']:>7.1f}x {r['same_tokens']!s:>12}",
            flush=True,
        )


if __name__ == "__main__":
    main()
