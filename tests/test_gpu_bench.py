"""bench/gpu.py's toy-size smoke run (CPU, fp32): its JSON has the fields, every layout gives the padded layout's
per-pair losses and rewards (the same objective), and FlexAttention's BlockMask and the varlen sequences give the
dense mask's log-probs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu.py"
LAYOUTS = ("padded", "packed", "shared_prompt", "shared_prompt_flex", "packed_flex", "shared_prompt_varlen")
ATOL = 1e-4


def run_script(*args: str) -> subprocess.CompletedProcess:
    # A subprocess: the toy run swaps transformers' compiled flex_attention for the eager one, process-wide.
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "gpu.json"
    done = run_script("--toy", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def test_json_fields(toy_run):
    results, stdout = toy_run
    assert "toy-size smoke run" in stdout
    for key in ("device", "mfu", "shared_prompt_flex_vs_padded", "peak_tflops_measured", "timestamp", "versions",
                "model", "data", "layouts", "flops_formula", "attention_check", "lm_head", "flex_sweep"):
        assert key in results, key
    assert results["device"] == "cpu" and results["mode"] == "toy" and results["complete"]
    # No GPU figure from a toy run.
    assert results["mfu"] is None and results["peak_tflops_measured"] is None
    assert results["shared_prompt_flex_vs_padded"] is None
    assert results["heavy_modules_loaded"] == []  # the GPU image has no ray, deepspeed, vllm or pydantic
    assert set(results["versions"]) >= {"torch", "transformers"}
    for name in LAYOUTS:
        layout = results["layouts"][name]
        for key in ("pairs_per_s", "tokens_per_s", "micro_batches", "model_tflop_per_pass", "peak_memory_gib"):
            assert key in layout, (name, key)


def test_layouts_give_the_padded_losses(toy_run):
    results, _ = toy_run
    layouts = results["layouts"]
    padded = layouts["padded"]["per_pair"]
    assert len(padded) == results["data"]["pairs"]
    for name in LAYOUTS:
        assert layouts[name]["losses_finite"], name
        per_pair = layouts[name]["per_pair"]
        assert per_pair.keys() == padded.keys(), name
        for pair_id, (loss, chosen_reward, rejected_reward) in per_pair.items():
            assert all(math.isfinite(v) for v in (loss, chosen_reward, rejected_reward)), (name, pair_id)
            assert [loss, chosen_reward, rejected_reward] == pytest.approx(padded[pair_id], abs=ATOL), (name, pair_id)
    # The flex layouts ran forward only: FlexAttention has no CPU backward (the varlen sequences have one).
    assert layouts["packed"]["backward"] and not layouts["packed_flex"]["backward"]
    assert layouts["shared_prompt_varlen"]["backward"]


def test_flex_and_varlen_match_the_dense_mask(toy_run):
    results, _ = toy_run
    assert set(results["attention_check"]) == {"shared_prompt_flex", "packed_flex", "shared_prompt_varlen"}
    for name, check in results["attention_check"].items():
        assert check["answers_equal"], (name, check)
        assert check["max_abs_logp_diff"] <= ATOL, (name, check)
        assert check["pairs"] > 3  # several documents a row: the document masking is exercised
        assert "max_grad_rel_diff" not in check  # gradients are compared on a GPU only


def test_compiled_layouts_are_left_to_the_gpu(toy_run):
    results, _ = toy_run
    for name in ("padded_compiled", "shared_prompt_flex_compiled", "shared_prompt_flex_compiled_tuned",
                 "shared_prompt_varlen_compiled"):
        assert "GPU only" in results["layouts"][name]["skipped"]


def test_lm_head_and_flex_sweep_smoke(toy_run):
    """The GPU run's component checks, at toy size: the eager and compiled chunk math give the same gradients (both
    eager on the CPU), and the FlexAttention sweep times torch's defaults on real shared-prompt block masks."""
    results, _ = toy_run
    head = results["lm_head"]
    for name in ("eager_512", "fused_512", "fused_1024", "fused_2048"):
        assert head[name]["seconds"] > 0 and head[name]["max_grad_rel_diff_vs_eager"] < 1e-5, (name, head[name])
    sweep = results["flex_sweep"]
    assert sweep["micro_batches"] >= 1 and sweep["attended_pairs"] > 0
    # The block masks compute every attended pair, and in blocks of 64 they skip some (the toy rows are one block
    # of 128 long): smaller blocks fit the documents more closely.
    blocks = sweep["mask_blocks"]
    assert set(blocks) == {"64", "128"}
    for stats in blocks.values():
        assert stats["blocks_partial"] + stats["blocks_full"] <= stats["blocks_total"]
        assert stats["computed_pairs_over_attended"] >= 1
    assert blocks["64"]["blocks_partial"] + blocks["64"]["blocks_full"] < blocks["64"]["blocks_total"]
    assert blocks["64"]["computed_pairs_over_attended"] < blocks["128"]["computed_pairs_over_attended"]
    assert sweep["options"]["default"]["forward_s"] > 0 and sweep["options"]["default"]["backward_s"] is None
    assert set(sweep["references"]) == {"flex_causal", "sdpa_causal"}
    assert sweep["varlen"]["forward_s"] > 0  # varlen.py's sequences on the same rows


