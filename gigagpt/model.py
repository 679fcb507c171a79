"""GPT-2/GPT-3 style decoder in plain PyTorch.

Learned positions, pre-LayerNorm blocks, separate q/k/v/output projections, GELU MLP, a final
LayerNorm and an LM head tied to the token embedding. The module knows nothing about where it
runs: devices, precision and parallelism are decided by whoever trains it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from gigagpt.errors import ConfigError


@dataclass
class GPTConfig:
    """Shape and initialisation of a GPT.

    The defaults are the GPT-2 tokenizer's vocabulary (50257, not rounded up) and a 2048-token
    context; ``depth`` blocks of ``width`` channels split over ``heads`` attention heads.
    """

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    depth: int = 12
    width: int = 768
    heads: int = 12
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5
    # "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation the public GPT-2 weights use).
    activation: str = "gelu"
    # Compute the LM head over the vocabulary rounded up to a multiple of this (64 on GPUs: a
    # 50,257-wide output is misaligned for tensor-core matrix multiplies). The extra rows are zeros
    # with logits of -inf, so parameters, state dict, logits and loss are those of the unpadded head.
    vocab_pad_multiple: int = 1
    # Maximal update parametrization (docs/mup.md): hyperparameters tuned at width
    # ``mup_base_width`` carry over unchanged to any width. Off: the standard parametrization.
    mup: bool = False
    mup_base_width: int = 256
    mup_embedding_multiplier: float = 10.0
    mup_output_multiplier: float = 1.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_position_embeddings", "depth", "width", "heads", "vocab_pad_multiple",
                     "mup_base_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.config.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ConfigError(
                f"model.config.width ({self.width}) must be divisible by model.config.heads "
                f"({self.heads}); pick heads so that width / heads is a whole head size"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.config.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ConfigError(
                f"model.config.activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}"
            )
        for name in ("mup_embedding_multiplier", "mup_output_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"model.config.{name} must be a finite number > 0, got {value!r}")

    @property
    def width_mult(self) -> float:
        """``width / mup_base_width`` under μP (how far this model is from the tuned proxy), else 1."""
        return self.width / self.mup_base_width if self.mup else 1.0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def padded_vocab_size(self) -> int:
        """The width the LM head is computed at (``vocab_size`` rounded up to ``vocab_pad_multiple``)."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """One of the named sizes (``tiny``, ``111m``, ``1p3b``, ``13b``, ``70b``, ``175b``)."""
        if name not in NAMED_CONFIGS:
            raise ConfigError(f"unknown model size {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
        return replace(NAMED_CONFIGS[name], **overrides)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def meta_model(self) -> GPT:
        """This architecture built on the meta device: shapes only, no memory, at any size."""
        with torch.device("meta"):
            return GPT(self)

    def num_params(self) -> int:
        """Parameters with the head tied, counted on :meth:`meta_model` (no second formula)."""
        return self.meta_model().num_params()

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply (:meth:`GPT.matmul_params`)."""
        return self.meta_model().matmul_params()

    def flops_per_token(self, sequence_length: int) -> float:
        """Training FLOPs (forward + backward) per token: ``6 N + 12 depth width T``.

        PaLM's estimate (Chowdhery et al. 2022, appendix B; nanoGPT and litgpt use it): ``N`` is
        :meth:`matmul_params`, 6 = 2 (multiply + add) x 3 (forward, two backward products), and
        ``12 depth width T`` is attention's ``Q K^T`` and ``A V`` over the full ``T x T`` score matrix
        (the convention of published MFU figures, though causal masking zeroes half of it).
        """
        if not isinstance(sequence_length, int) or sequence_length <= 0:
            raise ValueError(f"sequence_length must be a positive integer, got {sequence_length!r}")
        return float(6 * self.matmul_params() + 12 * self.depth * self.width * sequence_length)


# The GPTConfig fields that fix tensor shapes; the others (dropout, activation, vocab padding,
# init) may change when a run is resumed.
SHAPE_FIELDS = ("vocab_size", "max_position_embeddings", "depth", "width", "heads", "bias")


