"""Training checkpoints: DeepSpeed state, RNG state and the position in the data, written so that a resume
trains every pair of an epoch exactly once.

Layout: <run_dir>/checkpoints/step-00000012/ holds DeepSpeed's files (model, optimizer, scheduler), one
rng-rank<N>.pt per worker and, written last by rank 0, state.json: the step, the epoch, and the ids of the
pairs of that epoch already trained. A folder without state.json is a checkpoint whose writer died: it is
ignored with a warning, never loaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "state.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path, warn=print) -> list[Path]:
    """Complete checkpoint folders, oldest first; half-written ones are reported and skipped."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    complete = []
    for folder in folders:
        try:
            json.loads((folder / STATE_FILE).read_text())
            complete.append(folder)
        except (OSError, ValueError):
            warn(f"[checkpoint] ignoring {folder}: no readable {STATE_FILE} (a save that did not finish)")
    return complete


def latest_checkpoint(run_dir: Path, warn=print) -> Optional[tuple[Path, dict]]:
    folders = complete_checkpoints(run_dir, warn)
    if not folders:
        return None
    return folders[-1], json.loads((folders[-1] / STATE_FILE).read_text())


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, run_dir: Path, state: dict, keep: int, rank: int) -> Path:
    """A collective call: every worker saves its DeepSpeed shard and RNG; rank 0 seals it with state.json (the
    state of the loop, with the ids of the pairs of its epoch already trained)."""
    root = checkpoint_root(run_dir)
    tag = f"step-{state['step']:08d}"
    folder = root / tag
    if rank == 0 and folder.exists():
        shutil.rmtree(folder)  # a half-written save of this very step, from a run that died
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")
    dist.barrier()  # every shard is written before state.json seals the folder
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(state))
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def load_checkpoint(engine, folder: Path, rank: int) -> None:
    engine.load_checkpoint(str(folder.parent), tag=folder.name)
    rng_file = folder / f"rng-rank{rank}.pt"
    if rng_file.exists():  # absent when the worker count changed: the seeds then start afresh
        restore_rng(torch.load(rng_file, weights_only=False))
