"""`tgdpo-ray plan`: the GPUs each group of a job takes, and the scorer replicas that keep the trainers fed.

The rule of thumb: a frozen forward costs about a third of a training step per token (a step is a forward
and a backward twice its cost). Every pair goes once through each scorer pool and once through the trainers,
so a pool whose model is as large as the policy needs a third of the trainers' GPUs, scaled by its model's
size relative to the policy's.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from tgdpo_ray.common.model_files import model_files
from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.job import JobConfig
from tgdpo_ray.runtime.placement import training_groups

FORWARD_SHARE_OF_STEP = 1 / 3


def parameter_count(name_or_path: str) -> Optional[int]:
    """Approximate parameters of a decoder from its config.json (None when the config is not at hand)."""
    folder = model_files(name_or_path)
    if folder is None or not (folder / "config.json").exists():
        return None
    config = json.loads((folder / "config.json").read_text())
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    vocab, intermediate = config.get("vocab_size"), config.get("intermediate_size") or 4 * (hidden or 0)
    if not (hidden and layers and vocab):
        return None
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    attention = hidden * heads * head_dim * 2 + hidden * kv * 2
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def parse_cluster(text: str) -> dict[str, float]:
    """`gpus=16,cpus=128` -> {"GPU": 16, "CPU": 128}: a cluster described on the command line."""
    cluster = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        name = {"gpus": "GPU", "cpus": "CPU"}.get(key.strip().lower())
        if name is None or not value.strip().replace(".", "", 1).isdigit():
            raise ConfigError(f"--cluster {text!r}: expected gpus=N,cpus=N")
        cluster[name] = float(value)
    return cluster


def make_plan(config: JobConfig, cluster: Optional[dict[str, float]] = None) -> dict:
    policy_gpus = config.policy.workers * config.policy.gpus_per_worker
    policy_params = parameter_count(config.policy.model)
    groups = training_groups(config)
    models = {"reference": config.reference_model, "guidance": config.guidance.model}
    warnings, pools = [], []
    for group in groups[1:]:  # the scorer pools
        params = parameter_count(models[group.name]) if models[group.name] else None
        size_ratio = params / policy_params if params and policy_params else 1.0
        gpus_needed = policy_gpus * FORWARD_SHARE_OF_STEP * size_ratio
        replicas_needed = math.ceil(gpus_needed / group.gpus_each - 1e-9) if group.gpus_each else None
        high = group.processes[1]
        pools.append({"group": group.name, "size_ratio": round(size_ratio, 3), "gpus_needed": round(gpus_needed, 2),
                      "replicas_needed": replicas_needed, "max_replicas": high})
        if replicas_needed and high < replicas_needed and config.scoring.mode == "stream":
            warnings.append(f"{group.name}: at most {high} replica(s) of {group.gpus_each:g} GPU, but about "
                            f"{replicas_needed} are needed to keep {policy_gpus:g} training GPUs fed: scoring "
                            f"will starve training (raise {group.name}.replicas, or score ahead with "
                            f"scoring.mode: cache)")
    rows = [{"group": group.name, "processes": group.processes, "gpus_each": group.gpus_each,
             "gpus": tuple(n * group.gpus_each for n in group.processes), "labels": group.labels}
            for group in groups]
    total = tuple(sum(row["gpus"][i] for row in rows) for i in (0, 1))
    if cluster is not None and total[0] > cluster.get("GPU", 0):
        warnings.append(f"the job needs at least {total[0]:g} GPUs at once; the cluster has {cluster.get('GPU', 0):g}")
    elif cluster is not None and total[1] > cluster.get("GPU", 0):
        warnings.append(f"the scorer pools can only grow to {cluster.get('GPU', 0) - total[0]:g} spare GPUs of the "
                        f"{total[1] - total[0]:g} their maximum sizes ask for")
    return {"groups": rows, "total_gpus": total, "pools": pools, "cluster": cluster, "warnings": warnings,
            "sizes_known": policy_params is not None, "pairs_stage": pairs_stage(config)}


def pairs_stage(config: JobConfig) -> Optional[str]:
    """What a pipeline's pairs stage holds, before any trainer starts (its phases run one after the other)."""
    if config.pairs is None:
        return None
    section, ranker = config.pairs, config.pairs.ranker
    gpus = section.generation.tensor_parallel_size if section.generation.on_gpus else 0
    text = f"pairs stage first: {section.engines} sampling engine(s) of {gpus:g} GPU(s), then "
    if ranker.type == "reward_model":
        low, high = ranker.reward_model.replica_range
        each = ranker.reward_model.gpus_per_replica
        return text + f"the reward model's pool of {low}-{high} replica(s) of {each:g} GPU"
    if ranker.type == "judge" and ranker.judge.backend == "vllm":
        judge_gpus = ranker.judge.tensor_parallel_size if ranker.judge.on_gpus else 0
        return text + f"one judge engine of {judge_gpus:g} GPU(s)"
    return text + f"the {ranker.type} ranker (no GPU)"


