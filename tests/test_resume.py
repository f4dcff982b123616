"""Checkpoints and resume: a run stopped part-way and started again ends with the weights of a run that was
never interrupted, and trains every pair of every epoch exactly once."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tgdpo_ray.config import build_config
from tgdpo_ray.run import run_train


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def make_job(tiny_model, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")

    def make(name, *overrides):
        raw = {
            "run": {"name": name, "output_dir": str(root), "seed": 3},
            "data": {"train": {"path": str(demo_data["train"]), "limit": 64}, "max_length": 64,
                     "max_prompt_length": 32},
            "loss": {"type": "dpo"},
            "training": {"epochs": 2, "learning_rate": 1e-3, "max_tokens_per_batch": 512,
                         "gradient_accumulation_steps": 2, "checkpoint_every": 3, "keep_checkpoints": 2},
            "policy": {"model": tiny_model, "zero_stage": 2},
            "reference": {"batch_size": 8},
        }
        return build_config(raw, overrides=list(overrides))

    return make


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def train_records(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, make_job):
    config = make_job("uninterrupted")
    return config, run_train(config)


def test_a_stopped_run_resumes_to_the_same_weights(ray_cluster, make_job, uninterrupted):
    full_config, full = uninterrupted
    stopped = run_train(make_job("resumed", "training.max_steps=3"))
    assert stopped["steps"] == 3 and stopped["complete"] is False

    config = make_job("resumed")
    resumed = run_train(config)  # the same command again
    assert resumed["complete"] and resumed["steps"] == full["steps"]
    # Float noise bound: the resumed run replays the same micro-batches in the same order, so on one CPU
    # worker the weights agree to 1e-6 (they are usually bit-identical).
    expected, got = weights(full_config.run_dir), weights(config.run_dir)
    worst = max((expected[name] - got[name]).abs().max().item() for name in expected)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"

    records = train_records(config.run_dir)
    assert [r["step"] for r in records] == list(range(1, full["steps"] + 1))  # no step logged twice
    for epoch in (0, 1):
        assert sum(r["pairs"] for r in records if r["epoch"] == epoch) == 64  # every pair once per epoch
    # keep_checkpoints: only the newest two complete checkpoints remain.
    assert len(list((config.run_dir / "checkpoints").glob("step-*"))) == 2


def test_a_half_written_checkpoint_is_ignored(ray_cluster, make_job, uninterrupted):
    config = make_job("half-written", "training.checkpoint_hf_export=true")
    broken = config.run_dir / "checkpoints" / "step-00000004"
    broken.mkdir(parents=True)  # a save that died before state.json
    (broken / "rng-rank0.pt").write_bytes(b"partial")
    summary = run_train(config)
    assert summary["complete"] and summary["steps"] == uninterrupted[1]["steps"]  # trained from the start
    assert train_records(config.run_dir)[0]["step"] == 1
    # Each kept checkpoint also holds the policy in Hugging Face format.
    exports = sorted((config.run_dir / "checkpoints").glob("step-*/hf/model.safetensors"))
    assert len(exports) == 2


def test_resume_off_starts_afresh(ray_cluster, make_job, uninterrupted):
    before = weights(uninterrupted[0].run_dir)
    config = make_job("uninterrupted", "run.resume=false")  # its folder holds a final checkpoint
    summary = run_train(config)
    assert summary["steps"] == uninterrupted[1]["steps"]  # trained all over again, not resumed at the end
    assert len(train_records(config.run_dir)) == summary["steps"]
    after = weights(config.run_dir)
    assert max((before[name] - after[name]).abs().max().item() for name in before) <= 1e-6
