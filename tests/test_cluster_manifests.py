"""cluster/ manifests: they parse, pass schema checks, and offer the labels and GPUs that jobs/ asks for."""

import json
from pathlib import Path

import pytest
import yaml

from tgdpo_ray.config.job import JobConfig

REPO = Path(__file__).resolve().parent.parent
CLUSTER_JOBS = sorted(p for p in (REPO / "jobs").glob("llama3-8b-*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def raycluster() -> dict:
    return next(doc for doc in documents(REPO / "cluster/kuberay/raycluster.yaml") if doc["kind"] == "RayCluster")


def kuberay_groups() -> dict[str, dict]:
    """Worker group -> {labels, gpus per node, replicas}, from the group's labels and its container limits."""
    groups = {}
    for group in raycluster()["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups[group["groupName"]] = {"labels": group.get("labels", {}), "gpus": int(limits["nvidia.com/gpu"]),
                                      "max_nodes": group["maxReplicas"], "num_gpus": params.get("num-gpus")}
    return groups


def pod_specs() -> dict[str, dict]:
    spec = raycluster()["spec"]
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{group["groupName"]: group["template"]["spec"] for group in spec["workerGroupSpecs"]}}


def test_the_operators_rules_labels_at_the_top_gpus_as_declared_and_a_head_without_gpus():
    """What KubeRay's validation (>= 1.5) refuses, and what Ray then needs to place and autoscale the groups."""
    spec = raycluster()["spec"]
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        # KubeRay >= 1.5 rejects the whole RayCluster (no pod starts) when rayStartParams carry labels.
        assert "labels" not in group["rayStartParams"], group.get("groupName", "head")
    for name, group in kuberay_groups().items():
        assert group["labels"].get("tgdpo-group") == name
        assert group["num_gpus"] == str(group["gpus"]), f"{name}: num-gpus differs from the container's GPU limit"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert all("nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
               for container in head["template"]["spec"]["containers"])


def test_every_pod_shares_storage_it_can_write_with_room_in_shm_and_the_hub_cache_on_the_volume():
    claim = next(doc for doc in documents(REPO / "cluster/kuberay/raycluster.yaml")
                 if doc["kind"] == "PersistentVolumeClaim")
    # Block-storage default classes cannot provide ReadWriteMany: the class is named, for the user to set.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"].get("storageClassName")
    for name, pod in pod_specs().items():
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name  # Kubernetes' default: 64 MiB
        assert pod["securityContext"]["fsGroup"] == 100, name  # the image's user ray is in group 100 (users)
        env = {item["name"]: item for item in container["env"]}
        assert env["HF_HOME"]["value"].startswith("/mnt/shared/"), name
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], name
        if name != "head":
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_the_launchers_shared_storage_reaches_the_container_and_a_failed_mount_fails():
    config = yaml.safe_load((REPO / "cluster/launcher.yaml").read_text())
    # Ray runs inside Docker: only a bind mount makes the host's mount visible there.
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert any(option.startswith("-e HF_HOME=/mnt/shared/") for option in config["docker"]["run_options"])
    commands = config["initialization_commands"]
    assert any("mount -t nfs4" in command for command in commands)
    assert not any("|| true" in command for command in commands)


def test_the_image_leaves_local_environments_and_outputs_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", ".git/", "outputs/"} <= set(ignored)


def launcher_groups() -> dict[str, dict]:
    config = yaml.safe_load((REPO / "cluster/launcher.yaml").read_text())
    return {name: {"labels": node.get("labels", {}), "gpus": node["resources"].get("GPU", 0),
                   "max_nodes": node["max_workers"]}
            for name, node in config["available_node_types"].items()}


