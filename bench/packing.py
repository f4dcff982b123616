"""Trainer steps in every layout, TGDPO against DPO and against the authors' in-process way, and log-prob peak
memory at a 128k vocabulary (CPU, fp32).

Measured side by side in one run on the same models and pairs, through the trainers' own micro_batch_loss:
- DPO with cached reference log-probs, padded vs packed vs shared_prompt;
- TGDPO with cached reference and guidance log-probs (what our trainers run: the scorer pools computed them);
- TGDPO the authors' way: policy, reference and guidance models all in the step of one process, padded.
Prints a table and merges its numbers into bench/results/latest.json.

    python bench/packing.py [--pairs 48] [--max-tokens 4096] [--row-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tgdpo_ray.common.provenance import provenance

RESULTS = Path(__file__).parent / "results" / "latest.json"


def lognormal(rng, low: int, high: int, median: float, size: int) -> np.ndarray:
    """Long-tailed lengths: most short, a few near `high`."""
    return np.clip(np.round(rng.lognormal(np.log(median), 1.0, size)), low, high).astype(int)


def make_pairs(count: int, vocab: int, seed: int = 0, prompt: tuple = (16, 512, 96), answer: tuple = (8, 768, 160),
               logp_mean: float = -9.0) -> list[dict]:
    """Random token ids, prompts and answers of long-tailed lengths ((shortest, longest, median) tokens; by default
    16..512 and 8..768), with reference and guidance log-probs per answer token (as the scorers would add)."""
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = (lognormal(rng, *prompt, count), lognormal(rng, *answer, count),
                                 lognormal(rng, *answer, count))
    pairs = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        pairs.append({"pair_id": i, "prompt_ids": rng.integers(3, vocab, p).tolist(),
                      "chosen_ids": rng.integers(3, vocab, c).tolist(),
                      "rejected_ids": rng.integers(3, vocab, r).tolist(),
                      **{f"{model}_{side}_logps": rng.normal(logp_mean, 1.0, n).astype(np.float32)
                         for model in ("ref", "guidance") for side, n in (("chosen", c), ("rejected", r))}})
    return pairs


def make_model(vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


# name: (loss, layout, reference and guidance computed inside the step)
VARIANTS = {
    "padded": ("dpo", "padded", False),
    "packed": ("dpo", "packed", False),
    "shared_prompt": ("dpo", "shared_prompt", False),
    "tgdpo_shared_prompt": ("tgdpo", "shared_prompt", False),
    "tgdpo_in_process": ("tgdpo", "padded", True),
}


def with_frozen_logps(rows: list[dict], reference, guidance) -> list[dict]:
    """The authors' step: the reference and guidance forwards run inside it, on the same padded rows."""
    from tgdpo_ray.scoring.pools import answer_values

    rows = [dict(row) for row in rows]
    for name, model in (("ref", reference), ("guidance", guidance)):
        chosen, rejected = answer_values(model, rows, 0, torch.device("cpu"), 1024, token_rewards=False)
        for row, c, r in zip(rows, chosen, rejected):
            row[f"{name}_chosen_logps"], row[f"{name}_rejected_logps"] = c, r
    return rows


def time_steps(pairs: list[dict], max_tokens: int, row_tokens: int, vocab: int) -> dict:
    from tgdpo_ray.config.loader import build_config
    from tgdpo_ray.kernels.batches import micro_batch_tokens, pack_by_token_budget
    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.kernels.step import micro_batch_loss
    from tgdpo_ray.train.worker import step_settings

    policy, reference, guidance = make_model(vocab, 0), make_model(vocab, 1).eval(), make_model(vocab, 2).eval()
    results = {"params_millions": round(sum(p.numel() for p in policy.parameters()) / 1e6, 1)}

    def step(rows, config, loss, in_process):
        rows = with_frozen_logps(rows, reference, guidance) if in_process else rows
        micro_batch_loss(policy, rows, loss, step_settings(config), 0, torch.device("cpu"))[0].losses.sum().backward()

    for name, (loss_type, packing, in_process) in VARIANTS.items():
        config = build_config({"data": {"train": "x.jsonl"}, "policy": {"model": "bench"},
                               "guidance": {"model": "bench"}, "loss": {"type": loss_type},
                               "training": {"packing": packing, "packed_row_tokens": row_tokens}},
                              check_paths=False)
        loss = build_loss(config.loss)
        batches = list(pack_by_token_budget(pairs, max_tokens, packing=packing))
        step(batches[0], config, loss, in_process)  # warm up
        policy.zero_grad(set_to_none=True)
        started = time.perf_counter()
        for rows in batches:
            step(rows, config, loss, in_process)
        seconds = time.perf_counter() - started
        computed = sum(micro_batch_tokens(rows, packing) for rows in batches)
        results[name] = {"loss": loss_type, "packing": packing, "frozen_models_in_step": in_process,
                         "seconds": round(seconds, 2), "micro_batches": len(batches),
                         "policy_tokens_computed": computed, "pairs_per_second": round(len(pairs) / seconds, 2)}
        print(f"  {name:<20} {seconds:7.1f} s  {len(batches):3d} micro-batches  {computed:7d} policy tokens",
              flush=True)
    return results


