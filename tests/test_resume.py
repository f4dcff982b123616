"""Checkpoints and resume, on two workers: a run stopped part-way and started again trains the same pairs in the
same steps as a run that was never interrupted, ends with its weights, and trains every pair of every epoch
exactly once; a checkpoint made under another config is not resumed. Checkpoints go through Ray Train's storage:
the run folder by default, or run.checkpoint_storage."""

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tgdpo_ray.config.job import JobConfig
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.launch.pipeline import stage_config
from tgdpo_ray.train.checkpoints import (ChangedConfigError, CheckpointSpaceError, check_resumable, checkpoint_storage,
                                         config_changes, finished_run, local_storage, require_space, resumed_epoch)
from tgdpo_ray.train.driver import run_train


@pytest.fixture(scope="module")
def make_job(tiny_model, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")

    def make(name, *overrides):
        raw = {
            "run": {"name": name, "output_dir": str(root), "seed": 3},
            "data": {"train": {"path": str(demo_data["train"]), "limit": 64},
                     "eval": {"path": str(demo_data["test"]), "limit": 8}, "max_length": 64, "max_prompt_length": 32},
            "loss": {"type": "dpo"},
            "training": {"epochs": 2, "learning_rate": 1e-3, "max_tokens_per_batch": 512, "eval_every": 2,
                         "gradient_accumulation_steps": 2, "checkpoint_every": 3, "keep_checkpoints": 2},
            "policy": {"model": tiny_model, "zero_stage": 2, "workers": 2},
            "reference": {"batch_size": 8},
            # Scored once, into a cache every run here reads: stream mode would start a scorer pool for each epoch
            # of each run (6 s each on 2 cores). Resume sees the same pairs in the same order either way.
            "scoring": {"mode": "cache", "cache_dir": str(root / "cache")},
        }
        return build_config(raw, overrides=list(overrides))

    return make


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def train_records(run_dir: Path) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "eval" not in record]


def steps_pairs(run_dir: Path) -> list[list[int]]:
    return [record["pair_ids"] for record in train_records(run_dir)]


def checkpoints_folder(config) -> Path:
    """The run's folder in Ray Train's checkpoint storage (a local one in these tests)."""
    storage, name = checkpoint_storage(config)
    return Path(storage.removeprefix("file://")) / name


# The run every other run here compares with. Its checkpoints go to a storage of their own, named by URI as object
# storage would be, each with the policy in Hugging Face format; before it starts, that storage holds a checkpoint
# whose save died half-way (test_a_half_written_checkpoint_is_ignored).
UNINTERRUPTED = ("training.checkpoint_hf_export=true",)


@dataclass
class Uninterrupted:
    """The run, and what it left before any test ran its folder again."""

    config: JobConfig
    summary: dict
    storage: str  # the override that names its checkpoint storage
    lines: list  # its metrics.jsonl: training steps and held-out evaluations
    weights: dict
    exports: list  # the checkpoints that hold a Hugging Face export

    @property
    def records(self) -> list:
        """Its training steps."""
        return [line for line in self.lines if "eval" not in line]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, make_job, tmp_path_factory):
    storage = f"run.checkpoint_storage=file://{tmp_path_factory.mktemp('storage')}"
    config = make_job("uninterrupted", *UNINTERRUPTED, storage)
    # A save that died while the workers copied their files: rank 0's are there, state.json included, but Ray
    # Train never registered the checkpoint, so it must not be loaded.
    broken = checkpoints_folder(config) / "step-00000004-epoch-0"
    broken.mkdir(parents=True)
    (broken / "rng-rank0.pt").write_bytes(b"partial")
    (broken / "state.json").write_text(json.dumps({"step": 4, "epoch": 0, "epoch_pairs_done": list(range(32))}))
    summary = run_train(config)
    exports = sorted(path.parent.parent.name for path in checkpoints_folder(config).glob("step-*/hf/model.safetensors"))
    lines = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return Uninterrupted(config, summary, storage, lines, weights(config.run_dir), exports)


