"""Padded vs packed vs shared-prompt trainer steps, and log-prob peak memory at a 128k vocabulary (CPU, fp32).

Measured side by side in one run on the same model and pairs, through the trainers' own micro_batch_loss (DPO with
reference log-probs from the data). Prints a table and merges its numbers into bench/results/latest.json.

    python bench/packing.py [--pairs 48] [--max-tokens 4096] [--row-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "latest.json"


def lognormal(rng, low: int, high: int, median: float, size: int) -> np.ndarray:
    """Long-tailed lengths: most short, a few near `high`."""
    return np.clip(np.round(rng.lognormal(np.log(median), 1.0, size)), low, high).astype(int)


def make_pairs(count: int, vocab: int, seed: int = 0) -> list[dict]:
    """Prompts of 16..512 tokens and answers of 8..768, with reference log-probs (as the scorers would add)."""
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = (lognormal(rng, 16, 512, 96, count), lognormal(rng, 8, 768, 160, count),
                                 lognormal(rng, 8, 768, 160, count))
    pairs = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        pairs.append({"pair_id": i, "prompt_ids": rng.integers(3, vocab, p).tolist(),
                      "chosen_ids": rng.integers(3, vocab, c).tolist(),
                      "rejected_ids": rng.integers(3, vocab, r).tolist(),
                      "ref_chosen_logps": rng.normal(-9.0, 1.0, c).astype(np.float32),
                      "ref_rejected_logps": rng.normal(-9.0, 1.0, r).astype(np.float32)})
    return pairs


def make_model(vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def time_layouts(pairs: list[dict], max_tokens: int, row_tokens: int, vocab: int) -> dict:
    from tgdpo_ray.batches import micro_batch_tokens, pack_by_token_budget
    from tgdpo_ray.config import build_config
    from tgdpo_ray.training import micro_batch_loss

    model = make_model(vocab)
    results = {"params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    for packing in ("padded", "packed", "shared_prompt"):
        config = build_config({"data": {"train": "x.jsonl"}, "policy": {"model": "bench"}, "loss": {"type": "dpo"},
                               "training": {"packing": packing, "packed_row_tokens": row_tokens}},
                              check_paths=False)
        batches = list(pack_by_token_budget(pairs, max_tokens, packing=packing))
        micro_batch_loss(model, batches[0], config, 0, torch.device("cpu"))[0].losses.sum().backward()  # warm up
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        for rows in batches:
            micro_batch_loss(model, rows, config, 0, torch.device("cpu"))[0].losses.sum().backward()
        seconds = time.perf_counter() - started
        computed = sum(micro_batch_tokens(rows, packing) for rows in batches)
        results[packing] = {"seconds": round(seconds, 2), "micro_batches": len(batches),
                            "tokens_computed": computed, "pairs_per_second": round(len(pairs) / seconds, 2)}
        print(f"  {packing:<14} {seconds:7.1f} s  {len(batches):3d} micro-batches  {computed:7d} tokens computed",
              flush=True)
    return results


def logp_peak_memory(mode: str, tokens: int, vocab: int, hidden: int, chunk: int = 1024) -> float:
    """Peak resident memory (MiB) added by one forward and backward of the answer-token log-probs (the LM-head
    weight's gradient included), in a fresh process. The peak is read from /proc (VmHWM, which starts anew at
    exec; getrusage's maxrss would carry this process's peak into the child)."""
    code = f"""
import re, torch
from tgdpo_ray.packing import lm_head_token_logps
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
    layouts = time_layouts(pairs, args.max_tokens, args.row_tokens, args.vocab)
    padded = layouts["padded"]["seconds"]
    print("log-prob peak memory, 4096 tokens x 128k vocabulary, hidden 512 (fresh process each):", flush=True)
    memory = {"plain": logp_peak_memory("plain", 4096, 128_256, 512),
              "fused": logp_peak_memory("fused", 4096, 128_256, 512, chunk=1024),
              "fused_chunk_256": logp_peak_memory("fused", 4096, 128_256, 512, chunk=256)}
    print("  " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in memory.items()), flush=True)

    numbers = {
        "packing_speedup": round(padded / layouts["packed"]["seconds"], 2),
        "shared_prompt_speedup": round(padded / layouts["shared_prompt"]["seconds"], 2),
        "logp_peak_memory_reduction": round(memory["plain"] / memory["fused"], 2),  # the default chunk, 1024
        "packing": {"model": {"params_millions": layouts.pop("params_millions"), "hidden": 512, "layers": 4,
                              "vocab": args.vocab, "precision": "fp32"},
                    "data": {"pairs": args.pairs, "prompt_tokens": [16, 512], "answer_tokens": [8, 768]},
                    "max_tokens_per_batch": args.max_tokens, "packed_row_tokens": args.row_tokens, **layouts},
        "logp_memory": {"tokens": 4096, "vocab": 128_256, "hidden": 512, "lm_head_weight_grad_included": True,
                        **{f"{name}_mib": round(mib) for name, mib in memory.items()},
                        "reduction_chunk_256": round(memory["plain"] / memory["fused_chunk_256"], 2)},
        "machine": {"torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(numbers)
    RESULTS.write_text(json.dumps(merged, indent=2))
    print(f"\n{'measure':<40} {'ratio':>7}")
    for key in ("packing_speedup", "shared_prompt_speedup", "logp_peak_memory_reduction"):
        print(f"{key:<40} {numbers[key]:>7}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