def logp_peak_memory(mode: str, tokens: int, vocab: int, hidden: int, chunk: int = 512) -> float:
    """Peak resident memory (MiB) added by one forward and backward of the answer-token log-probs (the LM-head
    weight's gradient included), in a fresh process. The peak is read from /proc (VmHWM, which starts anew at
    exec; getrusage's maxrss would carry this process's peak into the child)."""
    code = f"""
import re, torch
from tgdpo_ray.kernels.logprobs import lm_head_token_logps
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
torch.manual_seed(0)
hidden = torch.randn({tokens}, {hidden}, requires_grad=True)
weight = torch.empty({vocab}, {hidden}).normal_(0, 0.02).requires_grad_()
targets = torch.randint(0, {vocab}, ({tokens},))
before = peak()
if "{mode}" == "plain":  # logits, then log_softmax over the whole [tokens x vocab], then gather
    logps = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[:, None])[:, 0]
else:
    logps = lm_head_token_logps(hidden, weight, None, targets, {chunk})
logps.sum().backward()
print(peak() - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--row-tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16000)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pairs = make_pairs(args.pairs, args.vocab)
    print(f"trainer micro-batches: {args.pairs} pairs, prompts 16-512 / answers 8-768 tokens (long-tailed), "
          f"budget {args.max_tokens} tokens, packed rows of {args.row_tokens}", flush=True)
    steps = time_steps(pairs, args.max_tokens, args.row_tokens, args.vocab)
    seconds = {name: steps[name]["seconds"] for name in VARIANTS}
    print("log-prob peak memory, 4096 tokens x 128k vocabulary, hidden 512 (fresh process each):", flush=True)
    memory = {"plain": logp_peak_memory("plain", 4096, 128_256, 512),
              "fused": logp_peak_memory("fused", 4096, 128_256, 512, chunk=512),
              "fused_chunk_1024": logp_peak_memory("fused", 4096, 128_256, 512, chunk=1024),
              "fused_chunk_256": logp_peak_memory("fused", 4096, 128_256, 512, chunk=256)}
    print("  " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in memory.items()), flush=True)

    numbers = {
        "packing_speedup": round(seconds["padded"] / seconds["packed"], 2),
        "shared_prompt_speedup": round(seconds["padded"] / seconds["shared_prompt"], 2),
        # TGDPO step time over DPO step time, both from cached log-probs: the target is at most 1.05.
        "tgdpo_step_vs_dpo_cached": round(seconds["tgdpo_shared_prompt"] / seconds["shared_prompt"], 3),
        "tgdpo_vs_inprocess_speedup": round(seconds["tgdpo_in_process"] / seconds["tgdpo_shared_prompt"], 2),
        # At a chunk of 512 (training.logp_chunk_size is 1024 since 2026-11-27).
        "logp_peak_memory_reduction": round(memory["plain"] / memory["fused"], 2),
        "steps": {"model": {"params_millions": steps.pop("params_millions"), "hidden": 512, "layers": 4,
                            "vocab": args.vocab, "precision": "fp32"},
                  "data": {"pairs": args.pairs, "prompt_tokens": [16, 512], "answer_tokens": [8, 768]},
                  "max_tokens_per_batch": args.max_tokens, "packed_row_tokens": args.row_tokens, **steps},
        "logp_memory": {"tokens": 4096, "vocab": 128_256, "hidden": 512, "lm_head_weight_grad_included": True,
                        **{f"{name}_mib": round(mib) for name, mib in memory.items()},
                        "reduction_chunk_256": round(memory["plain"] / memory["fused_chunk_256"], 2)},
        "machine": {"torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(numbers)
    # latest.json holds the numbers of two scripts (this one and trl_compare.py): one provenance block each.
    merged.setdefault("provenance", {})["bench/packing.py"] = provenance(
        shlex.join(["python", "bench/packing.py", *sys.argv[1:]]))
    RESULTS.write_text(json.dumps(merged, indent=2))
    print(f"\n{'measure':<40} {'ratio':>7}")
    for key in ("packing_speedup", "shared_prompt_speedup", "tgdpo_step_vs_dpo_cached", "tgdpo_vs_inprocess_speedup",
                "logp_peak_memory_reduction"):
        print(f"{key:<40} {numbers[key]:>7}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
