"""`tgdpo-ray plan`: the GPUs each group of a job takes, the scorer replicas that keep the trainers fed, and the
memory each policy worker's model states take, full fine-tune against LoRA.

The rule of thumb: a frozen forward costs about a third of a training step per token (a step is a forward
and a backward twice its cost). Every pair goes once through each scorer pool and once through the trainers,
so a pool whose model is as large as the policy needs a third of the trainers' GPUs, scaled by its model's
size relative to the policy's.

Model states follow ZeRO's accounting (Rajbhandari et al., 2020): the working weights, their gradients, and
AdamW's two fp32 moments (with an fp32 master copy under bf16), of which ZeRO-1 splits the optimizer state over
the workers, ZeRO-2 the gradients too, ZeRO-3 the weights too. Under LoRA only the adapters have gradients and
optimizer state; the frozen base costs its weights alone. Activations come on top.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from tgdpo_ray.common.model_files import model_files
from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.job import JobConfig, LoraSection
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


def meta_model(name_or_path: str, trust_remote_code: bool = False):
    """The model built from its config.json on the meta device (no weights read), to count its parameters;
    None when the config is not at hand or transformers cannot read it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = model_files(name_or_path)
    if folder is None or not (folder / "config.json").exists():
        return None
    try:
        model_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def model_state_bytes(parameters: int, trainable: int, workers: int, zero_stage: int, bf16: bool) -> int:
    """Bytes of one worker's weights, gradients and optimizer state (the module docstring's accounting)."""
    weight = 2 if bf16 else 4
    optimizer = 8 + (4 if bf16 else 0)  # AdamW's moments, and the fp32 master copy of bf16 weights
    return int(weight * parameters / (workers if zero_stage == 3 else 1)
               + weight * trainable / (workers if zero_stage >= 2 else 1)
               + optimizer * trainable / (workers if zero_stage >= 1 else 1))


def training_memory(config: JobConfig) -> Optional[dict]:
    """Each policy worker's model-state GiB as a full fine-tune and with LoRA (policy.lora, or its defaults), at
    the job's workers, ZeRO stage and precision (auto: bf16 on GPU workers); None when the model's config is not
    at hand. LoRA's figure is left out (None) when the default targets name no layer of this model."""
    from tgdpo_ray.modeling.lora import LoraTargetError, add_adapters, parameter_counts

    policy = config.policy
    model = meta_model(policy.model, policy.trust_remote_code)
    if model is None:
        return None
    base = parameter_counts(model)["parameters"]
    lora = policy.lora or LoraSection()
    try:
        adapters = parameter_counts(add_adapters(model, lora, seed=0))["trainable_parameters"]
    except LoraTargetError:
        if policy.lora is not None:  # the job's own targets: an error it would meet at its start
            raise
        adapters = None
    bf16 = policy.precision == "bf16" or (policy.precision == "auto" and policy.gpus_per_worker > 0)
    shape = (policy.workers, policy.zero_stage, bf16)
    each = {"full": model_state_bytes(base, base, *shape),
            "lora": model_state_bytes(base + adapters, adapters, *shape) if adapters is not None else None}
    return {"parameters": base, "lora_trainable": adapters, "lora_r": lora.r,
            "gib_per_worker": {key: value / 2**30 if value is not None else None for key, value in each.items()},
            "this_job": "lora" if policy.lora else "full", "dtype": "bf16" if bf16 else "fp32",
            "workers": policy.workers, "zero_stage": policy.zero_stage}


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
            "sizes_known": policy_params is not None, "pairs_stage": pairs_stage(config),
            "memory": training_memory(config)}


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


def format_memory(memory: dict) -> list[str]:
    gib = memory["gib_per_worker"]
    mark = {key: " <- this job" if memory["this_job"] == key else "" for key in gib}
    lines = [f"policy model states per worker ({memory['dtype']}, ZeRO-{memory['zero_stage']}, {memory['workers']} "
             "worker(s); weights, gradients and AdamW state, activations on top):",
             f"  full fine-tune {gib['full']:>10.2f} GiB  ({memory['parameters']:,} trainable){mark['full']}"]
    if gib["lora"] is None:
        return lines + ["  LoRA: its default target_modules name no layer of this model (set policy.lora."
                        "target_modules to see its figure)"]
    return lines + [f"  LoRA r {memory['lora_r']:<7} {gib['lora']:>10.2f} GiB  ({memory['lora_trainable']:,} "
                    f"trainable){mark['lora']}"]


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
    if plan["memory"]:
        lines += format_memory(plan["memory"])
    else:
        lines.append("(policy memory unknown here: policy.model's config.json is not at hand)")
    if plan["pairs_stage"]:
        lines.append(plan["pairs_stage"])
    if plan.get("data"):
        lines += format_data(plan["data"])
    lines += [f"warning: {warning}" for warning in plan["warnings"]]
    return "\n".join(lines)
