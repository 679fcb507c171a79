"""Per-step training time: Cerebras CPU backend (cstorch) vs plain Lightning CPU, same shapes, one run.

    PATH=.venv-cerebras/bin:$PATH .venv-cerebras/bin/python benchmarks/bench_cerebras.py [--steps 30]

Both trainings run the `tiny` shapes (depth 4, width 128, T=256, batch 16) on the built-in corpus, each
in its own process (cstorch allows one backend per process), alternating over several rounds so that
load from other processes hits both alike. Prints the median step time of each path (warm-up steps
excluded), the ratio of each round, and the median of those ratios (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cstorch" / "harness.py"


def prepare_data(folder: Path) -> None:
    from gigagpt.prepare import builtin_documents, prepare
    from gigagpt.tokenizer import bytes_tokenizer

    docs = ((d, len(d.encode("utf-8"))) for d in builtin_documents())
    prepare(docs, folder, bytes_tokenizer(), val_fraction=0.1, seed=2357, progress=False)


def run(kind: str, data: Path, out: Path, steps: int, shapes: list[str]) -> dict:
    cmd = [sys.executable, str(HARNESS), kind, str(data), str(out), "--steps", str(steps), *shapes]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return json.loads((out / "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    args = p.parse_args()
    shapes = ["--depth", "4", "--width", "128", "--heads", "4", "--seq", "256", "--batch", "16", "--warmup", "10"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_data(tmp / "data")
        times = {"cpu": [], "cerebras_cpu": []}
        losses, ratios = {}, []
        for r in range(args.rounds):
            kinds = list(times) if r % 2 == 0 else list(times)[::-1]
            this = {}
            for kind in kinds:
                res = run(kind, tmp / "data", tmp / f"{kind}{r}", args.steps, shapes)
                this[kind] = statistics.median(res["step_times"][args.skip:])
                times[kind] += res["step_times"][args.skip:]
                losses[kind] = res["losses"]
            ratios.append(this["cerebras_cpu"] / this["cpu"])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(ratios)
    last = str(args.steps - 1)
    print(f"shapes: depth 4, width 128, T 256, batch 16; {args.steps} steps x {args.rounds} rounds per path")
    print(f"plain Lightning CPU      : {med['cpu'] * 1000:8.1f} ms/step  (final loss {losses['cpu'][last]:.4f})")
    print(f"Cerebras CPU backend     : {med['cerebras_cpu'] * 1000:8.1f} ms/step  "
          f"(final loss {losses['cerebras_cpu'][last]:.4f})")
    print(f"ratio per round          : {', '.join(f'{x:.3f}' for x in ratios)}")
    print(f"ratio cerebras_cpu / cpu : {ratio:.3f}  (median of rounds; target <= 1.10)")


if __name__ == "__main__":
    main()
