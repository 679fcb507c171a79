import math

import pytest
import torch
import torch.nn.functional as F

from gigagpt.model import GPT, NAMED_CONFIGS, GPTConfig

# REFERENCE.md's table: N = V*W + P*W + depth*(12*W^2 + 13*W) + 2*W
REFERENCE_PARAMS = {
    "111m": 111_050_496,
    "1p3b": 1_315_723_264,
    "13b": 12_853_386_240,
    "70b": 64_861_528_064,
    "175b": 174_604_259_328,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_match_reference_on_meta(name):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(name))
    assert model.num_params() == REFERENCE_PARAMS[name]
    assert model.config.num_params() == REFERENCE_PARAMS[name]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_no_bias_variant_counts():
    cfg = GPTConfig(vocab_size=100, max_position_embeddings=16, depth=2, width=32, heads=4, bias=False)
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def tiny(**kw):
    base = dict(vocab_size=97, max_position_embeddings=32, depth=2, width=48, heads=4)
    return GPT(GPTConfig(**{**base, **kw}))


def test_shapes_and_loss_is_mean_token_cross_entropy():
    torch.manual_seed(0)
    model = tiny()
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 97)
    loss = model(idx, targets)
    summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, summed / (3 * 20))


def test_causality_future_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = tiny().eval()
    idx = torch.randint(0, 97, (2, 24))
    base = model(idx)
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_weight_tying_is_one_tensor_with_shared_gradient():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))).backward()
    assert model.wte.weight.grad is not None
    assert sum(1 for p in model.parameters() if p is model.wte.weight) == 1


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=4096, max_position_embeddings=512, depth=6, width=256, heads=4, init_std=0.02)
    model = GPT(cfg)
    residual = 0.02 / math.sqrt(2 * 6)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln" in name or name.startswith("ln_f"):
            assert torch.all(p == 1), name
        elif name.endswith(("attn.out_proj.weight", "mlp.down_proj.weight")):
            assert abs(p.std().item() - residual) < 0.05 * residual, name
            assert abs(p.mean().item()) < 0.1 * residual, name
        else:
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name


def test_meta_model_init_after_materialisation_matches_eager_statistics():
    cfg = GPTConfig(vocab_size=512, max_position_embeddings=64, depth=2, width=128, heads=4)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.wte.weight
    model.init_weights()
    assert abs(model.wte.weight.std().item() - 0.02) < 0.002
    assert torch.all(model.blocks[0].attn.q_proj.bias == 0)


def test_bf16_autocast_tracks_float32():
    torch.manual_seed(0)
    model = tiny()
    idx = torch.randint(0, 97, (2, 32))
    ref = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(idx, idx)
    assert low.dtype == torch.float32  # the loss is computed on float32 logits
    assert abs(low.item() - ref.item()) < 0.02 * ref.item()


def test_context_overflow_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("bad, match", [
    (dict(width=50, heads=4), "divisible"),
    (dict(depth=0), "depth"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_pad_multiple=0), "vocab_pad_multiple"),
])
def test_bad_config_is_a_clear_error(bad, match):
    base = dict(vocab_size=97, max_position_embeddings=32, depth=2, width=48, heads=4)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **bad})


def test_named_sizes_are_known():
    assert set(REFERENCE_PARAMS) < set(NAMED_CONFIGS)
    with pytest.raises(ValueError, match="choose one of"):
        GPTConfig.from_name("7b")


def test_padded_head_changes_no_parameter_logit_loss_or_gradient():
    """vocab_pad_multiple pads the head's compute only: same state dict, outputs and gradients."""
    base = dict(vocab_size=97, max_position_embeddings=32, depth=2, width=48, heads=4)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**base))
    padded = GPT(GPTConfig(**base, vocab_pad_multiple=64))
    padded.load_state_dict(plain.state_dict())
    assert padded.config.padded_vocab_size == 128 and padded.num_params() == plain.num_params()
    assert list(padded.state_dict()) == list(plain.state_dict())
    idx, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    torch.testing.assert_close(padded(idx), plain(idx))
    assert padded(idx).shape == (3, 20, 97)
    torch.testing.assert_close(padded(idx, last_only=True), plain(idx, last_only=True))
    # The padding columns exist in the head's output and are -inf, so they carry no probability.
    assert torch.isneginf(padded.head_loss.logits(torch.randn(2, 48), padded.lm_head.weight)[:, 97:]).all()
    losses = []
    for model in (plain, padded):
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(plain.named_parameters(), padded.parameters()):
        assert b.grad is not None and b.grad.shape == a.shape, name
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    # bf16 autocast (the GPU recipe): still the unpadded loss, to bf16 accuracy.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(padded(idx, targets), plain(idx, targets), atol=2e-2, rtol=2e-2)


def test_padded_vocab_size():
    assert GPTConfig().padded_vocab_size == 50257
    assert GPTConfig(vocab_pad_multiple=64).padded_vocab_size == 50304
    assert GPTConfig(vocab_size=256, vocab_pad_multiple=64).padded_vocab_size == 256