def measure_data(config: JobConfig, log=print) -> dict:
    """The training data as the tokenization pass measures it (Ray started): pairs, tokens, and what an epoch
    costs in each layout with the job's token budget, in its first epoch's order."""
    from tgdpo_ray.data.tokenize_pass import tokenize_split
    from tgdpo_ray.train.schedule import epoch_order, epoch_shape

    split = tokenize_split("train", config.data.train, config, log)
    order = epoch_order(len(split), config.run.seed, 0, config.training.shuffle)
    layouts = {}
    for packing in ("padded", "packed", "shared_prompt"):
        training = config.training.model_copy(update={"packing": packing})
        shape = epoch_shape(split.lengths, order, training, config.policy.workers)
        layouts[packing] = {"steps": shape.steps, "micro_batches": shape.micro_batches, "tokens": shape.tokens}
    return {"pairs": len(split), "skipped": split.report()["rows_skipped"], "tokens": split.report()["tokens"],
            "epochs": config.training.epochs, "packing": config.training.packing, "layouts": layouts}


def format_data(data: dict) -> list[str]:
    tokens = data["tokens"]
    lines = [f"data: {data['pairs']} pairs ({data['skipped']} skipped); tokens: prompts {tokens['prompt']}, chosen "
             f"{tokens['chosen']}, rejected {tokens['rejected']}; longest pair {tokens['longest_pair']}"]
    padded = data["layouts"]["padded"]["tokens"]
    for packing, layout in data["layouts"].items():
        mark = " <- training.packing" if packing == data["packing"] else ""
        lines.append(f"  {packing:<13} {layout['tokens']:>12} tokens/epoch ({layout['tokens'] / padded:.0%} of padded),"
                     f" {layout['steps']} steps/epoch x {data['epochs']} epoch(s){mark}")
    return lines


def format_plan(plan: dict) -> str:
    span = lambda pair: f"{pair[0]:g}" if pair[0] == pair[1] else f"{pair[0]:g}-{pair[1]:g}"  # noqa: E731
    lines = [f"{'group':<10} {'processes':>9} {'GPUs each':>9} {'GPUs':>7}  labels"]
    for group in plan["groups"]:
        labels = ",".join(f"{k}={v}" for k, v in group["labels"].items()) or "-"
        lines.append(f"{group['group']:<10} {span(group['processes']):>9} {group['gpus_each']:>9g} "
                     f"{span(group['gpus']):>7}  {labels}")
    lines.append(f"{'total':<10} {'':>9} {'':>9} {span(plan['total_gpus']):>7}")
    if plan["cluster"] is not None:
        lines.append(f"cluster: {plan['cluster'].get('GPU', 0):g} GPUs, {plan['cluster'].get('CPU', 0):g} CPUs")
    for pool in plan["pools"]:
        needed = f"{pool['replicas_needed']} replica(s)" if pool["replicas_needed"] else "no GPU replicas set"
        lines.append(f"{pool['group']}: keeping the trainers fed takes ~{pool['gpus_needed']:g} GPUs "
                     f"(model size x{pool['size_ratio']:g} of the policy) = {needed}; pool max {pool['max_replicas']}")
    if not plan["sizes_known"]:
        lines.append("(model sizes unknown here: scorer models assumed as large as the policy)")
    if plan["pairs_stage"]:
        lines.append(plan["pairs_stage"])
    if plan.get("data"):
        lines += format_data(plan["data"])
    lines += [f"warning: {warning}" for warning in plan["warnings"]]
    return "\n".join(lines)