# The named sizes of REFERENCE.md (sequence length 2048, GPT-2 vocabulary) and a CPU-sized one.
NAMED_CONFIGS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=256, max_position_embeddings=256, depth=4, width=128, heads=4),
    "111m": GPTConfig(depth=10, width=768, heads=12, init_std=0.02),
    "1p3b": GPTConfig(depth=24, width=2048, heads=16, init_std=0.01),
    "13b": GPTConfig(depth=40, width=5120, heads=40, init_std=0.014),
    "70b": GPTConfig(depth=80, width=8192, heads=64, init_std=0.01),
    "175b": GPTConfig(depth=96, width=12288, heads=96, init_std=0.005),
}


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far, for incremental decoding.

    Preallocated to ``max_len`` positions so each new token is a slice write, not a concatenation.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.size(2)
        if end > self.k.size(2):
            raise ValueError(
                f"KV cache holds {self.k.size(2)} positions, cannot write positions {pos}..{end - 1}; "
                "make the caches with a larger max_len"
            )
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        w, bias = config.width, config.bias
        self.heads = config.heads
        self.q_proj = nn.Linear(w, w, bias=bias)
        self.k_proj = nn.Linear(w, w, bias=bias)
        self.v_proj = nn.Linear(w, w, bias=bias)
        self.out_proj = nn.Linear(w, w, bias=bias)
        self.dropout = config.dropout
        # μP scores attention by 1/d_head instead of 1/sqrt(d_head) (Tensor Programs V, sec. 4: q and
        # k become correlated during training, so q.k grows like d_head, not sqrt(d_head);
        # Cerebras-GPT's μP and modelzoo's scale_qk_dot_by_d do the same). None: SDPA's 1/sqrt(d_head).
        self.scale = 1.0 / config.head_dim if config.mup else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, w // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is None:
            is_causal, mask = True, None
        else:
            k, v = cache.update(pos, k, v)
            # A new chunk of t queries sees every cached key plus the causal part of its own
            # (at pos 0 that is plain causal attention, which keeps SDPA's fused kernels).
            is_causal, mask = pos == 0 and t > 1, None
            if pos > 0 and t > 1:
                mask = torch.ones(t, k.size(2), dtype=torch.bool, device=x.device).tril(pos)
        # SDPA's fused kernels keep the softmax in float32 under bf16/fp16 inputs, as the
        # reference's explicit upcast does; it also lowers on the Cerebras path.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.width, 4 * config.width, bias=config.bias)
        self.down_proj = nn.Linear(4 * config.width, config.width, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), cache, pos))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class HeadLoss(nn.Module):
    """The tied LM head's logits and the mean token cross entropy over them.

    Holds no parameters (the head weight is passed in), so it can be compiled on its own: a
    compiled loss reads the logits without writing their float32 copy and log-probabilities out.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = config.padded_vocab_size

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits over ``padded_vocab_size`` columns; the padding columns are -inf."""
        pad = self.padded_vocab_size - self.vocab_size
        if not pad:
            return F.linear(x, weight)
        # An aligned GEMM with the mask as its bias: one kernel, and exp(-inf) = 0 keeps the
        # softmax, the loss and every gradient exactly those of the unpadded vocabulary.
        bias = torch.zeros(self.padded_vocab_size, device=x.device, dtype=x.dtype)
        bias[self.vocab_size:] = float("-inf")
        return F.linear(x, F.pad(weight, (0, 0, 0, pad)), bias)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x, weight)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.width)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.ln_f = nn.LayerNorm(config.width, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one tensor, counted once
        self.head_loss = HeadLoss(config)
        if self.wte.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, part: nn.Module | None = None) -> None:
        """normal(0, init_std) weights, zero biases; residual projections scaled by 1/sqrt(2*depth).

        Under μP the hidden (block) weights' std is further divided by sqrt(width_mult), while the
        embeddings (and so the tied head) keep ``init_std``: Cerebras-GPT's μP table (hidden init
        variance sigma_base^2 / m_d, embedding sigma_base^2), which is Tensor Programs V's
        fan_in-proportional hidden init with the base-width constant kept.

        ``part`` (a submodule, e.g. one block) initialises only that piece, for building a model
        one piece at a time from the meta device (:meth:`materialise`).
        """
        std = self.config.init_std
        hidden_std = std / math.sqrt(self.config.width_mult)
        residual_std = hidden_std / math.sqrt(2 * self.config.depth)
        for name, module in (self if part is None else part).named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_embedding = isinstance(module, nn.Embedding) or module is self.lm_head
                is_residual = name.endswith(("attn.out_proj", "mlp.down_proj"))
                module_std = std if is_embedding else residual_std if is_residual else hidden_std
                nn.init.normal_(module.weight, mean=0.0, std=module_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    @torch.no_grad()
    def materialise(self, device: torch.device, prepare_block=lambda block: block) -> None:
        """Allocate and initialise a model built on the meta device one piece at a time, in the order
        :meth:`init_weights` uses (so the weights equal those it gives the whole model from the same
        random state); each block goes through ``prepare_block`` (compile, shard) as soon as it exists."""
        for child in self.children():
            if child is self.blocks:
                for i, block in enumerate(self.blocks):
                    block.to_empty(device=device)
                    self.init_weights(block)
                    self.blocks[i] = prepare_block(block)
            elif child is self.lm_head:  # tied: share the materialised embedding, initialised as init_weights does
                self.lm_head.weight = self.wte.weight
                self.init_weights(child)
            else:
                child.to_empty(device=device)
                self.init_weights(child)

    def output_multiplier(self) -> float:
        """μP's logit multiplier ``mup_output_multiplier / width_mult``.

        Tensor Programs V (Table 3 with MuReadout) and Cerebras-GPT both divide the readout by the
        width multiplier; applied to the head's input it is the same product and leaves the tied
        weight itself shared with the embedding, whose learning rate is not scaled.
        """
        return self.config.mup_output_multiplier / self.config.width_mult

    def num_params(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply: all but the position embeddings (a lookup).
        The token embedding counts once: tied to the head, it is multiplied there."""
        return self.num_params() - self.wpe.weight.numel()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        caches: list[KVCache] | None = None,
        pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits of shape (B, T, V), or the mean token cross entropy when ``targets`` is given.

        With ``caches`` (one :class:`KVCache` per block) ``idx`` holds the tokens at positions
        ``pos .. pos+T-1`` and earlier positions come from the caches. ``last_only`` returns the
        logits of the last position only, shape (B, 1, V).
        """
        t = idx.size(1)
        if pos + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {pos + t} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        positions = torch.arange(pos, pos + t, device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        if self.config.mup:  # the embedding output multiplier (Cerebras-GPT's m_emb, on wte + wpe)
            x = x * self.config.mup_embedding_multiplier
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos)
        if last_only:  # generation needs the next-token logits only: skip the rest of the head
            x = x[:, -1:]
        x = self.ln_f(x)
        if self.config.mup:
            x = x * self.output_multiplier()
        if targets is None:
            return self.head_loss.logits(x, self.lm_head.weight)[..., : self.config.vocab_size]
        return self.head_loss(x, self.lm_head.weight, targets)

    def make_caches(self, batch: int, max_len: int | None = None, dtype=None) -> list[KVCache]:
        """One empty KV cache per block, on the model's device."""
        weight = self.wte.weight
        max_len = max_len or self.config.max_position_embeddings
        return [
            KVCache(batch, self.config.heads, max_len, self.config.head_dim, weight.device, dtype or weight.dtype)
            for _ in range(self.config.depth)
        ]


def fold_mup(state_dict: dict, config: GPTConfig) -> tuple[dict, GPTConfig]:
    """Standard-parametrization weights that compute the same logits as a μP model's.

    The multipliers are linear, so they fold into weights: the embedding multiplier into both
    embeddings; 1/d_head attention into the query projection (times 1/sqrt(d_head), on top of the
    standard 1/sqrt(d_head)); and, since the tied head now reads the multiplied embedding, the
    logit multiplier divided by the embedding multiplier into the final LayerNorm, whose output
    only the head reads. Exports (e.g. Hugging Face GPT-2) then need no μP support.
    """
    if not config.mup:
        return state_dict, config
    sd = dict(state_dict)
    emb = config.mup_embedding_multiplier
    out = config.mup_output_multiplier / config.width_mult / emb
    query = 1.0 / math.sqrt(config.head_dim)
    for name in ("wte.weight", "wpe.weight"):
        sd[name] = state_dict[name] * emb
    for name in [n for n in state_dict if n.startswith("ln_f.")]:
        sd[name] = state_dict[name] * out
    for name in [n for n in state_dict if ".attn.q_proj." in n]:
        sd[name] = state_dict[name] * query
    if "lm_head.weight" in sd:  # the tied head is the (folded) token embedding
        sd["lm_head.weight"] = sd["wte.weight"]
    return sd, replace(config, mup=False)
