"""The job driver: start Ray, validate and tokenize on Ray Data's CPU workers (data_pass.py), stream pairs
through the scorer pools into the Ray Train workers, and collect the run's summary. The driver holds counts and
token lengths, never tokens."""

from __future__ import annotations

import json
import shutil
import time
from functools import partial

import numpy as np

from tgdpo_ray.cluster import check_fits, start_ray, torch_backend, training_groups
from tgdpo_ray.config import SCORED_GUIDANCE, JobConfig
from tgdpo_ray.config_loader import dump_config
from tgdpo_ray.data_pass import TokenizedSplit, tokenize_split
from tgdpo_ray.errors import UserError
from tgdpo_ray.models import check_models_agree, load_tokenizer
from tgdpo_ray.steps import epoch_dataset, epoch_order, epoch_shape


class RunError(UserError, RuntimeError):
    """A run that failed inside Ray; the message carries the worker's own error."""


def prepare_data(config: JobConfig, log=print) -> tuple[int, TokenizedSplit, TokenizedSplit | None]:
    """The tokenization pass over the training and held-out sources (Ray started, no scorer or trainer yet):
    everything that can reject the input happens here, before any GPU is held."""
    pad_id = load_tokenizer(config.policy.model, config.policy.trust_remote_code).pad_token_id
    train = tokenize_split("train", config.data.train, config, log)
    held_out = tokenize_split("eval", config.data.eval, config, log) if config.data.eval else None
    return pad_id, train, held_out


def uses_scorers(config: JobConfig) -> bool:
    """A reference or guidance scorer pool runs (a loss without one has nothing to score or cache)."""
    return config.needs_reference or config.guidance_kind in SCORED_GUIDANCE


def reads_cache(config: JobConfig) -> bool:
    return config.scoring.mode == "cache" and uses_scorers(config)


def scored_pairs(split: TokenizedSplit, config: JobConfig, pad_id: int, log=print):
    """A split's pairs as the trainers read them, by pair id: scored on the fly, or from the cache (scored into
    it first if missing)."""
    from tgdpo_ray.cache import cached_scored_dataset
    from tgdpo_ray.scoring import configure_ray_data, scored_dataset

    configure_ray_data()
    if reads_cache(config):
        return cached_scored_dataset(split, config, pad_id, log)
    return scored_dataset(split.pairs, len(split), config, pad_id)


def epoch_orders(split: TokenizedSplit, config: JobConfig) -> list[np.ndarray]:
    """Each epoch's order of the training pairs (steps.epoch_order: indexes into split.pair_ids)."""
    return [epoch_order(len(split), config.run.seed, epoch, config.training.shuffle)
            for epoch in range(config.training.epochs)]


def epoch_streams(split: TokenizedSplit, orders: list[np.ndarray], config: JobConfig, pad_id: int,
                  log=print) -> dict:
    """One scored dataset per epoch, each in its epoch's order: streamed pairs enter the scorers in that order;
    cached pairs are scored once and sorted into it."""
    from tgdpo_ray.scoring import scored_dataset

    cached = scored_pairs(split, config, pad_id, log) if reads_cache(config) else None
    streams = {}
    for epoch, order in enumerate(orders):
        if cached is None:
            ordered = in_order(split.pairs, split, order)
            streams[epoch_dataset(epoch)] = scored_dataset(ordered, len(split), config, pad_id)
        else:
            streams[epoch_dataset(epoch)] = in_order(cached, split, order, by_id=False)
    return streams


def in_order(dataset, split: TokenizedSplit, order: np.ndarray, by_id: bool = True):
    """`dataset` (pairs of `split`) in the order `order`. A dataset already by pair id needs no sort in file
    order; otherwise a `place` column is added and Ray Data sorts by it (an all-to-all over the cluster)."""
    if by_id and np.array_equal(order, np.arange(len(order))):
        return dataset
    places = np.empty(len(order), dtype=np.int64)
    places[order] = np.arange(len(order))  # the place of the pair at each index of split.pair_ids
    return dataset.map_batches(partial(with_places, ids=split.pair_ids, places=places),
                               batch_format="pyarrow").sort("place")


def with_places(table, ids: np.ndarray, places: np.ndarray):
    """Adds each pair's place in the epoch's order (a `place` column) to a block of pairs; `ids` sorted."""
    import pyarrow as pa

    index = np.searchsorted(ids, table["pair_id"].to_numpy())
    return table.append_column("place", pa.array(places[index]))


def start_run_dir(config: JobConfig, log=print) -> tuple[int, TokenizedSplit, TokenizedSplit | None]:
    """Creates the run folder with the config, starts Ray and runs the tokenization pass; writes the data
    report and returns the tokenized splits."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for per_run in ("placement", "scoring"):  # records of this run's processes only
        shutil.rmtree(run_dir / per_run, ignore_errors=True)
    dump_config(config, run_dir / "config.yaml")
    start_ray(config)
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
    check_fits(training_groups(config, with_policy=False))
    counts = {split.name: scored_pairs(split, config, pad_id, log).count() for split in (train, held_out) if split}
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
    orders = epoch_orders(train, config)
    # The schedule's length, whatever max_steps stops at: every epoch's plan counted from the token counts.
    total_steps = sum(epoch_shape(train.lengths, order, training, config.policy.workers).steps for order in orders)

    check_fits(training_groups(config))
    datasets = epoch_streams(train, orders, config, pad_id, log)
    if held_out:
        datasets["eval"] = scored_pairs(held_out, config, pad_id, log)
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
                             checkpoint_config=CheckpointConfig(num_to_keep=training.keep_checkpoints or None),
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
