"""Hugging Face GPT-2 <-> gigagpt weights, Lightning checkpoints, Cerebras .mdl, `gigagpt export`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from gigagpt.checkpoint import ConversionError, lightning_checkpoint, load_model, save_lightning_checkpoint
from gigagpt.commands import main as gigagpt_main
from gigagpt.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from gigagpt.model import GPT, GPTConfig

ODD = GPTConfig(vocab_size=1000, max_position_embeddings=64, depth=3, width=96, heads=6)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_gpt(config: GPTConfig = ODD, seed: int = 0) -> GPT:
    """Random weights everywhere, biases and LayerNorms included (zeros/ones would hide mix-ups)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name or name.startswith("ln_"):
                p.normal_(1.0, 0.1)
    return model


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert tensor.dtype == b[key].dtype, key
        assert torch.equal(tensor, b[key]), key


def test_state_dict_round_trip_is_exact():
    model = random_gpt()
    hf = to_hf_state_dict(model.state_dict(), ODD)
    assert hf["transformer.h.0.attn.c_attn.weight"].shape == (96, 3 * 96)  # Conv1D: (in, out)
    assert hf["transformer.h.2.mlp.c_fc.weight"].shape == (96, 4 * 96)
    assert "lm_head.weight" not in hf  # tied: transformers re-ties it on load
    config = from_hf_config(to_hf_config(ODD))
    assert config == ODD
    back = GPT(config)
    back.load_state_dict(from_hf_state_dict(hf, config))
    assert_same_state(back.state_dict(), model.state_dict())
    assert back.lm_head.weight is back.wte.weight


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_export_matches_transformers_logits(tmp_path, activation):
    transformers = pytest.importorskip("transformers")
    from gigagpt.checkpoint import save_hf

    config = replace(ODD, activation=activation)
    model = random_gpt(config)
    save_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == ("gelu_new" if activation == "gelu_tanh" else "gelu")
    idx = torch.randint(
        0, ODD.vocab_size, (2, ODD.max_position_embeddings), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    back = load_model(tmp_path / "hf")
    assert back.config == config
    assert_same_state(back.state_dict(), model.state_dict())


def test_import_of_a_transformers_gpt2(tmp_path):
    """A GPT-2 written by transformers itself (tanh GELU, as the public checkpoints)."""
    transformers = pytest.importorskip("transformers")

    hf_config = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=96, n_layer=3, n_head=6)
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.activation == "gelu_tanh"
    idx = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-5
    # The base GPT2Model layout (keys without "transformer.", as some hub files have) works too.
    hf.transformer.save_pretrained(tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg.get("model_type") == "gpt2"
    assert_same_state(load_model(tmp_path / "base").state_dict(), ours.state_dict())


def test_unmappable_models_are_refused():
    with pytest.raises(ConversionError, match="bias is false"):
        to_hf_config(replace(ODD, bias=False))
    with pytest.raises(ConversionError, match="bias is false"):
        to_hf_state_dict(GPT(replace(ODD, bias=False)).state_dict(), replace(ODD, bias=False))
    good = to_hf_config(ODD)
    for change, message in (
        ({"n_inner": 100}, "n_inner"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_head": 7}, "not divisible"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"scale_attn_by_inverse_layer_idx": True}, "inverse_layer_idx"),
        ({"model_type": "gpt_neo"}, "model_type"),
    ):
        with pytest.raises(ConversionError, match=message):
            from_hf_config({**good, **change})
    hf = to_hf_state_dict(random_gpt().state_dict(), ODD)
    del hf["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ConversionError, match="missing"):
        from_hf_state_dict(hf, ODD)


def test_lightning_checkpoint_loads_everywhere(tmp_path):
    from gigagpt.module import GPTModule

    model = random_gpt()
    path = save_lightning_checkpoint(model, tmp_path / "m.ckpt")
    assert_same_state(load_model(path).state_dict(), model.state_dict())
    module = GPTModule.load_from_checkpoint(path)
    assert_same_state(module.model.state_dict(), model.state_dict())
    assert module.config == ODD


def test_export_command_round_trip(tmp_path, capsys):
    pytest.importorskip("safetensors")
    model = random_gpt()
    save_lightning_checkpoint(model, tmp_path / "a.ckpt")
    gigagpt_main(["export", str(tmp_path / "a.ckpt"), str(tmp_path / "hf")])
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    gigagpt_main(["export", str(tmp_path / "hf"), str(tmp_path / "b.ckpt")])
    a = torch.load(tmp_path / "a.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b.ckpt", weights_only=True)
    assert_same_state(a["state_dict"], b["state_dict"])
    assert a["hyper_parameters"] == b["hyper_parameters"]
    gigagpt_main(["export", str(tmp_path / "hf"), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert load_model(tmp_path / "bf16").wte.weight.dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="bias is false"):
        save_lightning_checkpoint(GPT(replace(ODD, bias=False)), tmp_path / "nobias.ckpt")
        gigagpt_main(["export", str(tmp_path / "nobias.ckpt"), str(tmp_path / "nobias")])
    with pytest.raises(SystemExit, match="does not exist"):
        gigagpt_main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")])


def test_mdl_without_cerebras_says_how_to_install(tmp_path):
    from gigagpt.accelerators.bridge_errors import cstorch_available

    if cstorch_available():
        pytest.skip("cerebras-pytorch is installed here")
    (tmp_path / "model.mdl").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(SystemExit, match=r'pip install "gigagpt\[cerebras\]"'):
        gigagpt_main(["export", str(tmp_path / "model.mdl"), str(tmp_path / "hf")])
    with pytest.raises(SystemExit, match=r'pip install "gigagpt\[cerebras\]"'):
        gigagpt_main(["sample", str(tmp_path / "model.mdl"), "--prompt", "x"])


def test_mdl_checkpoint_loads(tmp_path):
    cstorch = pytest.importorskip("cerebras.pytorch")
    model = random_gpt(GPTConfig(vocab_size=256, max_position_embeddings=32, depth=2, width=32, heads=2))
    cstorch.save(lightning_checkpoint(model), str(tmp_path / "model.mdl"))
    assert_same_state(load_model(tmp_path / "model.mdl").state_dict(), model.state_dict())
    gigagpt_main(["export", str(tmp_path / "model.mdl"), str(tmp_path / "back.ckpt")])
    assert_same_state(load_model(tmp_path / "back.ckpt").state_dict(), model.state_dict())
    gigagpt_main(["export", str(tmp_path / "back.ckpt"), str(tmp_path / "again.mdl")])
    assert_same_state(load_model(tmp_path / "again.mdl").state_dict(), model.state_dict())
    # A Cerebras run's checkpoint callback may write HDF5 under a .ckpt name: read by content.
    (tmp_path / "again.mdl").rename(tmp_path / "hdf5.ckpt")
    assert_same_state(load_model(tmp_path / "hdf5.ckpt").state_dict(), model.state_dict())
