"""Training speed of one GPT shape on one device: tokens/s, MFU, peak memory, Lightning vs plain PyTorch.

Every configuration runs as a plain PyTorch loop and as ``Trainer.fit`` on :class:`GPTModule`, over
the same model, data loader, optimizer (AdamW, fused on CUDA), schedule and gradient clipping;
rounds interleave them so that a shared or throttled machine slows all of them alike. The median
round is reported. MFU = tokens/s x ``flops_per_token`` / ``peak_flops`` (callbacks/throughput.py;
on a CPU the peak is a measured matrix multiply, not a datasheet number).

    # CPU, fp32 vs bf16 autocast, loss curves compared (a few minutes on 2 cores)
    python benchmarks/bench_train.py
    # one GPU, 111m at T=2048, bf16, compiled and not, the head's vocabulary padded and not
    python benchmarks/bench_train.py --model 111m --seq 2048 --batch 16 --precision bf16-mixed \
        --compile off,on --vocab-pad 1,64 --steps 20 --warmup 5
    # the largest model that trains with FSDP CPU offload on one GPU
    python benchmarks/bench_train.py --model 13b --seq 2048 --batch 1 --fsdp-offload
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gigagpt.callbacks.throughput import device_name_of, flops_per_token, peak_flops
from gigagpt.data import build_train_loader, read_meta
from gigagpt.model import GPT, GPTConfig
from gigagpt.optim import OptimConfig, build_torch_optimizer

# A CPU shape where matrix multiplies dominate (so precision matters) and a round takes seconds.
CPU_SHAPE = dict(vocab_size=256, max_position_embeddings=256, depth=2, width=1024, heads=16)


@dataclass
class Result:
    mode: str
    precision: str
    compile: bool
    batch: int
    seq: int
    tokens_per_s: float
    step_ms: float
    peak_mem_gib: float | None
    vocab_pad: int = 1
    losses: list[float] = field(default_factory=list)
    error: str | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def host_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def make_data(folder: Path, vocab_size: int, num_tokens: int) -> str:
    """The built-in corpus (bytes) when the vocabulary is 256, else uniformly random tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    if vocab_size == 256:
        from gigagpt.prepare import builtin_documents, prepare
        from gigagpt.tokenizer import get_tokenizer

        docs = ((d, len(d)) for d in builtin_documents())
        prepare(docs, folder, get_tokenizer("bytes"), val_fraction=0.02, progress=False)
        return str(folder)
    rng = np.random.default_rng(0)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    for split, n in (("train", num_tokens), ("val", num_tokens)):  # val: at least one batch
        rng.integers(0, vocab_size, n, dtype=np.dtype(dtype)).tofile(folder / f"{split}.bin")
    meta = {"dtype": dtype, "vocab_size": vocab_size, "tokenizer": "random",
            "train_max_token_id": vocab_size - 1, "val_max_token_id": vocab_size - 1}
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, scheduler, x, y, precision: str, device: torch.device) -> torch.Tensor:
    """One optimizer step as Lightning's automatic optimization takes it (clipping at 1.0)."""
    with autocast(precision, device):
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_raw(config, args, precision, compile_, data, device) -> Result:
    """The plain PyTorch loop: what Lightning's automatic optimization does, written out."""
    from gigagpt.parallelize import compile_blocks

    total = args.warmup + args.steps
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    if compile_:
        compile_blocks(model)
    optimizer, scheduler = build_torch_optimizer(model, OptimConfig(lr=args.lr, warmup_steps=2), total)
    dtype = read_meta(data).get("dtype", "uint16")
    loader = build_train_loader(os.path.join(data, "train.bin"), args.seq, args.batch, seed=args.seed,
                                dtype=dtype, num_steps=total, num_workers=args.workers,
                                pin_memory=device.type == "cuda")
    losses, t0 = [], None
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        losses.append(train_step(model, optimizer, scheduler, x, y, precision, device))
    sync(device)
    elapsed = time.perf_counter() - t0
    tokens = args.steps * args.batch * args.seq
    return Result("raw", precision, compile_, args.batch, args.seq, tokens / elapsed,
                  1000 * elapsed / args.steps, peak_memory(device), config.vocab_pad_multiple,
                  [float(v) for v in losses])