def test_resume_off_starts_afresh_and_a_stopped_run_resumes_to_the_same_weights(make_job, uninterrupted):
    full = uninterrupted
    # The finished run's folder, started over (run.resume false) and stopped one step into the second epoch.
    stop_at = sum(record["epoch"] == 0 for record in full.records) + 1
    config = make_job("uninterrupted", *UNINTERRUPTED, full.storage)
    started = time.time()
    stopped = run_train(make_job("uninterrupted", *UNINTERRUPTED, full.storage, "run.resume=false",
                                 f"training.max_steps={stop_at}"))
    assert stopped["steps"] == stop_at and stopped["complete"] is False
    # Started afresh: the finished run's checkpoints and lines are gone (resumed from its final checkpoint, the
    # run would have trained nothing and kept them).
    assert [(r["step"], r["time"] > started) for r in train_records(config.run_dir)] == \
        [(step, True) for step in range(1, stop_at + 1)]

    latest = json.loads((max(checkpoints_folder(config).glob("step-*")) / "state.json").read_text())
    assert resumed_epoch(config) == latest["epoch"] == 1  # read from Ray Train's record of the checkpoints
    assert resumed_epoch(make_job("never-run")) == 0
    resumed_at = time.time()
    resumed = run_train(config)  # the finished run's own command again: it resumes
    assert resumed["complete"] and resumed["steps"] == full.summary["steps"]
    # The same seed on two workers, stopped and resumed: the same pairs in the same steps as the uninterrupted
    # run. Float noise bound: the resumed run replays the same micro-batches in the same order, so on CPU workers
    # the weights agree to 1e-6 (they are usually bit-identical).
    assert steps_pairs(config.run_dir) == [record["pair_ids"] for record in full.records]
    got = weights(config.run_dir)
    worst = max((full.weights[name] - got[name]).abs().max().item() for name in full.weights)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"

    records = train_records(config.run_dir)
    assert [r["step"] for r in records] == list(range(1, full.summary["steps"] + 1))  # no step logged twice
    assert [r["step"] for r in records if r["time"] < resumed_at] == list(range(1, stop_at + 1))  # not trained again
    for epoch in (0, 1):  # every pair once per epoch, by id
        assert sorted(i for r in records if r["epoch"] == epoch for i in r["pair_ids"]) == list(range(64))
    # keep_checkpoints: only the newest two checkpoints remain.
    assert len(list(checkpoints_folder(config).glob("step-*"))) == 2


def test_a_half_written_checkpoint_is_ignored(uninterrupted):
    assert uninterrupted.summary["complete"] and uninterrupted.records[0]["step"] == 1  # trained from the start
    assert not (uninterrupted.config.run_dir / "checkpoints").exists()  # nothing in the run folder
    # Each kept checkpoint also holds the policy in Hugging Face format.
    assert len(uninterrupted.exports) == 2 and "step-00000004-epoch-0" not in uninterrupted.exports


def test_held_out_every_few_steps_and_a_finished_run_started_again_keeps_its_metrics(make_job, uninterrupted):
    config, first = uninterrupted.config, uninterrupted.summary
    evaluated = [line["step"] for line in uninterrupted.lines if "eval" in line]
    epoch_ends = {max(r["step"] for r in uninterrupted.records if r["epoch"] == epoch) for epoch in (0, 1)}
    # Every second step, and at each epoch's end unless that step was just evaluated.
    assert first["steps"] >= 3 and evaluated == sorted(set(range(2, first["steps"] + 1, 2)) | epoch_ends)
    assert all(line["eval"]["pairs"] == 8 and "dpo_loss" in line["eval"] for line in uninterrupted.lines
               if "eval" in line)
    # Started again (after any rerun of the same folder by the tests above), it has nothing to train: it says so
    # and returns its summary, starting no worker group (the folder is as it was: no placement record is new).
    finished = json.loads((config.run_dir / "summary.json").read_text())
    placed = sorted(path.stat().st_mtime_ns for path in (config.run_dir / "placement").iterdir())
    printed = []
    again = run_train(make_job("uninterrupted", *UNINTERRUPTED, uninterrupted.storage), log=printed.append)
    assert any("already trained every epoch" in line for line in printed)
    assert sorted(path.stat().st_mtime_ns for path in (config.run_dir / "placement").iterdir()) == placed
    assert again["steps"] == finished["steps"] == first["steps"]
    assert again["eval"] == finished["eval"] and again["eval_step"] == first["steps"]  # not nan, not missing
    # A run with no checkpoint has not finished (one stopped by max_steps trains on: the first test above).
    assert finished_run(make_job("never-run")) is None


