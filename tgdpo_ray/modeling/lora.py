"""LoRA (policy.lora): low-rank adapters put into the policy's linear layers with peft, and the two things an
adapted policy is exported as: the merged model (what vLLM and the next pipeline stage load) and the adapters
alone, in peft's folder layout.

The adapters go into the model in place (peft.inject_adapter_in_model), so the policy stays the Hugging Face
model the log-prob kernels and the probe read (get_decoder, get_output_embeddings). An adapted layer keeps its
frozen weight as `<layer>.base_layer.weight` and adds `<layer>.lora_A.default.weight` (r x in) and
`<layer>.lora_B.default.weight` (out x r); its output is base(x) + (alpha / r) * B(A(dropout(x))). B starts at
zero, so an adapted policy computes exactly what its base does until the first step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.config.job import LoraSection

ADAPTER = "default"  # peft's name for a model's only adapter
PEFT_PREFIX = "base_model.model."  # how peft's own folders name a weight of the model an adapter sits on


class LoraTargetError(UserError, ValueError):
    """policy.lora.target_modules that name no linear layer of the policy."""


def add_adapters(model, lora: LoraSection, seed: int):
    """Puts adapters into `model` in place and freezes everything else. The A matrices are drawn from `seed`
    alone, so every worker starts from the same adapters whatever its own seed."""
    from peft import LoraConfig, inject_adapter_in_model

    settings = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(settings, model)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise LoraTargetError(f"policy.lora.target_modules {lora.target_modules}: {err}") from None
    return model


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapted_layers(state: dict) -> list[str]:
    """The names of the adapted layers in a state dict of an adapted model."""
    return sorted(name[: -len(f".lora_A.{ADAPTER}.weight")] for name in state
                  if name.endswith(f".lora_A.{ADAPTER}.weight"))


def merged_state(state: dict, lora: LoraSection) -> dict:
    """The state dict of the plain model that computes what the adapted one does: every adapted layer's weight
    becomes base + (alpha / r) * B @ A (in fp32, then in the base's dtype), under the layer's own name."""
    scale = lora.alpha / lora.r
    merged = {name: value for name, value in state.items() if not is_adapter_key(name) and ".base_layer." not in name}
    for layer in adapted_layers(state):
        base = state[f"{layer}.base_layer.weight"]
        a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
        merged[f"{layer}.weight"] = (base.float() + scale * (b.float() @ a.float())).to(base.dtype)
        if f"{layer}.base_layer.bias" in state:
            merged[f"{layer}.bias"] = state[f"{layer}.base_layer.bias"]
    return merged


def save_adapter(folder: Path, state: dict, lora: LoraSection, base_model: str) -> None:
    """The adapters alone, as peft.PeftModel.from_pretrained(base, folder) reads them: adapter_config.json and
    adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model).save_pretrained(str(folder))
    weights = {PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): value.contiguous()
               for name, value in state.items() if is_adapter_key(name)}
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def parameter_counts(model) -> dict:
    """Parameters of a model: all of them and the trainable ones (the adapters, in an adapted model)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}


def adapter_summary(lora: LoraSection, counts: dict) -> str:
    share = counts["trainable_parameters"] / max(counts["parameters"], 1)
    return (f"LoRA r {lora.r} alpha {lora.alpha:g} on {', '.join(lora.target_modules)}: "
            f"{counts['trainable_parameters']:,} trainable of {counts['parameters']:,} parameters ({share:.2%})")
