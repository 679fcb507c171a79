"""Writing a sharded token store: shards made independently (on one machine, on a Dask cluster, or
split over machines by node rank), the manifest written last.

The inputs are planned into shards (:func:`gigagpt.sources.plan_shards`: byte ranges of the sorted
inputs, cut after newlines); shard ``i`` is a pure function of ``(plan[i], i, recipe)``: its
train/val draw is seeded by ``(seed, i)``, so its bytes do not depend on which machine or worker
makes it, nor when. Each shard is written under temporary names and renamed into place, then its
record (``shard-00007.json``: counts, SHA-256s, the recipe) is written atomically. Whoever finds
every record complete writes ``manifest.json`` atomically, last: a store without a manifest is not
a store, and a rerun reuses the shards whose record and files still match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from gigagpt.dataset_folder import fsync_file
from gigagpt.prepare import _progress, _tokenize, check_settings, dataset_meta, warn_small_val
from gigagpt.sources import plan_shards, segment_documents
from gigagpt.store import MANIFEST, STORE_FORMAT
from gigagpt.tokenizer import get_tokenizer

RECORD = "shard-{:05d}.json"
STORE_NAME = re.compile(r"^(?:(?:train|val)-\d{5}\.bin|shard-\d{5}\.json|manifest\.json|\..*)$")
# what decides the bytes of a store; a record or manifest of another recipe is not reused
RECIPE_KEYS = ("tokenizer", "vocab_size", "val_fraction", "seed", "piece_bytes", "shard_bytes", "source")


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _atomic_write():
    # the project's atomic writer lives with the checkpoints (which load torch): imported when first used
    from gigagpt.checkpoint import atomic_write

    return atomic_write


def _write_json(path: Path, data: dict) -> None:
    _atomic_write()(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def check_store_output(out: Path, recipe: dict, force: bool) -> None:
    """Refuse an output that holds other files, or a complete store of another recipe (without
    ``force``, which removes that manifest so no reader takes the old store as complete)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; give a folder (a new one, or a store made by gigagpt prepare)")
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if not STORE_NAME.match(p.name))
    if others:
        raise ValueError(f"--output {out} holds files that are not a gigagpt token store ({', '.join(others[:3])}); "
                         "choose a new or empty folder")
    old = _read_json(out / MANIFEST)
    if old is not None and any(old.get(k) != recipe.get(k) for k in RECIPE_KEYS):
        if not force:
            raise ValueError(f"--output {out} already holds a different store (source {old.get('source')!r}, "
                             f"tokenizer {old.get('tokenizer')!r}); pass --force to replace it, or choose "
                             "another --output")
        (out / MANIFEST).unlink(missing_ok=True)


def complete_record(out: Path, index: int, recipe: dict, segments: list, verify: bool = True) -> dict | None:
    """Shard ``index``'s record if it and its files are complete and of this recipe (sizes and,
    with ``verify``, SHA-256 checked), else None."""
    record = _read_json(out / RECORD.format(index))
    if record is None or record.get("recipe") != recipe or record.get("segments") != [list(s) for s in segments]:
        return None
    for split in ("train", "val"):
        entry = record.get(split) or {}
        path = out / str(entry.get("file"))
        itemsize = 2 if recipe["vocab_size"] <= 1 << 16 else 4
        if not path.is_file() or path.stat().st_size != entry.get("tokens", -1) * itemsize:
            return None
        if verify and sha256_file(path) != entry.get("sha256"):
            return None
    return record


def write_shard(index: int, segments: list, output: str, recipe: dict, tokenizer_spec: str,
                num_threads: int = 1) -> dict:
    """Make shard ``index`` of the store in ``output`` from ``segments`` (or reuse a complete one);
    returns its record. Module-level with plain arguments: the engines ship it to their workers."""
    out = Path(output)
    done = complete_record(out, index, recipe, segments)
    if done is not None:
        return {**done, "reused": True}
    tokenizer = get_tokenizer(tokenizer_spec)
    tmp = out / f".shard-{index:05d}.{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir(parents=True)
    try:
        stats = _tokenize(segment_documents(segments), tmp, tokenizer, recipe["val_fraction"],
                          f"{recipe['seed']}/{index}", num_threads, 1 << 20, _progress(False, None),
                          recipe["piece_bytes"], whole=False)
        record = {"index": index, "recipe": recipe, "segments": [list(s) for s in segments],
                  "text_bytes": stats["text_bytes"], "pieces": stats["pieces"]}
        for split in ("train", "val"):
            name = shard_file(split, index)
            record[split] = {"file": name, "tokens": stats[f"{split}_tokens"],
                             "sha256": sha256_file(tmp / f"{split}.bin"),
                             "max_token_id": stats[f"{split}_max_token_id"],
                             "documents": stats[f"{split}_documents"]}
            fsync_file(tmp / f"{split}.bin")  # on disk before the record that vouches for it
            os.replace(tmp / f"{split}.bin", out / name)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    _write_json(out / RECORD.format(index), record)
    return {**record, "reused": False}