def run_lightning(config, args, precision, compile_, data, device, bar: bool = False,
                  fsdp_offload: bool = False) -> Result:
    """``Trainer.fit`` on GPTModule + GPTDataModule, timed from step ``warmup`` to the end."""
    import lightning as L

    from gigagpt.callbacks import ThrottledRichProgressBar
    from gigagpt.data import GPTDataModule
    from gigagpt.module import GPTModule

    total = args.warmup + args.steps

    class Timer(L.Callback):
        t0 = t1 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup and self.t0 is None:
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            sync(device)
            self.t1 = time.perf_counter()

    strategy = "auto"
    if fsdp_offload:
        from lightning.pytorch.strategies import FSDPStrategy

        from gigagpt.model import Block

        strategy = FSDPStrategy(cpu_offload=True, activation_checkpointing_policy={Block})
    timer = Timer()
    torch.manual_seed(args.seed)
    module = GPTModule(config, OptimConfig(lr=args.lr, warmup_steps=2), compile=compile_)
    dm = GPTDataModule(path=data, sequence_length=args.seq, batch_size=args.batch, seed=args.seed,
                       num_workers=args.workers, val_batches=1)
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            accelerator=device.type if device.type == "cpu" else "gpu", devices=1, strategy=strategy,
            precision=precision, max_steps=total, limit_val_batches=0, num_sanity_val_steps=0,
            gradient_clip_val=1.0, log_every_n_steps=10, enable_checkpointing=False,
            enable_progress_bar=bar, enable_model_summary=False, use_distributed_sampler=False,
            logger=L.pytorch.loggers.CSVLogger(logs), default_root_dir=logs,
            callbacks=[timer, *([ThrottledRichProgressBar()] if bar else [])],  # the CLI's bar
        )
        trainer.fit(module, datamodule=dm)
    elapsed = timer.t1 - timer.t0
    tokens = args.steps * args.batch * args.seq
    mode = "fsdp-offload" if fsdp_offload else ("lightning+bar" if bar else "lightning")
    return Result(mode, precision, compile_, args.batch, args.seq, tokens / elapsed,
                  1000 * elapsed / args.steps, peak_memory(device), config.vocab_pad_multiple)


def guarded(fn, *a, **kw) -> Result | None:
    """Run one measurement; an out-of-memory or other failure becomes a row, not the end."""
    try:
        return fn(*a, **kw)
    except Exception as err:  # report and go on: the table says what failed and why
        text = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
        print(f"  failed: {text}", file=sys.stderr, flush=True)
        return Result(fn.__name__.removeprefix("run_"), a[2], a[3], a[1].batch, a[1].seq, 0.0, 0.0, None,
                      a[0].vocab_pad_multiple, error=text)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def median_rows(rows: list[Result]) -> Result:
    ok = [r for r in rows if r.error is None]
    if not ok:
        return rows[0]
    first = ok[0]
    tokens_per_s = statistics.median(r.tokens_per_s for r in ok)
    return Result(**{**asdict(first), "tokens_per_s": tokens_per_s,
                     "step_ms": 1000 * first.batch * first.seq / tokens_per_s,
                     "peak_mem_gib": max((r.peak_mem_gib for r in ok if r.peak_mem_gib is not None), default=None)})


def paired_ratio(rows: list[Result], base: list[Result]) -> float | None:
    """Median over rounds of tokens/s ratios of runs made side by side (robust to drifting load)."""
    ratios = [r.tokens_per_s / b.tokens_per_s for r, b in zip(rows, base) if not r.error and not b.error]
    return statistics.median(ratios) if ratios else None


