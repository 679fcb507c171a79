"""configs/gpu/: every file parses layered on its recipe, and the model builds on the meta device.

The Trainer itself is not built (the GPU configs ask for CUDA); everything else the CLI would make
is: the strategy object with its FSDP settings, the GPTModule and the GPTDataModule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from gigagpt.cli import GigaCLI
from gigagpt.data import GPTDataModule
from gigagpt.model import GPT, Block, GPTConfig
from gigagpt.module import GPTModule
from gigagpt.parallelize import build_for_fsdp, check_fsdp_strategy, compile_available, compile_blocks

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "configs" / "gpu"

# (files layered after the recipe, recipe, GPUs in the run)
LAYERS = {
    "111m": (["111m.yaml"], "111m", 1),
    "111m-ddp": (["111m.yaml", "ddp.yaml"], "111m", 8),
    "1p3b": (["fsdp.yaml", "1p3b.yaml"], "1p3b", 8),
    "13b": (["fsdp.yaml", "13b.yaml"], "13b", 8),
    "13b-offload": (["fsdp.yaml", "13b.yaml", "offload.yaml"], "13b", 8),
}


class ParseOnly(GigaCLI):
    """GigaCLI that instantiates everything but the Trainer."""

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")


def parse(layers: list[str], recipe: str) -> ParseOnly:
    args = ["--config", str(ROOT / "configs" / f"{recipe}.yaml")]
    for name in layers:
        args += ["--config", str(GPU / name)]
    return ParseOnly(GPTModule, GPTDataModule, args=args, run=False)


def test_every_gpu_config_is_covered():
    used = {name for layers, _, _ in LAYERS.values() for name in layers}
    assert used == {p.name for p in GPU.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gpu_config_parses_and_builds_on_meta(name):
    layers, recipe, gpus = LAYERS[name]
    cli = parse(layers, recipe)
    trainer = cli.config_init["trainer"]
    assert trainer["devices"] == gpus and trainer["accelerator"] == "gpu"
    assert cli.config["trainer"]["use_distributed_sampler"] is False
    assert str(cli.config["trainer"]["precision"]).startswith("bf16")
    assert cli.model.compile is True

    # The recipe's global batch survives the split over GPUs and accumulated steps.
    recipe_batch = yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())["data"]["batch_size"]
    nodes = trainer.get("num_nodes") or 1
    global_batch = cli.datamodule.batch_size * trainer["accumulate_grad_batches"] * gpus * nodes
    assert global_batch == recipe_batch
    # Validation every as many optimizer steps as the recipe (Lightning counts micro-batches).
    recipe_val = yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())["trainer"]["val_check_interval"]
    assert trainer["val_check_interval"] == recipe_val * trainer["accumulate_grad_batches"]

    config = cli.model.config
    # The recipe's model, its head computed over a vocabulary padded for tensor cores.
    assert config == GPTConfig.from_name(recipe, vocab_pad_multiple=64)
    strategy = trainer["strategy"]
    if "fsdp.yaml" in layers:
        from lightning.pytorch.strategies import FSDPStrategy

        assert isinstance(strategy, FSDPStrategy)
        check_fsdp_strategy(strategy)  # use_orig_params set, no auto_wrap_policy
        assert strategy.sharding_strategy.name == "FULL_SHARD"
        policy = strategy._activation_checkpointing_kwargs
        assert Block in (policy.get("check_fn") and {Block} or policy["auto_wrap_policy"]._module_classes)
        assert bool(strategy.cpu_offload and strategy.cpu_offload.offload_params) == ("offload.yaml" in layers)
        # Piece-wise construction at full size, on meta: every block handed to the wrapper.
        wrapped = []
        model = build_for_fsdp(config, "meta", wrap=lambda m: wrapped.append(m) or m)
        assert len(wrapped) == config.depth + 1
        assert model.lm_head.weight is model.wte.weight
        assert model.num_params() == config.num_params()
    else:
        with torch.device("meta"):
            model = GPT(config)
        assert model.num_params() == config.num_params()


def test_fsdp_settings_errors_name_the_fix():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="use_orig_params: true"):
        check_fsdp_strategy(FSDPStrategy(use_orig_params=False))
    check_fsdp_strategy(FSDPStrategy())  # Lightning's default keeps the original parameters
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        check_fsdp_strategy(FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True))


def test_compile_blocks_compiles_or_falls_back_with_one_line(capsys):
    config = GPTConfig(vocab_size=64, max_position_embeddings=16, depth=2, width=32, heads=2)
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, 64, (2, 16))
    expected = model(idx)
    targets = torch.randint(0, 64, (2, 16))
    expected_loss = model(idx, targets)
    # A backend that does not exist: a real compile failure, reported in one line, model eager.
    assert compile_blocks(model, backend="no_such_backend") is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile is unavailable" in err[0] and "model.compile: false" in err[0]
    assert all(block._compiled_call_impl is None for block in model.blocks)
    # The eager backend needs no compiler: blocks compiled in place, same class, same numbers.
    assert compile_blocks(model, backend="eager") is True
    assert all(isinstance(b, Block) and b._compiled_call_impl is not None for b in model.blocks)
    assert model.head_loss._compiled_call_impl is not None
    torch.testing.assert_close(model(idx), expected)
    torch.testing.assert_close(model(idx, targets), expected_loss)
    assert list(model.state_dict()) == list(GPT(config).state_dict())


def test_inductor_compiled_blocks_and_padded_loss_match_eager():
    """The real compiler (Inductor: C++ on CPU, Triton on GPU), the padded head included."""
    reason = compile_available("cpu")
    if reason is not None:
        pytest.skip(f"torch.compile cannot build here: {reason}")
    config = GPTConfig(vocab_size=97, max_position_embeddings=32, depth=2, width=48, heads=4,
                       vocab_pad_multiple=64)
    torch.manual_seed(0)
    model = GPT(config)
    idx, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    expected = model(idx, targets)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert compile_blocks(model) is True
    loss = model(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g)
