import json

import numpy as np
import pytest
from conftest import GPT2_TIKTOKEN, run_gigagpt

from gigagpt.prepare import builtin_documents, file_documents, input_files, prepare, token_dtype
from gigagpt.tokenizer import GPT2_EOT, bytes_tokenizer, get_tokenizer, gpt2_from_file


def test_gpt2_from_local_file_reproduces_gpt2_ids():
    tok = gpt2_from_file(GPT2_TIKTOKEN)
    assert tok.encode("hello world") == [31373, 995]
    assert tok.vocab_size == 50257 and tok.eot_token == GPT2_EOT
    assert tok.decode(tok.encode("The for statement <|endoftext|>")) == "The for statement <|endoftext|>"
    # special-token text in a document is ordinary text, never the end-of-text id
    assert GPT2_EOT not in tok.encode("<|endoftext|>")


def test_tokenizer_from_env(monkeypatch):
    monkeypatch.setenv("GIGAGPT_GPT2_TIKTOKEN", str(GPT2_TIKTOKEN))
    assert get_tokenizer("gpt2").encode("hello world") == [31373, 995]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gpt2_from_file(tmp_path / "missing.tiktoken")


def test_builtin_corpus_bytes(builtin_bytes):
    meta = json.loads((builtin_bytes / "meta.json").read_text())
    train = np.fromfile(builtin_bytes / "train.bin", dtype="<u2")
    val = np.fromfile(builtin_bytes / "val.bin", dtype="<u2")
    assert meta["tokenizer"] == "bytes" and meta["dtype"] == "uint16"
    assert len(train) == meta["train_tokens"] > 300_000
    assert len(val) == meta["val_tokens"] > 10_000
    total_text = sum(len(d.encode()) for d in builtin_documents())
    docs = meta["train_documents"] + meta["val_documents"]
    assert len(train) + len(val) == total_text + docs  # every byte plus one end-of-text per document
    assert (train == 0).sum() == meta["train_documents"]
    assert train.max() == meta["train_max_token_id"] < 256
    assert not list(builtin_bytes.glob("*.partial"))


def test_builtin_corpus_gpt2_offline(builtin_gpt2):
    meta = json.loads((builtin_gpt2 / "meta.json").read_text())
    train = np.fromfile(builtin_gpt2 / "train.bin", dtype="<u2")
    val = np.fromfile(builtin_gpt2 / "val.bin", dtype="<u2")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    tok = gpt2_from_file(GPT2_TIKTOKEN)
    docs = list(builtin_documents())
    decoded = []
    for split in (train, val):
        assert split[-1] == GPT2_EOT
        ends = np.flatnonzero(split == GPT2_EOT)
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded += [tok.decode(split[s:e].tolist()) for s, e in zip(starts, ends)]
    # every document round-trips exactly, each in exactly one split
    assert sorted(decoded) == sorted(docs)
    assert len(decoded) == meta["train_documents"] + meta["val_documents"] == len(docs)


def test_split_is_deterministic_and_seeded(tmp_path):
    docs = [(f"document {i} " * 20, 200) for i in range(200)]
    a = prepare(iter(docs), tmp_path / "a", bytes_tokenizer(), val_fraction=0.2, seed=1, progress=False)
    b = prepare(iter(docs), tmp_path / "b", bytes_tokenizer(), val_fraction=0.2, seed=1, progress=False)
    prepare(iter(docs), tmp_path / "c", bytes_tokenizer(), val_fraction=0.2, seed=2, progress=False)
    assert (tmp_path / "a/val.bin").read_bytes() == (tmp_path / "b/val.bin").read_bytes()
    assert (tmp_path / "a/val.bin").read_bytes() != (tmp_path / "c/val.bin").read_bytes()
    assert 20 < a["val_documents"] < 60 and a["train_documents"] + a["val_documents"] == 200
    assert {**b, "seconds": 0} == {**a, "seconds": 0}


def test_small_batches_give_the_same_files(tmp_path):
    docs = [(f"text number {i}\n" * (i % 7 + 1), 0) for i in range(300)]
    prepare(iter(docs), tmp_path / "big", bytes_tokenizer(), val_fraction=0.1, progress=False)
    prepare(iter(docs), tmp_path / "small", bytes_tokenizer(), val_fraction=0.1, progress=False, batch_bytes=1)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "big" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()


def test_folders_files_and_jsonl(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha text")
    (src / "sub" / "b.md").write_text("beta text")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta", "id": 2}) + "\n")
    files = input_files([src, jl])
    assert [f.name for f in files] == ["a.txt", "b.md", "c.jsonl"]
    assert [d for d, _ in file_documents(files)] == ["alpha text", "beta text", "gamma", "delta"]


def test_bad_jsonl_line_is_named(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: .*'text' field"):
        list(file_documents([jl]))


def test_failure_leaves_no_file_that_looks_finished(tmp_path):
    def docs():
        yield "fine", 4
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(docs(), tmp_path, bytes_tokenizer(), val_fraction=0.0, progress=False, batch_bytes=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_empty_validation_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--val-fraction"):
        prepare(iter([("only one document", 17)]), tmp_path, bytes_tokenizer(), val_fraction=0.01,
                progress=False)


def test_dtype_choice():
    assert token_dtype(50257) == "uint16"
    assert token_dtype(65536) == "uint16"
    assert token_dtype(100277) == "uint32"


def test_prepare_command_end_to_end(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(40):
        (tmp_path / "in" / f"{i}.txt").write_text(f"Document {i}: the quick brown fox. " * 10)
    proc = run_gigagpt("prepare", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--tokenizer", str(GPT2_TIKTOKEN), "--val-fraction", "0.2", "--no-progress")
    assert "train.bin" in proc.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["train_documents"] + meta["val_documents"] == 40
    bad = run_gigagpt("prepare", str(tmp_path / "missing"), "--output", str(tmp_path / "o2"), check=False)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
