"""Training checkpoints: DeepSpeed state, RNG state and the position in the data, saved so that a resume trains
every pair of an epoch exactly once, and stored by Ray Train (local, NFS or object storage).

A save is a collective call: every worker writes its part into a local temporary folder (DeepSpeed's files for
its rank, rng-rank<N>.pt, and on rank 0 state.json: the step, the epoch, the ids of the pairs of that epoch
already trained) and reports it with ray.train.report(checkpoint=...). Ray Train copies every worker's folder into
one checkpoint folder in its storage (the file names differ from rank to rank, so nothing is overwritten) and
registers the checkpoint only when every worker's copy has finished: a save that died half-way is never handed
back. Ray keeps the newest `training.keep_checkpoints` and records them in the storage, so workers restarted after
a failure and a new run of the same job (same storage, same run name) get the latest from ray.train.get_checkpoint.

Layout: <run.checkpoint_storage or <run_dir>/checkpoints>/<run.name>/step-00000012-epoch-0/, beside Ray Train's
record of the run's checkpoints (checkpoint_manager_snapshot.json).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from tgdpo_ray.cache import resolve_filesystem
from tgdpo_ray.config import JobConfig

STATE_FILE = "state.json"


def checkpoint_storage(config: JobConfig) -> tuple[str, str]:
    """(storage_path, name) for Ray Train's RunConfig: the run's checkpoints go to <storage_path>/<name>/."""
    return config.run.checkpoint_storage or str(config.run_dir / "checkpoints"), config.run.name


def delete_checkpoints(config: JobConfig) -> None:
    """Deletes the run's checkpoints and Ray Train's record of them, so that the run starts afresh
    (run.resume: false): Ray Train would otherwise hand the latest one to the new run's workers."""
    import pyarrow.fs

    storage, name = checkpoint_storage(config)
    filesystem, path = resolve_filesystem(storage)
    folder = f"{path.rstrip('/')}/{name}"
    if filesystem.get_file_info(folder).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(folder)


def checkpoint_name(state: dict) -> str:
    """The step and the epoch the run goes on in: a step that ends an epoch can be saved twice (checkpoint_every,
    then the epoch's end, whose state has moved on to the next epoch), and each checkpoint needs its own folder."""
    return f"step-{state['step']:08d}-epoch-{state['epoch']}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, state: dict, rank: int, also_write: Optional[Callable[[Path], None]] = None) -> None:
    """A collective call: every worker saves its DeepSpeed shard and RNG, rank 0 the state of the loop (with the
    ids of the pairs of its epoch already trained), and `also_write(folder)` adds what else every checkpoint holds
    (the Hugging Face export); then every worker reports its folder to Ray Train, which copies it to storage."""
    import ray.train

    name = checkpoint_name(state)
    with tempfile.TemporaryDirectory(prefix="tgdpo-checkpoint-") as staging:
        engine.save_checkpoint(staging, tag=name, save_latest=False)
        folder = Path(staging) / name
        torch.save(rng_state(), folder / f"rng-rank{rank}.pt")
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(state))
        if also_write is not None:
            also_write(folder)
        # Returns once this worker's files are in storage; the checkpoint counts when every worker's are.
        ray.train.report({"step": state["step"], "epoch": state["epoch"]},
                         checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def load_checkpoint(engine, rank: int) -> Optional[tuple[str, dict]]:
    """Loads the checkpoint Ray Train hands back (the latest complete one of this run) into `engine` and this
    worker's RNG; returns (where it is, the state of the loop it saved), or None when there is none."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as local:  # object storage: downloaded once per node
        folder = Path(local)
        engine.load_checkpoint(str(folder.parent), tag=folder.name)
        rng_file = folder / f"rng-rank{rank}.pt"
        if rng_file.exists():  # absent when the worker count changed: the seeds then start afresh
            restore_rng(torch.load(rng_file, weights_only=False))
        return checkpoint.path, json.loads((folder / STATE_FILE).read_text())


def resumed_epoch(config: JobConfig) -> int:
    """The epoch that the run's latest checkpoint goes on in, 0 when it has none: the trainers' stream starts
    there, so that a resumed run scores no pair of the epochs it finished. Read from Ray Train's record of the
    run's checkpoints, the same record that hands the latest one to the workers."""
    from ray.train import Result

    storage, name = checkpoint_storage(config)
    filesystem, path = resolve_filesystem(storage)
    try:
        result = Result.from_path(f"{path.rstrip('/')}/{name}", storage_filesystem=filesystem)
    except RuntimeError:  # no run folder, or no record of its checkpoints yet
        return 0
    return int(result.metrics["epoch"]) if result.checkpoint is not None else 0
