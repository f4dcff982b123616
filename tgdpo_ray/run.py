"""The job driver: validate and tokenize on the driver, start Ray, stream pairs through the scorer pools into
the Ray Train workers, and collect the run's summary."""

from __future__ import annotations

import json
import shutil
import time
from functools import partial

import numpy as np

from tgdpo_ray.cluster import check_fits, start_ray, torch_backend, training_groups
from tgdpo_ray.config import SCORED_GUIDANCE, JobConfig
from tgdpo_ray.config_loader import dump_config
from tgdpo_ray.data import PreparedData, prepare_pairs
from tgdpo_ray.errors import UserError
from tgdpo_ray.models import check_models_agree, load_tokenizer
from tgdpo_ray.steps import epoch_dataset, in_epoch_order, plan_steps


class RunError(UserError, RuntimeError):
    """A run that failed inside Ray; the message carries the worker's own error."""


def prepare_data(config: JobConfig, log=print) -> tuple[int, PreparedData, PreparedData | None]:
    """Everything that can reject the input happens here, before any Ray resource starts."""
    tokenizer = load_tokenizer(config.policy.model, config.policy.trust_remote_code, config.data.chat_template)
    started = time.perf_counter()
    rewards = config.guidance.reward_columns if config.guidance_kind == "column" else None
    train = prepare_pairs(config.data.train, config.data, tokenizer, log, rewards)
    held_out = prepare_pairs(config.data.eval, config.data, tokenizer, log, rewards) if config.data.eval else None
    log(f"[data] {len(train.rows)} training pairs" + (f", {len(held_out.rows)} held-out pairs" if held_out else "")
        + f" tokenized in {time.perf_counter() - started:.1f}s")
    return tokenizer.pad_token_id, train, held_out


def uses_scorers(config: JobConfig) -> bool:
    """A reference or guidance scorer pool runs (a loss without one has nothing to score or cache)."""
    return config.needs_reference or config.guidance_kind in SCORED_GUIDANCE


def reads_cache(config: JobConfig) -> bool:
    return config.scoring.mode == "cache" and uses_scorers(config)


def scored_pairs(rows: list, config: JobConfig, pad_id: int, split: str, log=print):
    """The stream the trainers read: scored on the fly, or from the cache (scored into it first if missing)."""
    from tgdpo_ray.cache import cached_scored_dataset
    from tgdpo_ray.scoring import configure_ray_data, scored_dataset

    configure_ray_data()
    if reads_cache(config):
        return cached_scored_dataset(rows, config, pad_id, split, log)
    return scored_dataset(rows, config, pad_id)


def epoch_streams(rows: list, orders: list[list], config: JobConfig, pad_id: int, log=print) -> dict:
    """One scored dataset per epoch, each in its epoch's order (`orders`, steps.in_epoch_order): streamed pairs
    enter the scorers in that order; cached pairs are sorted into it."""
    if not reads_cache(config):
        return {epoch_dataset(epoch): scored_pairs(ordered, config, pad_id, "train", log)
                for epoch, ordered in enumerate(orders)}
    cached = scored_pairs(rows, config, pad_id, "train", log)
    streams = {}
    for epoch, ordered in enumerate(orders):
        ids = np.array([row["pair_id"] for row in ordered])
        places = np.argsort(ids)  # the place in `ordered` of each id, ids sorted
        streams[epoch_dataset(epoch)] = cached.map_batches(
            partial(with_places, ids=ids[places], places=places), batch_format="pyarrow").sort("place")
    return streams


def with_places(table, ids: np.ndarray, places: np.ndarray):
    """Adds each pair's place in the epoch's order (a `place` column) to a block of scored pairs; `ids` sorted."""
    import pyarrow as pa

    index = np.searchsorted(ids, table["pair_id"].to_numpy())
    return table.append_column("place", pa.array(places[index]))


