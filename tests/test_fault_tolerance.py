"""Failures mid-run: a killed scorer actor and a killed training worker; the run completes and every pair of
every epoch is trained exactly once."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import trained_pair_ids, wandb_runs
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.experiments.demo import make_demo_model
from tgdpo_ray.train.checkpoints import checkpoint_storage
from tgdpo_ray.train.driver import run_train


def start_run(config):
    """run_train in a thread; returns the thread and a dict that receives the summary or the error."""
    outcome = {}

    def target():
        try:
            outcome["summary"] = run_train(config)
        except Exception as err:  # reported by the test, not swallowed
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_for(condition, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError("condition not reached")


def placement_pids(run_dir: Path, role: str) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (run_dir / "placement").glob(f"{role}-*.json")]


@pytest.fixture(scope="module")
def scorer_killed_run(ray_cluster, tiny_model, demo_data, tmp_path_factory):
    """One epoch in stream mode whose reference scorer actor is killed while scoring."""
    root = tmp_path_factory.mktemp("scorer-killed")
    # A slower reference model than the policy, so that the kill lands while scoring is under way.
    slow_reference = str(make_demo_model(str(root / "slow-ref"), hidden_size=512, layers=8))
    config = build_config({
        "run": {"name": "scorer-killed", "output_dir": str(root)},
        "data": {"train": {"path": str(demo_data["train"]), "limit": 160}, "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "dpo"},
        "training": {"epochs": 1, "learning_rate": 1e-4, "max_tokens_per_batch": 512},
        "policy": {"model": tiny_model},
        "reference": {"model": slow_reference, "batch_size": 2},
    })
    thread, outcome = start_run(config)
    victim = wait_for(lambda: placement_pids(config.run_dir, "reference"))[0]
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    return config


def test_a_killed_scorer_actor_is_restarted_and_its_batches_retried(scorer_killed_run):
    config = scorer_killed_run
    assert len(placement_pids(config.run_dir, "reference")) >= 2  # the pool replaced the killed actor
    assert trained_pair_ids(config.run_dir) == {0: list(range(160))}  # each pair once, by id


def test_stream_mode_trains_before_scoring_ends(scorer_killed_run):
    """The first optimizer step happens before the last pair is scored: training and scoring overlap."""
    run_dir = scorer_killed_run.run_dir
    batches = [json.loads(line) for path in (run_dir / "scoring").glob("reference-*.jsonl")
               for line in path.read_text().splitlines()]
    # Every pair scored, by id (a retried batch is logged again by the actor that scored it).
    assert {pair_id for batch in batches for pair_id in batch["pair_ids"]} == set(range(160))
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert min(step["time"] for step in steps) < max(batch["time"] for batch in batches)


def test_a_killed_training_worker_restarts_from_its_checkpoint(ray_cluster, tiny_model, demo_data, tmp_path):
    config = build_config({
        "run": {"name": "worker-killed", "output_dir": str(tmp_path)},
        "data": {"train": {"path": str(demo_data["train"]), "limit": 128}, "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "dpo"},
        "training": {"epochs": 2, "learning_rate": 1e-4, "max_tokens_per_batch": 256, "checkpoint_every": 4,
                     "max_failures": 1},
        "policy": {"model": tiny_model},
        "tracking": {"wandb_project": "tgdpo-test"},  # offline (conftest.py)
    })
    thread, outcome = start_run(config)
    metrics = config.run_dir / "metrics.jsonl"
    # Ray Train writes its record of the run's checkpoints once every worker's copy of one is in storage.
    registered = Path(*checkpoint_storage(config)) / "checkpoint_manager_snapshot.json"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 6 and registered.exists())
    killed = time.time()
    os.kill(placement_pids(config.run_dir, "policy")[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert len(placement_pids(config.run_dir, "policy")) == 2  # the worker group was started again
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, outcome["summary"]["steps"] + 1))  # no step twice
    assert any(r["time"] < killed for r in records)  # resumed from a checkpoint: the lines up to it were kept
    assert trained_pair_ids(config.run_dir) == {0: list(range(128)), 1: list(range(128))}
    # The restarted worker continued the run's own W&B run (the id kept in tracking.json) from its checkpoint. The
    # killed worker's offline file may lack its records: W&B's service died with it before writing them.
    runs = wandb_runs(config.run_dir)
    run_id = json.loads((config.run_dir / "tracking.json").read_text())["wandb_run_id"]
    assert len(runs) == 2 and runs[1]["id"] == run_id and runs[0].get("id", run_id) == run_id
    resumed_from = runs[1]["steps"][0] - 1
    assert resumed_from % 4 == 0 and runs[1]["steps"] == list(range(resumed_from + 1, outcome["summary"]["steps"] + 1))
    assert runs[1]["exit_code"] == 0