def table(results: list[Result], config: GPTConfig, device: torch.device, vs_raw: dict) -> str:
    name = device_name_of(device)
    fpt = flops_per_token(config, results[0].seq) if results else 0.0
    lines = [
        "| mode | precision | compile | vocab pad | batch x seq | tokens/s | step ms | MFU | peak GPU mem GiB "
        "| / raw loop |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.mode} | {r.precision} | {'on' if r.compile else 'off'} | {r.vocab_pad} "
                         f"| {r.batch} x {r.seq} | failed: {r.error} | | | | |")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peak = peak_flops(name, r.precision)
        mfu = f"{100 * r.tokens_per_s * fpt / peak:.1f}%" if peak else "n/a"
        ratio = vs_raw.get((r.batch, r.precision, r.compile, r.vocab_pad, r.mode))
        ratio = f"{ratio:.3f}" if ratio is not None and r.mode != "raw" else ""
        mem = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-"
        lines.append(f"| {r.mode} | {r.precision} | {'on' if r.compile else 'off'} | {r.vocab_pad} "
                     f"| {r.batch} x {r.seq} | {r.tokens_per_s:,.0f} | {r.step_ms:.1f} | {mfu} | {mem} | {ratio} |")
    return "\n".join(lines)


def loss_comparison(results: list[Result]) -> str:
    curves = {r.precision: r.losses for r in results
              if r.mode == "raw" and r.losses and not r.compile and r.vocab_pad == 1}
    if "32-true" not in curves or len(curves) < 2:
        return ""
    ref = np.array(curves["32-true"])
    out = [f"loss curves (raw loop, same init and batches, {len(ref)} steps): "
           f"fp32 {ref[0]:.4f} -> {ref[-1]:.4f}"]
    for precision, losses in curves.items():
        if precision == "32-true":
            continue
        cur = np.array(losses)
        out.append(f"  {precision}: {cur[0]:.4f} -> {cur[-1]:.4f}, max |loss - fp32| = "
                   f"{np.abs(cur - ref).max():.4f} ({100 * np.abs(cur - ref).max() / ref.mean():.2f}% of mean)")
    return "\n".join(out)


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """--model (a named size) and --depth/--width/--heads/--vocab overrides; see :func:`shape_config`."""
    p.add_argument("--model", default=None, help="a named size (111m, 1p3b, 13b, ...); default: a CPU shape")
    p.add_argument("--depth", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int)


