"""Autoregressive sampling from a :class:`~gigagpt.model.GPT`, with or without a KV cache.

Prompts may differ in length within one batch: every row advances one position per step, and a
row whose prompt is longer than the shortest one reads its remaining prompt tokens instead of
sampling (no padding, so learned positions stay exact). With the cache, the shortest prompt
length is encoded once and each later step costs one position. Once a sequence reaches the
model's context (``max_position_embeddings``) the window slides: the last ``context`` tokens are
re-encoded each step, exactly as uncached generation does (learned absolute positions cannot be
shifted inside a cache).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gigagpt.model import GPT

# Attention kernels for decoding. cuDNN's is left out: it builds a new execution plan for every new
# key length, and decoding grows the key length by one each token, so every step would pay for a
# plan (benchmarks/RESULTS.md, generation).
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

#: Marks a row that produced no new token at a step (still reading its prompt, or finished).
NO_TOKEN = -1


MAX_NEW_TOKENS = 1 << 20  # the token buffer is (rows, prompt + max_new_tokens) int64s


def check_sampling(
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, max_new_tokens: int = 0,
    names: dict[str, str] | None = None,
) -> None:
    """Raise a ``ValueError`` naming the bad setting (``names``: how the caller spells each)."""
    name = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "max_new_tokens": "max_new_tokens", **(names or {})}
    if not (temperature >= 0 and math.isfinite(temperature)):  # NaN compares false to everything
        raise ValueError(f"{name['temperature']} must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"{name['top_k']} must be >= 1 (or 0/None to keep every token), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{name['top_p']} must be in (0, 1] (1 keeps every token), got {top_p}")
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"{name['max_new_tokens']} must be in [0, {MAX_NEW_TOKENS}], got {max_new_tokens}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V), shape (B, 1). ``temperature=0`` is greedy.

    ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose probability reaches
    p (nucleus sampling); both apply after the temperature.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p: the one crossing it stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def crop_prompts(prompts: Sequence[Sequence[int]], context: int) -> list[list[int]]:
    """Each prompt as a list of ints, its last ``context`` tokens kept (with a warning)."""
    rows = []
    for i, prompt in enumerate(prompts):
        row = [int(t) for t in prompt]
        if not row:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the end-of-text token)")
        if len(row) > context:
            warnings.warn(
                f"prompt {i} has {len(row)} tokens, more than the model's context of {context}: "
                f"keeping its last {context} tokens",
                stacklevel=2,
            )
            row = row[-context:]
        rows.append(row)
    if not rows:
        raise ValueError("no prompts given")
    return rows


@torch.no_grad()
def generate_stream(
    model: GPT,
    prompt: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield, step by step, the next token of every prompt as a (B, 1) tensor.

    ``prompt`` is a (B, T) tensor or a list of token lists (lengths may differ). Each row gets up
    to ``max_new_tokens`` new tokens; a row stops early after producing ``stop_token``. Entries
    equal to :data:`NO_TOKEN` mark rows with nothing new at that step (still reading a longer
    prompt, or finished); with equal-length prompts and no ``stop_token`` there are none.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    context = model.config.max_position_embeddings
    rows = crop_prompts(prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt, context)
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        yield from _decode(
            model, rows, max_new_tokens, temperature, top_k, top_p, use_cache, generator, stop_token
        )
    finally:
        model.train(was_training)


def _decode(model, rows, max_new_tokens, temperature, top_k, top_p, use_cache, generator, stop_token):
    context = model.config.max_position_embeddings
    device = model.wte.weight.device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    start, total = int(lengths.min()), int(lengths.max()) + max_new_tokens
    tokens = torch.zeros(len(rows), total, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    ends = lengths + max_new_tokens  # a row is done once it holds this many tokens
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    caches = model.make_caches(len(rows), min(context, total)) if use_cache else None
    cached = 0  # positions already in the caches

    for pos in range(start, total):  # choose the token at position `pos`
        with sdpa_kernel(DECODE_ATTENTION):
            if caches is not None and pos <= context:
                logits = model(tokens[:, cached:pos], caches=caches, pos=cached, last_only=True)[:, -1]
                cached = pos
            else:  # uncached, or the window has started to slide
                logits = model(tokens[:, max(0, pos - context) : pos], last_only=True)[:, -1]
        sampled = sample_next(logits, temperature, top_k, top_p, generator)[:, 0]
        new = (pos >= lengths) & ~done
        tokens[:, pos] = torch.where(pos < lengths, tokens[:, pos], sampled)
        yield torch.where(new, sampled, NO_TOKEN)[:, None]
        done |= ends <= pos + 1
        if stop_token is not None:
            done |= new & (sampled == stop_token)
        if bool(done.all()):
            return


def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt (B, T) followed by ``max_new_tokens`` sampled tokens, shape (B, T + max_new_tokens).

    Rows that stopped early at ``stop_token`` are filled up with it. Keyword arguments are those
    of :func:`generate_stream`.
    """
    new = [step.clone() for step in generate_stream(model, prompt, max_new_tokens, **kwargs)]
    if not new:
        return prompt
    out = torch.cat(new, dim=1)
    if out.size(1) < max_new_tokens:
        pad = torch.full((out.size(0), max_new_tokens - out.size(1)), NO_TOKEN, device=out.device)
        out = torch.cat([out, pad], dim=1)
    if (out == NO_TOKEN).any():
        out = out.masked_fill(out == NO_TOKEN, kwargs.get("stop_token", NO_TOKEN))
    return torch.cat([prompt, out.to(prompt.device)], dim=1)


def generate_batch(
    model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs
) -> list[list[int]]:
    """The new tokens of each prompt (lengths may differ), without the stop token.

    Keyword arguments are those of :func:`generate_stream`.
    """
    out: list[list[int]] = [[] for _ in prompts]
    stop = kwargs.get("stop_token")
    for step in generate_stream(model, prompts, max_new_tokens, **kwargs):
        for i, token in enumerate(step[:, 0].tolist()):
            if token != NO_TOKEN and token != stop:
                out[i].append(token)
    return out
