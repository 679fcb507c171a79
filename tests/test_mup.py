"""μP: its rules, the per-group learning rates, the coordinate check and the folded HF export."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gigagpt.errors import ConfigError
from gigagpt.model import GPT, GPTConfig, fold_mup
from gigagpt.optim import OptimConfig, build_torch_optimizer, get_lr, param_groups

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=64, max_position_embeddings=16, depth=2, heads=4)


def mup_gpt(width=64, base=16, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL, width=width, mup=True, mup_base_width=base, **kw))


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The μP forward written out from the rules, independently of GPT.forward."""
    c = model.config
    x = (model.wte.weight[idx] + model.wpe.weight[: idx.size(1)]) * c.mup_embedding_multiplier
    t, hd = idx.size(1), c.head_dim
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for blk in model.blocks:
        h = blk.ln_1(x)
        q, k, v = (p(h).view(*h.shape[:2], c.heads, hd).transpose(1, 2)
                   for p in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj))
        scores = (q @ k.transpose(-1, -2) / hd).masked_fill(~causal, float("-inf"))  # 1/d_head
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + blk.attn.out_proj(y)
        x = x + blk.mlp.down_proj(F.gelu(blk.mlp.up_proj(blk.ln_2(x))))
    return (model.ln_f(x) * c.mup_output_multiplier * c.mup_base_width / c.width) @ model.wte.weight.t()


def test_mup_is_off_by_default_and_then_changes_nothing():
    config = GPTConfig(**SMALL, width=32)
    assert not config.mup and config.width_mult == 1.0
    torch.manual_seed(0)
    model = GPT(config)
    assert model.blocks[0].attn.scale is None  # SDPA's own 1/sqrt(d_head)
    assert all("lr_scale" not in g for g in param_groups(model, 0.1))
    assert fold_mup(model.state_dict(), config)[1] is config


def test_forward_follows_the_mup_rules():
    model = mup_gpt(width=64, base=16, mup_output_multiplier=2.0)
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_logits(model, idx), rtol=1e-5, atol=1e-5)
        loss = model(idx[:, :-1], idx[:, 1:])
        expected = F.cross_entropy(reference_logits(model, idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_init_std_of_hidden_weights_shrinks_with_width_and_embeddings_keep_it():
    model = mup_gpt(width=256, base=16, init_std=0.05)  # width_mult 16
    depth = model.config.depth
    assert model.wte.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert model.lm_head.weight is model.wte.weight
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.05 / 4, rel=0.05)
    assert model.blocks[0].mlp.up_proj.weight.std().item() == pytest.approx(0.05 / 4, rel=0.05)
    residual = 0.05 / 4 / math.sqrt(2 * depth)
    assert model.blocks[1].mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.05)


def test_hidden_weights_get_lr_over_width_mult_and_the_rest_the_base_rate():
    model = mup_gpt(width=64, base=16)  # width_mult 4
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    scaled = [g for g in groups if "lr_scale" in g]
    assert len(scaled) == 1 and scaled[0]["lr_scale"] == 0.25 and scaled[0]["weight_decay"] == 0.1
    assert {names[id(p)] for p in scaled[0]["params"]} == {
        n for n, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear) for n in [f"blocks.{n}.weight"]}
    base = {names[id(p)] for g in groups if "lr_scale" not in g for p in g["params"]}
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "blocks.0.attn.q_proj.bias", "blocks.1.ln_2.weight"} <= base
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each tensor once
    cfg = OptimConfig(lr=1e-2, warmup_steps=3, min_lr_ratio=0.1)
    optimizer, scheduler = build_torch_optimizer(model, cfg, 10)
    for step in range(10):
        want = get_lr(step, cfg.lr, cfg.warmup_steps, 7, cfg.min_lr)
        rates = [g["lr"] for g in optimizer.param_groups]
        assert rates[0] == pytest.approx(want) and rates[-1] == pytest.approx(want * 0.25)
        optimizer.step()
        scheduler.step()


def test_mup_settings_are_checked():
    with pytest.raises(ConfigError, match="model.config.mup_base_width"):
        GPTConfig(mup=True, mup_base_width=0)
    with pytest.raises(ConfigError, match="model.config.mup_embedding_multiplier"):
        GPTConfig(mup=True, mup_embedding_multiplier=float("nan"))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="model.optim.lr must be a finite number"):
            OptimConfig(lr=bad)


def load_coord_check():
    spec = importlib.util.spec_from_file_location("mup_coord_check", ROOT / "benchmarks" / "mup_coord_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mup_coord_check"] = module
    spec.loader.exec_module(module)
    return module