def test_a_checkpoint_made_under_another_config_is_not_resumed(make_job, uninterrupted, tmp_path):
    config, storage = uninterrupted.config, uninterrupted.storage
    changed = make_job("uninterrupted", *UNINTERRUPTED, storage, "training.learning_rate=2e-3", "loss.beta=0.2")
    # Refused before anything starts (no tokenization, no Ray Train run), naming each key that differs.
    with pytest.raises(ChangedConfigError, match=r"run 'uninterrupted' would resume from .*step-.*made under another "
                                                 r"config: loss\.beta: 0\.1 -> 0\.2; training\.learning_rate: "
                                                 r"0\.001 -> 0\.002\. .*run\.resume=false.*run\.on_config_change"):
        run_train(changed)
    # Where it runs, how far it goes and what it logs may change.
    longer = make_job("uninterrupted", *UNINTERRUPTED, storage, "training.max_steps=100", "training.log_every=5",
                      "policy.cpus_per_worker=2", "reference.batch_size=4", "training.keep_checkpoints=3")
    check_resumable(longer)
    # Asked to, a changed config starts over: the checkpoints go (here those of a copy of the storage).
    copy = tmp_path / "storage"
    shutil.copytree(storage.split("=", 1)[1].removeprefix("file://"), copy)
    restart = make_job("uninterrupted", *UNINTERRUPTED, f"run.checkpoint_storage=file://{copy}",
                       "training.learning_rate=2e-3", "run.on_config_change=restart")
    printed = []
    check_resumable(restart, log=printed.append)
    assert "learning_rate" in printed[0] and "starts over" in printed[0]
    assert resumed_epoch(restart) == 0 and not (copy / "uninterrupted").exists()
    assert list(checkpoints_folder(config).glob("step-*"))  # the original storage is untouched


def test_config_changes_names_nested_keys_and_ignores_where_the_run_goes():
    base = build_config({"loss": {"type": "dpo"}, "policy": {"model": "m"}, "data": {"train": "t.jsonl"}},
                        check_paths=False)
    saved = base.model_dump(mode="json")
    assert config_changes(saved, base) == []
    moved = build_config({"loss": {"type": "dpo"}, "policy": {"model": "m", "workers": 2},
                          "data": {"train": "t.jsonl"}, "ray": {"num_cpus": 4}, "run": {"resume": False}},
                         check_paths=False)
    assert config_changes(saved, moved) == ["policy.workers: 1 -> 2"]


def test_checkpoints_go_to_the_run_folder_or_to_the_configured_storage(make_job, tmp_path, monkeypatch):
    default = make_job("stored")
    assert checkpoint_storage(default) == (str(default.run_dir / "checkpoints"), "stored")
    monkeypatch.chdir(tmp_path)
    assert checkpoint_storage(make_job("stored", "run.checkpoint_storage=shared/ckpt")) == \
        (str(tmp_path / "shared" / "ckpt"), "stored")  # a relative folder is the working directory's
    remote = make_job("stored", "run.checkpoint_storage=s3://bucket/ckpt", "kind=pipeline")
    assert checkpoint_storage(remote) == ("s3://bucket/ckpt", "stored")
    # A pipeline's stages keep their checkpoints under its name, as their run folders are.
    assert checkpoint_storage(stage_config(remote, "dpo")) == ("s3://bucket/ckpt/stored", "dpo")


def test_a_checkpoint_that_cannot_fit_is_refused_before_the_save_starts(make_job, tmp_path):
    folder = tmp_path / "not-made-yet" / "run"  # Ray makes the run's folder at its first save: its disk counts
    require_space(folder, 0, "checkpoint step-1")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CheckpointSpaceError, match=rf"checkpoint step-1 needs about .* GiB in {folder}, whose disk "
                                                   r"has .* GiB free: .*TMPDIR.*training.keep_checkpoints"):
        require_space(folder, free + 2**40, "checkpoint step-1")
    # The free space of local storage is checked too; object storage has none to check.
    config = make_job("where")
    assert local_storage(config) == config.run_dir / "checkpoints" / "where"
    assert local_storage(make_job("where", f"run.checkpoint_storage=file://{tmp_path}")) == tmp_path / "where"
    assert local_storage(make_job("where", "run.checkpoint_storage=s3://bucket/runs")) is None

