"""Where per-step metrics go: metrics.jsonl and TensorBoard always, Weights & Biases and MLflow when the job
config names them. Only rank 0 writes; the numbers it writes are already combined across workers."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tgdpo_ray.common.jsonl import append_records, read_records, rewrite_records
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.job import JobConfig


def memory_metrics() -> dict:
    """Host memory of this worker and, on a GPU, the peak allocated since the last call."""
    import psutil
    import torch

    metrics = {"host_memory_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available():
        metrics["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return metrics


@dataclass
class PoolTotals:
    """What one scorer pool has delivered, from its batch log lines ({time, pairs, tokens, seconds} each)."""

    pairs: int = 0
    start: float = math.inf  # the earliest batch's start
    end: float = -math.inf  # the latest batch's end
    busy_seconds: float = 0.0  # the pool's actors' own compute time, summed

    def add(self, batch: dict) -> None:
        self.pairs += batch["pairs"]
        self.start = min(self.start, batch["time"] - batch["seconds"])
        self.end = max(self.end, batch["time"])
        self.busy_seconds += batch["seconds"]

    @property
    def pairs_per_second(self) -> float:
        """Over the pool's span, from its first batch's start to its last batch's end."""
        return self.pairs / max(self.end - self.start, 1e-9)

    @property
    def pairs_per_busy_second(self) -> float:
        return self.pairs / max(self.busy_seconds, 1e-9)


class ScorerThroughput:
    """Each scorer pool's totals so far, from the pools' batch logs (<run_dir>/scoring/<pool>-<pid>.jsonl).
    Reads only the lines added since the last call: the cost per logged step stays flat over a long run."""

    def __init__(self, run_dir: Path):
        self.folder = RunDir(run_dir).scoring
        self.offsets: dict[Path, int] = {}
        self.pools: dict[str, PoolTotals] = {}

    def read(self) -> dict[str, PoolTotals]:
        for path in sorted(self.folder.glob("*.jsonl")):
            with open(path) as handle:
                handle.seek(self.offsets.get(path, 0))
                lines = handle.readlines()
            complete = [line for line in lines if line.endswith("\n")]  # a line being written waits
            self.offsets[path] = self.offsets.get(path, 0) + sum(len(line.encode()) for line in complete)
            pool = self.pools.setdefault(path.name.split("-")[0], PoolTotals())
            for batch in map(json.loads, complete):
                pool.add(batch)
        return self.pools

    def __call__(self) -> dict[str, float]:
        """The step record's fields: <pool>_pairs_per_second of every pool that has scored."""
        return {f"{name}_pairs_per_second": pool.pairs_per_second for name, pool in self.read().items()
                if pool.pairs}


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of a record, flattened: {"eval": {"loss": x}} -> {"eval/loss": x}."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
            flat[f"{prefix}{key}"] = value
    return flat


class MetricsLog:
    """Rank 0 appends one JSON line per step to <run_dir>/metrics.jsonl, mirrors it to the trackers and prints
    progress. A resumed run keeps the lines up to its checkpoint and drops those of the steps it trains again."""

    def __init__(self, config: JobConfig, rank: int, resumed_step: Optional[int] = None):
        self.rank = rank
        self.path = RunDir(config.run_dir).metrics
        self.writers = []
        if rank != 0:
            return
        kept = [] if resumed_step is None else [r for r in read_records(self.path) if r["step"] <= resumed_step]
        rewrite_records(self.path, kept)
        self.writers = open_trackers(config)

    def write(self, record: dict, console: Optional[str] = None) -> None:
        if self.rank != 0:
            return
        append_records(self.path, [record])
        values = scalars(record)
        for writer in self.writers:
            writer(values, record["step"])
        if console:
            print(console, flush=True)

    def close(self) -> None:
        for writer in self.writers:
            getattr(writer, "close", lambda: None)()


class TensorBoard:
    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def __call__(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_trackers(config: JobConfig) -> list:
    trackers = [TensorBoard(RunDir(config.run_dir).tensorboard)]
    tracking = config.tracking
    if tracking.wandb_project:
        import wandb

        run = wandb.init(project=tracking.wandb_project, entity=tracking.wandb_entity, name=config.run.name,
                         config=config.model_dump(mode="json"), resume="allow", id=config.run.name)
        trackers.append(lambda values, step: run.log(values, step=step))
    if tracking.mlflow_experiment:
        import mlflow

        if tracking.mlflow_tracking_uri:
            mlflow.set_tracking_uri(tracking.mlflow_tracking_uri)
        mlflow.set_experiment(tracking.mlflow_experiment)
        mlflow.start_run(run_name=config.run.name)
        trackers.append(lambda values, step: mlflow.log_metrics(
            {key.replace("/", "_"): value for key, value in values.items()}, step=step))
    return trackers
