"""The job driver: validate and tokenize on the driver, start Ray, stream pairs through the scorer pools into
the Ray Train workers, and collect the run's summary."""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import torch

from tgdpo_ray.batches import count_micro_batches
from tgdpo_ray.config import JobConfig, dump_config
from tgdpo_ray.data import PreparedData, prepare_pairs
from tgdpo_ray.errors import UserError
from tgdpo_ray.models import load_tokenizer


class RunError(UserError, RuntimeError):
    """A run that failed inside Ray; the message carries the worker's own error."""


def prepare_data(config: JobConfig, log=print) -> tuple[int, PreparedData, PreparedData | None]:
    """Everything that can reject the input happens here, before any Ray resource starts."""
    tokenizer = load_tokenizer(config.policy.model, config.policy.trust_remote_code, config.data.chat_template)
    started = time.perf_counter()
    train = prepare_pairs(config.data.train, config.data, tokenizer, log)
    held_out = prepare_pairs(config.data.eval, config.data, tokenizer, log) if config.data.eval else None
    log(f"[data] {len(train.rows)} training pairs" + (f", {len(held_out.rows)} held-out pairs" if held_out else "")
        + f" tokenized in {time.perf_counter() - started:.1f}s")
    return tokenizer.pad_token_id, train, held_out


def start_ray(config: JobConfig) -> None:
    import ray

    # Ray Train's print patch echoes every worker line twice through the driver's log stream.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    if config.ray.address:
        ray.init(address=config.ray.address)
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus)


def resource_needs(config: JobConfig) -> dict[str, dict[str, float]]:
    """CPUs and GPUs each group holds at once (scorer pools at their minimum size)."""
    groups = {"policy": (config.policy.workers, config.policy.cpus_per_worker, config.policy.gpus_per_worker)}
    for name, section, needed in (("reference", config.reference, config.needs_reference),
                                  ("guidance", config.guidance, config.needs_guidance)):
        if needed:
            low = section.replicas if isinstance(section.replicas, int) else section.replicas[0]
            groups[name] = (low, section.cpus_per_replica, section.gpus_per_replica)
    return {name: {"CPU": n * cpus, "GPU": n * gpus} for name, (n, cpus, gpus) in groups.items()}


def check_fits_cluster(config: JobConfig) -> None:
    """Fail at once, saying what is missing, instead of waiting forever on actors that cannot be placed."""
    import ray

    available = ray.cluster_resources()
    needs = resource_needs(config)
    for resource in ("CPU", "GPU"):
        wanted = sum(group[resource] for group in needs.values())
        if wanted > available.get(resource, 0) + 1e-9:
            detail = ", ".join(f"{name} {group[resource]:g}" for name, group in needs.items() if group[resource])
            raise RunError(
                f"the job needs {wanted:g} {resource}s at once ({detail}) but the Ray cluster has "
                f"{available.get(resource, 0):g}; lower policy.workers, the replicas or the per-replica "
                f"resources, or add nodes"
            )


def torch_backend(config: JobConfig) -> str:
    """NCCL needs real GPUs and a CUDA build of torch; anything else (CPU, logical GPUs in tests) uses gloo."""
    if config.policy.backend != "auto":
        return config.policy.backend
    return "nccl" if config.policy.gpus_per_worker > 0 and torch.version.cuda else "gloo"


def uneven_split_config():
    """Ray Train's default split evens the shards by dropping up to world_size - 1 rows; ours drops none (the
    trainers pad with zero-weight micro-batches instead, see training.synced_micro_batches)."""
    from ray.train import DataConfig

    class UnevenSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            shards = [{} for _ in range(world_size)]
            for name, dataset in datasets.items():
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self._resolve_execution_options(name)
                splits = dataset.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
                for rank, split in enumerate(splits):
                    shards[rank][name] = split
            return shards

    return UnevenSplit()


def run_train(config: JobConfig, log=print) -> dict:
    """One training run; returns the summary that the trainer wrote to <run_dir>/summary.json."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tgdpo_ray.scoring import scored_dataset
    from tgdpo_ray.training import train_loop

    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "placement", ignore_errors=True)  # placement records are per run
    dump_config(config, run_dir / "config.yaml")
    pad_id, train, held_out = prepare_data(config, log)
    (run_dir / "data_report.json").write_text(
        json.dumps({"train": train.report(), "eval": held_out.report() if held_out else None}, indent=2)
    )
    per_step = config.policy.workers * config.training.gradient_accumulation_steps
    steps_per_epoch = math.ceil(count_micro_batches(train.rows, config.training.max_tokens_per_batch) / per_step)

    start_ray(config)
    check_fits_cluster(config)
    datasets = {"train": scored_dataset(train.rows, config, pad_id)}
    if held_out:
        datasets["eval"] = scored_dataset(held_out.rows, config, pad_id)
    policy = config.policy
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "has_eval": held_out is not None,
                           "total_steps": steps_per_epoch * config.training.epochs},
        scaling_config=ScalingConfig(
            num_workers=policy.workers,
            use_gpu=policy.gpus_per_worker > 0,
            resources_per_worker={"CPU": policy.cpus_per_worker, "GPU": policy.gpus_per_worker},
        ),
        torch_config=TorchConfig(backend=torch_backend(config)),
        datasets=datasets,
        dataset_config=uneven_split_config(),
        run_config=RunConfig(name=config.run.name, storage_path=str(run_dir / "ray_train")),
    )
    log(f"[run] {config.loss.type} on {policy.workers} policy worker(s), ZeRO-{policy.zero_stage}, "
        f"~{steps_per_epoch * config.training.epochs} optimizer steps; outputs in {run_dir}")
    started = time.perf_counter()
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; surface its message, keep the chain
        raise RunError(f"training run {config.run.name!r} failed: {err}") from err
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
