"""Autoregressive sampling from a :class:`~gigagpt.model.GPT`, with or without a KV cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gigagpt.model import GPT


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V). ``temperature=0`` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate_stream(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row of ``prompt`` (B, T), one step at a time.

    With the cache, the prompt is run once and each new token costs one position; without it,
    every step reruns the whole (cropped) context. The context is cropped to the model's last
    ``max_position_embeddings`` tokens.
    """
    model.eval()
    context = model.config.max_position_embeddings
    tokens = prompt[:, -context:]
    if not use_cache:
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -context:])[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            tokens = torch.cat([tokens, nxt], dim=1)
            yield nxt
        return
    caches = model.make_caches(tokens.size(0), context)
    logits = model(tokens, caches=caches, pos=0)[:, -1]
    pos = tokens.size(1)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if i == max_new_tokens - 1:
            return
        if pos == context:  # the cache is full: re-encode the last context-1 tokens + the new one
            tokens = torch.cat([tokens, nxt], dim=1)[:, -context:]
            caches = model.make_caches(tokens.size(0), context)
            logits = model(tokens, caches=caches, pos=0)[:, -1]
            continue
        tokens = torch.cat([tokens, nxt], dim=1)
        logits = model(nxt, caches=caches, pos=pos)[:, -1]
        pos += 1


def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by ``max_new_tokens`` sampled tokens, shape (B, T + max_new_tokens)."""
    new = list(generate_stream(model, prompt, max_new_tokens, **kwargs))
    return torch.cat([prompt, *new], dim=1) if new else prompt
