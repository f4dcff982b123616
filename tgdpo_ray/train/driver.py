"""The job driver: start Ray, validate and tokenize on Ray Data's CPU workers (data_pass.py), stream pairs
through the scorer pools into the Ray Train workers, and collect the run's summary. The driver holds counts and
token lengths, never tokens."""

from __future__ import annotations

import json
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np

from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.runtime.ray_start import start_ray

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.model_files import weights_identity
from tgdpo_ray.config.job import SCORED_GUIDANCE, JobConfig
from tgdpo_ray.config.loader import dump_config
from tgdpo_ray.data.tokenize_pass import TokenizedSplit, tokenize_split
from tgdpo_ray.modeling.loading import check_models_agree, load_tokenizer
from tgdpo_ray.runtime.placement import check_fits, torch_backend, training_groups
from tgdpo_ray.train.model_card import write_model_card
from tgdpo_ray.train.schedule import HELD_OUT, STREAM, epoch_order, epoch_shape


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


def epoch_orders(split: TokenizedSplit, config: JobConfig) -> list[np.ndarray]:
    """Each epoch's order of the training pairs (steps.epoch_order: indexes into split.pair_ids)."""
    return [epoch_order(len(split), config.run.seed, epoch, config.training.shuffle)
            for epoch in range(config.training.epochs)]


def training_stream(train: TokenizedSplit, held_out: TokenizedSplit | None, orders: list[np.ndarray],
                    first_epoch: int, config: JobConfig, pad_id: int, log=print):
    """The one scored dataset the trainers read, in the order they read it: the held-out pairs (part HELD_OUT),
    then each epoch's pairs from `first_epoch` on, each in its epoch's order (part = the epoch). In stream mode
    one pool per scorer scores it all, started once for the whole run (a pool per epoch would leave the trainers
    waiting for its models to load at every epoch); cache mode reads the cached scores (scoring into the cache
    first what is missing). None when there is nothing left to read (a finished run started again)."""
    from tgdpo_ray.scoring.cache import cached_scored_splits
    from tgdpo_ray.scoring.pools import stream_blocks, with_scorers

    cache = reads_cache(config)
    splits = [split for split in (train if first_epoch < len(orders) else None, held_out) if split]
    scored = cached_scored_splits(splits, config, pad_id, log) if cache else [split.pairs for split in splits]
    pairs = {split.name: dataset for split, dataset in zip(splits, scored)}
    parts, rows = [], 0
    if held_out:
        parts.append(with_position(pairs[held_out.name], held_out, HELD_OUT, np.arange(len(held_out)), rows))
        rows += len(held_out)
    for epoch in range(first_epoch, len(orders)):  # none for a run that finished every epoch
        parts.append(with_position(pairs[train.name], train, epoch, orders[epoch], rows))
        rows += len(train)
    if not parts:
        return None
    # One sort puts every pair at its position (an all-to-all over the cluster, run now, while no trainer or
    # scorer holds a CPU) in partitions that start with the stream's small first blocks; the larger partitions
    # are then cut into full blocks.
    every_part = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]  # Ray's union of one fails
    starts, full_block = stream_blocks(rows, config.reference.batch_size)
    # Without boundaries Ray samples its own (a stream of one block has none).
    ordered = (every_part.sort("position", boundaries=starts or None).drop_columns(["position"])
               .repartition(target_num_rows_per_block=full_block).materialize())
    return ordered if cache else with_scorers(ordered, config, pad_id)


def with_position(dataset, split: TokenizedSplit, part: int, order: np.ndarray, first_position: int):
    """`dataset` (the pairs of `split`) with a `part` column and a `position` column: each pair's place in the
    stream, first_position plus its place in the order `order` (indexes into split.pair_ids, as
    schedule.epoch_order gives them)."""
    positions = np.empty(len(order), dtype=np.int64)
    positions[order] = first_position + np.arange(len(order))  # the position of the pair at each index of pair_ids
    return dataset.map_batches(partial(add_position, ids=split.pair_ids, part=part, positions=positions),
                               batch_format="pyarrow")


def add_position(table, ids: np.ndarray, part: int, positions: np.ndarray):
    """Adds the part and each pair's position in the stream to a block of pairs; `ids` sorted."""
    import pyarrow as pa

    index = np.searchsorted(ids, table["pair_id"].to_numpy())
    table = table.append_column("part", pa.array(np.full(len(index), part, dtype=np.int64)))
    return table.append_column("position", pa.array(positions[index]))


def start_run_dir(config: JobConfig, log=print) -> tuple[int, TokenizedSplit, TokenizedSplit | None]:
    """Creates the run folder with the config, starts Ray and runs the tokenization pass; writes the data
    report and returns the tokenized splits."""
    files = RunDir(config.run_dir)
    files.path.mkdir(parents=True, exist_ok=True)
    for per_run in (files.placement, files.scoring):  # records of this run's processes only
        shutil.rmtree(per_run, ignore_errors=True)
    dump_config(config, files.config)
    start_ray(config)
    pad_id, train, held_out = prepare_data(config, log)
    files.data_report.write_text(
        json.dumps({"train": train.report(), "eval": held_out.report() if held_out else None}, indent=2)
    )
    return pad_id, train, held_out


def run_score(config: JobConfig, log=print) -> dict:
    """Scoring alone, into the cache: a team can score on spare GPUs and train later."""
    from tgdpo_ray.scoring.cache import cached_scored_splits

    if not uses_scorers(config):
        raise RunError(f"loss.type {config.loss.type} uses no scorer: there is nothing to score")
    config = config.model_copy(update={"scoring": config.scoring.model_copy(update={"mode": "cache"})})
    check_models_agree(config)
    pad_id, train, held_out = start_run_dir(config, log)
    check_fits(training_groups(config, with_policy=False))
    splits = [split for split in (train, held_out) if split]
    scored = cached_scored_splits(splits, config, pad_id, log)
    counts = {split.name: dataset.count() for split, dataset in zip(splits, scored)}
    log(f"[score] cached {counts} in {config.scoring.cache_dir}")
    return {"pairs": counts, "cache_dir": config.scoring.cache_dir}


