"""Starting Ray, or joining a running cluster (a wrong or unreachable address fails in seconds, in one line), and
the Ray Data settings every job runs with."""

from __future__ import annotations

import os
import socket

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.config.job import JobConfig


class ClusterError(UserError, RuntimeError):
    """A cluster that cannot be reached, or cannot hold the processes a job needs; the message says what is
    missing."""


# Seconds to wait for a TCP connection to the cluster's address before calling it unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0
# What the trackers and the Hub read from the environment. A driver that joins a running cluster from a shell
# hands those that are set to the job's processes through Ray's runtime environment (the cluster's processes
# never saw this shell); a Ray job already has its own (tgdpo-ray submit --env), and a local Ray inherits them.
FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", "MLFLOW_TRACKING_URI",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")


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
        connect_to_cluster(config, log_to_driver=log_to_driver, **forwarded_env())
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus, log_to_driver=log_to_driver)


def forwarded_env() -> dict:
    """ray.init's runtime_env with FORWARDED_ENV's variables that are set, for a driver outside a Ray job (inside
    one, Ray would refuse a second value for a variable the job already sets)."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set in a Ray job's driver
        return {}
    present = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {"runtime_env": {"env_vars": present}} if present else {}


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


def configure_ray_data() -> None:
    """Ray Data's settings for this process's streams: no progress bars, and blocks in the source's order."""
    from ray.data import DataContext

    context = DataContext.get_current()
    # Our own per-step lines report progress; Ray Data's per-operator bars would drown them.
    context.enable_progress_bars = False
    # Pairs reach the trainers in the same order every run: a resumed run repeats an uninterrupted one.
    context.execution_options.preserve_order = True
