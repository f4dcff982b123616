"""policy.lora: adapters put into the policy's linear layers train alone under every ZeRO stage, and an adapted
policy is exported merged (what vLLM and the next stage load) and as peft's adapter folder. The whole run (two
workers, ZeRO-3, evaluated by vLLM) is the e2e tgdpo run (tests/test_end_to_end.py); a LoRA run whose worker is
killed and that ends as one never killed is in tests/test_fault_tolerance.py."""

import pytest
import torch
from conftest import local_pairs

from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.job import LoraSection
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.modeling.loading import load_causal_lm
from tgdpo_ray.modeling.lora import (LoraTargetError, add_adapters, adapted_layers, is_adapter_key, merged_state,
                                     parameter_counts, save_adapter)
from tgdpo_ray.train.schedule import StepShare

LAYERS = 2  # the tiny model's decoder layers
PROJECTIONS = 7  # q, k, v, o, gate, up, down


def job(tiny_model, demo_data, tmp_path, zero_stage=0, lora=None, **training):
    return build_config({"run": {"output_dir": str(tmp_path)}, "loss": {"type": "simpo"},
                         "data": {"train": {"path": str(demo_data["train"]), "limit": 8}, "max_length": 64,
                                  "max_prompt_length": 32},
                         "training": {"learning_rate": 1e-2, **training},
                         "policy": {"model": tiny_model, "zero_stage": zero_stage, "lora": lora or {"r": 4}}})


def test_the_head_and_the_embeddings_are_refused_and_an_unknown_target_is_named(tiny_model, demo_data, tmp_path):
    with pytest.raises(ConfigError, match="lm_head cannot take adapters"):
        job(tiny_model, demo_data, tmp_path, lora={"target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(ConfigError, match="policy.lora.r"):
        job(tiny_model, demo_data, tmp_path, lora={"r": 0})
    with pytest.raises(LoraTargetError, match=r"policy.lora.target_modules \['qkv_proj'\]"):
        add_adapters(load_causal_lm(tiny_model, "fp32"), LoraSection(target_modules=["qkv_proj"]), seed=0)


def test_the_adapted_policy_computes_its_base_until_trained_and_its_exports_compute_it_after(tiny_model, tmp_path):
    from peft import PeftModel

    lora = LoraSection(r=4, alpha=8)
    model = add_adapters(load_causal_lm(tiny_model, "fp32"), lora, seed=1)
    counts = parameter_counts(model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {name for name in model.state_dict() if is_adapter_key(name)}
    assert len(trainable) == 2 * LAYERS * PROJECTIONS and counts["trainable_parameters"] < counts["parameters"] / 10
    inputs = torch.arange(1, 25).reshape(2, 12)
    base = load_causal_lm(tiny_model, "fp32")
    assert torch.equal(model(inputs).logits, base(inputs).logits)  # B starts at zero
    # The same seed draws the same adapters on every worker.
    again = add_adapters(load_causal_lm(tiny_model, "fp32"), lora, seed=1).state_dict()
    assert all(torch.equal(again[name], value) for name, value in model.state_dict().items())

    with torch.no_grad():  # as if trained: every B moves off zero
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1)
    adapted = model(inputs).logits
    state = model.state_dict()
    merged = merged_state(state, lora)
    assert set(merged) == set(base.state_dict())  # the plain model's names, nothing else
    changed = {name for name, value in merged.items() if not torch.equal(value, base.state_dict()[name])}
    assert changed == {f"{layer}.weight" for layer in adapted_layers(state)}
    base.load_state_dict(merged)
    assert torch.allclose(base(inputs).logits, adapted, atol=1e-5)
    # peft reads the adapter folder onto the base model, and its own merge gives our merged weights.
    save_adapter(tmp_path / "adapter", state, lora, tiny_model)
    with_peft = PeftModel.from_pretrained(load_causal_lm(tiny_model, "fp32"), str(tmp_path / "adapter"))
    assert torch.allclose(with_peft(inputs).logits, adapted, atol=1e-6)
    peft_merged = with_peft.merge_and_unload().state_dict()
    assert all(torch.allclose(peft_merged[name], value, atol=1e-6) for name, value in merged.items())


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_step_trains_the_adapters_alone_under_zero(one_process_group, tiny_model, demo_data, tmp_path,
                                                       zero_stage):
    """ZeRO-3 with gradient checkpointing: its partitioned, frozen base is gathered in every checkpointed layer's
    recomputation, and the adapters still get gradients though no layer's input needs one."""
    from deepspeed.runtime.zero import GatheredParameters

    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.train.worker import build_engine, load_policy, train_step

    config = job(tiny_model, demo_data, tmp_path, zero_stage, gradient_checkpointing=zero_stage == 3)
    pad_id, train, _ = local_pairs(config)
    model = load_policy(config, torch.device("cpu"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    engine = build_engine(model, config, total_steps=2, world_size=1)
    ids = [row["pair_id"] for row in train.rows]
    for _ in range(2):  # A has no gradient in the first step (B is zero), and moves in the second
        train_step(engine, StepShare([train.rows], len(ids), ids), config, build_loss(config.loss), pad_id,
                   torch.device("cpu"), 1)
    with GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
        after = {name: value.clone() for name, value in engine.module.state_dict().items()}
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == sorted(name for name in before if is_adapter_key(name))
    assert len(changed) == 2 * LAYERS * PROJECTIONS  # every A and every B
