"""Reading trained weights back: Lightning checkpoints into a bare :class:`GPT`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gigagpt.model import GPT, GPTConfig


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or the newest ``last.ckpt`` under a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise FileNotFoundError(f"no .ckpt file under {str(path)!r}")
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, no code."""
    return torch.load(find_checkpoint(path), map_location=map_location, weights_only=True)


def model_state_dict(state_dict: dict, prefix: str = "model.") -> dict:
    """The GPT's own keys from a LightningModule state dict."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def check_shapes(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Raise a clear error naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key not in state_dict:
            problems.append(f"missing {key} {tuple(tensor.shape)}")
        elif tuple(state_dict[key].shape) != tuple(tensor.shape):
            problems.append(
                f"{key}: {source} has {tuple(state_dict[key].shape)}, model expects {tuple(tensor.shape)}"
            )
    problems += [f"unexpected {key}" for key in state_dict if key not in expected]
    if problems:
        listing = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(
            f"the {source} does not match the model configuration "
            f"({len(problems)} problems):\n  {listing}\n"
            "Use the model.config the checkpoint was trained with."
        )


def load_gpt(path: str | os.PathLike, map_location="cpu") -> GPT:
    """A :class:`GPT` rebuilt from a Lightning checkpoint's hyperparameters and weights."""
    ckpt = load_checkpoint(path, map_location)
    try:
        config = GPTConfig.from_dict(ckpt["hyper_parameters"]["config"])
    except KeyError:
        raise ValueError(f"{path} has no gigagpt hyperparameters; was it written by GPTModule?") from None
    with torch.device("meta"):
        model = GPT(config)
    weights = model_state_dict(ckpt["state_dict"])
    check_shapes(model, weights)
    model.load_state_dict(weights, assign=True)
    model.lm_head.weight = model.wte.weight  # re-tie after assign
    return model.to(map_location).eval()
