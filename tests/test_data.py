import json

import numpy as np
import pytest
import torch

from gigagpt.data import (
    DataConfigError,
    GPTDataModule,
    StepSampler,
    WindowDataset,
    build_eval_loader,
    build_train_loader,
)


def write_tokens(folder, train, val=None, dtype="uint16", meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(folder / "train.bin")
    np.asarray(train if val is None else val, dtype=dtype).tofile(folder / "val.bin")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_windows_and_labels(tmp_path):
    write_tokens(tmp_path, np.arange(1000) % 500)
    ds = WindowDataset(tmp_path / "train.bin", sequence_length=10)
    assert len(ds) == 99  # (1000 - 1) // 10
    x, y = ds[3]
    assert x.tolist() == list(range(30, 40))
    assert y.tolist() == list(range(31, 41))
    assert x.dtype == torch.int64


def test_batch_k_is_a_pure_function_of_seed_and_k():
    a = StepSampler(num_windows=100, batch_size=8, seed=7)
    b = StepSampler(num_windows=100, batch_size=8, seed=7, start_step=5)
    c = StepSampler(num_windows=100, batch_size=8, seed=8)
    first = [batch for _, batch in zip(range(30), a)]
    resumed = [batch for _, batch in zip(range(25), b)]
    assert resumed == first[5:]
    assert [batch for _, batch in zip(range(30), c)] != first
    # 30 batches of 8 = 2.4 passes over 100 windows: each pass is a permutation.
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:100]) == list(range(100))
    assert sorted(flat[100:200]) == list(range(100))
    assert flat[:100] != flat[100:200]  # a new order each pass