def run_train(config: JobConfig, log=print) -> dict:
    """One training run; returns the summary that the trainer wrote to <run_dir>/summary.json."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tgdpo_ray.train.checkpoints import (checkpoint_storage, check_resumable, delete_checkpoints, finished_run,
                                             resumed_epoch)
    from tgdpo_ray.train.worker import train_loop

    run_dir = config.run_dir
    # Here, not at config load: a pipeline's guidance model is its DPO stage's output, made during the run.
    check_models_agree(config)
    if config.run.resume:  # before anything starts: a refused resume costs nothing
        check_resumable(config, log)
        done = finished_run(config)
        if done is not None:  # no worker group (nor GPUs, nor model loads) for a run with nothing left to train
            log(f"[run] {config.run.name!r} already trained every epoch ({done['steps']} steps) in {run_dir}: "
                "nothing to train; run.resume=false trains it again")
            return done
    pad_id, train, held_out = start_run_dir(config, log)
    training = config.training
    orders = epoch_orders(train, config)
    # The schedule's length, whatever max_steps stops at: every epoch's plan counted from the token counts.
    total_steps = sum(epoch_shape(train.lengths, order, training, config.policy.workers).steps for order in orders)

    check_fits(training_groups(config))
    if not config.run.resume:
        delete_checkpoints(config)
    first_epoch = resumed_epoch(config)
    if first_epoch:
        log(f"[run] the latest checkpoint goes on in epoch {first_epoch}: the stream starts there")
    stream = training_stream(train, held_out, orders, first_epoch, config, pad_id, log)
    storage_path, name = checkpoint_storage(config)
    policy = config.policy
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "has_eval": held_out is not None,
                           "total_steps": total_steps, "has_stream": stream is not None,
                           "base_weights": weights_identity(policy.model) if policy.lora else None},
        scaling_config=ScalingConfig(
            num_workers=policy.workers,
            use_gpu=policy.gpus_per_worker > 0,
            resources_per_worker={"CPU": policy.cpus_per_worker, "GPU": policy.gpus_per_worker,
                                  **policy.resources},
            label_selector=policy.node_labels or None,
        ),
        torch_config=TorchConfig(backend=torch_backend(config)),
        datasets={STREAM: stream} if stream is not None else {},
        # The stream is not split: rank 0 alone reads it and deals every step's micro-batches to the workers
        # (steps.py), so which pairs train in which step depends on the seed and the data, never on timing.
        dataset_config=DataConfig(datasets_to_split=[]),
        # Ray Train stores the checkpoints, keeps the newest few and hands the latest to restarted workers and
        # to a new run of the same job (checkpoints.py).
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=checkpoint_config(training),
                             failure_config=FailureConfig(max_failures=config.training.max_failures)),
    )
    log(f"[run] {config.loss.type} on {policy.workers} policy worker(s), ZeRO-{policy.zero_stage}, "
        f"{total_steps} optimizer steps; outputs in {run_dir}")
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps the worker's exception; surface its message, keep the chain
        raise RunError(f"training run {config.run.name!r} failed{worker_error(err)}") from err
    summary_file = RunDir(run_dir).summary  # written by the trainers' rank 0
    summary = json.loads(summary_file.read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    summary["data_fingerprint"] = train.digest
    if training.keep_best is not None:
        summary["best_checkpoint"] = export_best(result, config, log)
    summary_file.write_text(json.dumps(summary, indent=2))
    write_model_card(summary["model_dir"], config, summary)
    return summary


def checkpoint_config(training):
    """Ray Train's retention: the newest keep_checkpoints, or the best by keep_best (Ray keeps the newest as
    well, which a resumed run needs)."""
    from ray.train import CheckpointConfig

    best = training.keep_best
    return CheckpointConfig(num_to_keep=training.keep_checkpoints or None,
                            checkpoint_score_attribute=best.metric if best else None,
                            checkpoint_score_order=best.mode if best else "max")


def export_best(result, config: JobConfig, log=print) -> dict:
    """The best checkpoint by keep_best, from Ray's Result: its name and metric; with export best, its Hugging
    Face folder replaces <run>/model (the tokenizer files come with it)."""
    best = config.training.keep_best
    checkpoint = result.get_best_checkpoint(best.metric, best.mode)
    metrics = dict(next(m for c, m in result.best_checkpoints if c.path == checkpoint.path))
    chosen = {"checkpoint": Path(checkpoint.path).name, "step": metrics["step"], best.metric: metrics[best.metric]}
    if config.training.export == "best":
        files = RunDir(config.run_dir)
        exported = [("hf", files.model)] + ([("adapter", files.adapter)] if config.policy.lora else [])
        with checkpoint.as_directory() as folder:
            for name, target in exported:
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(Path(folder) / name, target)
        log(f"[run] exported the best checkpoint, step {chosen['step']} ({best.metric} {chosen[best.metric]:.4g}), "
            f"to {files.model}")
    return chosen


def worker_error(err: Exception) -> str:
    """What a failed run says after its name: the first failed worker's own message when it is one of ours (a
    UserError says what to change), else Ray's whole message with the workers' tracebacks."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", failure)  # a RayTaskError carries the exception raised in the task
        if isinstance(cause, UserError):
            return f" on worker {rank}: {cause}"
    return f": {err}"
