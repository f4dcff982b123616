"""Our DPO trainer step against TRL's DPOTrainer, side by side in one run (CPU, fp32).

Same model (bench/packing.py's random 21M Llama, a fresh copy with the same weights per side), same pairs in the
same order, same effective batch of B pairs per optimizer step, same number of optimizer steps, same AdamW, learning
rate, beta and gradient clipping, reference log-probs cached on both sides:
- ours: the trainers' micro_batch_loss in the shared_prompt layout over token-budget micro-batches of the B pairs,
  gradients accumulated, one optimizer step;
- TRL: DPOTrainer (loss sigmoid, precompute_ref_log_probs=True), per_device_train_batch_size B, no accumulation,
  its default padded collator; padding_free is run as a second variant if the installed TRL honours it.
The first optimizer step of each side is a warm-up and is not timed; TRL's tokenization and reference precompute
happen before training and are not timed either. Prints a table and merges its numbers into
bench/results/latest.json.

    python bench/trl_compare.py [--pairs 64] [--batch 8] [--steps N] [--vocab 16000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from tgdpo_ray.common.provenance import provenance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing import make_model, make_pairs  # noqa: E402  (bench/packing.py, imported from its folder)

RESULTS = Path(__file__).parent / "results" / "latest.json"
PAD, UNK, EOS = 0, 1, 2  # make_pairs draws token ids from 3 up, so 0..2 are free for the special tokens


def with_eos(pairs: list[dict]) -> list[dict]:
    """Every answer ends with EOS, as real data does: TRL appends EOS to any answer text that does not end with it,
    which would give TRL one token per answer more than us. The length (and the ref_* columns) stay the same."""
    return [{**pair, "chosen_ids": pair["chosen_ids"][:-1] + [EOS], "rejected_ids": pair["rejected_ids"][:-1] + [EOS]}
            for pair in pairs]


def pair_tokens(pair: dict) -> int:
    """Real tokens of a pair, prompt + chosen and prompt + rejected: what both trainers count as tokens."""
    return 2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def step_batches(pairs: list[dict], batch: int, steps: int) -> list[list[dict]]:
    """The B pairs of each optimizer step, in order, wrapping around the data: what TRL's sequential sampler with
    drop_last gives over several epochs."""
    full = [pairs[i: i + batch] for i in range(0, len(pairs) - batch + 1, batch)]
    return [full[i % len(full)] for i in range(steps)]


def dpo_config(max_tokens: int, row_tokens: int):
    from tgdpo_ray.config.loader import build_config

    return build_config({"data": {"train": "x.jsonl"}, "policy": {"model": "bench"}, "loss": {"type": "dpo"},
                         "training": {"packing": "shared_prompt", "max_tokens_per_batch": max_tokens,
                                      "packed_row_tokens": row_tokens}},
                        check_paths=False)


def run_ours(batches: list[list[dict]], config, vocab: int) -> dict:
    from tgdpo_ray.kernels.batches import micro_batch_tokens, pack_by_token_budget
    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.kernels.step import micro_batch_loss
    from tgdpo_ray.train.worker import step_settings

    training = config.training
    model = make_model(vocab, 0).train()
    loss = build_loss(config.loss)
    # The optimizer our trainers build (build_engine): torch's AdamW, same rate and weight decay as TRL is given.
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    device = torch.device("cpu")
    step_seconds, computed, micro_batches = [], 0, 0
    for index, rows in enumerate(batches):
        started = time.perf_counter()
        for micro in pack_by_token_budget(rows, training.max_tokens_per_batch, packing="shared_prompt"):
            out, _ = micro_batch_loss(model, micro, loss, step_settings(config), PAD, device)
            # Sum over the micro-batch / B: the mean over the effective batch, as TRL's per-batch mean.
            (out.losses.sum() / len(rows)).backward()
            if index:
                computed += micro_batch_tokens(micro, "shared_prompt")
                micro_batches += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    return {"step_seconds": step_seconds[1:], "micro_batches": micro_batches, "tokens_computed": computed,
            "params_millions": round(params / 1e6, 1), "layout": "shared_prompt",
            "max_tokens_per_batch": training.max_tokens_per_batch, "packed_row_tokens": training.packed_row_tokens}


def id_tokenizer(vocab: int):
    """A tokenizer whose vocabulary is our ids 1:1 ("t845" is id 845), so TRL tokenizing text sees our ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<unk>": UNK, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def as_text(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS else f"t{i}" for i in ids)


