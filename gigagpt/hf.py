"""The Hugging Face GPT-2 adapter: the only place that knows both parameter layouts.

gigagpt keeps separate q/k/v projections in ``nn.Linear`` layout (out, in); GPT-2 fuses them into
one ``c_attn`` in its ``Conv1D`` layout (in, out). The mapping is exact (a concatenation and a
transpose), so a round trip gives back identical tensors. Both tie the LM head to the token
embedding. A new model variant whose weights map to GPT-2 adds its names here and nowhere else.

Needs no ``transformers``: HF folders are read and written as ``config.json`` plus safetensors (the
``safetensors`` package, extra ``hf``) or ``pytorch_model.bin`` files. Building a :class:`GPT` from
any file (HF folder included) is :func:`gigagpt.checkpoint.load_model`; writing and reading the
folder's files is :mod:`gigagpt.checkpoint` (:func:`~gigagpt.checkpoint.save_hf`).
"""

from __future__ import annotations

import json
import re

import torch

from gigagpt.errors import ConversionError
from gigagpt.model import GPT, GPTConfig, fold_mup
from gigagpt.tokenizer import EOT_TEXT, GPT2_EOT, GPT2_VOCAB, Tokenizer

HF_INSTALL = 'pip install "gigagpt[hf]"'
# HF activation names and the gigagpt activation computing the same function.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# Buffers some GPT-2 checkpoints carry (the causal mask), not weights.
HF_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
# Per block: gigagpt name, GPT-2 name, whether the weight is transposed (Linear vs Conv1D).
# q/k/v are fused into c_attn and handled apart.
BLOCK_TENSORS = [
    ("attn.out_proj.weight", "attn.c_proj.weight", True),
    ("attn.out_proj.bias", "attn.c_proj.bias", False),
    ("mlp.up_proj.weight", "mlp.c_fc.weight", True),
    ("mlp.up_proj.bias", "mlp.c_fc.bias", False),
    ("mlp.down_proj.weight", "mlp.c_proj.weight", True),
    ("mlp.down_proj.bias", "mlp.c_proj.bias", False),
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
]
OUTER_TENSORS = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]


# -- configs ----------------------------------------------------------------------------------------
def to_hf_config(config: GPTConfig) -> dict:
    """A ``GPT2Config`` dictionary describing the same network."""
    if not config.bias:
        raise ConversionError(
            "model.config.bias is false, but every GPT-2 layer in Hugging Face transformers has a bias: "
            "this model cannot be exported as GPT2LMHeadModel (train with model.config.bias: true)"
        )
    eot = {GPT2_VOCAB: GPT2_EOT, 256: 0}.get(config.vocab_size)  # the tokenizers gigagpt ships
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_position_embeddings,
        "n_ctx": config.max_position_embeddings,
        "n_embd": config.width,
        "n_layer": config.depth,
        "n_head": config.heads,
        "n_inner": None,
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }


def from_hf_config(hf: dict) -> GPTConfig:
    """The :class:`GPTConfig` of a ``GPT2Config`` dictionary; refuses what GPT can not compute."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ConversionError(
            f"config.json has model_type {model_type!r}; only 'gpt2' models can be imported"
        )
    width, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    problems = []
    if hf.get("n_inner") not in (None, 4 * width):
        problems.append(f"n_inner={hf['n_inner']} (gigagpt's MLP is 4 * n_embd = {4 * width})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        problems.append(f"activation_function={activation!r} (supported: {sorted(HF_ACTIVATIONS)})")
    if width % heads:
        problems.append(f"n_embd={width} is not divisible by n_head={heads}")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false (gigagpt scales attention by 1/sqrt(head size))")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention=true")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings=false (gigagpt ties the LM head to the token embedding)")
    if problems:
        raise ConversionError("this GPT-2 cannot be represented by gigagpt's GPT: " + "; ".join(problems))
    config = GPTConfig(
        vocab_size=hf.get("vocab_size", GPT2_VOCAB),
        max_position_embeddings=hf.get("n_positions", 1024),
        depth=hf.get("n_layer", 12),
        width=width,
        heads=heads,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        init_std=float(hf.get("initializer_range", 0.02)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=HF_ACTIVATIONS[activation],
    )
    return config

# -- state dicts ------------------------------------------------------------------------------------
def _block_tensors(sd: dict, src: str, dst: str, to_hf: bool) -> dict[str, torch.Tensor]:
    """One block's tensors other than q/k/v, renamed (and transposed) from ``src`` to ``dst``."""
    out = {}
    for ours, theirs, transposed in BLOCK_TENSORS:
        old, new = (ours, theirs) if to_hf else (theirs, ours)
        out[dst + new] = sd[src + old].t() if transposed else sd[src + old]
    return out


