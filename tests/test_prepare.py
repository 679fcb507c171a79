import json

import numpy as np
import pytest
from conftest import GPT2_TIKTOKEN, run_gigagpt

from gigagpt.prepare import (
    PIECE_BYTES,
    builtin_documents,
    file_documents,
    input_files,
    prepare,
    text_blocks,
    token_dtype,
)
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
    docs = [d if isinstance(d, str) else "".join(d) for d, _ in file_documents(files)]
    assert docs == ["alpha text", "beta text", "gamma", "delta"]


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


# -- pieces: the unit of the train/val split ---------------------------------------------------------
def _mixed_text(n_bytes: int, seed: int = 0) -> str:
    """Unique numbered lines of mixed width (1-4 byte characters), some longer than a piece and
    without a newline, so cuts fall at newlines and inside lines next to multi-byte characters."""
    rng = np.random.default_rng(seed)
    chars = ["a", "b", " ", "é", "ß", "€", "中", "😀", "𝄞"]
    parts, size, i = [], 0, 0
    while size < n_bytes:
        width = int(rng.choice([20, 80, 300, 2500]))
        line = f"{i:05d} " + "".join(rng.choice(chars, width)) + "\n"
        parts.append(line)
        size += len(line.encode())
        i += 1
    return "".join(parts)


def _reference_pieces(data: bytes, piece_bytes: int) -> list[bytes]:
    """The cutting rule, spelled out: up to the last newline within the piece, else at the last
    character start."""
    pieces = []
    while len(data) > piece_bytes:
        cut = data.rfind(b"\n", 0, piece_bytes) + 1 or next(
            k for k in range(piece_bytes, 0, -1) if data[k] & 0xC0 != 0x80
        )
        pieces.append(data[:cut])
        data = data[cut:]
    return pieces + [data]


def _assign(pieces: list[bytes], train: bytes, val: bytes) -> list[str]:
    """Which split each piece (in order) went to, requiring the splits to be exactly the pieces
    in order (nothing lost, duplicated or reordered)."""
    where, rest = [], {"train": train, "val": val}
    for piece in pieces:
        split = next(s for s in ("train", "val") if rest[s].startswith(piece))
        rest[split] = rest[split][len(piece):]
        where.append(split)
    assert rest == {"train": b"", "val": b""}
    return where


def _splits(folder) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((folder / "meta.json").read_text())
    return (np.fromfile(folder / "train.bin", dtype="<u2"), np.fromfile(folder / "val.bin", dtype="<u2"), meta)


def test_text_file_is_read_in_blocks(tmp_path):
    text = _mixed_text(20_000)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    blocks = list(text_blocks(tmp_path / "a.txt", 777))
    assert "".join(blocks) == text and max(map(len, blocks)) == 777 and len(blocks) == -(-len(text) // 777)


def test_single_file_is_cut_into_pieces_that_lose_nothing(tmp_path):
    text = _mixed_text(50_000)
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    data = text.encode()
    meta = prepare(file_documents([path], block_chars=777), tmp_path / "out", bytes_tokenizer(),
                   val_fraction=0.2, seed=3, progress=False, piece_bytes=1000, total_bytes=len(data))
    train, val, _ = _splits(tmp_path / "out")
    pieces = _reference_pieces(data, 1000)
    assert len(pieces) > 50 and all(len(p) <= 1000 for p in pieces)
    assert sum(not p.endswith(b"\n") for p in pieces) > 5  # some cuts inside long lines
    for p in pieces:
        p.decode("utf-8")  # never inside a character
    # one document: one end-of-text token, after the last piece
    assert (train == 0).sum() + (val == 0).sum() == 1 == meta["train_documents"] + meta["val_documents"]
    where = _assign(pieces, train[train != 0].astype(np.uint8).tobytes(), val[val != 0].astype(np.uint8).tobytes())
    assert (train if where[-1] == "train" else val)[-1] == 0
    assert meta["pieces"] == {"train": where.count("train"), "val": where.count("val")}
    assert 0.1 < len(val) / len(data) < 0.3 and meta["text_bytes"] == len(data)
    assert meta["train_tokens"] + meta["val_tokens"] == len(data) + 1


def test_eot_count_is_the_document_count(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = [_mixed_text(n, seed=n) for n in (300, 4_000, 9_000)]
    for i, t in enumerate(texts):
        (src / f"{i}.txt").write_text(t, encoding="utf-8")
    (src / "empty.txt").write_text("")
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("short", _mixed_text(5_000, seed=7))))
    files = input_files([src, jl])
    meta = prepare(file_documents(files), tmp_path / "out", bytes_tokenizer(), val_fraction=0.3, seed=1,
                   progress=False, piece_bytes=1000)
    train, val, _ = _splits(tmp_path / "out")
    assert (train == 0).sum() + (val == 0).sum() == 6 == meta["train_documents"] + meta["val_documents"]
    assert len(train) + len(val) == sum(len(t.encode()) for t in texts) + len("short") + len(
        _mixed_text(5_000, seed=7).encode()) + 6
    assert meta["pieces"]["train"] > 0 and meta["pieces"]["val"] > 0


