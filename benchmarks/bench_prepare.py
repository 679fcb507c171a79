"""`gigagpt prepare` throughput and memory against raw tiktoken, on the same text, in one run.

    python benchmarks/bench_prepare.py [--corpus-mb 400] [--threads 2]
    python benchmarks/bench_prepare.py --sharded [--corpus-mb 40] [--shard-mb 2]

``--sharded`` measures a sharded store instead (``docs/data.md``): on a local Dask cluster of 1 and 2
worker processes (one tokenizer thread each), and as 2 "nodes" (two processes with ``--num-nodes 2
--node-rank 0|1``, as on two machines), against raw tiktoken with 1 and 2 threads; peak memory is
per worker process.

Builds a corpus of text files from the built-in documentation (each copy numbered so no two
documents are identical), then measures:
  1. raw tiktoken ``encode_ordinary_batch`` over the same documents held in memory (no I/O);
  2. ``gigagpt prepare`` end to end (read, tokenize, split, write) in a fresh process, with its
     peak resident memory (``VmHWM``; ``ru_maxrss`` would carry the parent's peak across exec).
Prints MB/s of both, their ratio, and peak memory relative to the corpus size. The GPT-2 ranks
come from ``tests/data/gpt2.tiktoken``: no network needed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RANKS = ROOT / "tests" / "data" / "gpt2.tiktoken"


def make_corpus(folder: Path, target_mb: int) -> tuple[list[Path], int]:
    from gigagpt.prepare import builtin_documents

    docs = list(builtin_documents())
    files, size, copy = [], 0, 0
    while size < target_mb * 1e6:
        path = folder / f"part{copy:05d}.jsonl"
        # One .jsonl file per copy, one document per line (~80 documents, ~0.5 MB of text).
        path.write_text("".join(json.dumps({"text": f"Copy {copy}. {d}"}) + "\n" for d in docs))
        files.append(path)
        size += sum(len(f"Copy {copy}. {d}".encode()) for d in docs)
        copy += 1
    return files, size


def raw_tiktoken(files: list[Path], threads: int, limit_bytes: int) -> float:
    """MB/s of encode_ordinary_batch over in-memory documents (up to ``limit_bytes``)."""
    from gigagpt.tokenizer import gpt2_from_file

    enc = gpt2_from_file(RANKS)._encoding
    texts, size = [], 0
    for f in files:
        for line in f.read_text().splitlines():
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode())
        if size >= limit_bytes:
            break
    # Same batching as prepare: ~1 MB of documents per call.
    batches, batch, acc = [], [], 0
    for t in texts:
        batch.append(t)
        acc += len(t)
        if acc >= 1 << 20:
            batches.append(batch)
            batch, acc = [], 0
    if batch:
        batches.append(batch)
    start = time.perf_counter()
    for b in batches:
        enc.encode_ordinary_batch(b, num_threads=threads)
    return size / 1e6 / (time.perf_counter() - start)


def run_prepare(corpus: Path, out: Path, threads: int) -> tuple[float, float, dict]:
    """(MB/s end to end, peak RSS in MB, meta) of `gigagpt prepare` in a fresh process."""
    code = (
        "import sys;"
        "from gigagpt.commands import main; main(sys.argv[1:]);"
        "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, "prepare", str(corpus), "--output", str(out), "--tokenizer", str(RANKS),
         "--threads", str(threads), "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
    )
    wall = time.perf_counter() - start
    peak_kb = int(proc.stdout.split("PEAK_RSS_KB")[1].split()[0])
    meta = json.loads((out / "meta.json").read_text())
    return meta["text_bytes"] / 1e6 / meta["seconds"], peak_kb / 1024, {**meta, "wall": wall}


def baseline_rss_mb() -> float:
    """RSS of a process that only imports what `gigagpt prepare` imports."""
    code = ("import gigagpt.commands, gigagpt.prepare, gigagpt.tokenizer;"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return int(out.stdout.split()[-1]) / 1024


def _peak_kb() -> int:
    return int([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])


def _warm() -> None:
    """What every shard task imports (the tokenizer, the atomic writer), loaded before timing."""
    from gigagpt.shards import _atomic_write
    from gigagpt.tokenizer import get_tokenizer

    _atomic_write()
    get_tokenizer(str(RANKS))


def run_dask(files: list[Path], out: Path, workers: int, shard_mb: float) -> tuple[float, list[float], list[float]]:
    """(MB/s, peak RSS MB of each worker, RSS MB of each worker after imports) on a local Dask cluster."""
    from dask.distributed import Client, LocalCluster

    from gigagpt.prepare import PIECE_BYTES
    from gigagpt.shards import prepare_store

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(_warm)
        base = [kb / 1024 for kb in client.run(_peak_kb).values()]
        done = prepare_store(files, out, str(RANKS), 0.0005, 2357, PIECE_BYTES, int(shard_mb * 1e6), "bench",
                             client=client)
        peaks = [kb / 1024 for kb in client.run(_peak_kb).values()]
    return done["text_bytes"] / 1e6 / done["seconds"], peaks, base


def run_nodes(corpus: Path, out: Path, nodes: int, shard_mb: float) -> tuple[float, list[float]]:
    """(MB/s over the slowest node's shard time, peak RSS MB of each node) of ``nodes`` processes."""
    code = ("import sys; from gigagpt.commands import main; main(sys.argv[1:]);"
            "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    procs = [subprocess.Popen(
        [sys.executable, "-c", code, "prepare", str(corpus), "--output", str(out), "--tokenizer", str(RANKS),
         "--shard-mb", str(shard_mb), "--threads", "1", "--num-nodes", str(nodes), "--node-rank", str(rank),
         "--no-progress"], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        for rank in range(nodes)]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    seconds = max(float(o.split(" MB of text in ")[1].split()[0]) for o in outs)
    text_mb = sum(float(o.split(" MB of text in ")[0].rsplit(":", 1)[1]) for o in outs)
    return text_mb / seconds, [int(o.split("PEAK_RSS_KB")[1].split()[0]) / 1024 for o in outs]


def sharded(args, tmp: Path, files: list[Path], size: int) -> None:
    raw1 = raw_tiktoken(files, 1, args.raw_mb * 10**6)
    raw2 = raw_tiktoken(files, 2, args.raw_mb * 10**6)
    print(f"corpus: {size / 1e6:.0f} MB of text in {len(files)} files, shards of {args.shard_mb} MB")
    print(f"raw tiktoken encode_ordinary_batch : {raw1:.2f} MB/s on 1 thread, {raw2:.2f} MB/s on 2")
    for workers in (1, 2):
        mbps, peaks, base = run_dask(files, tmp / f"dask{workers}", workers, args.shard_mb)
        print(f"Dask, {workers} worker process(es)       : {mbps:.2f} MB/s = {mbps / (raw1 if workers == 1 else raw2):.2f}"
              f" x raw on {workers} thread(s); peak RSS per worker "
              f"{', '.join(f'{p:.0f}' for p in peaks)} MB (after imports {', '.join(f'{b:.0f}' for b in base)} MB)")
    mbps, peaks = run_nodes(tmp / "corpus", tmp / "nodes", 2, args.shard_mb)
    print(f"2 nodes (--node-rank 0, 1)          : {mbps:.2f} MB/s = {mbps / raw2:.2f} x raw on 2 threads; "
          f"peak RSS per node {', '.join(f'{p:.0f}' for p in peaks)} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=int, default=400)
    parser.add_argument("--raw-mb", type=int, default=100, help="text for the raw tiktoken measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sharded", action="store_true", help="measure a sharded store: Dask workers, node ranks")
    parser.add_argument("--shard-mb", type=float, default=2.0, help="shard size of --sharded")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gigagpt-bench-prepare-"))
    try:
        (tmp / "corpus").mkdir()
        files, size = make_corpus(tmp / "corpus", args.corpus_mb)
        if args.sharded:
            return sharded(args, tmp, files, size)
        raw = raw_tiktoken(files, args.threads, args.raw_mb * 10**6)
        mbps, peak, meta = run_prepare(tmp / "corpus", tmp / "out", args.threads)
        raw_after = raw_tiktoken(files, args.threads, args.raw_mb * 10**6)  # bracket prepare: load drifts
        raw_mean = (raw + raw_after) / 2
        base = baseline_rss_mb()
        print(f"corpus: {size / 1e6:.0f} MB of text in {len(files)} files, {args.threads} threads")
        print(f"raw tiktoken encode_ordinary_batch : {raw:.2f} / {raw_after:.2f} MB/s (before / after)")
        print(f"gigagpt prepare, end to end        : {mbps:.2f} MB/s "
              f"({meta['train_tokens'] + meta['val_tokens']:,} tokens, {meta['seconds']:.1f} s; "
              f"process wall {meta['wall']:.1f} s incl. imports)")
        print(f"ratio prepare / raw                : {mbps / raw_mean:.2f}")
        print(f"peak RSS of prepare                : {peak:.0f} MB (imports alone: {base:.0f} MB); "
              f"corpus / peak = {size / 1e6 / peak:.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