def start_run_dir(config: JobConfig, log=print) -> tuple[int, PreparedData, PreparedData | None]:
    """Creates the run folder with the config and the data report; returns the prepared data."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for per_run in ("placement", "scoring"):  # records of this run's processes only
        shutil.rmtree(run_dir / per_run, ignore_errors=True)
    dump_config(config, run_dir / "config.yaml")
    pad_id, train, held_out = prepare_data(config, log)
    (run_dir / "data_report.json").write_text(
        json.dumps({"train": train.report(), "eval": held_out.report() if held_out else None}, indent=2)
    )
    return pad_id, train, held_out


def run_score(config: JobConfig, log=print) -> dict:
    """Scoring alone, into the cache: a team can score on spare GPUs and train later."""
    if not uses_scorers(config):
        raise RunError(f"loss.type {config.loss.type} uses no scorer: there is nothing to score")
    config = config.model_copy(update={"scoring": config.scoring.model_copy(update={"mode": "cache"})})
    check_models_agree(config)
    pad_id, train, held_out = start_run_dir(config, log)
    start_ray(config)
    check_fits(training_groups(config, with_policy=False))
    splits = {"train": train} | ({"eval": held_out} if held_out else {})
    counts = {split: scored_pairs(data.rows, config, pad_id, split, log).count() for split, data in splits.items()}
    log(f"[score] cached {counts} in {config.scoring.cache_dir}")
    return {"pairs": counts, "cache_dir": config.scoring.cache_dir}


def run_train(config: JobConfig, log=print) -> dict:
    """One training run; returns the summary that the trainer wrote to <run_dir>/summary.json."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tgdpo_ray.checkpoints import checkpoint_storage, delete_checkpoints
    from tgdpo_ray.training import train_loop

    run_dir = config.run_dir
    # Here, not at config load: a pipeline's guidance model is its DPO stage's output, made during the run.
    check_models_agree(config)
    pad_id, train, held_out = start_run_dir(config, log)
    training = config.training
    orders = [in_epoch_order(train.rows, config.run.seed, epoch, training.shuffle) for epoch in range(training.epochs)]
    # The schedule's length, whatever max_steps stops at: every epoch's plan counted here.
    total_steps = sum(sum(1 for _ in plan_steps(ordered, training, config.policy.workers)) for ordered in orders)

    start_ray(config)
    check_fits(training_groups(config))
    datasets = epoch_streams(train.rows, orders, config, pad_id, log)
    if held_out:
        datasets["eval"] = scored_pairs(held_out.rows, config, pad_id, "eval", log)
    if not config.run.resume:
        delete_checkpoints(config)
    storage_path, name = checkpoint_storage(config)
    policy = config.policy
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "has_eval": held_out is not None,
                           "total_steps": total_steps},
        scaling_config=ScalingConfig(
            num_workers=policy.workers,
            use_gpu=policy.gpus_per_worker > 0,
            resources_per_worker={"CPU": policy.cpus_per_worker, "GPU": policy.gpus_per_worker,
                                  **policy.resources},
            label_selector=policy.node_labels or None,
        ),
        torch_config=TorchConfig(backend=torch_backend(config)),
        datasets=datasets,
        # No dataset is split: rank 0 alone reads each one and deals every step's micro-batches to the workers
        # (steps.py), so which pairs train in which step depends on the seed and the data, never on timing.
        dataset_config=DataConfig(datasets_to_split=[]),
        # Ray Train stores the checkpoints, keeps the newest few and hands the latest to restarted workers and
        # to a new run of the same job (checkpoints.py).
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=training.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.training.max_failures)),
    )
    log(f"[run] {config.loss.type} on {policy.workers} policy worker(s), ZeRO-{policy.zero_stage}, "
        f"{total_steps} optimizer steps; outputs in {run_dir}")
    started = time.perf_counter()
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; surface its message, keep the chain
        raise RunError(f"training run {config.run.name!r} failed: {err}") from err
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
