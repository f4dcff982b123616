"""`tgdpo-ray plan`: GPUs per group, scorer replicas from the forward-is-a-third-of-a-step rule, warnings."""

from pathlib import Path

import pytest

from tgdpo_ray.cli import main
from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.experiments.demo import make_demo_model
from tgdpo_ray.launch.plan import format_plan, make_plan, measure_data, parameter_count, parse_cluster


@pytest.fixture(scope="module")
def big_guidance(tmp_path_factory):
    return str(make_demo_model(str(tmp_path_factory.mktemp("big")), hidden_size=256, layers=4))


def job(tiny_model, demo_data, guidance, *overrides):
    raw = {"data": {"train": str(demo_data["train"])},
           "policy": {"model": tiny_model, "workers": 6, "gpus_per_worker": 1},
           "reference": {"replicas": [1, 2], "gpus_per_replica": 1},
           "guidance": {"model": guidance, "replicas": 1, "gpus_per_replica": 1}}
    return build_config(raw, overrides=list(overrides))


def test_parameter_count_matches_the_real_model(tiny_model):
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert parameter_count(tiny_model) == pytest.approx(real, rel=0.01)  # norms are the only thing left out


def test_replicas_needed_scale_with_trainer_gpus_and_model_size(tiny_model, demo_data, big_guidance):
    plan = make_plan(job(tiny_model, demo_data, big_guidance))
    reference, guidance = plan["pools"]
    assert reference["gpus_needed"] == pytest.approx(6 / 3)  # same model as the policy: a third of 6 GPUs
    assert reference["replicas_needed"] == 2
    assert guidance["size_ratio"] > 3 and guidance["replicas_needed"] > reference["replicas_needed"]
    assert plan["total_gpus"] == (8, 9)
    # The guidance pool (1 replica) cannot keep up: a warning names it; the reference pool (up to 2) can.
    assert [w.split(":")[0] for w in plan["warnings"]] == ["guidance"]


def test_cache_mode_never_starves_training(tiny_model, demo_data, big_guidance):
    assert make_plan(job(tiny_model, demo_data, big_guidance, "scoring.mode=cache"))["warnings"] == []


def test_the_memory_of_a_full_and_a_lora_run_per_worker(tiny_model, demo_data, big_guidance):
    from tgdpo_ray.config.job import LoraSection
    from tgdpo_ray.modeling.loading import load_causal_lm
    from tgdpo_ray.modeling.lora import add_adapters

    plan = make_plan(job(tiny_model, demo_data, big_guidance, "policy.lora={r: 4}", "policy.zero_stage=3"))
    memory = plan["memory"]
    # Counted on the meta device, exactly as many as the real model and its adapters have.
    real = add_adapters(load_causal_lm(tiny_model), LoraSection(r=4), seed=0)
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert memory["lora_trainable"] == trainable
    assert memory["parameters"] == sum(p.numel() for p in real.parameters()) - trainable
    # Six bf16 workers (GPU workers, precision auto) under ZeRO-3: 2 + 2 + 12 bytes per trainable weight, and 2
    # per frozen one, all split six ways.
    gib = memory["gib_per_worker"]
    full, base = gib["full"] * 2**30, memory["parameters"]
    assert full == pytest.approx(16 * base / 6, abs=1)
    assert gib["lora"] * 2**30 == pytest.approx((2 * base + 16 * trainable) / 6, abs=1)
    lines = format_plan(plan).splitlines()
    assert any(line.startswith("  LoRA r 4") and line.endswith("<- this job") for line in lines)
    assert make_plan(job(tiny_model, demo_data, big_guidance))["memory"]["this_job"] == "full"


def test_a_model_whose_layers_lora_defaults_miss_gets_the_full_figure_alone(tmp_path):
    from transformers import GPT2Config

    from tgdpo_ray.modeling.lora import LoraTargetError

    GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100).save_pretrained(tmp_path)  # c_attn, c_proj, ...
    raw = {"data": {"train": "unused.jsonl"}, "loss": {"type": "dpo"}, "policy": {"model": str(tmp_path)}}
    memory = make_plan(build_config(raw, check_paths=False))["memory"]
    assert memory["gib_per_worker"]["lora"] is None and memory["parameters"] > 0
    assert "LoRA: its default target_modules name no layer" in format_plan(make_plan(build_config(raw, check_paths=False)))
    with pytest.raises(LoraTargetError, match=r"policy.lora.target_modules \['q_proj'\]"):
        make_plan(build_config(raw, check_paths=False, overrides=["policy.lora.target_modules=[q_proj]"]))


def test_cluster_too_small(tiny_model, demo_data, big_guidance):
    plan = make_plan(job(tiny_model, demo_data, big_guidance, "scoring.mode=cache"), parse_cluster("gpus=4,cpus=64"))
    assert plan["warnings"] == ["the job needs at least 8 GPUs at once; the cluster has 4"]
    with pytest.raises(ConfigError, match="expected gpus=N,cpus=N"):
        parse_cluster("gpu=4")


def test_plan_command_prints_the_table(tiny_model, demo_data, big_guidance, tmp_path, capsys):
    import yaml

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job(tiny_model, demo_data, big_guidance).model_dump(mode="json")))
    assert main(["plan", "--config", str(spec), "--cluster", "gpus=16,cpus=64"]) == 0
    out = capsys.readouterr().out
    assert "policy" in out and "reference" in out and "cluster: 16 GPUs" in out and "warning: guidance" in out
    assert format_plan(make_plan(job(tiny_model, demo_data, big_guidance))).count("\n") >= 5


def test_a_pipeline_with_a_pairs_stage_says_what_that_stage_holds(capsys):
    spec = Path(__file__).resolve().parent.parent / "jobs" / "llama3-8b-onpolicy.yaml"
    assert main(["plan", "--config", str(spec), "--cluster", "gpus=16,cpus=160"]) == 0
    out = capsys.readouterr().out
    assert "pairs stage first: 8 sampling engine(s) of 1 GPU(s), then the reward model's pool of 1-8 replica(s)" in out


def test_measure_adds_the_tokenized_data_and_each_layout(ray_cluster, tiny_model, demo_data, big_guidance, tmp_path,
                                                         capsys):
    import yaml

    spec = tmp_path / "job.yaml"
    config = job(tiny_model, demo_data, big_guidance, "training.packing=packed", f"run.output_dir={tmp_path}")
    spec.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["plan", "--config", str(spec), "--measure"]) == 0
    out = capsys.readouterr().out
    assert "data: 384 pairs (0 skipped)" in out and "packed" in out and "<- training.packing" in out
    data = measure_data(config, log=lambda _: None)
    layouts = data["layouts"]
    # Padding costs tokens; a shared prompt is counted once.
    assert layouts["padded"]["tokens"] > layouts["packed"]["tokens"] > layouts["shared_prompt"]["tokens"]
    tokens = data["tokens"]
    assert layouts["packed"]["tokens"] == tokens["chosen"] + tokens["rejected"] + 2 * tokens["prompt"]
