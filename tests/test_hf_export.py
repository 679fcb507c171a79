"""A complete Hugging Face export: weights, generation config and the tokenizer the data was prepared with."""

import stat

import pytest
from conftest import ROOT, run_gigagpt

from gigagpt.tokenizer import bytes_tokenizer, gpt2_from_file

GPT2_TIKTOKEN = ROOT / "tests/data/gpt2.tiktoken"
TEXTS = ["The for statement iterates over the items of any sequence.",
         "  héllo wörld\t 12345 it's  日本語 🤖\r\n\n  def f(x):\n    return x ** 2  # done\n"]
PROMPT = "The for statement"
SMALL = ["--model.config.depth=1", "--model.config.width=64", "--model.config.heads=4",
         "--model.config.max_position_embeddings=64", "--data.sequence_length=64", "--data.batch_size=4"]


def short_fit(run, data, vocab):
    run_gigagpt(
        "fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--data.path={data}", *SMALL,
        f"--model.config.vocab_size={vocab}", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=3", "--data.val_batches=1", "--model.optim.warmup_steps=1",
        f"--trainer.default_root_dir={run}", f"--checkpoint.dirpath={run}/checkpoints", "--trainer.logger=false",
        "--samples.every_n_steps=0", cwd=run,
    )
    return run / "checkpoints/last.ckpt"


def greedy_new_tokens(folder, prompt, n):
    transformers = pytest.importorskip("transformers")
    generate = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    out = generate(prompt, max_new_tokens=n, do_sample=False, return_tensors=True)
    ids = [int(i) for i in out[0]["generated_token_ids"]]
    return ids[len(generate.tokenizer.encode(prompt)):]


@pytest.mark.parametrize("kind", ["gpt2", "bytes"])
def test_exported_folder_generates_what_gigagpt_sample_does(kind, builtin_gpt2, builtin_bytes, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = gpt2_from_file(GPT2_TIKTOKEN) if kind == "gpt2" else bytes_tokenizer()
    ckpt = short_fit(tmp_path, builtin_gpt2 if kind == "gpt2" else builtin_bytes, ours.vocab_size)
    proc = run_gigagpt("export", str(ckpt), str(tmp_path / "hf"))
    assert f"with the {kind} tokenizer" in proc.stdout
    folder = tmp_path / "hf"
    names = {p.name for p in folder.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"} <= names
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir())
    # the tokenizer AutoTokenizer builds encodes exactly as the one the data was prepared with
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    # greedy decoding: transformers' pipeline and gigagpt sample produce the same new tokens
    n = 12
    new = greedy_new_tokens(folder, PROMPT, n)
    assert len(new) == n
    proc = run_gigagpt("sample", str(ckpt), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(n),
                       "--ignore-eot")
    assert proc.stdout.startswith(PROMPT), proc.stdout
    assert proc.stdout == PROMPT + ours.decode(new) + "\n", (proc.stdout, new)
