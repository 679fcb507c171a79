"""One table of bad inputs through the real command line: each ends in one ``gigagpt`` line.

Every row runs ``python -m gigagpt ...`` in a fresh process (rows of the torch commands fork from a
server that imported the CLI once: see ``cli_fork.py``) and asserts: a non-zero exit code, exactly
one line starting ``gigagpt:`` (or ``gigagpt <command>:``) that names the setting or file, no
traceback and no usage text, no new file or folder anywhere in the row's folder or the shared data
and checkpoint, and every earlier file unchanged (sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import ROOT

from gigagpt.checkpoint import save_lightning_checkpoint
from gigagpt.model import GPT, GPTConfig

try:
    import cerebras.pytorch  # noqa: F401

    HAS_CSTORCH = True
except ImportError:
    HAS_CSTORCH = False

TINY = str(ROOT / "configs" / "tiny.yaml")
GIGAGPT_LINE = re.compile(r"^gigagpt(?: [a-z]+)?: ")
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00" + bytes(range(256)) * 8
FIT = ["fit", "--config", TINY, "--data.path={data}", "--trainer.max_steps=3", "--trainer.default_root_dir={d}",
       "--checkpoint.dirpath={d}/ckpt", "--samples.every_n_steps=0", "--data.batch_size=2",
       "--data.sequence_length=64", "--model.config.max_position_embeddings=64", "--model.config.depth=1",
       "--model.config.width=32", "--model.optim.warmup_steps=0", "--trainer.limit_val_batches=2"]


@dataclass
class Row:
    id: str
    argv: list[str]
    expect: str  # in the one gigagpt line: the setting or file named
    setup: Callable[[Path, dict], None] | None = None
    fork: bool = True  # False: a plain `python -m gigagpt` subprocess (prepare never loads torch)
    skip: str | None = None
    env: dict = field(default_factory=dict)


# -- setups: each writes the row's inputs into its folder d ----------------------------------------------
def write(name: str, content: bytes | str) -> Callable[[Path, dict], None]:
    def setup(d: Path, shared: dict) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def data_copy(edit_meta: Callable[[dict], None] | None = None, edit: Callable[[Path], None] | None = None):
    """A copy of the shared dataset in d/data, its meta.json or files edited."""
    def setup(d: Path, shared: dict) -> None:
        shutil.copytree(shared["data"], d / "data")
        if edit_meta is not None:
            meta = json.loads((d / "data" / "meta.json").read_text())
            edit_meta(meta)
            (d / "data" / "meta.json").write_text(json.dumps(meta))
        if edit is not None:
            edit(d / "data")
    return setup


def both(*setups):
    def setup(d: Path, shared: dict) -> None:
        for s in setups:
            s(d, shared)
    return setup


def fit(*extra: str) -> list[str]:
    return [*FIT, *extra]


def fit_on_copy(*extra: str) -> list[str]:
    return [a.replace("{data}", "{d}/data") for a in FIT] + list(extra)


def no_cirh_path() -> dict:
    """PATH without any folder holding torch-cirh-opt (the cerebras environment's bin/)."""
    keep = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not (Path(p) / "torch-cirh-opt").exists()]
    return {"PATH": os.pathsep.join(keep) or "/usr/bin:/bin"}


NO_CSTORCH_ONLY = "cerebras-pytorch is installed here" if HAS_CSTORCH else None
ON_CPU_ONLY = "needs a machine without a CUDA GPU" if torch.cuda.is_available() else None

