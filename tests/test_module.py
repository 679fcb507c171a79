"""GPTModule used through Lightning's Python API the way users combine its calls."""

from __future__ import annotations

import resume_harness as H
import torch


def test_validate_then_fit_on_the_same_module(builtin_bytes, tmp_path):
    """validate runs under inference mode; the val_loss metric's state must not stay an inference
    tensor that the next fit's validation then updates in place."""
    torch.set_num_threads(1)
    module, dm = H.make_module_and_data(builtin_bytes)
    trainer = H.make_trainer(tmp_path / "a", max_steps=4, val_check_interval=2)
    before = trainer.validate(module, dm, verbose=False)[0]["val/loss"]
    trainer = H.make_trainer(tmp_path / "b", max_steps=4, val_check_interval=2)
    trainer.fit(module, dm)
    assert trainer.global_step == 4
    after = trainer.callback_metrics["val/loss"].item()
    assert after < before
    # and once more the other way round, on the same Trainer
    assert trainer.validate(module, dm, verbose=False)[0]["val/loss"] == torch.tensor(after).item()
