"""The job driver: validate and tokenize on the driver, start Ray, stream pairs through the scorer pools into
the Ray Train workers, and collect the run's summary."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from functools import partial

import numpy as np
import torch

from tgdpo_ray.config import JobConfig, dump_config
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
    rewards = config.guidance.reward_columns if config.rewards_from_data else None
    train = prepare_pairs(config.data.train, config.data, tokenizer, log, rewards)
    held_out = prepare_pairs(config.data.eval, config.data, tokenizer, log, rewards) if config.data.eval else None
    log(f"[data] {len(train.rows)} training pairs" + (f", {len(held_out.rows)} held-out pairs" if held_out else "")
        + f" tokenized in {time.perf_counter() - started:.1f}s")
    return tokenizer.pad_token_id, train, held_out


# Seconds to wait for a TCP connection to the cluster's address before calling it unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0


def start_ray(config: JobConfig) -> None:
    import ray

    # Ray Train's print patch echoes every worker line twice through the driver's log stream.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        # Inside a Ray job RAY_ADDRESS names the cluster; local-only settings do not apply there.
        connect_to_cluster(config)
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus)


def connect_to_cluster(config: JobConfig, **init_options) -> None:
    """ray.init on an existing cluster; a wrong or unreachable address fails in seconds, in one line."""
    import ray

    name, address = ray_address(config)
    # ray.init retries a wrong address for minutes and then fails with its internals: check it first.
    check_reachable(name, address)
    try:
        ray.init(address=config.ray.address, **init_options)
    except Exception as err:  # e.g. "auto" finding no cluster, or a port that answers but is not Ray's
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"{name} {address!r}: cannot connect to the Ray cluster: {reason}") from err


def ray_address(config: JobConfig) -> tuple[str, str]:
    """(where it was set, the address) that ray.init will use: RAY_ADDRESS replaces a missing or "auto" one."""
    address = config.ray.address
    if address in (None, "auto") and os.environ.get("RAY_ADDRESS"):
        return "RAY_ADDRESS", os.environ["RAY_ADDRESS"]
    return "ray.address", address


def check_reachable(name: str, address: str) -> None:
    """Fails in seconds, in one line, when nothing answers at a host:port or ray://host:port address. "auto"
    and "local" are left to Ray, which finds or starts the cluster itself."""
    if address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        return  # another Ray client protocol: let Ray handle it
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")  # an IPv6 address is written [::1]:6379
    if not host or not port.isdigit():
        raise UserError(f"{name} {address!r}: expected host:port (the head's GCS port, 6379 by default), "
                        f"ray://host:port (Ray Client, 10001 by default) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except socket.gaierror as err:
        raise UserError(f"{name} {address!r}: cannot resolve host {host!r} ({err.strerror})") from None
    except TimeoutError:
        raise UserError(f"{name} {address!r}: no answer within {RAY_CONNECT_TIMEOUT_S:g} s; is the address right "
                        f"and the port open from this machine?") from None
    except OSError as err:
        raise UserError(f"{name} {address!r}: {err.strerror or err}; is a Ray head running there, and is this "
                        f"its port?") from None


def process_groups(config: JobConfig, with_policy: bool = True) -> dict[str, tuple[int, dict, dict]]:
    """Each group's processes held at once (scorer pools at their minimum size), what each one holds, and
    the node labels it needs."""
    sections = {}
    if with_policy:
        sections["policy"] = (config.policy, config.policy.workers, config.policy.cpus_per_worker,
                              config.policy.gpus_per_worker)
    for name, section, needed in (("reference", config.reference, config.needs_reference),
                                  ("guidance", config.guidance, config.needs_guidance)):
        if needed:
            low = section.replicas if isinstance(section.replicas, int) else section.replicas[0]
            sections[name] = (section, low, section.cpus_per_replica, section.gpus_per_replica)
    groups = {}
    for name, (section, count, cpus, gpus) in sections.items():
        groups[name] = (count, held_resources(cpus, gpus, section.resources), section.node_labels)
    return groups


def held_resources(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    """What one process of a group holds, the resources it does not use left out."""
    each = {"CPU": cpus, "GPU": gpus, **custom}
    return {key: amount for key, amount in each.items() if amount > 0}


def check_fits_cluster(config: JobConfig, with_policy: bool = True) -> None:
    """Fail at once, saying what is missing, instead of waiting forever on actors that cannot be placed."""
    check_groups_fit(process_groups(config, with_policy))


def check_groups_fit(groups: dict[str, tuple[int, dict, dict]]) -> None:
    """groups: name -> (processes held at once, resources each holds, node labels they need)."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    for name, (count, each, labels) in groups.items():
        matching = [node for node in nodes if all(node["Labels"].get(k) == v for k, v in labels.items())]
        if not matching:
            raise RunError(f"{name}: no node of the Ray cluster has the labels {labels}")
        # How many such processes the matching nodes could hold if this group were alone on them.
        room = sum(min((int(node["Resources"].get(key, 0) / amount + 1e-9) for key, amount in each.items()),
                       default=count) for node in matching)
        if room < count:
            where = f"nodes labelled {labels}" if labels else "the cluster's nodes"
            raise RunError(f"{name}: needs {count} process(es) holding {each} each, but {where} fit {room}")
    available = ray.cluster_resources()
    for resource in sorted({key for _, each, _ in groups.values() for key in each}):
        wanted = sum(count * each.get(resource, 0) for count, each, _ in groups.values())
        if wanted > available.get(resource, 0) + 1e-9:
            detail = ", ".join(f"{name} {count * each[resource]:g}" for name, (count, each, _) in groups.items()
                               if resource in each)
            raise RunError(
                f"the job needs {wanted:g} {resource} at once ({detail}) but the Ray cluster has "
                f"{available.get(resource, 0):g}; lower policy.workers, the replicas or the per-replica "
                f"resources, or add nodes"
            )


def torch_backend(config: JobConfig) -> str:
    """NCCL needs real GPUs and a CUDA build of torch; anything else (CPU, logical GPUs in tests) uses gloo."""
    if config.policy.backend != "auto":
        return config.policy.backend
    return "nccl" if config.policy.gpus_per_worker > 0 and torch.version.cuda else "gloo"


def reads_cache(config: JobConfig) -> bool:
    """Cache mode, for a loss with a scorer (a loss without one has nothing to cache)."""
    return config.scoring.mode == "cache" and (config.needs_reference or config.needs_guidance)


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
    if not (config.needs_reference or config.needs_guidance):
        raise RunError(f"loss.type {config.loss.type} uses no scorer: there is nothing to score")
    config.scoring.mode = "cache"
    check_models_agree(config)
    pad_id, train, held_out = start_run_dir(config, log)
    start_ray(config)
    check_fits_cluster(config, with_policy=False)
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
    check_fits_cluster(config)
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
