"""Moving weights between gigagpt, Hugging Face GPT-2 and Lightning checkpoints.

- HF ``GPT2LMHeadModel`` <-> gigagpt: gigagpt keeps separate q/k/v projections in ``nn.Linear``
  layout (out, in); GPT-2 fuses them into one ``c_attn`` in its ``Conv1D`` layout (in, out). The
  conversion is exact (a concatenation and a transpose), so a round trip gives back identical
  tensors. Both tie the LM head to the token embedding.
- Lightning ``.ckpt`` files (written by :class:`~gigagpt.module.GPTModule`, or by
  :func:`save_lightning_checkpoint`), HF directories and Cerebras ``.mdl`` files all load into a
  bare :class:`~gigagpt.model.GPT` through :func:`load_model`.

Needs no ``transformers``: HF directories are read and written as ``config.json`` plus
safetensors (the ``safetensors`` package, extra ``hf``) or ``pytorch_model.bin`` files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from gigagpt.checkpoint import check_shapes, find_checkpoint, load_checkpoint, model_state_dict, safe_load
from gigagpt.model import GPT, GPTConfig, fold_mup
from gigagpt.tokenizer import GPT2_EOT, GPT2_VOCAB

HF_INSTALL = 'pip install "gigagpt[hf]"'
CEREBRAS_INSTALL = 'pip install "gigagpt[cerebras]"'
# HF activation names and the gigagpt activation computing the same function.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# Buffers some GPT-2 checkpoints carry (the causal mask), not weights.
HF_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


class ConversionError(ValueError):
    """A model cannot be represented in the target format; the message says why and what to do."""


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
def to_hf_state_dict(state_dict: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """gigagpt :class:`GPT` weights as ``GPT2LMHeadModel`` weights (the tied ``lm_head`` omitted).

    A μP model's multipliers are folded into the weights (:func:`~gigagpt.model.fold_mup`).
    """
    to_hf_config(config)  # refuses what cannot map
    state_dict, config = fold_mup(state_dict, config)
    sd = state_dict
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        attn = src + "attn."
        out[dst + "attn.c_attn.weight"] = torch.cat([sd[attn + f"{p}_proj.weight"].t() for p in "qkv"], dim=1)
        out[dst + "attn.c_attn.bias"] = torch.cat([sd[attn + f"{p}_proj.bias"] for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = sd[attn + "out_proj.weight"].t()
        out[dst + "attn.c_proj.bias"] = sd[attn + "out_proj.bias"]
        out[dst + "mlp.c_fc.weight"] = sd[src + "mlp.up_proj.weight"].t()
        out[dst + "mlp.c_fc.bias"] = sd[src + "mlp.up_proj.bias"]
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"].t()
        out[dst + "mlp.c_proj.bias"] = sd[src + "mlp.down_proj.bias"]
        for ln in ("ln_1", "ln_2"):
            out[dst + f"{ln}.weight"] = sd[src + f"{ln}.weight"]
            out[dst + f"{ln}.bias"] = sd[src + f"{ln}.bias"]
    out["transformer.ln_f.weight"] = sd["ln_f.weight"]
    out["transformer.ln_f.bias"] = sd["ln_f.bias"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf_state_dict: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``) weights as gigagpt :class:`GPT` weights."""
    sd = {}
    for key, value in hf_state_dict.items():
        if HF_IGNORED.search(key):
            continue
        sd[key.removeprefix("transformer.")] = value
    w = config.width
    needed = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
    for i in range(config.depth):
        needed += [
            f"h.{i}.{name}"
            for name in (
                "ln_1.weight",
                "ln_1.bias",
                "attn.c_attn.weight",
                "attn.c_attn.bias",
                "attn.c_proj.weight",
                "attn.c_proj.bias",
                "ln_2.weight",
                "ln_2.bias",
                "mlp.c_fc.weight",
                "mlp.c_fc.bias",
                "mlp.c_proj.weight",
                "mlp.c_proj.bias",
            )
        ]
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
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"]}
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
        out[dst + "attn.out_proj.weight"] = sd[src + "attn.c_proj.weight"].t()
        out[dst + "attn.out_proj.bias"] = sd[src + "attn.c_proj.bias"]
        out[dst + "mlp.up_proj.weight"] = sd[src + "mlp.c_fc.weight"].t()
        out[dst + "mlp.up_proj.bias"] = sd[src + "mlp.c_fc.bias"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.c_proj.weight"].t()
        out[dst + "mlp.down_proj.bias"] = sd[src + "mlp.c_proj.bias"]
        for ln in ("ln_1", "ln_2"):
            out[dst + f"{ln}.weight"] = sd[src + f"{ln}.weight"]
            out[dst + f"{ln}.bias"] = sd[src + f"{ln}.bias"]
    out["ln_f.weight"], out["ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    out = {k: v.contiguous() for k, v in out.items()}
    out["lm_head.weight"] = out["wte.weight"]
    return out


def build_gpt(config: GPTConfig, state_dict: dict, source: str = "checkpoint", map_location="cpu") -> GPT:
    """A :class:`GPT` holding ``state_dict`` (checked key by key), head re-tied, in eval mode."""
    state_dict = dict(state_dict)
    state_dict.setdefault("lm_head.weight", state_dict.get("wte.weight"))
    with torch.device("meta"):
        model = GPT(config)
    check_shapes(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    model.lm_head.weight = model.wte.weight
    return model.to(map_location).eval()


# -- files ------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _need_safetensors():
    try:
        import safetensors.torch
    except ModuleNotFoundError:
        raise RuntimeError(
            f"reading and writing Hugging Face safetensors needs the 'hf' extra: {HF_INSTALL}"
        ) from None
    return safetensors.torch


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def save_hf(model: GPT, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads."""
    st = _need_safetensors()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"{out_dir} exists and is not a folder; give a folder for the Hugging Face model"
        )
    config = model.config
    hf_config = to_hf_config(config)
    tensors = to_hf_state_dict({k: v.cpu() for k, v in model.state_dict().items()}, config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _atomic_write(
        out_dir / "model.safetensors", lambda tmp: st.save_file(tensors, tmp, metadata={"format": "pt"})
    )
    _atomic_write(
        out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n")
    )
    if hf_config["eos_token_id"] is not None:
        generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
        _atomic_write(
            out_dir / "generation_config.json",
            lambda tmp: Path(tmp).write_text(json.dumps(generation, indent=2) + "\n"),
        )
    return out_dir


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an HF model folder: safetensors (single or sharded) or ``pytorch_model.bin``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or index.is_file():
        st = _need_safetensors()
        files = (
            [folder / "model.safetensors"]
            if not index.is_file()
            else [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        )
        out = {}
        for f in files:
            out.update(st.load_file(str(f)))
        return out
    if (folder / "pytorch_model.bin").is_file():
        return safe_load(folder / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{folder} has a config.json but no model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin; download the weights next to config.json"
    )


def load_hf(folder: str | os.PathLike, map_location="cpu") -> GPT:
    """A :class:`GPT` from a Hugging Face GPT-2 folder (e.g. ``GPT2LMHeadModel.save_pretrained``)."""
    folder = Path(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{folder / 'config.json'} is not valid JSON: {err}") from None
    config = from_hf_config(hf_config)
    state = from_hf_state_dict(read_hf_weights(folder), config)
    return build_gpt(config, state, source=f"Hugging Face model {folder}", map_location=map_location)


def lightning_checkpoint(model: GPT) -> dict:
    """A checkpoint dict that ``GPTModule.load_from_checkpoint`` and ``gigagpt sample`` read."""
    import lightning

    from gigagpt.optim import OptimConfig

    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "config": asdict(model.config),
            "optim": asdict(OptimConfig()),
            "compile": False,
        },
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }


def save_lightning_checkpoint(model: GPT, path: str | os.PathLike) -> Path:
    path = Path(path)
    ckpt = lightning_checkpoint(model)
    _atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return path


def is_hdf5(path: Path) -> bool:
    """True for cstorch's HDF5 checkpoints (``.mdl``), whatever the file is called."""
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _need_cerebras(path: Path):
    """``accelerators.convert``, or one line saying how to install what reads ``path``."""
    from accelerators.errors import cstorch_available

    if not cstorch_available():
        raise RuntimeError(
            f"{path} is a Cerebras .mdl checkpoint; reading it needs cerebras-pytorch: {CEREBRAS_INSTALL}"
        )
    return importlib.import_module("accelerators.convert")


def _read_mdl(path: Path) -> dict:
    """A Cerebras ``.mdl`` checkpoint as a Lightning checkpoint dict of plain CPU tensors."""
    ckpt = load_checkpoint(path)  # data only; needs h5py + hdf5plugin, not cerebras-pytorch
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConversionError(f"{path} does not hold a Lightning checkpoint (no state_dict)")
    return ckpt


def save_mdl(model: GPT, path: str | os.PathLike) -> Path:
    """A Cerebras ``.mdl`` checkpoint of ``model`` (a Cerebras run can start from it)."""
    path = Path(path)
    convert = _need_cerebras(path)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.is_dir() else None) as tmp:
        ckpt = save_lightning_checkpoint(model, Path(tmp) / "model.ckpt")
        return convert.ckpt_to_mdl(ckpt, path)


def load_model(path: str | os.PathLike, map_location="cpu") -> GPT:
    """A :class:`GPT` from a Lightning ``.ckpt`` (or a run folder), a Cerebras ``.mdl`` or an HF folder."""
    path = Path(path)
    if path.is_dir() and is_hf_dir(path):
        return load_hf(path, map_location)
    path = path if path.suffix == ".mdl" and path.is_file() else find_checkpoint(path)
    if is_hdf5(path):  # by content: Cerebras runs may write HDF5 under .ckpt names
        ckpt = _read_mdl(path)
    else:
        try:
            ckpt = load_checkpoint(path, "cpu")
        except (RuntimeError, ValueError, EOFError, OSError, AttributeError) as err:
            # torch reports truncated and foreign files cryptically
            raise ConversionError(
                f"cannot read {path} as a Lightning checkpoint ({type(err).__name__}: {err}); "
                "give a .ckpt written by `gigagpt fit`, a Cerebras .mdl, or a Hugging Face folder"
            ) from None
    hparams = ckpt.get("hyper_parameters") or {}
    if "config" not in hparams:
        raise ConversionError(
            f"{path} has no gigagpt hyperparameters (hyper_parameters.config); was it written by GPTModule?"
        )
    config = GPTConfig.from_dict(hparams["config"])
    return build_gpt(
        config, model_state_dict(ckpt["state_dict"]), source=str(path), map_location=map_location
    )
