"""KV-cache generation against full recomputation; sampling controls; long prompts."""

from __future__ import annotations

import pytest
import torch

from gigagpt.generate import NO_TOKEN, generate, generate_batch, generate_stream, sample_next
from gigagpt.model import GPT, GPTConfig

CONTEXT = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(one_thread) -> GPT:
    torch.manual_seed(0)
    # A larger init spreads the logits, so greedy choices are far from ties.
    config = GPTConfig(
        vocab_size=97, max_position_embeddings=CONTEXT, depth=2, width=48, heads=4, init_std=0.3
    )
    return GPT(config).eval()


def _prompt(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cached_logits_match_full_forward(model):
    """Prefill a chunk, then one token at a time: logits equal those of the full forward."""
    seq = _prompt(CONTEXT)
    full = model(seq)
    for prefill in (1, 7, CONTEXT - 1, CONTEXT):
        caches = model.make_caches(2)
        steps = [model(seq[:, :prefill], caches=caches, pos=0)]
        steps += [model(seq[:, p : p + 1], caches=caches, pos=p) for p in range(prefill, CONTEXT)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # A chunk at pos > 0 (the masked path) as well.
    caches = model.make_caches(2)
    first = model(seq[:, :10], caches=caches, pos=0)
    second = model(seq[:, 10:], caches=caches, pos=10)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(seq, last_only=True), full[:, -1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prompt_len", [1, 5, CONTEXT - 1, CONTEXT, CONTEXT + 9])
def test_cached_greedy_equals_uncached(model, prompt_len):
    """Same tokens with and without the cache, including a full context and the sliding window."""
    prompt = _prompt(prompt_len)
    with pytest.warns(UserWarning, match="context") if prompt_len > CONTEXT else _no_warning():
        cached = generate(model, prompt, 40, temperature=0.0, use_cache=True)
        uncached = generate(model, prompt, 40, temperature=0.0, use_cache=False)
    assert cached.shape == (2, prompt_len + 40)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :prompt_len], prompt)


def test_greedy_matches_manual_argmax(model):
    """The cached stream reproduces a hand-written argmax loop over the full (cropped) context."""
    prompt = _prompt(20, batch=1)
    tokens = prompt
    for _ in range(25):
        logits = model(tokens[:, -CONTEXT:])[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, prompt, 25, temperature=0.0), tokens)


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = _prompt(6)

    def run(seed, use_cache=True):
        gen = torch.Generator().manual_seed(seed)
        return generate(
            model, prompt, 30, temperature=1.0, top_k=50, top_p=0.95, generator=gen, use_cache=use_cache
        )

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert torch.equal(run(3), run(3, use_cache=False))


def test_top_k_one_equals_greedy(model):
    prompt = _prompt(9)
    greedy = generate(model, prompt, 30, temperature=0.0)
    for temperature in (0.7, 1.0, 5.0):
        top1 = generate(
            model, prompt, 30, temperature=temperature, top_k=1, generator=torch.Generator().manual_seed(0)
        )
        assert torch.equal(top1, greedy)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_p=0.8, generator=gen)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reach 0.8: tokens 2 and 3 are never drawn
    picks = {int(sample_next(logits, 1.0, top_p=0.81, generator=gen)) for _ in range(300)}
    assert picks == {0, 1, 2}
    assert {int(sample_next(logits, 1.0, top_p=0.01, generator=gen)) for _ in range(50)} == {0}


def test_long_prompt_is_cropped_with_a_warning(model):
    prompt = _prompt(3 * CONTEXT, batch=1)
    with pytest.warns(UserWarning, match=f"keeping its last {CONTEXT} tokens"):
        out = generate(model, prompt, 5, temperature=0.0)
    with _no_warning():
        cropped = generate(model, prompt[:, -CONTEXT:], 5, temperature=0.0)
    assert torch.equal(out[:, -5:], cropped[:, -5:])


def test_ragged_batch_equals_one_by_one(model):
    """Prompts of different lengths in one batch give what each gives alone (greedy)."""
    prompts = [_prompt(n, batch=1, seed=n)[0].tolist() for n in (3, 11, CONTEXT - 2, 7)]
    together = generate_batch(model, prompts, 12, temperature=0.0)
    alone = [generate_batch(model, [p], 12, temperature=0.0)[0] for p in prompts]
    assert together == alone
    assert all(len(row) == 12 for row in together)


def test_stop_token_ends_a_row(model):
    prompt = _prompt(4, batch=1)
    free = generate(model, prompt, 30, temperature=0.0)[0, 4:].tolist()
    stop = free[5]
    first = free.index(stop)
    steps = list(generate_stream(model, prompt, 30, temperature=0.0, stop_token=stop))
    assert len(steps) == first + 1 and int(steps[-1]) == stop
    assert generate_batch(model, [prompt[0].tolist()], 30, temperature=0.0, stop_token=stop) == [free[:first]]
    # Rows that finish early are filled with the stop token in generate().
    out = generate(model, prompt, 30, temperature=0.0, stop_token=stop)
    assert out.shape == (1, 34) and (out[0, 4 + first :] == stop).all()
    assert NO_TOKEN not in out


def test_bfloat16_cached_generation_runs(model):
    half = GPT(model.config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    out = generate(half, _prompt(5), 8, temperature=0.0)
    assert out.shape == (2, 13) and half.make_caches(1)[0].k.dtype == torch.bfloat16


def test_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, _prompt(2), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, _prompt(2), 3, top_p=1.5)
    with pytest.raises(ValueError, match="empty"):
        generate_batch(model, [[]], 3)
    with pytest.raises(ValueError, match="larger max_len"):
        caches = model.make_caches(1, max_len=4)
        model(_prompt(5, batch=1), caches=caches, pos=0)


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
