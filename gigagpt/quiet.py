"""Known messages of the libraries under gigagpt that tell its user nothing they can act on.

Each is matched by its exact text (never a blanket ``ignore``), so any other warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path


class _DropLightningNotes(logging.Filter):
    """Lightning's advertisements for its cloud services (litlogger, litmodels) on every run, and its note
    that gigagpt's own model summary (``GPTSummary``) replaces the default one."""

    NOTES = ("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud",
             "Trainer already configured with model summary callbacks: [<class 'gigagpt.callbacks.summary.GPTSummary'>]")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


def quiet_known_noise() -> None:
    """Known messages that tell a gigagpt user nothing they can act on, each matched exactly."""
    # torch 2.13 deprecates LeafSpec, which Lightning 2.6's own pytree helper still builds.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningNotes())


def quiet_resumed_folder(folder: Path) -> None:
    """Lightning's "Checkpoint directory ... exists and is not empty", meant for a fresh run, for the
    folder a resumed run continues in."""
    warnings.filterwarnings("ignore", message=rf"Checkpoint directory {re.escape(str(Path(folder).resolve()))} "
                            "exists and is not empty")