def test_toy_run_never_overwrites_the_gpu_results():
    done = run_script("--toy", "--out", str(REPO / "bench" / "results" / "gpu.json"))
    assert done.returncode != 0 and "does not overwrite" in done.stderr


def load_bench():
    """bench/gpu.py as a module (its flags are parsed only when run as a script)."""
    import importlib.util

    sys.path.insert(0, str(REPO / "bench"))  # it imports bench/packing.py by its plain name
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The bench's CPU layouts and the job config that trains the same way: (training.packing, training.attention).
TRAINER_CONFIG = {"padded": ("padded", "dense"), "packed": ("packed", "dense"),
                  "shared_prompt": ("shared_prompt", "dense"), "shared_prompt_varlen": ("shared_prompt", "varlen"),
                  "shared_prompt_flex": ("shared_prompt", "flex"), "packed_flex": ("packed", "flex")}


def test_the_bench_measures_the_trainers_step(tiny_model):
    """In every layout the bench runs on a CPU, its step (the model it prepares, the micro-batch loss it times) and
    the trainers' (train/worker.py's load_policy and step settings from a job config, the loss the config builds)
    give the same per-pair losses and the same gradients on one micro-batch (FlexAttention: losses only, it has no
    CPU backward)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tgdpo_ray.config.loader import build_config
    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.kernels.step import micro_batch_loss
    from tgdpo_ray.train.worker import load_policy, step_settings

    bench = load_bench()
    assert set(TRAINER_CONFIG) <= set(bench.LAYOUTS) and len(TRAINER_CONFIG) == 6
    rng = np.random.default_rng(0)
    rows = []
    for index in range(5):
        row = {"pair_id": index, "prompt_ids": list(rng.integers(5, 300, 3 + 2 * index)),
               "chosen_ids": list(rng.integers(5, 300, 2 + index)), "rejected_ids": list(rng.integers(5, 300, 4))}
        for side in ("chosen", "rejected"):
            for prefix in ("ref", "guidance"):
                row[f"{prefix}_{side}_logps"] = rng.normal(-4.0, 1.0, len(row[f"{side}_ids"])).astype(np.float32)
        rows.append(row)
    cpu, row_tokens = torch.device("cpu"), 64
    bench_model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for name, (packing, attention) in TRAINER_CONFIG.items():
        bench_packing, _, _ = bench.LAYOUTS[name]
        assert bench_packing == packing, name
        backward = attention != "flex"
        # The bench's step, as run_pass runs it: the mean loss of the micro-batch, backward.
        bench.prepare_layout(bench_model, *bench.LAYOUTS[name], cpu)
        bench_model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            per_pair = bench.run_pass(bench_model, [rows], packing, row_tokens, cpu, backward)
        # The trainers' step on the same pairs, its model loaded and prepared from a job config.
        config = build_config({"data": {"train": "x.jsonl"}, "policy": {"model": tiny_model},
                               "guidance": {"model": tiny_model}, "loss": {"type": "tgdpo"},
                               "training": {"packing": packing, "attention": attention if backward else "dense",
                                            "packed_row_tokens": row_tokens}}, check_paths=False)
        trainer_model = load_policy(config, cpu).train()
        if not backward:
            from tgdpo_ray.kernels import flex

            flex.enable(trainer_model)  # a trainer cannot run FlexAttention on a CPU; its forward can
        with torch.set_grad_enabled(backward):
            out, _ = micro_batch_loss(trainer_model, rows, build_loss(config.loss), step_settings(config),
                                      config_pad_id(tiny_model), cpu)
            if backward:
                out.losses.mean().backward()
        trainer_per_pair = {row["pair_id"]: [loss, chosen, rejected] for row, loss, chosen, rejected in
                            zip(rows, out.losses.tolist(), out.chosen_rewards.tolist(), out.rejected_rewards.tolist())}
        assert per_pair.keys() == trainer_per_pair.keys() and len(per_pair) == len(rows), name
        for pair_id, values in per_pair.items():
            assert values == pytest.approx(trainer_per_pair[pair_id], abs=1e-6), (name, pair_id)
        if backward:
            bench_grads = dict(bench_model.named_parameters())
            compared = 0
            for param_name, param in trainer_model.named_parameters():
                assert param.grad is not None, (name, param_name)
                torch.testing.assert_close(bench_grads[param_name].grad, param.grad, atol=1e-6, rtol=1e-5,
                                           msg=f"{name}: {param_name}")
                compared += 1
            assert compared > 5


def config_pad_id(model_dir: str) -> int:
    from tgdpo_ray.modeling.loading import load_tokenizer

    return load_tokenizer(model_dir).pad_token_id