def manifest_from(records: list[dict], meta: dict) -> dict:
    """The store's manifest: ``meta`` (tokenizer, recipe) with the totals and shards of ``records``."""
    manifest = {"format": STORE_FORMAT, "version": 1, **meta}
    for split in ("train", "val"):
        entries = [r[split] for r in records]
        manifest[f"{split}_tokens"] = sum(e["tokens"] for e in entries)
        manifest[f"{split}_documents"] = sum(e["documents"] for e in entries)
        manifest[f"{split}_max_token_id"] = max(e["max_token_id"] for e in entries)
    manifest["text_bytes"] = sum(r["text_bytes"] for r in records)
    manifest["shards"] = {split: [{k: r[split][k] for k in ("file", "tokens", "sha256", "max_token_id")}
                                  for r in records] for split in ("train", "val")}
    return manifest


def finish_store(out: Path, plan: list, recipe: dict, meta: dict) -> dict | None:
    """Write the manifest if every shard of ``plan`` is complete; returns it, or None (shards missing).

    Any machine may call this: the manifest's bytes depend only on the records, so two writers
    racing write the same file.
    """
    records = []
    for index, segments in enumerate(plan):
        record = complete_record(out, index, recipe, segments, verify=False)
        if record is None:
            return None
        records.append(record)
    manifest = manifest_from(records, meta)
    if manifest["train_tokens"] == 0:
        raise ValueError("no training text: the inputs were empty")
    if recipe["val_fraction"] > 0 and manifest["val_tokens"] == 0:
        raise ValueError(f"no piece of the text was drawn for validation with --val-fraction {recipe['val_fraction']}: "
                         "raise --val-fraction, or give a smaller --piece-bytes or more text")
    try:
        _write_json(out / MANIFEST, manifest)
    except FileNotFoundError:  # another machine's identical write replaced ours first
        if not (out / MANIFEST).is_file():
            raise
    return manifest


def run_shards(indices: list[int], plan: list, output: str, recipe: dict, tokenizer_spec: str,
               num_threads: int, workers: int = 0, scheduler: str | None = None, client=None) -> list[dict]:
    """Make the shards ``indices``: in this process (``workers`` 0, no ``scheduler``), or as tasks of
    a Dask cluster (``scheduler``'s address, or a local cluster of ``workers`` processes)."""
    if not (workers or scheduler or client):
        return [write_shard(i, plan[i], output, recipe, tokenizer_spec, num_threads) for i in indices]
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--workers and --scheduler run on Dask: pip install 'gigagpt[data]' "
                         "(or 'dask[distributed]'), or leave them out to prepare in this process") from None
    own = None
    if client is None:
        own = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) \
            if not scheduler else None
        client = Client(own if own is not None else scheduler)
    try:
        # one task per shard; results come back in shard order whatever order workers finish in
        futures = client.map(write_shard, indices, [plan[i] for i in indices], output=output, recipe=recipe,
                             tokenizer_spec=tokenizer_spec, num_threads=1, pure=False)
        return client.gather(futures)
    finally:
        if own is not None:
            client.close()
            own.close()


