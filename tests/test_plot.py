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

    from gigagpt.commands import main as gigagpt_main

    out = tmp_path / "plots" / "curves.png"
    gigagpt_main(["plot", str(tmp_path), "--output", str(out)])
    width, height = png_size(out)
    assert (width, height) == (1080, 840)
    assert 20_000 < out.stat().st_size < 2_000_000


def test_plot_errors(tmp_path, capsys):
    from gigagpt.commands import main as gigagpt_main

    with pytest.raises(SystemExit, match="does not exist"):
        gigagpt_main(["plot", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no metrics.csv"):
        gigagpt_main(["plot", str(tmp_path)])


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from gigagpt.plot import _pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(RuntimeError, match=r"pip install 'gigagpt\[plot\]'"):
        _pyplot()


COLUMNS = ["epoch", "step", "train/loss", "train/lr", "train/tokens", "val/loss", "val/ppl"]


def write_version(root, n, train=(), val=()):
    """``<root>/logs/version_<n>/metrics.csv`` laid out as CSVLogger writes it: one row per logged step.

    ``train`` is ``[(step, loss)]`` (lr and tokens derived from the step), ``val`` ``[(step, loss)]``.
    """
    folder = root / "logs" / f"version_{n}"
    folder.mkdir(parents=True)
    lines = [",".join(COLUMNS)]
    for step, loss in train:
        lines.append(f"0,{step},{loss},{1e-3 * (step + 1)},{64 * (step + 1)},,")
    for step, loss in val:
        lines.append(f"0,{step},,,,{loss},{2.718281828 ** loss}")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder / "metrics.csv"


def test_evaluation_only_versions_are_left_out(tmp_path, capsys):
    """``gigagpt validate`` after training writes a version holding only val/loss at step 0."""
    pytest.importorskip("matplotlib")
    fit = write_version(tmp_path, 0, train=[(s, 5.0 - 0.2 * s) for s in range(10)], val=[(4, 4.5), (9, 3.5)])
    validate = write_version(tmp_path, 1, val=[(0, 3.5)])
    test = write_version(tmp_path, 2, val=[(0, 3.4)])

    curves = read_curves(tmp_path)
    assert curves.sources == [fit] and curves.skipped == [validate, test]
    assert curves.series("val/loss") == ([4, 9], [4.5, 3.5])
    assert curves.series("train/loss")[0] == list(range(10))

    from gigagpt.commands import main as gigagpt_main

    gigagpt_main(["plot", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"from {fit})" in printed
    assert "left out evaluation-only runs" in printed and str(validate) in printed and str(test) in printed
    assert png_size(tmp_path / "loss.png") == (1080, 840)

    only_eval = tmp_path / "eval_only"
    write_version(only_eval, 0, val=[(0, 3.5)])
    with pytest.raises(SystemExit, match="only from evaluation runs"):
        gigagpt_main(["plot", str(only_eval)])


def test_resumed_version_replaces_stale_steps(tmp_path):
    """Crashed at step 9 after the checkpoint of step 6: steps 7..9 of version_0 are stale."""
    write_version(tmp_path, 0, train=[(s, 10.0 + s) for s in range(10)], val=[(3, 20.0), (7, 21.0)])
    write_version(tmp_path, 1, train=[(s, 30.0 + s) for s in range(7, 12)], val=[(11, 40.0)])

    curves = read_curves(tmp_path)
    assert curves.series("train/loss") == (
        list(range(12)), [10.0 + s for s in range(7)] + [30.0 + s for s in range(7, 12)]
    )
    assert curves.series("val/loss") == ([3, 11], [20.0, 40.0])  # stale val at 7 is gone
    steps, lr = curves.series("train/lr")
    assert steps == list(range(12))
    assert curves.series("train/tokens")[1][-1] == 64 * 12


def test_fresh_run_in_same_folder_replaces_the_old_run(tmp_path):
    """``--resume never`` into the same folder: the new version starts at step 0 and runs 4 steps;
    nothing of the old, longer run may survive past them."""
    write_version(tmp_path, 0, train=[(s, 10.0) for s in range(20)], val=[(9, 11.0), (19, 12.0)])
    write_version(tmp_path, 1, train=[(s, 1.0) for s in range(4)], val=[(3, 2.0)])
    write_version(tmp_path, 2, val=[(0, 2.0)])  # and a validate run afterwards

    curves = read_curves(tmp_path)
    assert curves.series("train/loss") == ([0, 1, 2, 3], [1.0] * 4)
    assert curves.series("val/loss") == ([3], [2.0])
    assert curves.series("train/lr")[0] == [0, 1, 2, 3]
    assert curves.series("train/tokens")[0] == [0, 1, 2, 3]


def test_training_run_that_logged_only_validation_yet_is_plotted(tmp_path):
    """A fit with log_every_n_steps beyond its length: val/loss at several steps, no train/loss yet."""
    pytest.importorskip("matplotlib")
    write_version(tmp_path, 0, val=[(1, 5.0), (3, 4.0)])
    curves = read_curves(tmp_path)
    assert curves.skipped == [] and curves.series("val/loss") == ([1, 3], [5.0, 4.0])

    from gigagpt.commands import main as gigagpt_main

    gigagpt_main(["plot", str(tmp_path)])
    assert png_size(tmp_path / "loss.png") == (1080, 840)


def _drawn_figure(monkeypatch, *args):
    """Run ``gigagpt plot ARGS`` and return the figure it saved, drawn (tick labels computed)."""
    from matplotlib.figure import Figure

    from gigagpt.commands import main as gigagpt_main

    saved, original = [], Figure.savefig

    def keep(fig, *a, **kw):
        saved.append(fig)
        return original(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    gigagpt_main(["plot", *map(str, args)])
    fig = saved[-1]
    fig.canvas.draw()
    return fig


def test_steps_agree_with_checkpoint_names_and_ticks_are_readable(tmp_path, monkeypatch):
    """A 3-step run validated after its last step: Lightning logs that at CSV step 2, its checkpoint
    is step0000003.ckpt and TextSamples says "step 3": the figure says 3 too. Short runs get whole
    step numbers on the x axis, and a log loss axis plain numbers (no "6x10^0")."""
    pytest.importorskip("matplotlib")
    write_version(tmp_path, 0, train=[(s, 6.0 - 0.5 * s) for s in range(3)], val=[(0, 4.9), (2, 3.6)])
    fig = _drawn_figure(monkeypatch, tmp_path, "--log-y")
    ax_loss, ax_lr = fig.axes[:2]
    labels = [t.get_text() for t in ax_loss.texts]
    assert any(text.startswith("best val 3.600 @ step 3") for text in labels), labels
    train_line = ax_loss.get_lines()[0]
    assert list(train_line.get_xdata()) == [1, 2, 3]  # step k: after k optimizer steps
    ticks = [t for t in ax_lr.get_xticks() if ax_lr.get_xlim()[0] <= t <= ax_lr.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    y_labels = [t.get_text() for t in ax_loss.get_yticklabels() + ax_loss.get_yticklabels(minor=True)]
    shown = [text for text in y_labels if text]
    assert shown and not any("times" in text or "^" in text or "×" in text for text in shown), shown