ROWS = [
    # -- fit: settings -------------------------------------------------------------------------------
    Row("data_seed_negative", fit("--data.seed=-5"), "data.seed"),
    Row("seed_everything_negative", fit("--seed_everything=-1"), "seed_everything"),
    Row("lr_nan_yaml", fit("--config={d}/nan.yaml"), "model.optim.lr",
        write("nan.yaml", "model:\n  optim:\n    lr: .nan\n")),
    Row("lr_nan_flag", fit("--model.optim.lr=nan"), "model.optim.lr"),
    Row("lr_negative", fit("--model.optim.lr=-1"), "model.optim.lr"),
    Row("min_lr_ratio", fit("--model.optim.min_lr_ratio=2"), "model.optim.min_lr_ratio"),
    Row("max_steps_zero", fit("--trainer.max_steps=0"), "trainer.max_steps"),
    Row("width_not_divisible", fit("--model.config.width=50"), "model.config.width"),
    Row("sequence_over_context", fit("--data.sequence_length=128"), "data.sequence_length"),
    Row("batch_size_zero", fit("--data.batch_size=0"), "data.batch_size"),
    Row("unknown_argument", fit("--trainer.max_stepz=5"), "max_stepz"),
    Row("argument_of_wrong_type", fit("--trainer.max_steps=abc"), "max_steps"),
    Row("yaml_syntax_error", fit("--config={d}/broken.yaml"), "broken.yaml",
        write("broken.yaml", "model:\n  optim: {lr: [1, 2\n")),
    Row("config_file_missing", fit("--config={d}/nope.yaml"), "nope.yaml"),
    Row("gpu_on_a_cpu_machine", fit("--trainer.accelerator=gpu"), "--trainer.accelerator", skip=ON_CPU_ONLY),
    Row("ckpt_path_missing", fit("--ckpt_path={d}/nope.ckpt"), "--ckpt_path"),
    Row("ckpt_path_mdl_on_plain_trainer", fit("--ckpt_path={d}/run.mdl"), "gigagpt[cerebras]",
        write("run.mdl", b"\x89HDF\r\n\x1a\n" + bytes(64))),
    Row("csx_lowering_without_venv_bin_on_path",
        fit("--config", str(ROOT / "configs/cerebras/tiny.yaml"), "--config", str(ROOT / "configs/cerebras/validate.yaml")),
        "PATH", skip=None if HAS_CSTORCH else "needs cerebras-pytorch", env=no_cirh_path()),
    # -- fit: data ----------------------------------------------------------------------------------
    Row("data_path_missing", fit("--data.path={d}/nothing"), "data.path"),
    Row("data_path_placeholder", fit("--data.path=/path/to/data"), "data.path"),
    Row("data_path_is_a_file", fit("--data.path={d}/train.bin"), "data.path", write("train.bin", bytes(4096))),
    Row("meta_not_json", fit_on_copy(), "meta.json",
        data_copy(edit=lambda p: (p / "meta.json").write_text("{not json"))),
    Row("meta_says_uint32_for_uint16", fit_on_copy(), "meta.json", data_copy(lambda m: m.update(dtype="uint32"))),
    Row("meta_unknown_dtype", fit_on_copy(), "meta.json", data_copy(lambda m: m.update(dtype="float64"))),
    Row("meta_token_count_stale", fit_on_copy(), "meta.json",
        data_copy(lambda m: m.update(train_tokens=m["train_tokens"] + 2))),
    Row("meta_max_id_understated", fit_on_copy("--model.config.vocab_size=128"), "train.bin",
        data_copy(lambda m: m.update(train_max_token_id=100, val_max_token_id=100))),
    Row("train_bin_truncated", fit_on_copy(), "train.bin",
        data_copy(edit=lambda p: os.truncate(p / "train.bin", (p / "train.bin").stat().st_size - 1))),
    Row("train_bin_missing", fit_on_copy(), "train.bin", data_copy(edit=lambda p: (p / "train.bin").unlink())),
    Row("val_bin_missing", fit_on_copy(), "val.bin", data_copy(edit=lambda p: (p / "val.bin").unlink())),
    Row("train_bin_ids_over_vocab", fit("--model.config.vocab_size=100"), "vocab_size"),
    # -- prepare ------------------------------------------------------------------------------------
    Row("jsonl_text_null", ["prepare", "{d}/a.jsonl", "-o", "{d}/out", "--tokenizer=bytes"], "a.jsonl:2",
        write("a.jsonl", '{"text": "fine"}\n{"text": null}\n'), fork=False),
    Row("jsonl_text_number", ["prepare", "{d}/a.jsonl", "-o", "{d}/out", "--tokenizer=bytes"], "a.jsonl:1",
        write("a.jsonl", '{"text": 5}\n'), fork=False),
    Row("jsonl_not_json", ["prepare", "{d}/a.jsonl", "-o", "{d}/out", "--tokenizer=bytes"], "a.jsonl:1",
        write("a.jsonl", "text: hello\n"), fork=False),
    Row("jsonl_invalid_utf8", ["prepare", "{d}/a.jsonl", "-o", "{d}/out", "--tokenizer=bytes"], "a.jsonl:2",
        write("a.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n'), fork=False),
    Row("elf_renamed_txt", ["prepare", "{d}/prog.txt", "-o", "{d}/out", "--tokenizer=bytes"], "prog.txt",
        write("prog.txt", ELF), fork=False),
    Row("elf_given_by_name", ["prepare", "{d}/prog", "-o", "{d}/out", "--tokenizer=bytes"], "prog",
        write("prog", ELF), fork=False),
    Row("binary_in_a_folder", ["prepare", "{d}/texts", "-o", "{d}/out", "--tokenizer=bytes"], "blob.txt",
        both(write("texts/good.txt", "some text\n" * 100), write("texts/blob.txt", bytes(range(256)) * 64)),
        fork=False),
    Row("prepare_over_another_dataset", ["prepare", "{d}/in.txt", "-o", "{d}/data", "--tokenizer=bytes"],
        "--force", both(data_copy(), write("in.txt", "other text\n" * 500)), fork=False),
    Row("prepare_output_is_a_file", ["prepare", "{d}/in.txt", "-o", "{d}/in.txt", "--tokenizer=bytes"],
        "--output", write("in.txt", "text\n" * 500), fork=False),
    Row("prepare_output_under_a_file", ["prepare", "{d}/in.txt", "-o", "{d}/in.txt/out", "--tokenizer=bytes"],
        "in.txt/out", write("in.txt", "text\n" * 500), fork=False),
    Row("prepare_output_not_writable", ["prepare", "--builtin", "-o", "/proc/gigagpt-out"], "/proc/gigagpt-out",
        fork=False),
    Row("prepare_input_missing", ["prepare", "{d}/nope.txt", "-o", "{d}/out"], "nope.txt", fork=False),
    Row("prepare_folder_without_text", ["prepare", "{d}/empty", "-o", "{d}/out"], "empty",
        write("empty/x.bin", bytes(10)), fork=False),
    Row("prepare_empty_input", ["prepare", "{d}/in.txt", "-o", "{d}/out", "--tokenizer=bytes"], "no training text",
        write("in.txt", ""), fork=False),
    Row("prepare_val_fraction", ["prepare", "--builtin", "-o", "{d}/out", "--val-fraction=1.5"], "--val-fraction",
        fork=False),
    Row("prepare_piece_bytes", ["prepare", "--builtin", "-o", "{d}/out", "--piece-bytes=2"], "--piece-bytes",
        fork=False),
    Row("prepare_seed_not_a_number", ["prepare", "--builtin", "-o", "{d}/out", "--seed=abc"], "--seed", fork=False),
    Row("prepare_unknown_tokenizer", ["prepare", "--builtin", "-o", "{d}/out", "--tokenizer=nope"], "tokenizer",
        fork=False),
    Row("prepare_tiktoken_missing", ["prepare", "--builtin", "-o", "{d}/out", "--tokenizer={d}/x.tiktoken"],
        "x.tiktoken", fork=False),
    Row("prepare_builtin_and_inputs", ["prepare", "--builtin", "{d}/in.txt", "-o", "{d}/out"], "--builtin",
        write("in.txt", "text\n"), fork=False),
    Row("prepare_unknown_option", ["prepare", "--builtin", "-o", "{d}/out", "--val-fractoin=0.1"], "--val-fractoin",
        fork=False),
    # -- sample -------------------------------------------------------------------------------------
    Row("sample_temperature_nan", ["sample", "{ckpt}", "--prompt=a", "--temperature=nan"], "--temperature"),
    Row("sample_max_new_tokens_huge", ["sample", "{ckpt}", "--prompt=a", "--max-new-tokens=10000000000"],
        "--max-new-tokens"),
    Row("sample_max_new_tokens_not_an_integer", ["sample", "{ckpt}", "--prompt=a", "--max-new-tokens=1e10"],
        "--max-new-tokens"),
    Row("sample_top_p", ["sample", "{ckpt}", "--prompt=a", "--top-p=2"], "--top-p"),
    Row("sample_top_k_negative", ["sample", "{ckpt}", "--prompt=a", "--top-k=-1"], "--top-k"),
    Row("sample_num_samples_zero", ["sample", "{ckpt}", "--prompt=a", "--num-samples=0"], "--num-samples"),
    Row("sample_checkpoint_missing", ["sample", "{d}/nope.ckpt", "--prompt=a"], "nope.ckpt"),
    Row("sample_prompt_file_missing", ["sample", "{ckpt}", "--prompt-file={d}/p.txt"], "--prompt-file"),
    Row("sample_mdl_without_cstorch", ["sample", "{d}/run.mdl", "--prompt=a"], "gigagpt[cerebras]",
        write("run.mdl", b"\x89HDF\r\n\x1a\n" + bytes(64)), skip=NO_CSTORCH_ONLY),
    # -- export -------------------------------------------------------------------------------------
    Row("export_over_a_training_checkpoint", ["export", "{ckpt}", "{d}/last.ckpt"], "--force",
        lambda d, shared: shutil.copy(shared["ckpt"], d / "last.ckpt")),
    Row("export_to_mdl_without_cstorch", ["export", "{ckpt}", "{d}/out.mdl"], "writing", skip=NO_CSTORCH_ONLY),
    Row("export_under_a_file", ["export", "{ckpt}", "{d}/f.txt/out.ckpt"], "f.txt/out.ckpt", write("f.txt", "x")),
    Row("export_folder_not_writable", ["export", "{ckpt}", "/proc/gigagpt-out.ckpt"], "/proc/gigagpt-out.ckpt"),
    Row("export_same_path", ["export", "{ckpt}", "{ckpt}"], "same path"),
    Row("export_source_missing", ["export", "{d}/nope.ckpt", "{d}/out.ckpt"], "nope.ckpt"),
    # -- plot ---------------------------------------------------------------------------------------
    Row("plot_run_missing", ["plot", "{d}/nope"], "nope"),
]


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(tmp_path_factory, builtin_bytes) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs_shared")
    ckpt = root / "tiny.ckpt"
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, max_position_embeddings=64, depth=1, width=32, heads=2)
    save_lightning_checkpoint(GPT(config), ckpt)
    return {"data": builtin_bytes, "ckpt": ckpt}


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_fork.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def run_row(row: Row, d: Path, shared: dict, server) -> tuple[int, str, str]:
    argv = [a.format(d=d, data=shared["data"], ckpt=shared["ckpt"]) for a in row.argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **row.env}
    if not row.fork:
        proc = subprocess.run([sys.executable, "-m", "gigagpt", *argv], cwd=d, env=env, capture_output=True,
                              text=True, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr
    out, err = d.parent / f"{d.name}.stdout", d.parent / f"{d.name}.stderr"
    server.stdin.write(json.dumps({"argv": argv, "cwd": str(d), "env": env, "stdout": str(out),
                                   "stderr": str(err)}) + "\n")
    server.stdin.flush()
    reply = json.loads(server.stdout.readline())
    return reply["rc"], out.read_text(errors="replace"), err.read_text(errors="replace")


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file (sha256) and folder ("dir") under ``folders``."""
    seen = {}
    for folder in folders:
        base = folder if folder.is_dir() else folder.parent
        for path in [folder, *folder.rglob("*")] if folder.is_dir() else [folder]:
            key = str(path.relative_to(base.parent))
            seen[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line(row: Row, shared, server, tmp_path):
    if row.skip:
        pytest.skip(row.skip)
    d = tmp_path / "row"
    d.mkdir()
    if row.setup is not None:
        row.setup(d, shared)
    before = snapshot(d, shared["data"], shared["ckpt"])
    rc, stdout, stderr = run_row(row, d, shared, server)
    shown = f"exit {rc}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-5000:]}"
    lines = [line for line in (stdout + "\n" + stderr).splitlines() if GIGAGPT_LINE.match(line)]
    assert rc != 0, shown
    assert "Traceback" not in stderr and "usage:" not in stderr, shown
    assert len(lines) == 1, shown
    assert row.expect in lines[0], shown
    after = snapshot(d, shared["data"], shared["ckpt"])
    assert {k for k in after if k not in before} == set(), "new files or folders"
    assert {k for k in before if before[k] != after.get(k)} == set(), "earlier files changed or removed"


def test_the_table_is_long_enough():
    assert len(ROWS) >= 40