def test_piece_split_is_deterministic_and_seeded(tmp_path):
    text = _mixed_text(30_000)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")

    def run(name, seed):
        prepare(file_documents([tmp_path / "a.txt"]), tmp_path / name, bytes_tokenizer(), val_fraction=0.3,
                seed=seed, progress=False, piece_bytes=1000)
        return [(tmp_path / name / f).read_bytes() for f in ("train.bin", "val.bin")]

    assert run("a", 5) == run("b", 5) != run("c", 6)


def test_validation_split_is_never_empty_and_train_neither(tmp_path):
    two = [("first document", 14), ("second document", 15)]
    # a tiny fraction: no piece is drawn for val, so the last one goes there
    low = prepare(iter(two), tmp_path / "low", bytes_tokenizer(), val_fraction=1e-9, progress=False)
    assert low["pieces"] == {"train": 1, "val": 1} and low["val_tokens"] == len("second document") + 1
    # a huge fraction: every piece is drawn for val, so the last one goes to train
    high = prepare(iter(two), tmp_path / "high", bytes_tokenizer(), val_fraction=0.999999, progress=False)
    assert high["pieces"] == {"train": 1, "val": 1} and high["train_tokens"] == len("second document") + 1
    # the same inside a batch holding both pieces, and across batches of one piece
    again = prepare(iter(two), tmp_path / "again", bytes_tokenizer(), val_fraction=1e-9, progress=False,
                    batch_bytes=1)
    assert {**again, "seconds": 0} == {**low, "seconds": 0}


def test_an_empty_last_document_is_not_what_val_gets(tmp_path):
    """The piece sent to an otherwise empty val split holds text, not an empty document's end-of-text."""
    docs = [("hello\n" * 20, 120), ("world\n" * 20, 120), ("", 0)]
    meta = prepare(iter(docs), tmp_path, bytes_tokenizer(), val_fraction=1e-9, progress=False)
    train, val, _ = _splits(tmp_path)
    assert val.tolist() == list(b"world\n" * 20) + [0]
    assert meta["train_documents"] + meta["val_documents"] == 3 and len(train) == 120 + 1 + 1