def test_coordinate_check_flat_under_mup_and_growing_under_the_standard_parametrization():
    """Tensor Programs V's coordinate check over a 16x width range, after 3 Adam steps."""
    cc = load_coord_check()
    widths = [16, 64, 256]
    kw = dict(steps=3, lr=1e-2, depth=2, head_dim=8, seeds=1, seq=8, batch=2)
    mup, sp = cc.coord_check(True, widths, **kw), cc.coord_check(False, widths, **kw)
    layers = ["block0.attn", "block0.mlp", "block1", "logits"]
    mup_spread = {layer: cc.spread(mup, layer) for layer in layers}
    sp_spread = {layer: cc.spread(sp, layer) for layer in layers}
    assert all(s < 2.0 for s in mup_spread.values()), mup_spread
    assert all(s > 2.0 for s in sp_spread.values()), sp_spread
    # Growth, not noise: the standard parametrization's largest activations are at the largest width.
    assert all(sp[256][-1][layer] > sp[16][-1][layer] for layer in layers)


def test_hf_export_of_a_mup_model_folds_the_multipliers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from gigagpt.checkpoint import load_model, save_hf

    model = mup_gpt(width=64, base=16, mup_output_multiplier=2.0).eval()
    with torch.no_grad():  # trained-looking LayerNorms and biases, not the init's ones and zeros
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    save_hf(model, tmp_path / "hf")
    idx = torch.randint(0, 64, (2, 12))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    back = load_model(tmp_path / "hf")
    assert not back.config.mup
    with torch.no_grad():
        want = model(idx)
        torch.testing.assert_close(hf(idx).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back(idx), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size, width_mult", [("111m", 3.0), ("13b", 20.0), ("175b", 48.0)])
def test_mup_overlay_carries_the_proxy_values_to_every_size(size, width_mult, tmp_path, monkeypatch):
    from gigagpt.cli import cli_main

    monkeypatch.chdir(tmp_path)
    configs = ROOT / "configs"
    proxy = cli_main(["--config", str(configs / f"{size}.yaml"), "--config", str(configs / "mup" / "mup.yaml"),
                      "--config", str(configs / "mup" / "proxy.yaml")], run=False).model
    target = cli_main(["--config", str(configs / f"{size}.yaml"), "--config", str(configs / "mup" / "mup.yaml")],
                      run=False).model
    assert proxy.config.width == proxy.config.mup_base_width == 256 and proxy.config.width_mult == 1.0
    assert target.config.mup and target.config.width == GPTConfig.from_name(size).width
    assert target.config.width_mult == width_mult
    # the tuned numbers are the same at both widths: nothing to rescale by hand
    assert (proxy.optim.lr, proxy.config.init_std) == (target.optim.lr, target.config.init_std) == (6e-3, 0.08)
    assert proxy.config.depth == target.config.depth
    with torch.device("meta"):
        target.configure_model()
    assert sum(p.numel() for p in target.parameters()) == GPTConfig.from_name(size).num_params()


FSDP_GROUPS = """
import os, socket, torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from gigagpt.model import GPT, GPTConfig, Block
from gigagpt.optim import param_groups
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
m = GPT(GPTConfig(vocab_size=64, max_position_embeddings=16, depth=2, width=64, heads=4, mup=True, mup_base_width=16))
plain = [(len(g["params"]), g.get("lr_scale")) for g in param_groups(m, 0.1)]
f = FSDP(m, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}))
sharded = [(len(g["params"]), g.get("lr_scale")) for g in param_groups(f, 0.1)]
assert sharded == plain == [(2, None), (22, None), (12, 0.25)], (plain, sharded)
assert sum(n for n, _ in sharded) == len(list(f.parameters()))
dist.destroy_process_group()
print("OK")
"""


def test_mup_groups_survive_fsdp_with_original_parameters():
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", FSDP_GROUPS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_transfer_benchmark_runs_and_merges(tmp_path):
    spec = importlib.util.spec_from_file_location("mup_transfer", ROOT / "benchmarks" / "mup_transfer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = ["--widths", "16,32", "--base-width", "16", "--head-dim", "8", "--depth", "1", "--seq", "16",
             "--batch", "2", "--steps", "3", "--warmup", "1", "--val-batches", "1", "--threads", "1"]
    bench.main([*small, "--param", "standard", "--lrs", "1e-3,4e-3", "--out", str(tmp_path / "sp")])
    bench.main([*small, "--param", "mup", "--lrs", "4e-3,1.6e-2", "--out", str(tmp_path / "mup")])
    bench.main(["--merge", f"{tmp_path / 'sp.json'},{tmp_path / 'mup.json'}", "--out", str(tmp_path / "all")])
    text = (tmp_path / "all.md").read_text()
    assert "| parametrization | width | lr 0.001 | lr 0.004 | lr 0.016 | best lr |" in text
    assert text.count("| standard |") == 2 and text.count("| μP |") == 2
    assert "μP: best learning rate moves" in text and "standard: best learning rate moves" in text
