"""Ray Jobs: submit a job spec to a cluster from a laptop, watch it, read its logs, stop it.

The job runs `python -m tgdpo_ray.cli run --config <spec>` on the cluster's head; the working directory (this
repository, with the package and jobs/) travels in the runtime environment. The spec is validated here first,
so a typo never costs a cluster round trip. The address comes from --address or RAY_ADDRESS; the token of a
cluster with Ray's token authentication comes from where Ray's own CLI reads it (RAY_AUTH_TOKEN, the file
RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token), and a cluster that refuses the caller says so in one line.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.config.loader import load_config

# What never travels: environments, outputs, caches (Ray caps a working directory at 500 MiB).
EXCLUDES = [".git", ".venv", "outputs", "**/__pycache__", "*.egg-info", ".pytest_cache", "bench/results"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(UserError):
    """A cluster that cannot be reached, a job that does not exist, a spec that cannot be sent."""


def token_source() -> Optional[str]:
    """Where Ray's client reads this shell's token from, in Ray's order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return "~/.ray/auth_token" if os.path.isfile(os.path.expanduser("~/.ray/auth_token")) else None


class AuthRefusedError(JobsError):
    """A cluster with token authentication that refused this shell: no token, or another cluster's."""


def refused(address: str) -> AuthRefusedError:
    source = token_source() if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" else None
    where = ("get it where the cluster runs (`ray get-auth-token` on its head; KubeRay: the Secret named after the "
             "RayCluster, key auth_token) and set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file that holds it")
    if source is None:
        return AuthRefusedError(f"the Ray cluster at {address} requires a token (Ray's token authentication) and "
                                f"this shell sent none: {where}")
    return AuthRefusedError(f"the Ray cluster at {address} refused the token from {source}: it is another "
                            f"cluster's; {where}")


def job_client(address: Optional[str]):
    # Ray's client sends its token only in token mode, which is off unless asked for: ask whenever a token
    # is at hand (a cluster without authentication ignores it).
    if "RAY_AUTH_MODE" not in os.environ and token_source() is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:  # the first request (Ray's version check) already needs the token
        raise refused(address) from None
    except Exception as err:  # Ray raises ConnectionError, RuntimeError or ValueError here
        raise JobsError(f"cannot reach the Ray dashboard at {address}: {err}") from None


def call(what: str, function, *args, **kwargs):
    """A client call whose failure (unknown job id, lost connection) becomes one clear message."""
    try:
        return function(*args, **kwargs)
    except Exception as err:
        raise JobsError(f"{what}: {err}") from None


def build_entrypoint(spec: str, overrides: list[str], python: str) -> str:
    words = [python, "-m", "tgdpo_ray.cli", "run", "--config", spec]
    for override in overrides:
        words += ["--set", override]
    return shlex.join(words)


def job_env_vars(names: list[str]) -> dict[str, str]:
    """The named variables of this shell, for the job's runtime environment: keys (W&B, a judge's API, the Hub)
    reach every process of the job this way, and never a job config, a run folder or the entrypoint."""
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise JobsError(f"--env {', '.join(missing)}: not set in this shell (export it, or leave out --env)")
    return {name: os.environ[name] for name in names}


def submit(spec: str, overrides: list[str], address: Optional[str], working_dir: str = ".",
           python: str = "python", submission_id: Optional[str] = None, env: tuple[str, ...] = (), log=print) -> str:
    """Validates the spec locally, sends the job, returns its submission id. `env` names variables of this shell
    copied into the job's runtime environment."""
    config = load_config(spec, overrides, check_paths=False)  # its paths are the cluster's, not ours
    env_vars = job_env_vars(list(env))
    work = Path(working_dir).resolve()
    spec_in_work = Path(spec).resolve()
    if work not in spec_in_work.parents:
        raise JobsError(f"the spec {spec} must be inside the working directory {work}, which is what travels")
    if not Path(config.run.output_dir).is_absolute() and "://" not in config.run.output_dir:
        log(f"[submit] note: run.output_dir {config.run.output_dir!r} is relative: outputs are written inside the "
            "job's working directory on the cluster; set it to shared storage to keep them")
    client = job_client(address)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    submission_id = submission_id or f"tgdpo-{config.kind}-{config.run.name}-{stamp}"
    call(
        "submission refused",
        client.submit_job,
        entrypoint=build_entrypoint(str(spec_in_work.relative_to(work)), overrides, python),
        submission_id=submission_id,
        runtime_env={"working_dir": str(work), "excludes": EXCLUDES, **({"env_vars": env_vars} if env_vars else {})},
        metadata={"tgdpo_kind": config.kind, "tgdpo_run": config.run.name, "tgdpo_spec": spec},
    )
    return submission_id


def status(job_id: str, address: Optional[str]) -> dict:
    info = call(f"no job {job_id!r}", job_client(address).get_job_info, job_id)
    return {
        "submission_id": info.submission_id,
        "status": state_name(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata,
    }


def logs(job_id: str, address: Optional[str], follow: bool = False, out=print) -> None:
    client = job_client(address)
    if not follow:
        out(call(f"no job {job_id!r}", client.get_job_logs, job_id), end="")
        return
    call(f"no job {job_id!r}", client.get_job_info, job_id)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out(chunk, end="", flush=True)

    asyncio.run(tail())


def wait(job_id: str, address: Optional[str], timeout: Optional[float] = None, poll: float = 2.0) -> str:
    """Blocks until the job ends (or the timeout passes); returns its last status."""
    client = job_client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = state_name(call(f"no job {job_id!r}", client.get_job_status, job_id))
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll)


def stop(job_id: str, address: Optional[str]) -> bool:
    return call(f"cannot stop job {job_id!r}", job_client(address).stop_job, job_id)


def list_jobs(address: Optional[str]) -> list[dict]:
    jobs = call("cannot list jobs", job_client(address).list_jobs)
    rows = []
    for info in sorted(jobs, key=lambda job: job.start_time or 0):
        rows.append({"submission_id": info.submission_id or info.job_id,
                     "status": state_name(info.status),
                     "kind": (info.metadata or {}).get("tgdpo_kind", "-"),
                     "started": format_time(info.start_time), "entrypoint": info.entrypoint})
    return rows


def state_name(state) -> str:
    return str(getattr(state, "value", state))  # Ray's JobStatus is a str enum


def format_time(milliseconds: Optional[int]) -> str:
    if not milliseconds:
        return "-"
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
