"""Ray Jobs through the CLI against a real Ray head started here by cluster/local-head.sh (dashboard on loopback),
with Ray's token authentication on, as every cluster path we ship has it."""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wandb_runs, without_local_ray

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args, timeout=600, env=None, token="~/.ray/auth_token"):
    """The tgdpo-ray CLI in a shell whose token is the head's (~/.ray/auth_token, which cluster/local-head.sh
    made); token=None: a shell that sends none; another value: another cluster's, in RAY_AUTH_TOKEN."""
    env = {key: value for key, value in (env or os.environ).items() if not key.startswith("RAY_AUTH_")}
    if token is None:
        env["RAY_AUTH_MODE"] = "disabled"  # not even this machine's ~/.ray/auth_token
    elif token != "~/.ray/auth_token":
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([str(VENV_BIN / "tgdpo-ray"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head whose job drivers find this venv's python first on PATH (as a cluster image would). The suite's
    local Ray is stopped meanwhile: `ray stop --force` at the end stops every Ray on the machine."""
    with without_local_ray():
        yield from started_head(tmp_path_factory)


def started_head(tmp_path_factory):
    port, dashboard = free_port(), free_port()
    env = {**{key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH_")},
           "PORT": str(port), "DASHBOARD_PORT": str(dashboard), "NUM_CPUS": "8"}
    started = subprocess.run(["bash", str(REPO / "cluster/local-head.sh")], env=env, capture_output=True, text=True,
                             timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    address = f"http://127.0.0.1:{dashboard}"
    for _ in range(60):  # the dashboard's job API comes up a little after `ray start` returns
        if cli("list", "--address", address, timeout=60).returncode == 0:
            break
        time.sleep(1)
    yield {"address": address, "outputs": tmp_path_factory.mktemp("cluster-outputs")}
    subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def small_demo(outputs: Path, *extra: str) -> list[str]:
    # The demo spec as one DPO training stage (no SFT stage, no evaluation): what reaches the cluster and comes
    # back is what these tests check.
    # The pipeline's stages, the held-out pairs and the evaluation run in tests/test_end_to_end.py, and the demo's
    # whole pipeline in `make demo`.
    return ["--set", f"run.output_dir={outputs}", "--set", "kind=train", "--set", "loss.type=dpo",
            "--set", "training.epochs=1", "--set", "data.train.limit=48", "--set", "data.eval=null",
            "--set", "eval=null", "--set", "sft=null", *extra]


def test_submit_the_demo_wait_and_read_its_logs(head):
    # --env copies variables of the submitting shell (not the head's) into the job: W&B reads WANDB_TAGS in the
    # trainer, so the run's tags show it arrived; the secret must reach no file and not the entrypoint.
    secret = "tgdpo-test-secret-5b1e0c"
    shell = {**os.environ, "WANDB_TAGS": "from-submit-env", "TGDPO_TEST_SECRET": secret}
    done = cli("submit", "jobs/demo.yaml", "--address", head["address"], "--wait", "--env", "WANDB_TAGS",
               "--env", "TGDPO_TEST_SECRET", *small_demo(head["outputs"], "--set", "tracking.wandb_project=tgdpo-test"),
               env=shell)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [run] = wandb_runs(head["outputs"] / "demo")
    assert run["tags"] == ["from-submit-env"] and run["exit_code"] == 0
    written = [path for path in (head["outputs"] / "demo").rglob("*") if path.is_file()]
    assert written and not [path for path in written if secret.encode() in path.read_bytes()]
    job_id = done.stdout.split("submitted: ")[1].split()[0]
    assert f"job {job_id}: SUCCEEDED" in done.stdout

    status = cli("status", job_id, "--address", head["address"])
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout and secret not in status.stdout
    logs = cli("logs", job_id, "--address", head["address"])
    # The driver's lines, and the trainer's, which say the time left; the secret is not among them.
    assert "[run] dpo on 1 policy worker(s)" in logs.stdout and secret not in logs.stdout
    assert re.search(r"\[train\] step 1/\d+ .* ETA \d", logs.stdout), logs.stdout

    # The outputs are where the job's config sent them.
    assert (head["outputs"] / "demo" / "model" / "model.safetensors").exists()
    assert json.loads((head["outputs"] / "demo" / "summary.json").read_text())["complete"]
    listing = cli("list", "--address", head["address"])
    assert job_id in listing.stdout and "demo" in listing.stdout


def test_a_bad_config_is_refused_locally(head):
    before = cli("list", "--address", head["address"]).stdout.count("tgdpo-")
    refused = cli("submit", "jobs/demo.yaml", "--address", head["address"], "--set", "training.epochs=0")
    assert refused.returncode == 2
    assert "training.epochs" in refused.stderr and "Traceback" not in refused.stderr
    unset = cli("submit", "jobs/demo.yaml", "--address", head["address"], "--env", "TGDPO_NOT_SET_ANYWHERE",
                env={key: value for key, value in os.environ.items() if key != "TGDPO_NOT_SET_ANYWHERE"})
    assert unset.returncode == 2 and "--env TGDPO_NOT_SET_ANYWHERE: not set in this shell" in unset.stderr
    assert cli("list", "--address", head["address"]).stdout.count("tgdpo-") == before  # nothing was sent


def test_a_long_job_is_stopped(head):
    submitted = cli("submit", "jobs/demo.yaml", "--address", head["address"], "--id", "long-demo",
                    *small_demo(head["outputs"] / "long", "--set", "training.epochs=100"))
    assert submitted.returncode == 0 and "submitted: long-demo" in submitted.stdout, submitted.stderr
    for _ in range(120):
        if "RUNNING" in cli("status", "long-demo", "--address", head["address"]).stdout:
            break
        time.sleep(1)
    stopped = cli("stop", "long-demo", "--address", head["address"])
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    for _ in range(60):
        status = cli("status", "long-demo", "--address", head["address"]).stdout
        if "STOPPED" in status:
            break
        time.sleep(1)
    assert "long-demo: STOPPED" in status


def test_a_caller_without_the_clusters_token_is_refused_in_one_line(head):
    before = cli("list", "--address", head["address"]).stdout.count("tgdpo-")
    for token, says in ((None, "requires a token (Ray's token authentication) and this shell sent none"),
                        (secrets.token_hex(32), "refused the token from RAY_AUTH_TOKEN: it is another cluster's")):
        refused = cli("submit", "jobs/demo.yaml", "--address", head["address"], *small_demo(head["outputs"]),
                      token=token)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr, \
            refused.stderr[-2000:]
        assert "ray get-auth-token" in refused.stderr and "RAY_AUTH_TOKEN_PATH" in refused.stderr
        assert cli("list", "--address", head["address"], token=token).returncode == 2
    assert cli("list", "--address", head["address"]).stdout.count("tgdpo-") == before  # nothing was sent


def test_unknown_job_and_missing_address_are_clear_errors(head):
    missing = cli("status", "no-such-job", "--address", head["address"])
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr and "Traceback" not in missing.stderr
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    no_address = cli("list", env=env)
    assert no_address.returncode == 2 and "--address" in no_address.stderr
