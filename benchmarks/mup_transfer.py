"""μP transfer on CPU: the best learning rate per width, μP vs the standard parametrization.

For each parametrization and width, a GPT trains for a fixed number of tokens on the built-in corpus
(bytes) at each learning rate of a log-spaced grid, with the same data order, seed and schedule;
the validation loss after training is recorded. Under μP the best learning rate should stay at the
same grid point as the width grows (the sweep at the smallest width sets it for all); under the
standard parametrization it moves. Writes a JSON of every run, a Markdown table and a plot.

    python benchmarks/mup_transfer.py                      # 3 widths x 7 rates x 2, CPU minutes
    python benchmarks/mup_transfer.py --widths 64,128 --lrs 1e-3,4e-3 --steps 20   # a smoke run
    # the two sweeps as two single-threaded processes, then one table and plot from both
    python benchmarks/mup_transfer.py --threads 1 --param standard --out sp &
    python benchmarks/mup_transfer.py --threads 1 --param mup --out mup; wait
    python benchmarks/mup_transfer.py --merge sp.json,mup.json --out mup_transfer
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gigagpt.data import build_eval_loader, build_train_loader
from gigagpt.model import GPT, GPTConfig
from gigagpt.optim import OptimConfig, build_torch_optimizer

DEFAULT_LRS = ",".join(f"{2.0 ** e:.6g}" for e in range(-12, -5))  # 2^-12 .. 2^-6, factor 2


def make_builtin(folder: Path) -> str:
    from gigagpt.prepare import builtin_documents, prepare
    from gigagpt.tokenizer import get_tokenizer

    docs = ((d, len(d.encode("utf-8"))) for d in builtin_documents())
    prepare(docs, folder, get_tokenizer("bytes"), val_fraction=0.05, progress=False)
    return str(folder)


def model_config(args, width: int, mup: bool) -> GPTConfig:
    return GPTConfig(vocab_size=256, max_position_embeddings=args.seq, depth=args.depth, width=width,
                     heads=width // args.head_dim, init_std=args.init_std, mup=mup,
                     mup_base_width=args.base_width)


def run_one(args, data: str, width: int, mup: bool, lr: float) -> dict:
    """Train one model; the mean validation loss over ``--val-batches`` batches afterwards."""
    torch.manual_seed(args.seed)
    model = GPT(model_config(args, width, mup))
    optim = OptimConfig(lr=lr, warmup_steps=args.warmup, min_lr_ratio=0.1, weight_decay=0.0, fused=False)
    optimizer, scheduler = build_torch_optimizer(model, optim, args.steps)
    loader = build_train_loader(data + "/train.bin", args.seq, args.batch, seed=args.seed, num_steps=args.steps)
    train_loss = float("nan")
    for inputs, labels in loader:
        loss = model(inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        train_loss = loss.item()
        if not math.isfinite(train_loss):
            break
    model.eval()
    losses = []
    with torch.no_grad():
        for inputs, labels in build_eval_loader(data + "/val.bin", args.seq, args.batch,
                                                  max_batches=args.val_batches):
            losses.append(model(inputs, labels).item())
    val = sum(losses) / len(losses) if math.isfinite(train_loss) else float("inf")
    return {"mup": mup, "width": width, "lr": lr, "train_loss": train_loss,
            "val_loss": val if math.isfinite(val) else float("inf")}


def best_per_width(runs: list[dict]) -> dict:
    best = {}
    for r in runs:
        key = (r["mup"], r["width"])
        if key not in best or r["val_loss"] < best[key]["val_loss"]:
            best[key] = r
    return best


def table(runs: list[dict], lrs: list[float]) -> str:
    """Markdown: one row per (parametrization, width), one column per rate, the best one in bold."""
    best = best_per_width(runs)
    lines = ["| parametrization | width | " + " | ".join(f"lr {lr:.3g}" for lr in lrs) + " | best lr |",
             "|---|---:|" + "---:|" * (len(lrs) + 1)]
    for (mup, width), b in sorted(best.items()):
        cells = []
        for lr in lrs:
            r = next((r for r in runs if r["mup"] == mup and r["width"] == width and r["lr"] == lr), None)
            if r is None:  # not in this parametrization's grid
                cells.append("")
                continue
            text = "diverged" if not math.isfinite(r["val_loss"]) else f"{r['val_loss']:.4f}"
            cells.append(f"**{text}**" if r is b else text)
        lines.append(f"| {'μP' if mup else 'standard'} | {width} | " + " | ".join(cells) + f" | {b['lr']:.3g} |")
    return "\n".join(lines)


def optimum_shift(runs: list[dict], lrs: list[float], mup: bool) -> int:
    """How many grid steps the best learning rate moves across the widths."""
    lrs = sorted({r["lr"] for r in runs if r["mup"] == mup})
    idx = [lrs.index(b["lr"]) for (m, _), b in best_per_width(runs).items() if m == mup]
    return max(idx) - min(idx)


def plot(runs: list[dict], lrs: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mup in zip(axes, (False, True)):
        for width in sorted({r["width"] for r in runs}):
            pts = [(r["lr"], r["val_loss"]) for r in runs if r["mup"] == mup and r["width"] == width]
            pts = [(x, y) for x, y in sorted(pts) if math.isfinite(y)]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (base rate under μP)")
        ax.set_title("μP" if mup else "standard parametrization")
        ax.legend()
    axes[0].set_ylabel("validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep(args, params: list[bool], widths: list[int], lrs: list[float]) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_builtin(Path(tmp) / "builtin")
        for mup in params:
            for width in widths:
                for lr in lrs:
                    start = time.perf_counter()
                    runs.append(run_one(args, data, width, mup, lr))
                    print(f"{'mup' if mup else 'sp '} width={width:5d} lr={lr:.3g} "
                          f"val={runs[-1]['val_loss']:.4f} ({time.perf_counter() - start:.1f}s)", flush=True)
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--lrs", default=DEFAULT_LRS, help="comma-separated learning rates (log-spaced)")
    p.add_argument("--base-width", type=int, default=32, help="mup_base_width (the proxy's width)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=12)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--param", default="standard,mup", help="which parametrizations to sweep")
    p.add_argument("--out", default="mup_transfer", help="output prefix (.json, .md, .png)")
    p.add_argument("--merge", default=None, help="comma-separated JSONs of earlier sweeps: report them, train nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    params = [{"standard": False, "mup": True}[name] for name in args.param.split(",")]
    out = Path(args.out)
    if args.merge:
        runs = [r for f in args.merge.split(",") for r in json.loads(Path(f).read_text())["runs"]]
        widths, lrs = sorted({r["width"] for r in runs}), sorted({r["lr"] for r in runs})
        params = sorted({r["mup"] for r in runs})
    else:
        runs = sweep(args, params, widths, lrs)
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    text = table(runs, lrs)
    for mup in params:
        text += f"\n\n{'μP' if mup else 'standard'}: best learning rate moves {optimum_shift(runs, lrs, mup)} grid step(s) across widths {widths}"
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    try:
        plot(runs, lrs, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'gigagpt[plot]')")


if __name__ == "__main__":
    main()
