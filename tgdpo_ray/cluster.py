"""Processes on the Ray cluster, for training and evaluation alike: starting or joining Ray, the groups of
processes a job holds (one ProcessGroup per role), whether they fit the cluster, where each one landed, and the
device it computes on."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from tgdpo_ray.config import SCORED_GUIDANCE, JobConfig
from tgdpo_ray.config_base import Placement
from tgdpo_ray.errors import UserError


class ClusterError(UserError, RuntimeError):
    """A cluster that cannot be reached, or cannot hold the processes a job needs; the message says what is
    missing."""


# ---------------------------------------------------------------- starting or joining Ray

# Seconds to wait for a TCP connection to the cluster's address before calling it unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0


def start_ray(config: JobConfig, log_to_driver: bool = True) -> None:
    """Joins the configured cluster, or starts a local Ray. log_to_driver=False keeps the workers' lines out of
    this process's output (they stay in Ray's log folder), for a driver that prints its own progress."""
    import ray

    # Ray Train's print patch echoes every worker line twice through the driver's log stream.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        # Inside a Ray job RAY_ADDRESS names the cluster; local-only settings do not apply there.
        connect_to_cluster(config, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus, log_to_driver=log_to_driver)


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
        raise ClusterError(f"{name} {address!r}: cannot connect to the Ray cluster: {reason}") from err


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
        raise ClusterError(f"{name} {address!r}: expected host:port (the head's GCS port, 6379 by default), "
                           f"ray://host:port (Ray Client, 10001 by default) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except socket.gaierror as err:
        raise ClusterError(f"{name} {address!r}: cannot resolve host {host!r} ({err.strerror})") from None
    except TimeoutError:
        raise ClusterError(f"{name} {address!r}: no answer within {RAY_CONNECT_TIMEOUT_S:g} s; is the address "
                           f"right and the port open from this machine?") from None
    except OSError as err:
        raise ClusterError(f"{name} {address!r}: {err.strerror or err}; is a Ray head running there, and is this "
                           f"its port?") from None


# ---------------------------------------------------------------- process groups and whether they fit


@dataclass(frozen=True)
class ProcessGroup:
    """A role's processes: how many (a range for an autoscaling pool), what each one holds, where it may run."""

    name: str
    processes: tuple[int, int]  # (at least, at most); the same number twice for a fixed size
    each: dict[str, float]  # the resources one process holds (CPU, GPU, custom ones), those it does not use left out
    labels: dict[str, str]  # the Ray node labels a process needs

    @property
    def gpus_each(self) -> float:
        return self.each.get("GPU", 0.0)


def process_group(name: str, placement: Placement, processes: tuple[int, int], cpus: float,
                  gpus: float) -> ProcessGroup:
    each = {"CPU": cpus, "GPU": gpus, **placement.resources}
    return ProcessGroup(name, processes, {key: amount for key, amount in each.items() if amount > 0},
                        dict(placement.node_labels))


def training_groups(config: JobConfig, with_policy: bool = True) -> list[ProcessGroup]:
    """The policy workers and the scorer pools a training (or scoring) job runs."""
    groups = []
    if with_policy:
        policy = config.policy
        groups.append(process_group("policy", policy, (policy.workers, policy.workers), policy.cpus_per_worker,
                                    policy.gpus_per_worker))
    for name, section, needed in (("reference", config.reference, config.needs_reference),
                                  ("guidance", config.guidance, config.guidance_kind in SCORED_GUIDANCE)):
        if needed:
            groups.append(process_group(name, section, section.replica_range, section.cpus_per_replica,
                                        section.gpus_per_replica))
    return groups


def check_fits(groups: list[ProcessGroup]) -> None:
    """Fail at once, saying what is missing, instead of waiting forever on actors that cannot be placed. Each
    group is counted at its smallest size: the processes held at once."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    for group in groups:
        count, each, labels = group.processes[0], group.each, group.labels
        matching = [node for node in nodes if all(node["Labels"].get(k) == v for k, v in labels.items())]
        if not matching:
            raise ClusterError(f"{group.name}: no node of the Ray cluster has the labels {labels}")
        # How many such processes the matching nodes could hold if this group were alone on them.
        room = sum(min((int(node["Resources"].get(key, 0) / amount + 1e-9) for key, amount in each.items()),
                       default=count) for node in matching)
        if room < count:
            where = f"nodes labelled {labels}" if labels else "the cluster's nodes"
            raise ClusterError(f"{group.name}: needs {count} process(es) holding {each} each, but {where} fit {room}")
    available = ray.cluster_resources()
    for resource in sorted({key for group in groups for key in group.each}):
        wanted = sum(group.processes[0] * group.each.get(resource, 0) for group in groups)
        if wanted > available.get(resource, 0) + 1e-9:
            detail = ", ".join(f"{group.name} {group.processes[0] * group.each[resource]:g}" for group in groups
                               if resource in group.each)
            raise ClusterError(
                f"the job needs {wanted:g} {resource} at once ({detail}) but the Ray cluster has "
                f"{available.get(resource, 0):g}; lower policy.workers, the replicas or the per-replica "
                f"resources, or add nodes"
            )


# ---------------------------------------------------------------- where a process landed, what it computes on


def record_placement(run_dir: str, role: str, **extra) -> dict:
    """Writes which process, node and GPUs this actor got, so a run (and its tests) can check placement."""
    import ray

    record = {
        "role": role,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        **extra,
    }
    folder = Path(run_dir) / "placement"
    folder.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: a reader polling the folder (a test, a monitor) never sees half a file.
    partial = folder / f".{role}-{record['pid']}.json.partial"
    partial.write_text(json.dumps(record))
    os.replace(partial, folder / f"{role}-{record['pid']}.json")
    return record


def pick_device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def torch_backend(config: JobConfig) -> str:
    """NCCL needs real GPUs and a CUDA build of torch; anything else (CPU, logical GPUs in tests) uses gloo."""
    import torch

    if config.policy.backend != "auto":
        return config.policy.backend
    return "nccl" if config.policy.gpus_per_worker > 0 and torch.version.cuda else "gloo"
