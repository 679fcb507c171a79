import math

import pytest

from gigagpt.model import GPT, GPTConfig
from gigagpt.optim import OptimConfig, build_torch_optimizer, get_lr, param_groups


def test_schedule_values():
    lr, warm, decay, min_lr = 6e-4, 100, 1000, 6e-5
    assert get_lr(0, lr, warm, decay, min_lr) == 0.0
    assert get_lr(50, lr, warm, decay, min_lr) == pytest.approx(3e-4)
    assert get_lr(100, lr, warm, decay, min_lr) == pytest.approx(lr)  # warmup end
    assert get_lr(600, lr, warm, decay, min_lr) == pytest.approx((lr + min_lr) / 2)  # mid-decay
    assert get_lr(350, lr, warm, decay, min_lr) == pytest.approx(
        min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert get_lr(1100, lr, warm, decay, min_lr) == pytest.approx(min_lr)  # end
    assert get_lr(5000, lr, warm, decay, min_lr) == pytest.approx(min_lr)  # held after the end


def test_decay_steps_default_and_error():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10)
    assert cfg.resolve_decay_steps(110) == 100
    assert OptimConfig(lr=1e-3, warmup_steps=10, decay_steps=7).resolve_decay_steps(None) == 7
    with pytest.raises(ValueError, match="trainer.max_steps"):
        cfg.resolve_decay_steps(-1)


def test_torch_scheduler_follows_get_lr_per_optimizer_step():
    model = GPT(GPTConfig(vocab_size=32, max_position_embeddings=8, depth=1, width=16, heads=2))
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, min_lr_ratio=0.1)
    opt, sched = build_torch_optimizer(model, cfg, max_steps=20)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [get_lr(s, 1e-2, 4, 16, 1e-3) for s in range(25)]
    assert seen == pytest.approx(expected)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_weight_decay_groups():
    model = GPT(GPTConfig(vocab_size=32, max_position_embeddings=8, depth=2, width=16, heads=2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied head counted once
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.dim() >= 2}


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("warmup_steps", -1), ("min_lr_ratio", 2.0)])
def test_bad_optim_settings(field, value):
    with pytest.raises(ValueError, match=f"model.optim.{field}"):
        OptimConfig(**{field: value})


def test_fused_adamw_where_torch_has_it_and_same_update_as_the_loop():
    import torch

    from gigagpt.optim import fused_adamw_available

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, max_position_embeddings=16, depth=1, width=32, heads=2))
    fused_opt, _ = build_torch_optimizer(model, OptimConfig(), 10)
    assert fused_opt.defaults["fused"] == (fused_adamw_available("cpu") or None)
    loop_opt, _ = build_torch_optimizer(model, OptimConfig(fused=False), 10)
    assert not loop_opt.defaults["fused"]
    # The same step from the same state: the fused kernel and the loop agree.
    start = {k: v.clone() for k, v in model.state_dict().items()}
    idx, targets = torch.randint(0, 64, (2, 16)), torch.arange(32).view(2, 16) % 64
    results = []
    for optimizer in (fused_opt, loop_opt):
        model.load_state_dict(start)
        model.zero_grad()
        model(idx, targets).backward()
        optimizer.step()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in start:
        torch.testing.assert_close(results[0][key], results[1][key], msg=key)
