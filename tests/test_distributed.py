"""Data parallelism on Lightning's engines, on CPU with gloo.

2 ranks x batch b must train exactly like 1 rank x batch 2b: the same global batches (StepSampler)
and the same averaged gradients, hence the same losses step by step. Run as a script, this file is
the training worker that Lightning's launcher starts once per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
SEQ = 32
CONFIG = dict(vocab_size=256, max_position_embeddings=SEQ, depth=2, width=64, heads=2)


def train(data: str, out: str, strategy: str, devices: int, batch_size: int, steps: int = STEPS) -> None:
    """Train the tiny GPT; rank 0 writes the global (rank-averaged) loss of every step to ``out``,
    and the trained model is saved as a Lightning checkpoint to ``out`` + ``.ckpt``.

    The FSDP run computes its head over a padded vocabulary (``vocab_pad_multiple``): the padded
    head's weight is an FSDP parameter view, and the losses must still equal the plain run's.
    """
    import lightning as L

    from gigagpt.data import GPTDataModule
    from gigagpt.model import Block, GPTConfig
    from gigagpt.module import GPTModule
    from gigagpt.optim import OptimConfig
    from gigagpt.parallelize import build_for_fsdp

    torch.set_num_threads(1)

    class Record(L.Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"].detach().clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(loss)
                loss /= torch.distributed.get_world_size()
            self.losses.append(loss.item())

        def on_train_end(self, trainer, pl_module):
            if trainer.is_global_zero:
                tmp = Path(out + ".tmp")
                groups = [(len(g["params"]), g["weight_decay"]) for g in trainer.optimizers[0].param_groups]
                tmp.write_text(json.dumps(
                    {"losses": self.losses, "world_size": trainer.world_size, "groups": groups}
                ))
                os.replace(tmp, out)

    if strategy == "fsdp":
        import lightning.pytorch.strategies.fsdp as lightning_fsdp
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        # torch's FSDP runs on CPU given device_id=cpu; Lightning's FSDPStrategy is GPU-only (it
        # refuses accelerator='cpu', passes device_id=None, and gathers full state dicts with
        # offload_to_cpu=True, which on CPU-resident shards reads freed memory). Lightning's and
        # torch's code run unchanged below; only those three GPU assumptions are lifted for this test.
        def full_state_dict_on_cpu(module, world_size, rank0_only=True):
            return FSDP.state_dict_type(
                module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            )

        lightning_fsdp._get_full_state_dict_context = full_state_dict_on_cpu
        init = FSDP.__init__

        def init_on_cpu(self, *args, device_id=None, **kwargs):
            init(self, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

        FSDP.__init__ = init_on_cpu

        class CPUFSDPStrategy(FSDPStrategy):
            """Lightning's FSDPStrategy; being a subclass passes its GPU-only accelerator check."""

        strategy_obj = CPUFSDPStrategy(activation_checkpointing_policy={Block}, use_orig_params=True)
    elif strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy_obj = DDPStrategy(process_group_backend="gloo")
    else:
        strategy_obj = "auto"
    L.seed_everything(1234, verbose=False)
    pad = 100 if strategy == "fsdp" else 1
    module = GPTModule(GPTConfig(**CONFIG, vocab_pad_multiple=pad), OptimConfig(lr=3e-3, warmup_steps=2))
    if strategy != "fsdp":
        # The FSDP run builds in configure_model, piece by piece (build_for_fsdp); start the
        # others from the same weights (the same function without sharding, the same seed).
        module.model = build_for_fsdp(module.config, "cpu", wrap=lambda m: m)
    dm = GPTDataModule(path=data, sequence_length=SEQ, batch_size=batch_size, seed=7, val_batches=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy_obj, max_steps=steps,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        gradient_clip_val=1.0, callbacks=[Record()], use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    # With FSDP: Lightning's default state_dict_type "full" gathers the shards into one file.
    trainer.save_checkpoint(out + ".ckpt")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    from gigagpt.prepare import builtin_documents, prepare
    from gigagpt.tokenizer import get_tokenizer

    out = tmp_path_factory.mktemp("dist_data")
    docs = ((d, len(d)) for d in list(builtin_documents())[:120])
    prepare(docs, out, get_tokenizer("bytes"), val_fraction=0.05, progress=False)
    return str(out)


def _run_ranks(data: str, out: Path, strategy: str, batch_size: int, timeout: int = 120) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, __file__, data, str(out), strategy, "2", str(batch_size)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and out.is_file(), f"{strategy} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory) -> dict:
    """1 process, batch 4: the reference."""
    out = tmp_path_factory.mktemp("single") / "losses.json"
    train(data_dir, str(out), "single", 1, 4)
    return {**json.loads(out.read_text()), "ckpt": str(out) + ".ckpt"}


def test_ddp_two_ranks_match_one_rank_with_same_global_batch(data_dir, single, tmp_path):
    result = _run_ranks(data_dir, tmp_path / "ddp.json", "ddp", batch_size=2)
    assert result["world_size"] == 2
    assert len(result["losses"]) == len(single["losses"]) == STEPS
    # The losses move over the run (training happened) and agree step by step.
    assert max(single["losses"]) - min(single["losses"]) > 1e-3
    assert result["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)


def test_fsdp_two_ranks_match_one_rank(data_dir, single, tmp_path):

    from gigagpt.checkpoint import load_model

    result = _run_ranks(data_dir, tmp_path / "fsdp.json", "fsdp", batch_size=2)
    assert result["world_size"] == 2
    assert result["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)
    # Weight decay still reaches exactly the matrices, though FSDP flattens every parameter.
    assert result["groups"] == single["groups"]
    # The sharded model saved as one ordinary checkpoint holds the weights the single run reached.
    sharded, plain = load_model(tmp_path / "fsdp.json.ckpt"), load_model(single["ckpt"])
    assert sharded.config.vocab_pad_multiple == 100 and sharded.lm_head.weight is sharded.wte.weight
    for (name, a), b in zip(plain.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_ranks_see_the_global_batch_of_one_rank():
    """Rank r of 2 with batch b holds rows r*b..(r+1)*b-1 of the 1-rank batch 2b, at every step."""
    from gigagpt.data import StepSampler

    num_windows, b = 37, 3
    one = StepSampler(num_windows, 2 * b, seed=5)
    ranks = [StepSampler(num_windows, b, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in (0, 1, 5, 6, 12, 40):  # crosses several epochs of 37 windows
        assert ranks[0].batch_indices(step) + ranks[1].batch_indices(step) == one.batch_indices(step)
    # And resuming mid-run yields the same batches as running through.
    resumed = StepSampler(num_windows, b, seed=5, start_step=6, rank=1, world_size=2, num_steps=3)
    assert list(resumed) == [ranks[1].batch_indices(s) for s in (6, 7, 8)]


def test_fsdp_build_matches_init_weights_and_keeps_tie():
    """build_for_fsdp (meta layout, piece-wise materialisation) gives init_weights()'s exact weights."""
    from gigagpt.model import GPT, GPTConfig
    from gigagpt.parallelize import build_for_fsdp

    config = GPTConfig(**CONFIG)
    with torch.device("meta"):
        plain = GPT(config)
    plain.to_empty(device="cpu")
    plain.lm_head.weight = plain.wte.weight
    torch.manual_seed(3)
    plain.init_weights()  # the whole model at once
    torch.manual_seed(3)
    wrapped = []
    built = build_for_fsdp(config, "cpu", wrap=lambda m: wrapped.append(m) or m)
    assert len(wrapped) == config.depth + 1 and wrapped[-1] is built  # each block, then the root
    assert built.lm_head.weight is built.wte.weight
    for (name, a), (_, b) in zip(plain.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name


if __name__ == "__main__":
    data_arg, out_arg, strategy_arg, devices_arg, batch_arg = sys.argv[1:6]
    train(data_arg, out_arg, strategy_arg, int(devices_arg), int(batch_arg))
