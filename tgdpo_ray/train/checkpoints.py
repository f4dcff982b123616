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
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.model_files import weights_identity
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.job import JobConfig
from tgdpo_ray.common.files import resolve_filesystem

STATE_FILE = "state.json"
CONFIG_FILE = "config.json"  # the job config the checkpoint was made under (rank 0 writes it)

# What a resumed run may change: where and on what it runs, how far it goes, what it logs, keeps and evaluates.
# Any other key changes what its steps compute, so a checkpoint made under another value is not resumed. A key
# names itself and everything under it.
RESUMABLE_KEYS = (
    "kind", "run.resume", "run.on_config_change", "run.output_dir", "run.checkpoint_storage",
    "training.max_steps", "training.keep_checkpoints", "training.max_failures", "training.log_every",
    "training.checkpoint_every", "training.checkpoint_hf_export", "training.eval_every", "training.logp_chunk_size",
    "training.keep_best", "training.export",
    "policy.cpus_per_worker", "policy.node_labels", "policy.resources", "data.tokenize", "scoring", "tracking",
    "ray", "eval", "pairs",
    *(f"{scorer}.{key}" for scorer in ("reference", "guidance")
      for key in ("replicas", "cpus_per_replica", "gpus_per_replica", "batch_size", "node_labels", "resources")),
)


def checkpoint_storage(config: JobConfig) -> tuple[str, str]:
    """(storage_path, name) for Ray Train's RunConfig: the run's checkpoints go to <storage_path>/<name>/."""
    return config.run.checkpoint_storage or str(RunDir(config.run_dir).checkpoints), config.run.name


def delete_checkpoints(config: JobConfig) -> None:
    """Deletes the run's checkpoints and Ray Train's record of them, so that the run starts afresh
    (run.resume: false): Ray Train would otherwise hand the latest one to the new run's workers."""
    import pyarrow.fs

    filesystem, folder = run_checkpoint_folder(config)
    if filesystem.get_file_info(folder).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(folder)


def run_checkpoint_folder(config: JobConfig):
    """(pyarrow filesystem, path inside it) of the run's folder in its checkpoint storage."""
    storage, name = checkpoint_storage(config)
    filesystem, path = resolve_filesystem(storage)
    return filesystem, f"{path.rstrip('/')}/{name}"


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


class CheckpointSpaceError(UserError, RuntimeError):
    """A checkpoint that cannot fit on its disk, refused before the save starts."""