def shape_config(args: argparse.Namespace, cpu_shape: dict, seq: int) -> GPTConfig:
    """The named size (or ``cpu_shape``) with the given overrides, its context at least ``seq``."""
    base = GPTConfig.from_name(args.model) if args.model else GPTConfig(**cpu_shape)
    overrides = {k: v for k, v in dict(depth=args.depth, width=args.width, heads=args.heads,
                                       vocab_size=args.vocab).items() if v is not None}
    return replace(base, **overrides, max_position_embeddings=max(base.max_position_embeddings, seq))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=str, default="8", help="batch sizes, comma separated")
    p.add_argument("--precision", default="32-true,bf16-mixed,bf16-true", help="Lightning precisions, comma separated")
    p.add_argument("--compile", default="off", help="off, on or off,on")
    p.add_argument("--vocab-pad", default="1",
                   help="model.config.vocab_pad_multiple values, comma separated (1 = unpadded; 64 for GPUs)")
    p.add_argument("--modes", default="raw,lightning", help="raw, lightning, lightning+bar (comma separated)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the median is reported")
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (on a CPU shared with other jobs, 1 avoids OpenMP spin-waiting)")
    p.add_argument("--data", default=None, help="a folder made by `gigagpt prepare` (default: generated)")
    p.add_argument("--fsdp-offload", action="store_true",
                   help="one Lightning FSDP run with CPU offload instead (CUDA only): does it fit, how fast")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--markdown", default=None, help="append the table to this file")
    return p.parse_args(argv)


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = shape_config(args, CPU_SHAPE, args.seq)
    batches = [int(b) for b in args.batch.split(",")]
    precisions = args.precision.split(",")
    compiles = [c.strip() == "on" for c in args.compile.split(",")]
    pads = [int(v) for v in args.vocab_pad.split(",")]
    modes = args.modes.split(",")
    header = (f"device {device_name_of(device)} | torch {torch.__version__} | model depth={config.depth} "
              f"width={config.width} heads={config.heads} vocab={config.vocab_size} "
              f"({config.num_params() / 1e6:.1f}M params) | threads {torch.get_num_threads()}")
    print(header, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_data(Path(tmp) / "data", config.vocab_size,
                                      max(batches) * args.seq * (args.warmup + args.steps + 2) * 2 + 1)
        results: list[Result] = []
        vs_raw: dict = {}
        notes: list[str] = []
        if args.fsdp_offload:
            if device.type != "cuda":
                print("FSDP CPU offload needs a CUDA device; skipped")
                return []
            for b in batches:
                args.batch = b
                results.append(guarded(run_lightning, replace(config, vocab_pad_multiple=pads[0]), args,
                                       precisions[0], compiles[0], data, device, fsdp_offload=True))
                print(f"  {results[-1].mode} batch={b}: {results[-1].tokens_per_s:,.0f} tokens/s, "
                      f"host peak RSS {host_rss_gib():.1f} GiB", flush=True)
        else:
            runs: dict[tuple, list[Result]] = {}
            for round_ in range(args.rounds):
                for b in batches:
                    args.batch = b
                    for precision in precisions:
                        for compile_ in compiles:
                            for pad in pads:
                                shaped = replace(config, vocab_pad_multiple=pad)
                                for mode in modes:
                                    if device.type == "cuda":
                                        torch.cuda.reset_peak_memory_stats(device)
                                    t = time.perf_counter()
                                    if mode == "raw":
                                        r = guarded(run_raw, shaped, args, precision, compile_, data, device)
                                    else:
                                        r = guarded(run_lightning, shaped, args, precision, compile_, data, device,
                                                    bar=mode == "lightning+bar")
                                    runs.setdefault((b, precision, compile_, pad, mode), []).append(r)
                                    print(f"  round {round_} {mode:13s} {precision:10s} compile={compile_!s:5s} "
                                          f"pad={pad:<3d} batch={b}: {r.tokens_per_s:,.0f} tokens/s "
                                          f"({time.perf_counter() - t:.0f}s)", flush=True)
            results = [median_rows(rows) for rows in runs.values()]
            for (b, precision, compile_, pad, mode), rows in runs.items():
                if (b, precision, compile_, pad, "raw") in runs:
                    vs_raw[(b, precision, compile_, pad, mode)] = paired_ratio(
                        rows, runs[(b, precision, compile_, pad, "raw")])
                if precision != "32-true" and (b, "32-true", compile_, pad, mode) in runs:
                    ratio = paired_ratio(rows, runs[(b, "32-true", compile_, pad, mode)])
                    if ratio is not None:
                        notes.append(f"{mode} {precision} / 32-true, compile {'on' if compile_ else 'off'}, "
                                     f"pad {pad}, batch {b}: {ratio:.2f}x tokens/s (median of per-round ratios)")
                if pad != 1 and (b, precision, compile_, 1, mode) in runs:
                    ratio = paired_ratio(rows, runs[(b, precision, compile_, 1, mode)])
                    if ratio is not None:
                        notes.append(f"{mode} {precision}, compile {'on' if compile_ else 'off'}, batch {b}: "
                                     f"vocab pad {pad} / unpadded {ratio:.2f}x tokens/s")
    text = table(results, config, device, vs_raw) + ("\n\n" + "\n".join(notes) if notes else "")
    losses = loss_comparison(results)
    print("\n" + text + ("\n\n" + losses if losses else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]}))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n{header}\n\n`{' '.join(['python benchmarks/bench_train.py', *(argv or sys.argv[1:])])}`"
                    f"\n\n{text}\n" + (f"\n```\n{losses}\n```\n" if losses else ""))
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
