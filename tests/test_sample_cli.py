"""`gigagpt sample` from Lightning / Hugging Face checkpoints, and `gigagpt validate|test` metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gigagpt.checkpoint import load_model
from gigagpt.cli import cli_main
from gigagpt.commands import main as gigagpt_main
from gigagpt.data import WindowDataset
from gigagpt.generate import generate
from gigagpt.tokenizer import bytes_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SEQ, BATCH = 64, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def trainer_args(data: Path, root: Path) -> list[str]:
    return [
        "--config",
        TINY,
        "--data.path",
        str(data),
        "--data.sequence_length",
        str(SEQ),
        "--data.batch_size",
        str(BATCH),
        "--data.val_batches",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--checkpoint.dirpath",
        str(root / "checkpoints"),
        "--trainer.enable_model_summary",
        "false",
    ]


@pytest.fixture(scope="module")
def trained(builtin_bytes, tmp_path_factory) -> Path:
    """A checkpoint written by `gigagpt fit` itself (3 steps of configs/tiny.yaml)."""
    root = tmp_path_factory.mktemp("sample_run")
    cli_main(
        [
            "fit",
            *trainer_args(builtin_bytes, root),
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def sample(capsys, *args: str) -> tuple[str, str]:
    gigagpt_main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_greedy_sample_equals_generate(trained, capsys):
    out, _ = sample(
        capsys,
        trained,
        "--prompt",
        "The for",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--ignore-eot",
        "--device",
        "cpu",
    )
    model = load_model(trained)
    tok = bytes_tokenizer()
    expected = generate(model, torch.tensor([tok.encode("The for")]), 24, temperature=0.0)[0, 7:]
    assert out == "The for" + tok.decode(expected.tolist()) + "\n"


def test_seeded_sampling_is_reproducible(trained, capsys):
    args = [trained, "--prompt", "x = ", "--max-new-tokens", "40", "--temperature", "1.0", "--device", "cpu"]
    first, _ = sample(capsys, *args, "--seed", "5")
    again, _ = sample(capsys, *args, "--seed", "5")
    other, _ = sample(capsys, *args, "--seed", "6")
    uncached, _ = sample(capsys, *args, "--seed", "5", "--no-cache")
    assert first == again == uncached and first.startswith("x = ")
    assert other != first


def test_hf_folder_samples_like_the_checkpoint(trained, tmp_path, capsys):
    pytest.importorskip("safetensors")
    gigagpt_main(["export", str(trained), str(tmp_path / "hf")])
    capsys.readouterr()
    args = ["--prompt", "def ", "--max-new-tokens", "30", "--top-p", "0.9", "--seed", "3", "--device", "cpu"]
    from_ckpt, _ = sample(capsys, trained, *args)
    from_hf, _ = sample(capsys, tmp_path / "hf", *args)
    assert from_ckpt == from_hf


def test_batched_prompts_and_prompt_file(trained, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("import os\n")
    out, _ = sample(
        capsys,
        trained,
        "--prompt",
        "A",
        "--prompt-file",
        tmp_path / "p.txt",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "10",
        "--device",
        "cpu",
    )
    assert out.count("----- sample ") == 4
    assert out.count("\nimport os\n") == 2 and out.count("-----\nA") == 2


def test_long_prompt_is_cropped_with_a_warning(trained, capsys):
    out, err = sample(
        capsys,
        trained,
        "--prompt",
        "y" * 300,
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
    )
    assert "300 tokens, more than the model's context of 256; keeping its last 256 tokens" in err
    assert out.startswith("y" * 300)


def test_bad_settings_are_clear_errors(trained, capsys):
    with pytest.raises(SystemExit, match="temperature must be >= 0"):
        sample(capsys, trained, "--prompt", "a", "--temperature", "-1")
    with pytest.raises(SystemExit, match="prompt-file"):
        sample(capsys, trained, "--prompt-file", "/nonexistent/prompt.txt")
    with pytest.raises(SystemExit, match="does not exist"):
        sample(capsys, "/nonexistent/model.ckpt", "--prompt", "a")


def _expected_val_loss(model, val_bin: Path, batches: int) -> float:
    data = WindowDataset(val_bin, SEQ)
    losses = []
    with torch.no_grad():
        for i in range(batches * BATCH):
            x, y = data[i]
            losses.append(float(model(x[None].long(), y[None].long())))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_report_loss_and_perplexity(trained, builtin_bytes, tmp_path, capsys, command):
    cli = cli_main([command, *trainer_args(builtin_bytes, tmp_path), "--ckpt_path", str(trained)], run=True)
    out = capsys.readouterr().out
    prefix = "val" if command == "validate" else "test"
    assert f"{prefix}/loss" in out and f"{prefix}/ppl" in out
    metrics = cli.trainer.callback_metrics
    loss, ppl = float(metrics[f"{prefix}/loss"]), float(metrics[f"{prefix}/ppl"])
    assert loss == pytest.approx(
        _expected_val_loss(load_model(trained), builtin_bytes / "val.bin", 2), rel=1e-5
    )
    assert ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_offline_gpt2_model_samples_with_the_ranks_file_its_data_was_prepared_with(
        builtin_gpt2, tmp_path, capsys, monkeypatch):
    """Data prepared from a local .tiktoken file: sampling finds that file, never the network."""
    import gigagpt.tokenizer as tokenizers
    from gigagpt.checkpoint import training_tokenizer_file

    root = tmp_path / "run"
    cli_main(["fit", *trainer_args(builtin_gpt2, root), "--model.config.vocab_size", "50257",
              "--model.config.width", "32", "--model.config.heads", "2", "--model.config.depth", "1",
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--samples.every_n_steps", "0"])
    ckpt = root / "checkpoints" / "last.ckpt"
    ranks = str((ROOT / "tests" / "data" / "gpt2.tiktoken").resolve())
    assert training_tokenizer_file(ckpt) == ranks

    def no_download():
        raise AssertionError("the online gpt2 encoding was asked for")

    monkeypatch.setattr(tokenizers, "gpt2", no_download)
    capsys.readouterr()  # training's own output
    out, _ = sample(capsys, ckpt, "--prompt", "Hello world", "--max-new-tokens", "4", "--device", "cpu")
    assert out.startswith("Hello world")


def test_sample_finds_the_training_tokenizer_from_anywhere_offline(builtin_gpt2, tmp_path, capsys, monkeypatch):
    """Trained with a relative data path (the usual `--data.path data/mine`): sampling from another
    folder, or after the whole project moved, still finds the ranks file (verified by its sha256)
    and never downloads; without it, one line names the file and how to pass it."""
    import shutil

    import gigagpt.tokenizer as tokenizers

    project = tmp_path / "project"
    shutil.copytree(builtin_gpt2, project / "data")
    (project / "tok").mkdir()
    shutil.copy(ROOT / "tests" / "data" / "gpt2.tiktoken", project / "tok" / "gpt2.tiktoken")
    meta = json.loads((project / "data" / "meta.json").read_text())
    meta["tokenizer_file"] = str(project / "tok" / "gpt2.tiktoken")  # as `prepare --tokenizer tok/...` writes it
    (project / "data" / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(project)
    cli_main(["fit", *trainer_args(Path("data"), Path("run")), "--model.config.vocab_size", "50257",
              "--model.config.width", "32", "--model.config.heads", "2", "--model.config.depth", "1",
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--samples.every_n_steps", "0"])

    def no_download():
        raise AssertionError("the online gpt2 encoding was asked for")

    monkeypatch.setattr(tokenizers, "gpt2", no_download)
    monkeypatch.delenv("GIGAGPT_GPT2_TIKTOKEN", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["--prompt", "Hello world", "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"]
    capsys.readouterr()
    out, _ = sample(capsys, project / "run", *args)
    assert out.startswith("Hello world")

    moved = tmp_path / "moved"
    project.rename(moved)  # the run, its data and the ranks file, all somewhere else now
    again, _ = sample(capsys, moved / "run", *args)
    assert again == out

    (moved / "tok" / "gpt2.tiktoken").write_text("not the ranks\n")  # a file of that name, but not it
    with pytest.raises(SystemExit) as info:
        sample(capsys, moved / "run", *args)
    message = str(info.value)
    assert "\n" not in message and "gpt2.tiktoken" in message and "--tokenizer" in message, message


def test_recorded_ranks_are_found_in_tiktokens_cache_by_hash(tmp_path, monkeypatch):
    """No ranks file anywhere, but tiktoken's cache (TIKTOKEN_CACHE_DIR) holds GPT-2: its ranks
    carry the recorded hash, so that encoding is used; another hash is refused in one line."""
    import tiktoken

    from gigagpt.tokenizer import file_sha256, find_training_tokenizer, gpt2_from_file

    ranks = ROOT / "tests" / "data" / "gpt2.tiktoken"
    cached = gpt2_from_file(ranks)._encoding  # what tiktoken.get_encoding("gpt2") builds from its cache
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: cached)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GIGAGPT_GPT2_TIKTOKEN", raising=False)
    record = {"name": "gpt2", "file": str(tmp_path / "gone" / "gpt2.tiktoken"), "sha256": file_sha256(ranks)}
    tokenizer = find_training_tokenizer(record, tmp_path / "run" / "last.ckpt")
    assert tokenizer._encoding is cached and tokenizer.decode(tokenizer.encode("Hello")) == "Hello"
    with pytest.raises(FileNotFoundError, match=r"gpt2.tiktoken \(sha256 000000000000.*--tokenizer"):
        find_training_tokenizer({**record, "sha256": "0" * 64}, tmp_path / "run" / "last.ckpt")


def _run_folder_with(ckpt: Path, root: Path) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    return root


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_without_ckpt_path_evaluate_the_runs_last_checkpoint(
        trained, builtin_bytes, tmp_path, command):
    root = _run_folder_with(trained, tmp_path / "run")
    cli = cli_main([command, *trainer_args(builtin_bytes, root)], run=True)
    prefix = "val" if command == "validate" else "test"
    assert float(cli.trainer.callback_metrics[f"{prefix}/loss"]) == pytest.approx(
        _expected_val_loss(load_model(trained), builtin_bytes / "val.bin", 2), rel=1e-5)


def test_validate_refuses_untrained_weights_unless_asked(builtin_bytes, tmp_path):
    with pytest.raises(SystemExit) as refused:
        cli_main(["validate", *trainer_args(builtin_bytes, tmp_path)], run=True)
    message = str(refused.value)
    assert message.startswith("gigagpt: ") and "\n" not in message
    assert "--untrained true" in message and "--ckpt_path" in message
    cli = cli_main(["validate", *trainer_args(builtin_bytes, tmp_path), "--untrained", "true"], run=True)
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))


def test_resumed_run_with_nothing_left_to_train_says_so(trained, builtin_bytes, tmp_path, capsys, caplog):
    root = _run_folder_with(trained, tmp_path / "run")
    cli_main(["fit", *trainer_args(builtin_bytes, root), "--trainer.max_steps", "2", "--samples.every_n_steps", "0",
              "--trainer.limit_val_batches", "1"])
    said = capsys.readouterr().err + caplog.text
    assert "nothing left to train" in said and "trainer.max_steps" in said


def test_vocabulary_follows_the_data_unless_set(builtin_gpt2, builtin_bytes, tmp_path):
    small = ["--model.config.width", "32", "--model.config.heads", "2", "--model.config.depth", "1",
             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--samples.every_n_steps", "0"]
    cli = cli_main(["fit", *trainer_args(builtin_gpt2, tmp_path / "bpe"), *small])  # tiny.yaml: byte-level
    assert cli.model.config.vocab_size == 50257
    bpe = str(ROOT / "configs" / "tiny-bpe.yaml")
    cli = cli_main([bpe if a == TINY else a for a in trainer_args(builtin_bytes, tmp_path / "bytes")], run=False)
    assert cli.model.config.vocab_size == 256
    with pytest.raises(SystemExit, match=r"set model.config.vocab_size >= 50257"):
        cli_main(["fit", *trainer_args(builtin_gpt2, tmp_path / "set"), *small, "--model.config.vocab_size", "256"])
