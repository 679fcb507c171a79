"""``gigagpt fit`` as it runs for users, with two test hooks for the fault tests (``test_faults.py``).

Every finished optimizer step and every checkpoint write is announced in the file named by
``GIGAGPT_FAULT_LOG`` (``step N``; ``write-begin PATH``, ``write-half PATH``, ``write-end PATH``, where
PATH is the temporary file being written), and each checkpoint's bytes go out in 8 slices 30 ms
apart, so the test can ``kill -9`` the process at a chosen step or in the middle of a chosen write.
Nothing else differs from ``python -m gigagpt fit ...``.
"""

from __future__ import annotations

import io
import os
import sys
import time

import torch

from gigagpt.checkpoint import AtomicCheckpointIO
from gigagpt.module import GPTModule

LOG = os.environ["GIGAGPT_FAULT_LOG"]


def announce(line: str) -> None:
    with open(LOG, "a") as f:
        f.write(line + "\n")


def slow_write(self, checkpoint, f) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    announce(f"write-begin {f.name}")
    step = -(-len(data) // 8)
    for i in range(0, len(data), step):
        f.write(data[i: i + step])
        f.flush()
        if i == 4 * step:
            announce(f"write-half {f.name}")
        time.sleep(0.03)
    announce(f"write-end {f.name}")


def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
    announce(f"step {self.trainer.global_step}")


AtomicCheckpointIO.write = slow_write
GPTModule.on_train_batch_end = on_train_batch_end

if __name__ == "__main__":
    from gigagpt.commands import main

    sys.argv = ["gigagpt", *sys.argv[1:]]
    main()
