"""Faults the tests inject into Ray workers (importable there: Ray puts the driver's working directory, the
repository root, on its workers' path)."""

import os
import signal
import time
from pathlib import Path


def kill_once_after(model, tokenizer, device, step: int, folder: str, registered: str) -> dict:
    """A training.probe (every: 1) that SIGKILLs its worker in the probe after optimizer step `step`, once: the
    run's first probe comes before step 1, so that is call step + 1; a restarted worker finds the mark and goes on.
    It first waits for `registered` (Ray Train's record of the run's checkpoints), which the controller writes
    a moment after a checkpoint's report: a kill before it would lose that checkpoint. Nothing of the policy is
    read: the run trains as it would without it."""
    calls, mark = Path(folder) / "calls", Path(folder) / "killed"
    count = len(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text("x" * count)
    if count == step + 1 and not mark.exists():
        deadline = time.monotonic() + 120
        while not Path(registered).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        mark.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return {"probe_calls": count}