def prepare_store(files: list[Path], output: str | os.PathLike, tokenizer_spec: str, val_fraction: float,
                  seed: int, piece_bytes: int, shard_bytes: int, source: str, num_threads: int | None = None,
                  workers: int = 0, scheduler: str | None = None, num_nodes: int = 1, node_rank: int = 0,
                  force: bool = False, client=None) -> dict:
    """Tokenize ``files`` into a sharded store in ``output``; this machine makes the shards
    ``i % num_nodes == node_rank``. Returns a summary; its ``manifest`` is None while shards of
    other nodes are missing."""
    check_settings(val_fraction, piece_bytes)
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node-rank must be in [0, --num-nodes), --num-nodes at least 1; got --node-rank "
                         f"{node_rank} of --num-nodes {num_nodes}")
    if workers < 0:
        raise ValueError(f"--workers must be 0 (this process) or more, got {workers}")
    if shard_bytes < 1:
        raise ValueError(f"--shard-mb must be positive, got {shard_bytes / 1e6}")
    tokenizer = get_tokenizer(tokenizer_spec)
    recipe = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "val_fraction": val_fraction,
              "seed": seed, "piece_bytes": piece_bytes, "shard_bytes": shard_bytes, "source": source}
    meta = dataset_meta(tokenizer, {}, val_fraction, seed, source)
    meta.update(piece_bytes=piece_bytes, shard_bytes=shard_bytes)
    out = Path(output)
    check_store_output(out, recipe, force)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(files, shard_bytes)
    mine = [i for i in range(len(plan)) if i % num_nodes == node_rank]
    _atomic_write()  # its import (torch) before the clock starts
    start = time.perf_counter()
    records = run_shards(mine, plan, str(out), recipe, tokenizer_spec, num_threads or os.cpu_count() or 1,
                         workers, scheduler, client)
    seconds = time.perf_counter() - start
    manifest = finish_store(out, plan, recipe, meta)
    if manifest is None and num_nodes == 1:
        raise RuntimeError(f"shards of {out} are missing after every shard was made")
    return {"shards": len(plan), "mine": mine, "reused": [r["index"] for r in records if r["reused"]],
            "text_bytes": sum(r["text_bytes"] for r in records if not r["reused"]), "seconds": seconds,
            "manifest": manifest}


def main(args, files, output, spec, val_fraction, source) -> dict:
    shard_bytes = int((256 if args.shard_mb is None else args.shard_mb) * 1e6)
    done = prepare_store(files, output, spec, val_fraction, args.seed, args.piece_bytes, shard_bytes, source,
                         num_threads=args.threads, workers=args.workers, scheduler=args.scheduler,
                         num_nodes=args.num_nodes, node_rank=args.node_rank, force=args.force)
    mb = done["text_bytes"] / 1e6
    print(f"made {len(done['mine']) - len(done['reused'])} of {done['shards']} shards ({len(done['reused'])} "
          f"complete ones kept) in {output}: {mb:.1f} MB of text in {done['seconds']:.1f} s "
          f"({mb / max(done['seconds'], 1e-9):.1f} MB/s)")
    manifest = done["manifest"]
    if manifest is None:
        print(f"{output}/manifest.json not written yet: the other nodes' shards are missing; the last node "
              "to finish writes it")
    else:
        print(f"wrote {output}/manifest.json: {manifest['train_tokens']:,} train and {manifest['val_tokens']:,} "
              f"val tokens, {manifest['dtype']}, tokenizer {manifest['tokenizer']}")
        warn_small_val(manifest["val_tokens"], val_fraction)
    return done


def split_dataset(source: str | os.PathLike, output: str | os.PathLike, shard_tokens: int) -> dict:
    """A prepared ``train.bin``/``val.bin`` folder cut into a store of the same token streams
    (shards of ``shard_tokens``), e.g. to put existing data into object storage."""
    import numpy as np

    from gigagpt.token_files import meta_dtype, open_tokens, read_meta

    src, out = Path(source), Path(output)
    meta = read_meta(src)
    dtype = meta_dtype(meta, src)
    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for split in ("train", "val"):
        tokens = open_tokens(src / f"{split}.bin", dtype) if (src / f"{split}.bin").stat().st_size else []
        parts[split] = [np.asarray(tokens[i : i + shard_tokens]) for i in range(0, len(tokens), shard_tokens)]
    records = []
    for index in range(max(map(len, parts.values()))):
        record = {"text_bytes": 0}
        for split in ("train", "val"):
            part = parts[split][index] if index < len(parts[split]) else np.zeros(0, dtype)
            name = shard_file(split, index)
            _write_bytes(out / name, part.tobytes())
            record[split] = {"file": name, "tokens": len(part), "sha256": sha256_file(out / name),
                             "max_token_id": int(part.max()) if len(part) else -1, "documents": 0}
        records.append(record)
    keep = ("tokenizer", "tokenizer_file", "vocab_size", "eot_token", "dtype", "val_fraction", "seed", "source")
    manifest = manifest_from(records, {k: meta.get(k) for k in keep} | {"split_from": str(src)})
    _write_json(out / MANIFEST, manifest)
    return manifest


def _write_bytes(path: Path, data: bytes) -> None:
    _atomic_write()(path, lambda f: f.write(data))
