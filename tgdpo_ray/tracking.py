"""Where per-step metrics go: metrics.jsonl and TensorBoard always, Weights & Biases and MLflow when the job
config names them. Only rank 0 writes; the numbers it writes are already combined across workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from tgdpo_ray.config import JobConfig


def memory_metrics() -> dict:
    """Host memory of this worker and, on a GPU, the peak allocated since the last call."""
    import psutil

    metrics = {"host_memory_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available():
        metrics["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return metrics


class ScorerThroughput:
    """Pairs per second each scorer pool has delivered so far, from the pools' batch logs (scoring/*.jsonl).
    Reads only the lines added since the last call: the cost per logged step stays flat over a long run."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / "scoring"
        self.offsets: dict[Path, int] = {}
        self.pools: dict[str, dict] = {}  # pool -> pairs, first start, last end

    def __call__(self) -> dict[str, float]:
        for path in sorted(self.folder.glob("*.jsonl")):
            with open(path) as handle:
                handle.seek(self.offsets.get(path, 0))
                lines = handle.readlines()
            complete = [line for line in lines if line.endswith("\n")]  # a line being written waits
            self.offsets[path] = self.offsets.get(path, 0) + sum(len(line.encode()) for line in complete)
            pool = self.pools.setdefault(path.name.split("-")[0], {"pairs": 0, "start": None, "end": None})
            for batch in map(json.loads, complete):
                pool["pairs"] += batch["pairs"]
                start = batch["time"] - batch["seconds"]
                pool["start"] = start if pool["start"] is None else min(pool["start"], start)
                pool["end"] = batch["time"] if pool["end"] is None else max(pool["end"], batch["time"])
        return {f"{name}_pairs_per_second": pool["pairs"] / max(pool["end"] - pool["start"], 1e-9)
                for name, pool in self.pools.items() if pool["pairs"]}


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
        self.path = config.run_dir / "metrics.jsonl"
        self.writers = []
        if rank != 0:
            return
        kept = []
        if resumed_step is not None and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= resumed_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.writers = open_trackers(config)

    def write(self, record: dict, console: Optional[str] = None) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
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
    trackers = [TensorBoard(config.run_dir / "tensorboard")]
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
