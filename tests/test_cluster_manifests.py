"""cluster/ manifests: they parse, pass schema checks, and offer the labels and GPUs that jobs/ asks for."""

import json
from pathlib import Path

import pytest
import yaml

from tgdpo_ray.config import JobConfig

REPO = Path(__file__).resolve().parent.parent
CLUSTER_JOBS = sorted(p for p in (REPO / "jobs").glob("llama3-8b-*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def raycluster() -> dict:
    return next(doc for doc in documents(REPO / "cluster/kuberay/raycluster.yaml") if doc["kind"] == "RayCluster")


def kuberay_groups() -> dict[str, dict]:
    """Worker group -> {labels, gpus per node, replicas}, from rayStartParams and the container limits."""
    groups = {}
    for group in raycluster()["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        labels = dict(pair.split("=") for pair in params.get("labels", "").split(",") if pair)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(params["num-gpus"]) == int(limits["nvidia.com/gpu"]), group["groupName"]
        groups[group["groupName"]] = {"labels": labels, "gpus": int(params["num-gpus"]),
                                      "max_nodes": group["maxReplicas"]}
    return groups


def launcher_groups() -> dict[str, dict]:
    config = yaml.safe_load((REPO / "cluster/launcher.yaml").read_text())
    return {name: {"labels": node.get("labels", {}), "gpus": node["resources"].get("GPU", 0),
                   "max_nodes": node["max_workers"]}
            for name, node in config["available_node_types"].items()}


@pytest.mark.parametrize("groups", [kuberay_groups, launcher_groups], ids=["kuberay", "launcher"])
@pytest.mark.parametrize("spec", CLUSTER_JOBS, ids=lambda p: p.name)
def test_cluster_offers_what_each_job_asks_for(groups, spec):
    config = JobConfig.model_validate(yaml.safe_load(spec.read_text()))
    offered = groups()
    needs = [("policy", config.policy.node_labels, config.policy.workers * config.policy.gpus_per_worker)]
    scorers = [("reference", config.reference)] + ([("guidance", config.guidance)] if config.kind != "train"
                                                   or config.loss.type == "tgdpo" else [])
    scorer_gpus = {}
    for name, section in scorers:
        low = section.replicas if isinstance(section.replicas, int) else section.replicas[0]
        key = tuple(sorted(section.node_labels.items()))
        scorer_gpus[key] = scorer_gpus.get(key, 0) + low * section.gpus_per_replica
        needs.append((name, section.node_labels, None))
    for name, labels, _ in needs:
        assert labels, f"{spec.name}: {name} is not pinned to a node group"
    # Every labelled group exists, and its nodes hold at least the GPUs the group needs at its minimum size.
    for name, labels, gpus in needs:
        matching = [g for g in offered.values() if labels.items() <= g["labels"].items()]
        assert matching, f"{spec.name}: no node group has labels {labels} ({name})"
        capacity = sum(g["gpus"] * g["max_nodes"] for g in matching)
        wanted = gpus if gpus is not None else scorer_gpus[tuple(sorted(labels.items()))]
        assert capacity >= wanted, f"{spec.name}: {name} needs {wanted} GPUs, nodes labelled {labels} hold {capacity}"


# The cluster specs with an evaluation (the demo's runs on a laptop, on CPU).
EVAL_JOBS = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if p.name != "demo.yaml"
             and (yaml.safe_load(p.read_text()) or {}).get("eval") and "eval-demo" not in p.name]


@pytest.mark.parametrize("groups", [kuberay_groups, launcher_groups], ids=["kuberay", "launcher"])
@pytest.mark.parametrize("spec", EVAL_JOBS, ids=lambda p: p.name)
def test_cluster_fits_each_vllm_engine_on_one_node(groups, spec):
    config = JobConfig.model_validate(yaml.safe_load(spec.read_text()))
    offered = groups()
    for name, engine, count in (("generation", config.eval.generation, config.eval.generation.concurrent_models),
                                ("judge", config.eval.judge, 1)):
        if name == "judge" and engine.backend != "vllm":
            continue
        matching = [g for g in offered.values() if engine.node_labels.items() <= g["labels"].items()]
        assert engine.node_labels and matching, f"{spec.name}: eval.{name} is not pinned to an existing node group"
        # vLLM's tensor-parallel workers run inside the engine's actor: one node must hold all of its GPUs.
        assert max(g["gpus"] for g in matching) >= engine.tensor_parallel_size, f"{spec.name}: eval.{name}"
        capacity = sum(g["gpus"] * g["max_nodes"] for g in matching)
        assert capacity >= count * engine.tensor_parallel_size, f"{spec.name}: eval.{name}"


def test_raycluster_pod_templates_pass_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    spec = raycluster()["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, "1.33", strict=True)
    for doc in documents(REPO / "cluster/kuberay/raycluster.yaml"):
        if doc["apiVersion"] == "v1":  # the shared-storage claim is a core object: validate it whole
            kubernetes_validate.validate(doc, "1.33", strict=True)


def test_rayjob_runs_a_shipped_pipeline_on_the_raycluster():
    job = documents(REPO / "cluster/kuberay/rayjob.yaml")[0]
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == raycluster()["metadata"]["name"]
    spec = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert JobConfig.model_validate(yaml.safe_load((REPO / spec).read_text())).kind == "pipeline"


def test_launcher_config_passes_rays_own_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((REPO / "cluster/launcher.yaml").read_text()), schema)
