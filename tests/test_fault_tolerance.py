"""Failures mid-run: a killed scorer actor and a killed training worker; the run completes and every pair of
every epoch is trained exactly once."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import trained_pair_ids, wandb_runs
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.experiments.demo import make_demo_model
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


def test_a_killed_training_worker_restarts_from_its_checkpoint_and_ends_as_if_never_killed(ray_cluster,
                                                                                          tiny_model, demo_data,
                                                                                          tmp_path):
    """A LoRA run (its checkpoints hold the adapters and their optimizer state alone) whose worker is SIGKILLed
    after step 3, in its probe: Ray Train starts the worker again from the step-2 checkpoint, which loads the
    frozen base again from policy.model, and the run ends with the weights of one never killed. The run's own
    W&B run goes on. A base whose files changed since the checkpoint is then refused."""
    from safetensors.torch import load_file, save_file

    from tgdpo_ray.train.checkpoints import ChangedConfigError, check_resumable

    base = tmp_path / "base"  # a copy of the tiny model, changed at the end
    shutil.copytree(tiny_model, base)

    def job(name, **training):
        return build_config({
            "run": {"name": name, "output_dir": str(tmp_path)},
            "data": {"train": {"path": str(demo_data["train"]), "limit": 64}, "max_length": 64,
                     "max_prompt_length": 32},
            "loss": {"type": "dpo"},
            "training": {"epochs": 1, "learning_rate": 1e-2, "max_tokens_per_batch": 192, "checkpoint_every": 2,
                         "max_failures": 1, **training},
            "policy": {"model": str(base), "lora": {"r": 4, "alpha": 8}},
            # Scored once, before the first run trains; the second reads the cache (no scorer starts).
            "scoring": {"mode": "cache", "cache_dir": str(tmp_path / "cache")},
            "tracking": {"wandb_project": "tgdpo-test"},  # offline (conftest.py)
        })

    never_killed = run_train(job("never-killed"))
    faults = tmp_path / "faults"
    faults.mkdir()
    registered = tmp_path / "worker-killed" / "checkpoints" / "worker-killed" / "checkpoint_manager_snapshot.json"
    config = job("worker-killed", probe={"function": "tests.faults:kill_once_after", "every": 1, "arguments": {
        "step": 3, "folder": str(faults), "registered": str(registered)}})
    summary = run_train(config)
    pids = placement_pids(config.run_dir, "policy")
    assert len(pids) == 2 and int((faults / "killed").read_text()) in pids  # the killed worker, then its successor
    assert summary["complete"] and summary["steps"] == never_killed["steps"] > 3
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    # Before step 1, after steps 1 and 2; the fourth call killed its worker; the restart went on from step 2's
    # checkpoint, and probed after step 3 again.
    assert [r["probe"]["probe_calls"] for r in records if "probe" in r][:4] == [1, 2, 3, 5]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))  # no step twice
    assert sorted(pair for r in steps for pair in r["pair_ids"]) == list(range(64))  # each pair once
    for folder, name in (("model", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        want, got = (load_file(str(run / folder / name)) for run in (tmp_path / "never-killed", config.run_dir))
        worst = max((want[key] - got[key]).abs().max().item() for key in want)
        assert worst <= 1e-6, f"{folder}: weights after the restart differ by {worst}"
    # The restarted worker continued the run's own W&B run (the id kept in tracking.json) from its checkpoint. The
    # killed worker's offline file may lack its records: W&B's service died with it before writing them.
    runs = wandb_runs(config.run_dir)
    run_id = json.loads((config.run_dir / "tracking.json").read_text())["wandb_run_id"]
    assert len(runs) == 2 and runs[1]["id"] == run_id and runs[0].get("id", run_id) == run_id
    assert runs[1]["steps"] == list(range(3, summary["steps"] + 1)) and runs[1]["exit_code"] == 0

    # The base retrained in place: the checkpoint's adapters would mean something else on it.
    weights_file = base / "model.safetensors"
    changed = {key: value + 0.01 if key.endswith("norm.weight") else value
               for key, value in load_file(str(weights_file)).items()}
    save_file(changed, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(ChangedConfigError, match=r"the files of policy.model \(the LoRA base\)"):
        check_resumable(config)
