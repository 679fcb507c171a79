"""Text samples during training: a short continuation of a fixed prompt every N steps.

Sampling draws from a private ``torch.Generator`` and the global RNG state is saved and restored
around it, so training's random stream (dropout) is the same with or without this callback and a
resumed run stays exact. The model is put back in training mode afterwards.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gigagpt.generate import generate
from gigagpt.tokenizer import get_tokenizer

_SAMPLING_DEVICES = ("cpu", "cuda", "mps")


class TextSamples(L.Callback):
    """Every ``every_n_steps`` optimizer steps, continue ``prompt`` and log the text.

    The text goes to the console, to TensorBoard (``samples`` text tab) and to
    ``<log dir>/samples.txt``. Only global rank 0 samples.

    Args:
        prompt: the fixed text to continue.
        every_n_steps: optimizer steps between samples (0 disables).
        max_new_tokens: length of each continuation.
        temperature, top_k: sampling settings (``temperature=0``: greedy).
        seed: seeds the private generator; the same step gives the same sample.
        tokenizer: ``"bytes"``, ``"gpt2"`` or a ``.tiktoken`` file; default: from the data's
            ``meta.json`` (the local ranks file it was prepared with, when that still exists),
            else from the vocabulary size (256: bytes).

    The tokenizer is loaded when training starts; if it cannot be (e.g. GPT-2's files offline),
    one warning says how to fix it and sampling is turned off: samples never stop a run.
    """

    def __init__(self, prompt: str = "\n", every_n_steps: int = 500, max_new_tokens: int = 64,
                 temperature: float = 0.8, top_k: int | None = 50, seed: int = 1234,
                 tokenizer: str | None = None):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"TextSamples every_n_steps must be >= 0, got {every_n_steps}")
        if max_new_tokens <= 0:
            raise ValueError(f"TextSamples max_new_tokens must be > 0, got {max_new_tokens}")
        self.prompt, self.every_n_steps, self.max_new_tokens = prompt, every_n_steps, max_new_tokens
        self.temperature, self.top_k, self.seed, self.tokenizer_spec = temperature, top_k, seed, tokenizer
        self.samples: list[tuple[int, str]] = []
        self._tokenizer = None
        self._disabled = False

    def _get_tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule):
        if self._tokenizer is None:
            spec = self.tokenizer_spec
            files = getattr(getattr(trainer, "datamodule", None), "files", None)
            if spec is None and files is not None:
                local = files.meta.get("tokenizer_file")
                spec = local if local and Path(local).is_file() else files.meta.get("tokenizer")
            if spec is None:
                spec = "bytes" if pl_module.config.vocab_size == 256 else "gpt2"
            self._tokenizer = get_tokenizer(spec)
        return self._tokenizer

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps or not trainer.is_global_zero:
            return
        try:
            self._get_tokenizer(trainer, pl_module)
        except Exception as err:  # offline, missing file, ...: a note, not the end of the run
            rank_zero_warn(
                f"TextSamples is turned off: its tokenizer could not be loaded ({err}). Set "
                "--samples.tokenizer to a local GPT-2 '.tiktoken' file (or GIGAGPT_GPT2_TIKTOKEN), "
                "or --samples.every_n_steps 0 to silence this"
            )
            self._disabled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._disabled or not self.every_n_steps or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if any(s == step for s, _ in self.samples):
            return
        model = getattr(pl_module, "model", None)
        device = next(model.parameters()).device if model is not None else None
        if device is None or device.type not in _SAMPLING_DEVICES:
            rank_zero_warn(f"TextSamples cannot sample on {device} during training; it is turned off")
            self._disabled = True
            return
        text = self.sample(trainer, pl_module, model, device)
        self.samples.append((step, text))
        self._log(trainer, step, text)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, model, device: torch.device) -> str:
        tokenizer = self._get_tokenizer(trainer, pl_module)
        ids = tokenizer.encode(self.prompt) or [tokenizer.eot_token]
        ids = ids[-model.config.max_position_embeddings + 1:]
        prompt = torch.tensor([ids], device=device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        was_training = model.training
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            try:
                out = generate(model, prompt, self.max_new_tokens, temperature=self.temperature,
                               top_k=self.top_k, generator=generator)
            finally:
                model.train(was_training)
        return tokenizer.decode([t for t in out[0, len(ids):].tolist() if t >= 0])

    def _log(self, trainer: L.Trainer, step: int, text: str) -> None:
        line = f"[sample @ step {step}] {self.prompt!r} -> {text!r}"
        bar = trainer.progress_bar_callback
        if bar is not None and bar.is_enabled:
            bar.print(line)  # on a line of its own above the bar, not behind the bar's line
        else:
            rank_zero_info(line)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", f"**{self.prompt}**{text}", global_step=step)
        log_dir = trainer.log_dir or trainer.default_root_dir
        if log_dir:
            path = Path(log_dir) / "samples.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"--- step {step}\n{self.prompt}{text}\n")