class StepClock:
    """Records each optimizer step: begin to end (forward, backward, clip, AdamW), and end to end (the same plus
    fetching and collating the batch, which our side's timing includes)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                clock.ends.append(now)
                clock.computes.append(now - clock.began)

        self.callback, self.ends, self.computes = Callback(), [], []


def trl_trainer(pairs: list[dict], batch: int, steps: int, config, vocab: int, out_dir: str, padding_free: bool,
                callbacks=()):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # The prompt text ends with a space: TRL tokenizes prompt + chosen as one concatenated string.
    data = Dataset.from_list([{"prompt": as_text(p["prompt_ids"]) + " ", "chosen": as_text(p["chosen_ids"]),
                               "rejected": as_text(p["rejected_ids"])} for p in pairs])
    args = DPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False,  # fp32 on CPU, as ours
        loss_type=["sigmoid"], beta=config.loss.beta, learning_rate=config.training.learning_rate,
        weight_decay=config.training.weight_decay, max_grad_norm=config.training.max_grad_norm,
        optim="adamw_torch",  # torch's AdamW, as our trainers (TRL's default here is its fused variant)
        lr_scheduler_type="constant", warmup_steps=0,  # no schedule on our side either
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
        train_sampling_strategy="sequential", dataloader_drop_last=True,  # our order, full batches only
        gradient_checkpointing=False,  # TRL turns it on by default; our trainers have it off
        precompute_ref_log_probs=True, precompute_ref_batch_size=batch,  # a cached reference, as ours
        max_length=None,  # no truncation: TRL sees every token we do
        padding_free=padding_free,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        seed=0,
    )
    return DPOTrainer(model=make_model(vocab, 0), args=args, train_dataset=data, processing_class=id_tokenizer(vocab),
                      callbacks=list(callbacks))


def check_same_ids(trainer, pairs: list[dict]) -> None:
    """TRL must train on exactly our token ids, pair for pair and in our order (nothing added, dropped, truncated)."""
    seen = trainer.train_dataset
    assert len(seen) == len(pairs), f"TRL kept {len(seen)} of {len(pairs)} pairs"
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for i, (theirs, pair) in enumerate(zip(seen[key], pairs)):
            assert list(theirs) == list(pair[key]), f"pair {i}: TRL's {key} differ from ours"


def run_trl(pairs: list[dict], batch: int, steps: int, config, vocab: int, padding_free: bool) -> dict:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        trainer = trl_trainer(pairs, batch, steps, config, vocab, out_dir, padding_free, [clock.callback])
        prepare_seconds = time.perf_counter() - started
        check_same_ids(trainer, pairs)
        trainer.train()
        # TRL's own count of the real tokens it trained on (attention-mask sum over every step, warm-up included).
        trained = sum(pair_tokens(p) for rows in step_batches(pairs, batch, steps) for p in rows)
        assert getattr(trainer, "_total_train_tokens", trained) == trained, "TRL trained on other tokens than ours"
        padded = sum(2 * len(rows) * max(max(len(p["prompt_ids"]) + len(p[side]) for p in rows)
                                         for side in ("chosen_ids", "rejected_ids"))
                     for rows in step_batches(pairs, batch, steps)[1:])
        settings = {key: getattr(trainer.args, key) for key in (
            "loss_type", "beta", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
            "weight_decay", "max_grad_norm", "optim", "lr_scheduler_type", "bf16", "fp16", "use_cpu",
            "gradient_checkpointing", "precompute_ref_log_probs", "max_length", "padding_free",
            "train_sampling_strategy", "dataloader_drop_last")}
        settings["optim"] = str(settings["optim"].value if hasattr(settings["optim"], "value") else settings["optim"])
        settings["lr_scheduler_type"] = str(getattr(settings["lr_scheduler_type"], "value",
                                                    settings["lr_scheduler_type"]))
        settings["padding_free_in_effect"] = trainer.padding_free
    assert len(clock.ends) == steps, f"TRL ran {len(clock.ends)} optimizer steps, not {steps}"
    return {"step_seconds": [b - a for a, b in zip(clock.ends, clock.ends[1:])],
            "compute_only_seconds": round(sum(clock.computes[1:]), 3),
            "tokens_computed": padded, "layout": "padding_free" if trainer.padding_free else "padded",
            "untimed_prepare_seconds": round(prepare_seconds, 2), "settings": settings}


def trl_honours_padding_free(pairs: list[dict], config, vocab: int) -> bool:
    """TRL 1.16 accepts padding_free but warns and falls back to padding: probe on one pair whether it sticks."""
    with tempfile.TemporaryDirectory() as out_dir:
        return trl_trainer(pairs[:1], 1, 1, config, vocab, out_dir, padding_free=True).padding_free


def summary(result: dict, pairs: int, tokens: int) -> dict:
    """Rates over the timed steps; `pairs` and `tokens` are what those steps trained on (the same for each side)."""
    step_seconds = result.pop("step_seconds")
    seconds = sum(step_seconds)
    return {"seconds": round(seconds, 3), "seconds_per_step": round(seconds / len(step_seconds), 3),
            "pairs_per_second": round(pairs / seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
            **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (the effective batch)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps per side, after one untimed warm-up step (default: one epoch)")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--max-tokens", type=int, default=8192, help="our micro-batch token budget")
    parser.add_argument("--row-tokens", type=int, default=1024, help="our packed row size")
    args = parser.parse_args()
    if args.pairs < args.batch:
        parser.error("--pairs must be at least --batch")
    steps = args.steps if args.steps is not None else max(1, args.pairs // args.batch - 1)
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute progress bar
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bar()

    pairs = with_eos(make_pairs(args.pairs, args.vocab))
    config = dpo_config(args.max_tokens, args.row_tokens)
    batches = step_batches(pairs, args.batch, steps + 1)
    timed_pairs = sum(len(rows) for rows in batches[1:])
    timed_tokens = sum(pair_tokens(p) for rows in batches[1:] for p in rows)
    print(f"{args.pairs} pairs, {args.batch} per optimizer step, 1 warm-up + {steps} timed steps per side, "
          f"{torch.get_num_threads()} threads, trl {trl.__version__}", flush=True)

    results = {"ours": summary(run_ours(batches, config, args.vocab), timed_pairs, timed_tokens)}
    print(f"  ours done in {results['ours']['seconds']:.1f} s", flush=True)
    results["trl"] = summary(run_trl(pairs, args.batch, steps + 1, config, args.vocab, False), timed_pairs,
                             timed_tokens)
    print(f"  trl done in {results['trl']['seconds']:.1f} s", flush=True)
    padding_free = trl_honours_padding_free(pairs, config, args.vocab)
    if padding_free:
        results["trl_padding_free"] = summary(run_trl(pairs, args.batch, steps + 1, config, args.vocab, True),
                                              timed_pairs, timed_tokens)
    fastest = max((name for name in results if name != "ours"), key=lambda name: results[name]["pairs_per_second"])

    params_millions = results["ours"].pop("params_millions")
    numbers = {
        "dpo_vs_trl_speedup": round(results["ours"]["pairs_per_second"] / results[fastest]["pairs_per_second"], 2),
        "trl_compare": {
            "against": fastest,
            "model": {"params_millions": params_millions, "hidden": 512, "layers": 4, "vocab": args.vocab,
                      "precision": "fp32", "attention": "sdpa", "device": "cpu"},
            "data": {"pairs": args.pairs, "prompt_tokens": [16, 512], "answer_tokens": [8, 768],
                     "answers_end_with_eos": True},
            "pairs_per_step": args.batch, "timed_steps": steps, "warmup_steps": 1,
            "timed_pairs": timed_pairs, "timed_tokens": timed_tokens,
            "tokens": "prompt + chosen and prompt + rejected, no padding (what both trainers log)",
            "trl_padding_free": "run" if padding_free else "not run: DPOTrainer falls back to padding in this TRL",
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
            "torch_threads": torch.get_num_threads(),
            **results,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(numbers)
    # latest.json holds the numbers of two scripts (this one and packing.py): one provenance block each.
    merged.setdefault("provenance", {})["bench/trl_compare.py"] = provenance(
        shlex.join(["python", "bench/trl_compare.py", *sys.argv[1:]]))
    RESULTS.write_text(json.dumps(merged, indent=2))

    print(f"\n{'':<18} {'s/step':>8} {'pairs/s':>8} {'tokens/s':>9}  layout")
    for name, result in results.items():
        print(f"{name:<18} {result['seconds_per_step']:>8.2f} {result['pairs_per_second']:>8.2f} "
              f"{result['tokens_per_second']:>9.0f}  {result['layout']}")
    print(f"dpo_vs_trl_speedup {numbers['dpo_vs_trl_speedup']} (ours over {fastest}); TRL padding_free: "
          f"{numbers['trl_compare']['trl_padding_free']}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
