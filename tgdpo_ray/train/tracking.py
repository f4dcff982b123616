"""Where per-step metrics go: metrics.jsonl and TensorBoard always, Weights & Biases and MLflow when the job
config names them. Only rank 0 writes; the numbers it writes are already combined across workers."""

from __future__ import annotations

import json
import os
import uuid
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
        self.writers = open_trackers(config, resumed=resumed_step is not None)

    def write(self, record: dict, console: Optional[str] = None) -> None:
        if self.rank != 0:
            return
        append_records(self.path, [record])
        values = scalars(record)
        for writer in self.writers:
            writer(values, record["step"])
        if console:
            print(console, flush=True)

    def close(self, failed: bool = False) -> None:
        """Ends every tracker's run (as failed when the run raised), once."""
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close(failed)


class TensorBoard:
    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def __call__(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def open_trackers(config: JobConfig, resumed: bool) -> list:
    """TensorBoard always; W&B and MLflow when the config names them. Each run folder is one tracker run: its ids
    are kept in <run_dir>/tracking.json, so a resumed run (after a restart, or the same job submitted again)
    continues its own, and a run that starts over gets a new one."""
    trackers: list = [TensorBoard(RunDir(config.run_dir).tensorboard)]
    tracking = config.tracking
    if not (tracking.wandb_project or tracking.mlflow_experiment):
        return trackers
    ids_file = RunDir(config.run_dir).tracking
    ids = json.loads(ids_file.read_text()) if resumed and ids_file.exists() else {}
    if tracking.wandb_project:
        trackers.append(WandbRun(config, ids))
    if tracking.mlflow_experiment:
        trackers.append(MlflowRun(config, ids))
    ids_file.write_text(json.dumps(ids, indent=2))
    return trackers


def group_and_job_type(config: JobConfig) -> tuple[Optional[str], str]:
    """The tracker group (a pipeline's or an experiment's name; null for a lone run) and the stage."""
    return config.tracking.group, config.tracking.job_type or config.loss.type


class WandbRun:
    """One W&B run per run folder; its id is made here the first time and kept in `ids`."""

    def __init__(self, config: JobConfig, ids: dict):
        import wandb

        tracking = config.tracking
        group, job_type = group_and_job_type(config)
        ids.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        self.run = wandb.init(project=tracking.wandb_project, entity=tracking.wandb_entity, id=ids["wandb_run_id"],
                              resume="allow", name=config.run.name, group=group, job_type=job_type,
                              config=config.model_dump(mode="json"), dir=str(config.run_dir), reinit="create_new")

    def __call__(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowRun:
    """One MLflow run per run folder, started the first time and resumed by its id after; the group and the
    stage are tags (MLflow has no groups)."""

    def __init__(self, config: JobConfig, ids: dict):
        import mlflow

        tracking = config.tracking
        if tracking.mlflow_tracking_uri:
            mlflow.set_tracking_uri(tracking.mlflow_tracking_uri)
        mlflow.set_experiment(tracking.mlflow_experiment)
        group, job_type = group_and_job_type(config)
        tags = {"tgdpo_ray.job_type": job_type, **({"tgdpo_ray.group": group} if group else {})}
        resumed = ids.get("mlflow_run_id")
        run = mlflow.start_run(run_id=resumed, run_name=None if resumed else config.run.name, tags=tags)
        ids["mlflow_run_id"] = run.info.run_id
        self.mlflow = mlflow

    def __call__(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics({key.replace("/", "_"): value for key, value in values.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
