"""The processes a job holds on the Ray cluster, for training and evaluation alike: the groups of processes (one
ProcessGroup per role), whether they fit the cluster, where each one landed, and the device it computes on."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.base import Placement
from tgdpo_ray.config.job import SCORED_GUIDANCE, JobConfig
from tgdpo_ray.runtime.ray_start import ClusterError


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
    folder = RunDir(run_dir).placement
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