def test_ranks_split_the_same_global_batch():
    one = StepSampler(num_windows=64, batch_size=8, seed=3)
    ranks = [StepSampler(num_windows=64, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(20):
        assert ranks[0].batch_indices(step) + ranks[1].batch_indices(step) == one.batch_indices(step)


def test_train_loader_from_plain_arguments_is_picklable_and_resumable(tmp_path):
    import pickle

    write_tokens(tmp_path, np.arange(5000) % 300)
    args = dict(path=str(tmp_path / "train.bin"), sequence_length=16, batch_size=4, seed=1)
    pickle.dumps((build_train_loader, args))
    full = [x for _, (x, _) in zip(range(10), build_train_loader(**args))]
    later = [x for _, (x, _) in zip(range(4), build_train_loader(**args, start_step=6))]
    for a, b in zip(full[6:], later):
        assert torch.equal(a, b)


def test_eval_loader_is_sequential_and_bounded(tmp_path):
    write_tokens(tmp_path, np.arange(3000) % 300)
    loader = build_eval_loader(str(tmp_path / "val.bin"), 10, 4, max_batches=3)
    batches = list(loader)
    assert len(batches) == 3
    assert batches[0][0][0].tolist() == list(range(10))


def test_eval_loader_gives_every_rank_the_same_whole_batches(tmp_path):
    write_tokens(tmp_path, np.arange(1001) % 300)  # 100 windows of 10 tokens
    counts = [len(build_eval_loader(str(tmp_path / "val.bin"), 10, 30, rank=r, world_size=3)) for r in range(3)]
    assert counts == [1, 1, 1]  # 90 of the 100 windows: one global batch of 3 x 30
    write_tokens(tmp_path, np.arange(101) % 300)  # 10 windows of 10 tokens
    counts = [len(build_eval_loader(str(tmp_path / "val.bin"), 10, 2, rank=r, world_size=3)) for r in range(3)]
    assert counts == [1, 1, 1]  # 6 windows in whole global batches; round robin over 10 gave 2, 1, 1


def test_too_small_split_for_the_devices_names_them(tmp_path):
    write_tokens(tmp_path, np.arange(81) % 300)  # 10 windows of 8
    setup_dm(tmp_path, batch_size=5)  # one batch on one device
    dm = GPTDataModule(path=str(tmp_path), sequence_length=8, batch_size=5)
    with pytest.raises(DataConfigError, match=r"fewer than one batch \(data.batch_size=5 on each of 3 devices\)"):
        dm.resolve(world_size=3)


def test_data_without_a_val_split_trains_without_validation(tmp_path):
    """`gigagpt prepare --val-fraction 0`: an empty val.bin, fine for fit with limit_val_batches=0."""
    import lightning as L

    from gigagpt.model import GPTConfig
    from gigagpt.module import GPTModule
    from gigagpt.prepare import builtin_documents, prepare
    from gigagpt.tokenizer import get_tokenizer

    docs = ((d, len(d)) for d in list(builtin_documents())[:40])
    prepare(docs, tmp_path, get_tokenizer("bytes"), val_fraction=0.0, progress=False)
    dm = GPTDataModule(path=str(tmp_path), sequence_length=32, batch_size=4)
    with pytest.raises(DataConfigError, match=r"--val-fraction 0.0; train without validation \(--trainer.limit_val"):
        dm.resolve()
    module = GPTModule(GPTConfig(vocab_size=256, max_position_embeddings=32, depth=1, width=32, heads=2))
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert trainer.global_step == 2


# -- every bad input has a clear error naming the setting ---------------------------------------------
def setup_dm(path, vocab=None, max_pos=None, **kw):
    dm = GPTDataModule(path=str(path), **{"sequence_length": 8, "batch_size": 2, **kw})
    return dm.resolve(vocab, max_pos)


def test_missing_folder(tmp_path):
    with pytest.raises(DataConfigError, match="data.path .* does not exist.*gigagpt prepare"):
        setup_dm(tmp_path / "nope")


def test_placeholder_path():
    with pytest.raises(DataConfigError, match="placeholder"):
        setup_dm("/path/to/openwebtext")


def test_missing_file(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(DataConfigError, match="train.bin.* does not exist"):
        setup_dm(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"")
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(DataConfigError, match="empty"):
        setup_dm(tmp_path)


def test_odd_sized_file(tmp_path):
    write_tokens(tmp_path, np.arange(100))
    (tmp_path / "train.bin").write_bytes((tmp_path / "train.bin").read_bytes() + b"\x01")
    with pytest.raises(DataConfigError, match="not a multiple of 2"):
        setup_dm(tmp_path)


def test_token_id_beyond_vocab(tmp_path):
    write_tokens(tmp_path, np.arange(200))
    with pytest.raises(DataConfigError, match="token id 199 .* vocab_size is 100"):
        setup_dm(tmp_path, vocab=100)
    setup_dm(tmp_path, vocab=200)  # fits exactly


def test_token_id_beyond_vocab_from_meta(tmp_path):
    write_tokens(tmp_path, np.arange(200), meta={"dtype": "uint16", "train_max_token_id": 60000,
                                                 "val_max_token_id": 10})
    with pytest.raises(DataConfigError, match="60000"):
        setup_dm(tmp_path, vocab=50257)


def test_sequence_length_beyond_context(tmp_path):
    write_tokens(tmp_path, np.arange(2000))
    with pytest.raises(DataConfigError, match="data.sequence_length=64 exceeds .*max_position_embeddings=32"):
        setup_dm(tmp_path, max_pos=32, sequence_length=64)


def test_fewer_tokens_than_one_batch(tmp_path):
    write_tokens(tmp_path, np.arange(40))
    with pytest.raises(DataConfigError, match="fewer than one batch .*data.batch_size=8"):
        setup_dm(tmp_path, batch_size=8)


def test_fewer_windows_than_a_global_batch_across_ranks(tmp_path):
    with pytest.raises(DataConfigError, match="global batch"):
        StepSampler(num_windows=10, batch_size=4, seed=0, world_size=4)


def test_uint32_files_via_meta(tmp_path):
    write_tokens(tmp_path, np.arange(1000) + 70000, dtype="uint32", meta={"dtype": "uint32"})
    files = setup_dm(tmp_path, vocab=80000)
    assert files.dtype == "uint32"
    x, _ = WindowDataset(files.train, 8, "uint32")[0]
    assert x[0].item() == 70000


def _copy(src, dst, **meta_changes):
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.update(meta_changes)
    (dst / "meta.json").write_text(json.dumps(meta))
    return GPTDataModule(path=str(dst), sequence_length=64, batch_size=2)


def test_meta_json_is_checked_against_the_files(builtin_bytes, tmp_path):
    meta = json.loads((builtin_bytes / "meta.json").read_text())
    with pytest.raises(DataConfigError, match=r"meta.json does not match train.bin.*the size fits uint16"):
        _copy(builtin_bytes, tmp_path / "a", dtype="uint32").resolve()
    with pytest.raises(DataConfigError, match=r"meta.json does not match train.bin: it says train_tokens="):
        _copy(builtin_bytes, tmp_path / "b", train_tokens=meta["train_tokens"] - 1).resolve()
    with pytest.raises(DataConfigError, match=r"says dtype 'int8', not a token dtype"):
        _copy(builtin_bytes, tmp_path / "c", dtype="int8").resolve()
    with pytest.raises(DataConfigError, match=r"train.bin holds token id \d+, above the largest meta.json records"):
        _copy(builtin_bytes, tmp_path / "d", train_max_token_id=50).resolve(vocab_size=256)
    _copy(builtin_bytes, tmp_path / "e").resolve(vocab_size=256)  # the untouched copy passes


def test_data_path_that_is_a_file_says_so(builtin_bytes):
    dm = GPTDataModule(path=str(builtin_bytes / "train.bin"))
    with pytest.raises(DataConfigError, match=r"is a file, not a folder: point data.path at the folder"):
        dm.resolve()


@pytest.mark.parametrize("seed", [-5, 2**32, True])
def test_data_seed_outside_numpys_range_is_refused(seed):
    with pytest.raises(DataConfigError, match="data.seed must be an integer in"):
        GPTDataModule(seed=seed)
