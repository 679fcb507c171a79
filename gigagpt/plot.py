"""``gigagpt plot <run dir>``: train/val loss and learning rate against steps (and tokens), as a PNG.

Reads every ``metrics.csv`` that Lightning's CSVLogger wrote under the run folder (one ``version_N``
folder per ``gigagpt fit``, ``validate`` or ``test``) and splices them, in version order, into one
continuous run:

- an evaluation-only version (``validate`` / ``test``: no ``train/`` value, and all its values
  at one step) is left out of the curves and listed in :attr:`Curves.skipped`;
- a training version whose first logged step is ``s`` first drops every value (all series)
  that earlier versions logged at steps ``>= s``, then adds its own. A run resumed from the
  checkpoint of step ``k`` thus replaces the stale steps ``> k`` its crashed predecessor logged
  after that checkpoint, and a fresh run (``--resume never``) into the same folder, starting at
  step 0, replaces the old run entirely.

The figure numbers steps as the checkpoints (``step0000300.ckpt``) and text samples ("sample @ step
300") do: step ``k`` is the state after ``k`` optimizer steps. Lightning logs the values of that
step under CSV step ``k - 1`` (:class:`Curves` keeps the CSV's numbers; :func:`done_steps` converts).

matplotlib is an optional extra: ``pip install 'gigagpt[plot]'``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SERIES = ("train/loss", "val/loss", "train/lr", "train/tokens")


@dataclass
class Curves:
    """``name -> {step: value}`` for the series of :data:`SERIES` found in a run."""

    values: dict[str, dict[int, float]] = field(default_factory=lambda: {name: {} for name in SERIES})
    sources: list[Path] = field(default_factory=list)  # the training versions spliced into the curves
    skipped: list[Path] = field(default_factory=list)  # evaluation-only versions (no train/loss)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        points = sorted(self.values.get(name, {}).items())
        return [s for s, _ in points], [v for _, v in points]


def _version_key(path: Path) -> tuple:
    match = re.search(r"version_(\d+)", str(path))
    return (int(match.group(1)) if match else -1, path.stat().st_mtime, str(path))


def find_metric_files(run_dir: str | os.PathLike) -> list[Path]:
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".csv":
        return [run_dir]
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    files = sorted(run_dir.rglob("metrics.csv"), key=_version_key)
    if not files:
        raise FileNotFoundError(
            f"no metrics.csv under {str(run_dir)!r}; train with a CSVLogger "
            "(configs/tiny.yaml has one: trainer.logger lightning.pytorch.loggers.CSVLogger)"
        )
    return files


def _read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """``name -> {step: value}`` of one ``metrics.csv``; within a file a later row wins."""
    values: dict[str, dict[int, float]] = {name: {} for name in SERIES}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for name in SERIES:
                value = row.get(name)
                if value not in (None, ""):
                    number = float(value)
                    if math.isfinite(number):
                        values[name][int(float(step))] = number
    return values


def read_curves(run_dir: str | os.PathLike) -> Curves:
    """Splice the ``metrics.csv`` versions under ``run_dir`` into one run.

    Versions are read in order (``version_N`` number, then modification time). An evaluation-only
    version (``gigagpt validate`` / ``test``: no ``train/`` value, all its values at one step) is
    skipped. A training version whose first logged step is ``s`` first removes every earlier value, of every series, at steps
    ``>= s``, then adds its own values: what a resumed or restarted run logged replaces whatever an
    earlier version had logged from that step on, including stale steps past the earlier
    version's last checkpoint.
    """
    curves = Curves()
    for path in find_metric_files(run_dir):
        values = _read_metrics(path)
        steps = {step for series in values.values() for step in series}
        if not steps or (not any(values[name] for name in SERIES if name.startswith("train/")) and len(steps) == 1):
            curves.skipped.append(path)
            continue
        curves.sources.append(path)
        first = min(steps)
        for name in SERIES:
            kept = {step: v for step, v in curves.values[name].items() if step < first}
            kept.update(values[name])
            curves.values[name] = kept
    if not curves.values["train/loss"] and not curves.values["val/loss"]:
        if curves.skipped:
            raise ValueError(
                f"the metrics under {str(run_dir)!r} come only from evaluation runs (validate / test), "
                "which hold no train/loss values: "
                + ", ".join(str(p) for p in curves.skipped)
            )
        raise ValueError(f"the metrics under {str(run_dir)!r} hold no train/loss or val/loss values yet")
    return curves


def done_steps(csv_steps: list[int]) -> list[int]:
    """Optimizer steps done for the CSV's step numbers: Lightning logs step ``k``'s values at ``k - 1``."""
    return [step + 1 for step in csv_steps]


def _readable_axes(ax_loss, ax_lr, log_y: bool) -> None:
    """Whole step numbers on the x axis; plain numbers ("6", not "6x10^0") on a log loss axis."""
    from matplotlib.ticker import LogFormatter, MaxNLocator

    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_y:
        ax_loss.set_yscale("log")
        ax_loss.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax_loss.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise RuntimeError(
            "gigagpt plot needs matplotlib: pip install 'gigagpt[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, title: str | None = None,
         log_y: bool = False, curves: Curves | None = None) -> Path:
    """Write the loss / learning-rate figure of ``run_dir`` to ``output`` (default ``<run_dir>/loss.png``).

    ``curves`` defaults to :func:`read_curves` of ``run_dir`` (see there for how versions are spliced).
    """
    curves = curves if curves is not None else read_curves(run_dir)
    plt = _pyplot()
    run_dir = Path(run_dir)
    output = Path(output) if output else (run_dir if run_dir.is_dir() else run_dir.parent) / "loss.png"

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.3]})
    steps, loss = curves.series("train/loss")
    steps = done_steps(steps)
    if steps:
        ax_loss.plot(steps, loss, color="tab:blue", linewidth=1.0, alpha=0.85, label="train")
    vsteps, vloss = curves.series("val/loss")
    vsteps = done_steps(vsteps)
    if vsteps:
        ax_loss.plot(vsteps, vloss, color="tab:orange", marker="o", markersize=3.5, linewidth=1.5, label="val")
        best = min(range(len(vloss)), key=vloss.__getitem__)
        ax_loss.annotate(f"best val {vloss[best]:.3f} @ step {vsteps[best]}", (vsteps[best], vloss[best]),
                         textcoords="offset points", xytext=(0, 10), ha="center", fontsize=8)
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    ax_loss.set_title(title or f"{run_dir.resolve().name}")

    tsteps, tokens = curves.series("train/tokens")
    tsteps = done_steps(tsteps)
    if len(tsteps) >= 2 and tsteps[-1] > tsteps[0]:
        # tokens grow linearly with steps: a secondary axis converts one into the other
        per_step = (tokens[-1] - tokens[0]) / (tsteps[-1] - tsteps[0])
        offset = tokens[0] - per_step * tsteps[0]
        top = ax_loss.secondary_xaxis("top", functions=(lambda s: s * per_step + offset,
                                                         lambda t: (t - offset) / per_step))
        top.set_xlabel("tokens")

    lsteps, lr = curves.series("train/lr")
    lsteps = done_steps(lsteps)
    if lsteps:
        ax_lr.plot(lsteps, lr, color="tab:green", linewidth=1.2)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    _readable_axes(ax_loss, ax_lr, log_y)
    fig.tight_layout()

    from gigagpt.checkpoint import atomic_write

    atomic_write(output, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (e.g. runs/tiny) or one metrics.csv")
    parser.add_argument("--output", "-o", default=None, help="PNG to write (default: <run_dir>/loss.png)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")


def main(args: argparse.Namespace) -> Path:
    curves = read_curves(args.run_dir)
    path = plot(args.run_dir, args.output, args.title, args.log_y, curves=curves)
    curves_from = ", ".join(str(p) for p in curves.sources)
    print(f"wrote {path} (from {curves_from})")
    if curves.skipped:
        print("left out evaluation-only runs (validate / test, no train/loss): "
              + ", ".join(str(p) for p in curves.skipped))
    return path