def save_checkpoint(engine, state: dict, config: dict, rank: int, also_write: Optional[Callable[[Path], None]] = None,
                    expected_bytes: int = 0, storage: Optional[Path] = None, metrics: Optional[dict] = None) -> int:
    """A collective call: every worker saves its DeepSpeed shard and RNG, rank 0 the state of the loop (with the
    ids of the pairs of its epoch already trained) and the job config (a dict) it was made under, and
    `also_write(folder)` adds what else every checkpoint holds (the Hugging Face export); then every worker reports
    its folder to Ray Train, which copies it to storage, with `metrics` (rank 0's are the ones Ray keeps).

    Free space is checked first: in the temporary folder for `expected_bytes` (this worker's previous checkpoint;
    at least AdamW's moments of its share of the weights), then in `storage`, when local, for what was written.
    Returns the bytes this worker wrote."""
    import ray.train

    name = checkpoint_name(state)
    what = f"checkpoint {name} (worker {rank}'s part)"
    require_space(Path(tempfile.gettempdir()), max(expected_bytes, least_checkpoint_bytes(engine, rank)), what)
    with tempfile.TemporaryDirectory(prefix="tgdpo-checkpoint-") as staging:
        # A LoRA policy's frozen base is not saved: the run loads it again from policy.model (check_resumable
        # refuses a base whose files changed).
        engine.save_checkpoint(staging, tag=name, save_latest=False, exclude_frozen_parameters=has_frozen(engine))
        folder = Path(staging) / name
        torch.save(rng_state(), folder / f"rng-rank{rank}.pt")
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(state))
            (folder / CONFIG_FILE).write_text(json.dumps(config))
        if also_write is not None:
            also_write(folder)
        written = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        if storage is not None:
            require_space(storage, written, what)
        # Returns once this worker's files are in storage; the checkpoint counts when every worker's are.
        ray.train.report({**(metrics or {}), "step": state["step"], "epoch": state["epoch"]},
                         checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
    return written


def has_frozen(engine) -> bool:
    """The policy has frozen weights (a LoRA base), which checkpoints leave out."""
    return any(not param.requires_grad for param in engine.module.parameters())


def least_checkpoint_bytes(engine, rank: int) -> int:
    """A lower bound of what this worker's checkpoint holds: AdamW's two fp32 moments of its share of the
    trainable weights (ZeRO 1-3 split them over the workers; without ZeRO rank 0 saves them all)."""
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    if engine.zero_optimization_stage() == 0:
        return 8 * trainable if rank == 0 else 0
    return 8 * trainable // engine.dp_world_size


def require_space(folder: Path, needed: int, what: str) -> None:
    """Refuses a save that cannot fit before it starts: a disk that fills half-way fails deep inside DeepSpeed or
    pyarrow, with a message that names neither the checkpoint nor the folder."""
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise CheckpointSpaceError(
            f"{what} needs about {needed / 2**30:.2f} GiB in {folder}, whose disk has {free / 2**30:.2f} GiB free: "
            "free some space, move the temporary folder (TMPDIR) or run.checkpoint_storage to a larger disk, or "
            "lower training.keep_checkpoints (0 saves none)")


def local_storage(config: JobConfig) -> Optional[Path]:
    """The run's checkpoint folder when its storage is a local path (None for object storage)."""
    storage, _ = checkpoint_storage(config)
    if "://" in storage and not storage.startswith("file://"):
        return None  # checked without resolving the URI, which for object storage reaches the network
    return Path(run_checkpoint_folder(config)[1])


def load_checkpoint(engine, rank: int) -> Optional[tuple[str, dict]]:
    """Loads the checkpoint Ray Train hands back (the latest complete one of this run) into `engine` and this
    worker's RNG; returns (where it is, the state of the loop it saved), or None when there is none."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as local:  # object storage: downloaded once per node
        folder = Path(local)
        engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=not has_frozen(engine))
        rng_file = folder / f"rng-rank{rank}.pt"
        if rng_file.exists():  # absent when the worker count changed: the seeds then start afresh
            restore_rng(torch.load(rng_file, weights_only=False))
        return checkpoint.path, json.loads((folder / STATE_FILE).read_text())


def latest_checkpoint(config: JobConfig):
    """Ray Train's record of the run's latest checkpoint (a Result with a checkpoint), or None when it has none:
    the same record that hands the latest checkpoint to the workers."""
    from ray.train import Result

    filesystem, folder = run_checkpoint_folder(config)
    try:
        result = Result.from_path(folder, storage_filesystem=filesystem)
    except (RuntimeError, OSError):  # no run folder or record yet, or a storage Ray Train will report on itself
        return None
    return result if result.checkpoint is not None else None


def finished_run(config: JobConfig) -> Optional[dict]:
    """The summary of this run when it has trained every epoch: its latest checkpoint goes on in the epoch after
    the last, and its summary.json, written at that same step, says it completed. None otherwise (max_steps
    stopped it, or it has no checkpoint)."""
    latest, summary_file = latest_checkpoint(config), RunDir(config.run_dir).summary
    if latest is None or int(latest.metrics["epoch"]) < config.training.epochs or not summary_file.exists():
        return None
    summary = json.loads(summary_file.read_text())
    return summary if summary.get("complete") and summary.get("steps") == latest.metrics["step"] else None


def resumed_epoch(config: JobConfig) -> int:
    """The epoch that the run's latest checkpoint goes on in, 0 when it has none: the trainers' stream starts
    there, so that a resumed run scores no pair of the epochs it finished."""
    latest = latest_checkpoint(config)
    # No checkpoint (or none Ray Train could read): a stream from the first epoch is right whatever the workers
    # resume from, only slower.
    return int(latest.metrics["epoch"]) if latest is not None else 0


def config_changes(saved: dict, config: JobConfig) -> list[str]:
    """'key: saved value -> value now' for every key of `config` that differs from the config dict `saved`,
    RESUMABLE_KEYS aside."""
    changes: list[str] = []

    def compare(before, now, key: str) -> None:
        if any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS):
            return
        if isinstance(before, dict) and isinstance(now, dict):
            for name in sorted(set(before) | set(now)):
                compare(before.get(name), now.get(name), f"{key}.{name}" if key else name)
        elif before != now:
            changes.append(f"{key}: {before!r} -> {now!r}")

    compare(saved, config.model_dump(mode="json"), "")
    return changes


class ChangedConfigError(UserError, RuntimeError):
    """A run folder's checkpoint made under another config, which the run would have resumed."""


def check_resumable(config: JobConfig, log=print) -> None:
    """Before a run resumes from its latest checkpoint: that checkpoint was made under this config, RESUMABLE_KEYS
    aside. Otherwise the run stops naming the keys that differ, or (run.on_config_change: restart) the
    checkpoints are deleted and the run starts over. A checkpoint from before configs were saved in them is
    resumed as it was."""
    import pyarrow.fs

    latest = latest_checkpoint(config)
    if latest is None:
        return
    filesystem = latest.checkpoint.filesystem
    saved_file = f"{latest.checkpoint.path}/{CONFIG_FILE}"
    if filesystem.get_file_info(saved_file).type == pyarrow.fs.FileType.NotFound:
        return
    with filesystem.open_input_stream(saved_file) as stream:
        saved = json.loads(stream.read())
    changes = config_changes(saved, config)
    if config.policy.lora is not None:
        with filesystem.open_input_stream(f"{latest.checkpoint.path}/{STATE_FILE}") as stream:
            before = json.loads(stream.read()).get("base_weights")
        now = weights_identity(config.policy.model)
        if before != now:  # the checkpoint holds adapters only: on another base they mean something else
            changes.append(f"the files of policy.model (the LoRA base): {str(before)[:12]} -> {now[:12]}")
    if not changes:
        return
    where = latest.checkpoint.path
    if config.run.on_config_change == "restart":
        log(f"[run] the checkpoints of {config.run.name!r} were made under another config ({'; '.join(changes)}): "
            "deleted, the run starts over")
        delete_checkpoints(config)
        return
    raise ChangedConfigError(
        f"run {config.run.name!r} would resume from {where}, made under another config: " + "; ".join(changes)
        + ". Run it with the config it was made under, start it over (run.resume=false), or let a changed "
        "config start it over (run.on_config_change=restart)")