def test_single_file_with_the_command(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(_mixed_text(3 * PIECE_BYTES), encoding="utf-8")
    run_gigagpt("prepare", str(tmp_path / "corpus" / "a.txt"), "--output", str(tmp_path / "d"),
                "--tokenizer", "bytes", "--val-fraction", "0.2", "--no-progress")
    train, val, meta = _splits(tmp_path / "d")
    assert len(train) > 0 and len(val) > 0 and meta["pieces"]["train"] + meta["pieces"]["val"] >= 3
    # a folder of small files with the default fraction: val still gets a piece
    for i in range(50):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(f"file {i}\n" * 50)
    run_gigagpt("prepare", str(tmp_path / "corpus"), "--output", str(tmp_path / "e"), "--tokenizer", "bytes",
                "--no-progress")
    train, val, meta = _splits(tmp_path / "e")
    assert meta["val_fraction"] == 0.0005 and meta["pieces"]["val"] >= 1 and len(val) > 0
    assert meta["train_documents"] + meta["val_documents"] == 51


def test_text_in_one_piece_cannot_be_split(tmp_path):
    (tmp_path / "tiny.txt").write_text("a tiny corpus\n" * 10)
    args = ["prepare", str(tmp_path / "tiny.txt"), "--output", str(tmp_path / "out"), "--tokenizer", "bytes",
            "--no-progress"]
    bad = run_gigagpt(*args, "--val-fraction", "0.2", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "one piece" in bad.stderr and "--piece-bytes" in bad.stderr and "--val-fraction 0" in bad.stderr
    assert not (tmp_path / "out").exists()  # a failed run leaves no folder behind, not even an empty one
    run_gigagpt(*args, "--val-fraction", "0.2", "--piece-bytes", "64")  # smaller pieces: it splits
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["val_tokens"] > 0
    run_gigagpt(*args, "--val-fraction", "0", "--force")  # or no validation split (another dataset: --force)
    assert (tmp_path / "out" / "val.bin").stat().st_size == 0


def test_builtin_with_val_fraction_zero_has_no_val_split(tmp_path):
    run_gigagpt("prepare", "--builtin", "--output", str(tmp_path / "b"), "--val-fraction", "0", "--no-progress")
    train, val, meta = _splits(tmp_path / "b")
    assert meta["val_fraction"] == 0 and meta["val_tokens"] == 0 and len(val) == 0
    assert meta["pieces"]["val"] == 0 and meta["train_documents"] == len(list(builtin_documents()))


def test_a_different_dataset_is_replaced_only_with_force(tmp_path):
    docs = [("alpha " * 200, 1200), ("beta " * 200, 1000)]
    first = prepare(iter(docs), tmp_path / "d", bytes_tokenizer(), val_fraction=0.3, seed=1, progress=False)
    again = prepare(iter(docs), tmp_path / "d", bytes_tokenizer(), val_fraction=0.3, seed=1, progress=False)
    assert again["train_tokens"] == first["train_tokens"]  # the same recipe rebuilds freely
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    with pytest.raises(ValueError, match="already holds a different dataset.*--force"):
        prepare(iter(docs), tmp_path / "d", bytes_tokenizer(), val_fraction=0.3, seed=2, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    prepare(iter(docs), tmp_path / "d", bytes_tokenizer(), val_fraction=0.3, seed=2, progress=False, force=True)
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left


def test_an_output_with_other_files_is_refused_even_with_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a gigagpt dataset"):
        prepare(iter([("text " * 100, 500)]), tmp_path, bytes_tokenizer(), val_fraction=0.0, progress=False,
                force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_failed_run_removes_the_folders_it_made(tmp_path):
    with pytest.raises(ValueError, match="no training text"):
        prepare(iter([]), tmp_path / "a" / "b" / "out", bytes_tokenizer(), val_fraction=0.0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_binary_inputs_and_non_string_jsonl_text_are_refused(tmp_path):
    (tmp_path / "prog.txt").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    with pytest.raises(ValueError, match="prog.txt' is not text"):
        input_files([tmp_path / "prog.txt"])
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: the 'text' field must be a string, got null"):
        list(file_documents([tmp_path / "a.jsonl"]))
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="b.jsonl:1: not valid UTF-8"):
        list(file_documents([tmp_path / "b.jsonl"]))


# -- folders: what is read, what is skipped; a validation split too small to use ------------------------
def _corpus_text(nbytes: int) -> str:
    return "\n".join(builtin_documents())[:nbytes]


def test_a_folder_reports_the_files_it_skipped_by_kind(tmp_path, capsys):
    from gigagpt.commands import main

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(_corpus_text(20_000))
    for name in ("x.py", "y.py", "sub/z.py"):
        (src / name).write_text("print(1)\n")
    (src / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    main(["prepare", str(src), "--output", str(tmp_path / "out"), "--tokenizer", "bytes", "--val-fraction", "0",
          "--no-progress"])
    out = capsys.readouterr().out
    assert "skipped 3 .py, 1 .png" in out


def test_ext_chooses_the_extensions_read_from_a_folder(tmp_path, capsys):
    from gigagpt.commands import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(_corpus_text(5_000))
    (src / "b.py").write_text(_corpus_text(3_000))
    (src / "c.rst").write_text(_corpus_text(2_000))
    main(["prepare", str(src), "--output", str(tmp_path / "out"), "--tokenizer", "bytes", "--val-fraction", "0",
          "--ext", ".py,rst", "--no-progress"])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["text_bytes"] == (src / "b.py").stat().st_size + (src / "c.rst").stat().st_size
    assert "skipped 1 .txt" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--ext"):
        main(["prepare", str(src), "--output", str(tmp_path / "out2"), "--ext", ",", "--no-progress"])


def test_a_validation_split_smaller_than_one_batch_is_warned_of_naming_val_fraction(tmp_path, capsys):
    from gigagpt.commands import main

    text = tmp_path / "a.txt"
    text.write_text(_corpus_text(100_000))
    common = [str(text), "--tokenizer", "bytes", "--piece-bytes", "1024", "--no-progress"]
    main(["prepare", *common, "--output", str(tmp_path / "small"), "--val-fraction", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "--val-fraction" in err[0], err
    assert "16 x 256 + 1" in err[0]  # configs/tiny.yaml's batch
    main(["prepare", *common, "--output", str(tmp_path / "enough"), "--val-fraction", "0.2"])
    assert capsys.readouterr().err == ""