def test_the_parametrized_specs_are_there():
    """A renamed or moved spec would leave the checks below with fewer cases, or none, and still pass."""
    assert [p.name for p in CLUSTER_JOBS] == ["llama3-8b-dpo-guidance.yaml", "llama3-8b-onpolicy.yaml",
                                              "llama3-8b-pipeline.yaml", "llama3-8b-tgdpo.yaml"]
    assert [p.name for p in EVAL_JOBS] == ["eval-llama3-8b.yaml", "llama3-8b-onpolicy.yaml",
                                           "llama3-8b-pipeline.yaml"]


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
        low = section.replica_range[0]
        key = tuple(sorted(section.node_labels.items()))
        scorer_gpus[key] = scorer_gpus.get(key, 0) + low * section.gpus_per_replica
        needs.append((name, section.node_labels, None))
    if config.pairs is not None:  # its engines and its reward model run before the trainers, on the scorer nodes
        reward_model = config.pairs.ranker.reward_model
        needs.append(("pairs.generation", config.pairs.generation.node_labels,
                      config.pairs.engines * config.pairs.generation.tensor_parallel_size))
        needs.append(("pairs.ranker.reward_model", reward_model.node_labels,
                      reward_model.replica_range[0] * reward_model.gpus_per_replica))
    for name, labels, _ in needs:
        assert labels, f"{spec.name}: {name} is not pinned to a node group"
    # Every labelled group exists, and its nodes hold at least the GPUs the group needs at its minimum size.
    for name, labels, gpus in needs:
        matching = [g for g in offered.values() if labels.items() <= g["labels"].items()]
        assert matching, f"{spec.name}: no node group has labels {labels} ({name})"
        capacity = sum(g["gpus"] * g["max_nodes"] for g in matching)
        wanted = gpus if gpus is not None else scorer_gpus[tuple(sorted(labels.items()))]
        assert capacity >= wanted, f"{spec.name}: {name} needs {wanted} GPUs, nodes labelled {labels} hold {capacity}"


def evaluates_on_gpus(spec: Path) -> bool:
    evaluation = (yaml.safe_load(spec.read_text()) or {}).get("eval")
    return bool(evaluation) and evaluation.get("generation", {}).get("on_gpus", True)


# The cluster specs with an evaluation (the laptop ones, whose engines run on CPU, are left out).
EVAL_JOBS = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if evaluates_on_gpus(p)]


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


# KubeRay v1.7.0's CRD schemas, pruned to what the manifests use (tests/data/kuberay/SOURCE.md).
CRD_SCHEMAS = {"RayCluster": "raycluster.schema.json", "RayJob": "rayjob.schema.json"}


def crd_schema(kind: str) -> dict:
    return json.loads((REPO / "tests/data/kuberay" / CRD_SCHEMAS[kind]).read_text())


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the API server would prune or refuse: not among an object's `properties`, at every level the value
    reaches, unless the schema keeps unknown fields (x-kubernetes-preserve-unknown-fields) or maps any key. Also
    keys whose subschema the pruned test data left empty."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        if "properties" not in schema:
            values = schema.get("additionalProperties")
            if not isinstance(values, dict):
                return []
            return [found for key, item in value.items() for found in unknown_fields(item, values, f"{path}.{key}")]
        known = schema["properties"]
        # A known key whose subschema was pruned away: the test data is older than the manifest.
        stale = [f"{path}.{key} (rerun tests/data/kuberay/prune.py)" for key in value if known.get(key, None) == {}]
        return [f"{path}.{key}" for key in value if key not in known] + stale + [
            found for key, item in value.items() if key in known
            for found in unknown_fields(item, known[key], f"{path}.{key}")]
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [found for index, item in enumerate(value)
                for found in unknown_fields(item, schema["items"], f"{path}[{index}]")]
    return []


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_the_manifests_pass_kuberays_crd_schemas_with_no_unknown_field(kind):
    import copy

    import jsonschema

    path = REPO / "cluster/kuberay" / ("raycluster.yaml" if kind == "RayCluster" else "rayjob.yaml")
    (manifest,) = [doc for doc in documents(path) if doc["kind"] == kind]
    schema = crd_schema(kind)
    jsonschema.Draft7Validator(schema).validate(manifest)
    assert unknown_fields(manifest, schema) == []
    # The walk does find a field KubeRay does not know, wherever it is.
    misspelt = copy.deepcopy(manifest)
    misspelt["spec"]["shutdownAfterJobFinishs" if kind == "RayJob" else "enableInTreeAutoscalng"] = True
    assert len(unknown_fields(misspelt, schema)) == 1


def test_every_cluster_path_turns_on_rays_token_authentication():
    """An open Jobs API runs whatever it is sent: the RayCluster asks KubeRay for Ray's token authentication, in
    a form its CRD accepts (a mode it does not know is refused); the launcher's containers run in token mode with
    the token the user sets. (cluster/local-head.sh starts the head tests/test_jobs.py submits to.)"""
    options = yaml.safe_load((REPO / "cluster/launcher.yaml").read_text())["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options and "-e RAY_AUTH_TOKEN=SET_ME" in options
    import copy

    import jsonschema

    cluster = raycluster()
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError, match="'tokens' is not one of \\['disabled', 'token'\\]"):
        jsonschema.Draft7Validator(crd_schema("RayCluster")).validate(wrong)