def to_hf_state_dict(state_dict: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """gigagpt :class:`GPT` weights as ``GPT2LMHeadModel`` weights (the tied ``lm_head`` omitted).

    A μP model's multipliers are folded into the weights (:func:`~gigagpt.model.fold_mup`).
    """
    to_hf_config(config)  # refuses what cannot map
    sd, config = fold_mup(state_dict, config)
    out = {f"transformer.{k}": sd[k] for k in OUTER_TENSORS}
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        attn = src + "attn."
        out[dst + "attn.c_attn.weight"] = torch.cat([sd[attn + f"{p}_proj.weight"].t() for p in "qkv"], dim=1)
        out[dst + "attn.c_attn.bias"] = torch.cat([sd[attn + f"{p}_proj.bias"] for p in "qkv"])
        out.update(_block_tensors(sd, src, dst, to_hf=True))
    return {k: v.detach().contiguous() for k, v in out.items()}


def _check_hf_names(sd: dict, config: GPTConfig) -> None:
    """Refuse GPT-2 weights whose names do not match ``config`` (missing, extra, untied head)."""
    block = ["attn.c_attn.weight", "attn.c_attn.bias", *(theirs for _, theirs, _ in BLOCK_TENSORS)]
    needed = OUTER_TENSORS + [f"h.{i}.{name}" for i in range(config.depth) for name in block]
    missing = [k for k in needed if k not in sd]
    unexpected = sorted(set(sd) - set(needed) - {"lm_head.weight"})
    if missing or unexpected:
        raise ConversionError(
            f"the GPT-2 weights do not match their config.json (n_layer={config.depth}): "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    head = sd.get("lm_head.weight")
    if head is not None and not torch.equal(head, sd["wte.weight"]):
        raise ConversionError("lm_head.weight differs from wte.weight: gigagpt needs a tied LM head")


def from_hf_state_dict(hf_state_dict: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``) weights as gigagpt :class:`GPT` weights."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items() if not HF_IGNORED.search(k)}
    _check_hf_names(sd, config)
    w = config.width
    out = {k: sd[k] for k in OUTER_TENSORS}
    for i in range(config.depth):
        src, dst = f"h.{i}.", f"blocks.{i}."
        qkv_w = sd[src + "attn.c_attn.weight"]
        if tuple(qkv_w.shape) != (w, 3 * w):
            raise ConversionError(
                f"{src}attn.c_attn.weight has shape {tuple(qkv_w.shape)}, expected {(w, 3 * w)}"
            )
        for j, p in enumerate("qkv"):
            out[dst + f"attn.{p}_proj.weight"] = qkv_w[:, j * w : (j + 1) * w].t()
            out[dst + f"attn.{p}_proj.bias"] = sd[src + "attn.c_attn.bias"][j * w : (j + 1) * w]
        out.update(_block_tensors(sd, src, dst, to_hf=False))
    out = {k: v.contiguous() for k, v in out.items()}
    out["lm_head.weight"] = out["wte.weight"]
    return out


# -- files ------------------------------------------------------------------------------------------
def need_safetensors():
    try:
        import safetensors.torch
    except ModuleNotFoundError:
        raise RuntimeError(
            f"reading and writing Hugging Face safetensors needs the 'hf' extra: {HF_INSTALL}"
        ) from None
    return safetensors.torch


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def hf_files(model: GPT, dtype: torch.dtype | None = None, tokenizer: Tokenizer | None = None) -> dict[str, bytes]:
    """The files of a Hugging Face GPT-2 folder holding ``model`` (name -> contents):
    ``model.safetensors``, ``config.json``, for the shipped tokenizers ``generation_config.json``, and
    with ``tokenizer`` its files (:func:`tokenizer_files`)."""
    st = need_safetensors()
    config = model.config
    hf_config = to_hf_config(config)
    tensors = to_hf_state_dict({k: v.cpu() for k, v in model.state_dict().items()}, config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    files = {"model.safetensors": st.save(tensors, metadata={"format": "pt"}), "config.json": _json_bytes(hf_config)}
    if hf_config["eos_token_id"] is not None:
        generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
        files["generation_config.json"] = _json_bytes(generation)
    if tokenizer is not None:
        files.update(tokenizer_files(tokenizer, config))
    return files


# -- tokenizer files --------------------------------------------------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of ``vocab.json`` and ``merges.txt``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def _split(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """``token`` encoded by byte pair merges of lower rank than its own: the two parts it is merged from."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that reproduces tiktoken's encoding with ``ranks``."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _split(ranks, token)
            if len(parts) != 2:
                raise ConversionError(f"the tokenizer's token {token!r} is not a merge of two lower-ranked tokens")
            merges.append((parts[0], parts[1]))
    return merges


def tokenizer_files(tokenizer: Tokenizer, config: GPTConfig) -> dict[str, bytes]:
    """``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a byte-level BPE that
    ``AutoTokenizer`` loads (``GPT2Tokenizer``) and that encodes exactly as ``tokenizer`` does.

    GPT-2 BPE: the vocabulary and merges come from the tiktoken ranks themselves, ``<|endoftext|>``
    is the end-of-text token. Byte-level (``bytes``): 256 tokens, token id = byte value, no merges;
    its end-of-text token is byte 0, which no text token stands for, so the tokenizer declares no
    special tokens (``generation_config.json`` carries ``eos_token_id`` 0).
    """
    alphabet = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    if tokenizer.name == "bytes" and tokenizer.vocab_size == 256:
        vocab, merges, special = {alphabet[b]: b for b in range(256)}, [], None
    elif getattr(tokenizer._encoding, "_mergeable_ranks", None):
        ranks = tokenizer._encoding._mergeable_ranks
        vocab = {text(token): rank for token, rank in ranks.items()}
        merges = bpe_merges(ranks)
        special = EOT_TEXT
        vocab[special] = tokenizer.eot_token
    else:
        raise ConversionError(f"tokenizer {tokenizer.name!r} cannot be written as Hugging Face files")
    if len(vocab) > config.vocab_size:
        raise ConversionError(f"the tokenizer has {len(vocab)} tokens but the model only {config.vocab_size}")
    settings = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": config.max_position_embeddings,
        "add_prefix_space": False,
        "add_bos_token": False,
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
    }
    merges_txt = "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges)
    return {
        "vocab.json": (json.dumps(vocab, ensure_ascii=False) + "\n").encode(),
        "merges.txt": merges_txt.encode(),
        "tokenizer_config.json": _json_bytes(settings),
    }
