"""``gigagpt plot``: a PNG of loss and learning rate from a real short run's CSV logs."""

from __future__ import annotations

import struct

import pytest
import resume_harness as H

from gigagpt.plot import read_curves


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND", "PNG is truncated"
    return struct.unpack(">II", data[16:24])


def test_plot_real_run_including_a_resume(builtin_bytes, tmp_path):
    """A run interrupted at step 7 and resumed: two CSV versions merged into one figure."""
    pytest.importorskip("matplotlib")
    import lightning as L

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 7:
                raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        H.fit(tmp_path, builtin_bytes, 12, callbacks=[Stop()])
    H.fit(tmp_path, builtin_bytes, 12, ckpt_path="last")
    curves = read_curves(tmp_path)
    assert len(curves.sources) == 2
    steps, losses = curves.series("train/loss")
    assert steps == list(range(12)) and all(0 < v < 10 for v in losses)
    assert curves.series("val/loss")[0] == [3, 7, 11]
    assert len(curves.series("train/lr")[0]) == 12

    from gigagpt.cli import cli_main

    out = tmp_path / "plots" / "curves.png"
    cli_main(["plot", str(tmp_path), "--output", str(out)])
    width, height = png_size(out)
    assert (width, height) == (1080, 840)
    assert 20_000 < out.stat().st_size < 2_000_000


def test_plot_errors(tmp_path, capsys):
    from gigagpt.cli import cli_main

    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["plot", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no metrics.csv"):
        cli_main(["plot", str(tmp_path)])


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from gigagpt.plot import _pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(RuntimeError, match=r"pip install 'gigagpt\[plot\]'"):
        _pyplot()
