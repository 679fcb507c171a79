"""The sharded token store: made on one machine, by node ranks or a Dask cluster with the same bytes;
a killed preparation leaves no manifest and a rerun completes it; read back as one token stream, and
from object storage through a bounded cache."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import GPT2_TIKTOKEN, ROOT

from gigagpt.data import GPTDataModule
from gigagpt.shards import prepare_store, split_dataset
from gigagpt.sources import input_files, plan_shards, range_blocks, text_blocks
from gigagpt.store import ShardCache, TokenStream
from gigagpt.token_files import DataConfigError

SHARD_MB = 0.25
RECIPE = dict(tokenizer_spec=str(GPT2_TIKTOKEN), val_fraction=0.01, seed=5, piece_bytes=4096,
              shard_bytes=int(SHARD_MB * 1e6))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~3.8 MB of text in .txt files (cut inside files) and a .jsonl file: ~15 shards."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    keys = sorted(topics)
    for n in range(7):
        (folder / f"part{n}.txt").write_text("\n".join(f"{n} {k}\n{topics[k]}" for k in keys))
    with open(folder / "docs.jsonl", "w") as f:
        for k in keys:
            f.write(json.dumps({"text": topics[k]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def one_node(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_node")
    done = prepare_store(input_files([corpus]), out, source=str(corpus), **RECIPE)
    assert done["manifest"] is not None and done["shards"] > 10
    return out


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _node(corpus: Path, out: Path, rank: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "gigagpt", "prepare", str(corpus), "--output", str(out), "--tokenizer",
            RECIPE["tokenizer_spec"], "--val-fraction", str(RECIPE["val_fraction"]), "--seed", str(RECIPE["seed"]),
            "--piece-bytes", str(RECIPE["piece_bytes"]), "--shard-mb", str(SHARD_MB), "--threads", "1",
            "--num-nodes", "2", "--node-rank", str(rank), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_two_nodes_one_killed_then_rerun_give_the_one_node_store(corpus, one_node, tmp_path):
    """Node 0 and node 1 run as two processes; node 1 is killed with SIGKILL after its first shard.
    No manifest exists until node 1 is rerun; then the store is byte for byte the one-node store."""
    out = tmp_path / "store"
    nodes = [_node(corpus, out, rank) for rank in (0, 1)]
    deadline = time.monotonic() + 300
    while not (out / "shard-00001.json").exists():
        assert nodes[1].poll() is None, nodes[1].communicate()
        assert time.monotonic() < deadline, "node 1 made no shard in time"
        time.sleep(0.005)
    os.kill(nodes[1].pid, signal.SIGKILL)
    nodes[1].wait(timeout=30)
    out0, err0 = nodes[0].communicate(timeout=300)
    assert nodes[0].returncode == 0, err0
    assert nodes[1].returncode == -signal.SIGKILL
    expected = sorted(p.name for p in one_node.glob("shard-*.json"))
    made = sorted(p.name for p in out.glob("shard-*.json"))
    assert made != expected, "node 1 finished before it was killed"
    assert not (out / "manifest.json").exists(), "a store with missing shards must have no manifest"
    assert "manifest.json not written yet" in out0 or "wrote" in out0

    done = prepare_store(input_files([corpus]), out, source=str(corpus), num_nodes=2, node_rank=1, **RECIPE)
    assert done["manifest"] is not None and 1 in done["reused"]  # node 1's finished shard is kept
    assert store_bytes(out) == store_bytes(one_node)


def test_dask_workers_give_the_one_node_store(corpus, one_node, tmp_path):
    pytest.importorskip("dask.distributed")
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        done = prepare_store(input_files([corpus]), tmp_path, source=str(corpus), client=client, **RECIPE)
    assert done["manifest"] is not None
    assert store_bytes(tmp_path) == store_bytes(one_node)


def test_rerun_keeps_complete_shards_and_remakes_a_changed_one(corpus, one_node, tmp_path):
    out = tmp_path / "store"
    files = input_files([corpus])
    shutil.copytree(one_node, out)
    (out / "manifest.json").unlink()
    data = bytearray((out / "train-00002.bin").read_bytes())
    data[10] ^= 1  # same size, other bytes: only the hash tells
    (out / "train-00002.bin").write_bytes(bytes(data))
    done = prepare_store(files, out, source=str(corpus), **RECIPE)
    assert 2 not in done["reused"] and len(done["reused"]) == done["shards"] - 1
    assert store_bytes(out) == store_bytes(one_node)


def test_store_output_refuses_other_files_and_another_recipe(corpus, one_node, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a gigagpt token store"):
        prepare_store(input_files([corpus]), tmp_path, source=str(corpus), **RECIPE)
    with pytest.raises(ValueError, match="different store.*--force"):
        prepare_store(input_files([corpus]), one_node, source=str(corpus), **{**RECIPE, "seed": 6})


def test_plan_cuts_files_after_newlines_and_the_ranges_read_back_whole(corpus):
    files = input_files([corpus / "part0.txt", corpus / "docs.jsonl"])
    plan = plan_shards(files, 100_000)
    segments = [s for shard in plan for s in shard]
    assert len(plan) > 5 and plan == plan_shards(files, 100_000)
    for path in files:
        parts = [(a, b) for name, a, b in segments if name == str(path)]
        assert parts[0][0] == 0 and parts[-1][1] == path.stat().st_size
        assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))  # contiguous
        data = path.read_bytes()
        assert all(data[b - 1 : b] == b"\n" for _, b in parts[:-1])  # cut just after a newline
    text = corpus / "part0.txt"
    parts = [(a, b) for name, a, b in segments if name == str(text)]
    assert "".join("".join(range_blocks(text, a, b, 999)) for a, b in parts) == "".join(text_blocks(text))


def test_token_stream_reads_shards_as_one_array(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, 1000).astype("<u2")
    cuts = [0, 7, 300, 301, 650, 1000]
    shards = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        tokens[a:b].tofile(tmp_path / f"s{i}.bin")
        shards.append([str(tmp_path / f"s{i}.bin"), b - a])
    stream = pickle.loads(pickle.dumps(TokenStream(shards, "uint16")))
    assert len(stream) == 1000
    for a, b in [(0, 1000), (5, 9), (299, 302), (300, 301), (640, 1000), (999, 1000)]:
        assert np.array_equal(stream.read(a, b), tokens[a:b]), (a, b)


def test_cache_keeps_the_most_recently_used_within_its_bytes_and_checks_hashes(tmp_path):
    import hashlib

    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"memory://gigagpt-cache-{os.getpid()}"
    blobs = {name: bytes([i]) * 1000 for i, name in enumerate("abcd")}
    for name, data in blobs.items():
        fs.pipe(f"{root}/{name}.bin".removeprefix("memory://"), data)
    hashes = {f"{root}/{n}.bin": hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
    try:
        cache = ShardCache(tmp_path, 2500, hashes)
        for name in "abca":  # c pushes a out; a comes back, pushing b out (the least recently used)
            assert cache.fetch(f"{root}/{name}.bin").read_bytes() == blobs[name]
            time.sleep(0.01)
        assert sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir()) == ["a.bin", "c.bin"]
        assert cache.cached_bytes() <= 2500
        bad = ShardCache(tmp_path / "bad", 10**6, {f"{root}/d.bin": "0" * 64})
        with pytest.raises(DataConfigError, match="does not match the SHA-256"):
            bad.fetch(f"{root}/d.bin")
        assert not any((tmp_path / "bad").iterdir())  # nothing half-checked is left to read
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)


def test_datamodule_names_a_shard_whose_size_is_not_the_manifests(builtin_bytes, tmp_path):
    split_dataset(builtin_bytes, tmp_path, 50_000)
    with open(tmp_path / "train-00003.bin", "ab") as f:
        f.write(b"\0\0")
    dm = GPTDataModule(path=str(tmp_path), sequence_length=32, batch_size=4)
    with pytest.raises(DataConfigError, match="train-00003.bin"):
        dm.resolve(vocab_size=256)


def test_inputs_in_object_storage_give_the_same_shards(corpus, one_node, tmp_path):
    """The corpus read through fsspec (``memory://`` here; ``s3://`` ... with its package): the same
    shard bytes as from the local files."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"gigagpt-inputs-{os.getpid()}"
    fs.put(str(corpus), root, recursive=True)
    try:
        files = input_files([f"memory://{root}"])
        assert [f.rsplit("/", 1)[1] for f in files] == [p.name for p in input_files([corpus])]
        done = prepare_store(files, tmp_path, source="memory", **RECIPE)
    finally:
        fs.rm(root, recursive=True)
    assert done["manifest"]["shards"] == json.loads((one_node / "manifest.json").read_text())["shards"]
    bins = {n: b for n, b in store_bytes(one_node).items() if n.endswith(".bin")}
    assert {n: b for n, b in store_bytes(tmp_path).items() if n.endswith(".bin")} == bins


@pytest.mark.parametrize(("flags", "message"), [
    (["--shard-mb", "0"], "--shard-mb must be positive"),
    (["--num-nodes", "2", "--node-rank", "2"], "--node-rank must be in"),
    (["--node-rank", "1"], "--node-rank must be in"),
    (["--workers", "-1"], "--workers must be 0"),
])
def test_bad_store_settings_are_one_line_and_write_nothing(corpus, tmp_path, flags, message):
    from gigagpt.commands import main

    with pytest.raises(SystemExit) as err:
        main(["prepare", str(corpus / "docs.jsonl"), "--output", str(tmp_path / "out"), "--tokenizer", "bytes",
              "--no-progress", *flags])
    assert str(err.value).startswith("gigagpt prepare: error:") and message in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_bad_cache_size_is_named():
    with pytest.raises(DataConfigError, match="data.cache_gb"):
        GPTDataModule(path="store", cache_gb=0)
