"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): groups land on the nodes their labels name (the
tokenization pass on nodes other than the driver's), and a scorer node that disappears mid-run costs nothing but
time."""

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import trained_pair_ids, without_local_ray
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.experiments.demo import make_demo_model
from tgdpo_ray.train.driver import run_train


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    with without_local_ray():
        # The head takes a node for dead after a few failed health checks: by default 5 of them, 3 s apart, so the
        # lost scorer node below went unnoticed for about 15 s. Checks every 0.5 s, 3 failures, here; each check
        # still has 10 s to answer, so a busy node that is alive is not taken for dead.
        health_checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 4, "num_gpus": 0, "_system_config": health_checks})
        nodes = {
            "policy": cluster.add_node(num_cpus=3, num_gpus=2, labels={"tgdpo-group": "policy"}),
            "scorer-a": cluster.add_node(num_cpus=2, num_gpus=1, labels={"tgdpo-group": "scorer"}),
            "scorer-b": cluster.add_node(num_cpus=2, num_gpus=1, labels={"tgdpo-group": "scorer"}),
        }
        ray.init(address=cluster.address)
        yield cluster, {name: node.node_id for name, node in nodes.items()}, nodes
        ray.shutdown()
        cluster.shutdown()


def placements(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "placement").glob("*.json"))]


def test_groups_follow_their_labels_and_survive_a_lost_scorer_node(cluster, tiny_model, demo_data, tmp_path):
    ray_cluster, node_ids, nodes = cluster
    slow_reference = str(make_demo_model(str(tmp_path / "slow-ref"), hidden_size=512, layers=8))
    config = build_config({
        "run": {"name": "labelled", "output_dir": str(tmp_path)},
        "data": {"train": {"path": str(demo_data["train"]), "limit": 128}, "max_length": 64, "max_prompt_length": 32,
                 # Tokenized on the scorer nodes, never the driver's (the head), in several shards.
                 "tokenize": {"node_labels": {"tgdpo-group": "scorer"}, "shard_mib": 0.01}},
        "loss": {"type": "dpo"},
        "training": {"epochs": 1, "learning_rate": 1e-4, "max_tokens_per_batch": 512},
        "policy": {"model": tiny_model, "workers": 2, "gpus_per_worker": 1,
                   "node_labels": {"tgdpo-group": "policy"}},
        "reference": {"model": slow_reference, "batch_size": 2, "gpus_per_replica": 1,
                      "node_labels": {"tgdpo-group": "scorer"}},
    })
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run_train(config)))
    thread.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not [p for p in placements(config.run_dir) if p["role"] == "reference"]:
        time.sleep(0.1)
    first = next(p for p in placements(config.run_dir) if p["role"] == "reference")
    lost = next(name for name, node_id in node_ids.items() if node_id == first["node_id"])
    time.sleep(0.5)
    ray_cluster.remove_node(nodes[lost], allow_graceful=False)
    thread.join(timeout=600)
    assert "summary" in outcome, "the run did not finish"

    records = placements(config.run_dir)
    tokenize_nodes = {r["node_id"] for r in records if r["role"] == "tokenize"}
    assert tokenize_nodes and tokenize_nodes <= {node_ids["scorer-a"], node_ids["scorer-b"]}
    assert {r["node_id"] for r in records if r["role"] == "policy"} == {node_ids["policy"]}
    scorer_nodes = {r["node_id"] for r in records if r["role"] == "reference"}
    assert scorer_nodes == {node_ids["scorer-a"], node_ids["scorer-b"]}  # moved to the other scorer node
    assert trained_pair_ids(config.run_dir) == {0: list(range(128))}  # each pair once, by id

