"""μP coordinate check (Tensor Programs V, sec. 5 and appendix D.1): activation size vs width.

At each width a GPT takes a few AdamW steps on one fixed batch; after each step the mean absolute
value of every layer's output is recorded (the embedding sum, each block's attention, MLP and
residual output, and the logits). Under μP these stay flat as the width grows; under the standard
parametrization the layers that the updates reach through a width-sized sum (attention, MLP,
logits) grow with the width. Writes a plot of size vs width per step, one panel per parametrization.

    python benchmarks/mup_coord_check.py                       # widths 64..1024, seconds on CPU
    python benchmarks/mup_coord_check.py --widths 32,64,128,256,512 --out coord.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gigagpt.model import GPT, GPTConfig
from gigagpt.optim import OptimConfig, build_torch_optimizer


def layer_outputs(model: GPT, idx: torch.Tensor) -> dict[str, float]:
    """Mean |x| of each layer's output for one forward pass of ``idx``."""
    sizes, hooks = {}, []

    def record(name):
        def hook(_module, _inputs, output):
            sizes[name] = output.detach().abs().mean().item()
        return hook

    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.register_forward_hook(record(f"block{i}.attn")))
        hooks.append(block.mlp.register_forward_hook(record(f"block{i}.mlp")))
        hooks.append(block.register_forward_hook(record(f"block{i}")))
    # The first block's input is the (multiplied) embedding sum.
    hooks.append(model.blocks[0].register_forward_pre_hook(
        lambda _m, args: sizes.__setitem__("embedding", args[0].detach().abs().mean().item())))
    try:
        with torch.no_grad():
            sizes["logits"] = model(idx).abs().mean().item()
    finally:
        for h in hooks:
            h.remove()
    return sizes


def coord_check(mup: bool, widths: list[int], steps: int = 4, lr: float = 1e-2, depth: int = 2,
                head_dim: int = 16, base_width: int | None = None, seeds: int = 2, vocab: int = 64,
                seq: int = 16, batch: int = 4) -> dict[int, list[dict[str, float]]]:
    """``{width: [sizes after step 1, ..., after step steps]}``, each averaged over ``seeds``."""
    base_width = base_width or widths[0]
    out = {}
    for width in widths:
        per_seed = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            config = GPTConfig(vocab_size=vocab, max_position_embeddings=seq, depth=depth, width=width,
                               heads=width // head_dim, mup=mup, mup_base_width=base_width)
            model = GPT(config)
            optimizer, _ = build_torch_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0, fused=False), steps)
            data = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
            inputs, labels = data[:, :-1], data[:, 1:]
            history = []
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                model(inputs, labels).backward()
                optimizer.step()  # a constant rate: the check is about the parametrization, not the schedule
                history.append(layer_outputs(model, inputs))
            per_seed.append(history)
        out[width] = [{k: sum(h[t][k] for h in per_seed) / seeds for k in per_seed[0][t]} for t in range(steps)]
    return out


def spread(result: dict[int, list[dict[str, float]]], layer: str, step: int = -1) -> float:
    """Largest over smallest size of ``layer`` across the widths, after ``step``."""
    values = [result[w][step][layer] for w in result]
    return max(values) / min(values)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    layers = list(next(iter(results[names[0]].values()))[0])
    steps = len(next(iter(results[names[0]].values())))
    fig, axes = plt.subplots(len(names), steps, figsize=(3.2 * steps, 3.2 * len(names)), sharey=True, squeeze=False)
    for row, name in enumerate(names):
        widths = sorted(results[name])
        for t in range(steps):
            ax = axes[row][t]
            for layer in layers:
                ax.plot(widths, [results[name][w][t][layer] for w in widths], marker=".", label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{name}, after step {t + 1}")
            ax.set_xlabel("width")
    axes[0][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="64,128,256,512,1024")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="mup_coord_check.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    results = {name: coord_check(mup, widths, args.steps, args.lr, args.depth, seeds=args.seeds)
               for name, mup in (("standard", False), ("μP", True))}
    layers = list(results["μP"][widths[0]][-1])
    print(f"largest / smallest mean |activation| across widths {widths[0]}..{widths[-1]} after step {args.steps}")
    print("| layer | standard | μP |\n|---|---:|---:|")
    for layer in layers:
        print(f"| {layer} | {spread(results['standard'], layer):.2f}x | {spread(results['μP'], layer):.2f}x |")
    try:
        plot(results, Path(args.out))
        print(f"plot: {args.out}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'gigagpt[plot]')")
    return results


if __name__ == "__main__":
    main()
