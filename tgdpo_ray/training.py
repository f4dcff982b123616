"""The policy trainer: a Ray Train worker loop around a DeepSpeed engine.

Each worker reads its shard of the scored stream (pairs that already carry reference and guidance log-probs),
so a training step is one policy forward and backward. Shards are uneven under a token budget; workers agree
at every micro-batch whether anyone still has data, and a worker that has run out joins with a zero-weight
copy of its last micro-batch, so collectives never hang and no pair is dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from tgdpo_ray.batches import collate_pairs, pack_by_token_budget, packed_tokens, values_to_grid
from tgdpo_ray.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from tgdpo_ray.config import JobConfig
from tgdpo_ray.losses import (IGNORE_INDEX, TOKEN_SUM_KEYS, WEIGHT_BINS, compute_loss, finalize_metrics,
                              metric_sums, token_logps)
from tgdpo_ray.models import load_causal_lm, load_tokenizer, resolve_dtype
from tgdpo_ray.packing import micro_batch_token_logps
from tgdpo_ray.scoring import COLUMN_PREFIX, pick_device, record_placement
from tgdpo_ray.tracking import MetricsLog, ScorerThroughput, memory_metrics

SUM_KEYS = ("loss_sum", "chosen_reward_sum", "rejected_reward_sum", "margin_sum", "correct_sum", "pairs")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup, then cosine decay to min_lr_ratio; flat at the end if the step estimate falls short."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(config: JobConfig, world_size: int, bf16: bool) -> dict:
    training = config.training
    return {
        # Micro-batches are formed by a token budget, so DeepSpeed's row count is a formality.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.gradient_accumulation_steps * world_size,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": {"stage": config.policy.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: no extension build needed, works on CPU too
        "steps_per_print": 10**9,
    }


def extensions_dir() -> str:
    """A torch extension cache of this Python environment's own. DeepSpeed compiles its CPU all-reduce op into
    torch's extension cache, whose default folder every checkout on a machine shares while the build command names
    the environment's paths: each checkout rebuilt the op (about a minute of both cores of a small machine)
    whenever another one had built it last."""
    environment = hashlib.sha256(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:16]
    return str(Path.home() / ".cache" / "torch_extensions" / f"env-{environment}")


def prefer_environment_ninja() -> None:
    """torch builds extensions with the first ninja on PATH. Processes that Ray starts see different PATHs: in one
    suite run the op was built with the venv's ninja (1.13) in one process and the system's (1.11) in another,
    each discarding the other's build log, so it was compiled twice. The environment's own ninja (DeepSpeed
    depends on it) is always the one used."""
    tools = str(Path(sys.executable).parent)
    if (Path(tools) / "ninja").exists() and os.environ.get("PATH", "").split(os.pathsep)[0] != tools:
        os.environ["PATH"] = tools + os.pathsep + os.environ.get("PATH", "")


def build_engine(model, config: JobConfig, total_steps: int, world_size: int):
    import deepspeed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    prefer_environment_ninja()

    bf16 = resolve_dtype(config.policy.precision) == torch.bfloat16
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.training.learning_rate, weight_decay=config.training.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.training.warmup_ratio, config.training.min_lr_ratio)
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(config, world_size, bf16)
    )
    return engine


def all_reduce(values: list[float], device, op=None) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def dummy_row(pad_id: int) -> dict:
    """A one-token pair for a worker that got no data at all: it still has to join every collective."""
    values = [f"{prefix}_{side}_{kind}" for prefix in COLUMN_PREFIX.values() for side in ("chosen", "rejected")
              for kind in ("logps", "rewards")]
    return {"pair_id": -1, "prompt_ids": [pad_id], "chosen_ids": [pad_id], "rejected_ids": [pad_id],
            **{key: [0.0] for key in values}}


class Waited:
    """Wraps an iterator and adds up the time spent blocked in next(): the trainer's wait for data."""

    def __init__(self, iterator):
        self.iterator = iter(iterator)
        self.seconds = 0.0
        self.step_started = time.perf_counter()

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - started


def synced_micro_batches(rows: Iterator, config: JobConfig, device, pad_id: int) -> Iterator[tuple[list, bool]]:
    """(micro-batch, real) until every worker is out of data; `real` is False for the filler batches."""
    local = pack_by_token_budget(rows, config.training.max_tokens_per_batch, config.training.max_pairs_per_batch,
                                 config.training.packing)
    last = None
    while True:
        batch = next(local, None)
        anyone_has_data = all_reduce([0.0 if batch is None else 1.0], device, dist.ReduceOp.MAX)[0]
        if not anyone_has_data:
            return
        if batch is None:
            yield (last or [dummy_row(pad_id)]), False
        else:
            last = batch
            yield batch, True


def policy_token_logps(model, rows: list, config: JobConfig, pad_id: int, device):
    """(log-probs, answer mask, tokens) on collate_pairs' [2n, W] label grid, in the configured layout. `model` is
    the DeepSpeed engine (or a plain model). Tokens count prompt + chosen and prompt + rejected in every layout,
    so that tokens/s compares across layouts."""
    training = config.training
    if training.packing != "padded":
        module = getattr(model, "module", model)
        # Under ZeRO-3 the LM head's weight is gathered only inside its module's call: no fused head there.
        logps, mask, _ = micro_batch_token_logps(module, rows, training.packing == "shared_prompt",
                                                 training.packed_row_tokens, training.logp_chunk_size,
                                                 fused_head=config.policy.zero_stage != 3)
        return logps, mask, packed_tokens(rows, shared_prompt=False)
    batch = collate_pairs(rows, pad_id)
    labels = batch["labels"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return token_logps(logits, labels, training.logp_chunk_size), labels != IGNORE_INDEX, \
        int(batch["attention_mask"].sum())


def micro_batch_loss(model, rows: list, config: JobConfig, pad_id: int, device):
    logps, mask, tokens = policy_token_logps(model, rows, config, pad_id, device)
    n = len(rows)
    inputs = {"policy_chosen_logps": logps[:n], "policy_rejected_logps": logps[n:],
              "chosen_mask": mask[:n], "rejected_mask": mask[n:]}
    # (column in the rows, name of the loss input) per side; the loss inputs are named as tgdpo_loss names them.
    wanted = []
    if config.needs_reference:
        wanted.append(("ref_{side}_logps", "ref_{side}_logps"))
    if config.uses_token_rewards:
        wanted.append(("guidance_{side}_rewards", "{side}_token_rewards"))
    elif config.needs_guidance:
        wanted.append(("guidance_{side}_logps", "guidance_{side}_logps"))
    for column, name in wanted:
        grid = values_to_grid(rows, column.format(side="chosen"), column.format(side="rejected"),
                              mask.shape[1]).to(device)
        inputs[name.format(side="chosen")], inputs[name.format(side="rejected")] = grid[:n], grid[n:]
    loss = config.loss
    out = compute_loss(loss.type, inputs, loss.beta, loss.alpha, loss.simpo_gamma, loss.clamp_weights)
    return out, tokens


class MetricSums:
    """Sums over the micro-batches of one optimizer step (or one evaluation), combined across workers."""

    def __init__(self, loss_type: str):
        self.keys = SUM_KEYS + (TOKEN_SUM_KEYS if loss_type == "tgdpo" else ()) + ("tokens",)
        self.histograms = ("chosen_weight_histogram", "rejected_weight_histogram") if loss_type == "tgdpo" else ()
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.keys, 0.0)
        self.counts = {key: [0.0] * WEIGHT_BINS for key in self.histograms}

    def add(self, out, tokens: int) -> None:
        for key, value in metric_sums(out).items():
            self.sums[key] += value
        self.sums["tokens"] += tokens
        for key in self.histograms:
            self.counts[key] = [a + b for a, b in zip(self.counts[key], out.stats[key].tolist())]

    def combined(self, device) -> dict:
        flat = [self.sums[key] for key in self.keys] + [c for key in self.histograms for c in self.counts[key]]
        reduced = all_reduce(flat, device)  # one collective for every number of the step
        totals = dict(zip(self.keys, reduced))
        metrics = {**finalize_metrics(totals), "pairs": int(totals["pairs"]), "tokens": int(totals["tokens"])}
        if "weighted_tokens" in totals:
            metrics["answer_tokens"] = int(totals["weighted_tokens"])
        for index, key in enumerate(self.histograms):
            start = len(self.keys) + index * WEIGHT_BINS
            metrics[key] = [int(c) for c in reduced[start: start + WEIGHT_BINS]]
        return metrics


def evaluate(engine, shard, config: JobConfig, pad_id: int, device) -> dict:
    meter = MetricSums(config.loss.type)
    engine.eval()
    with torch.no_grad():
        for rows, real in synced_micro_batches(iter(shard.iter_rows()), config, device, pad_id):
            out, tokens = micro_batch_loss(engine, rows, config, pad_id, device)
            if real:
                meter.add(out, tokens)
    engine.train()
    return meter.combined(device)


def save_hf_model(engine, tokenizer, out_dir: Path, zero_stage: int, rank: int) -> None:
    """Hugging Face format (safetensors) with the tokenizer: loadable by transformers and vLLM."""
    # Under ZeRO-3 every rank holds a slice of the weights: gathering them is a collective call.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        if state is None:
            state = engine.module.state_dict()
        engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()


def resume_state(engine, run_dir: Path, rank: int, enabled: bool) -> tuple[dict, set]:
    """The loop state to start from, and the pairs of its epoch already trained (a fresh run: zeros)."""
    state = {"step": 0, "epoch": 0, "tokens": 0, "step_seconds": 0.0}
    found = latest_checkpoint(run_dir, warn=print if rank == 0 else lambda _: None) if enabled else None
    if found is None:
        return state, set()
    folder, saved = found
    load_checkpoint(engine, folder, rank)
    state.update({key: saved[key] for key in state})
    if rank == 0:
        print(f"[checkpoint] resumed from {folder}: step {saved['step']}, epoch {saved['epoch']}, "
              f"{len(saved['epoch_pairs_done'])} pairs of that epoch already trained", flush=True)
    return state, set(saved["epoch_pairs_done"])


def train_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train

    config = JobConfig.model_validate(loop_config["config"])
    total_steps = loop_config["total_steps"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    run_dir = config.run_dir
    record_placement(str(run_dir), "policy", rank=rank)
    seed_everything(config.run.seed + rank)
    device = pick_device()

    tokenizer = load_tokenizer(config.policy.model, config.policy.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    # fp32 master weights; DeepSpeed casts the working copy to bf16 when that is on.
    model = load_causal_lm(config.policy.model, "fp32", config.policy.trust_remote_code).to(device)
    if config.training.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = build_engine(model, config, total_steps, world_size)
    state, done_in_epoch = resume_state(engine, run_dir, rank, config.run.resume)
    first_epoch = state["epoch"]
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop_config["has_eval"] else None
    log = MetricsLog(config, rank, resumed_step=state["step"] or None)
    scorer_throughput = ScorerThroughput(run_dir)
    meter = MetricSums(config.loss.type)
    training = config.training
    started, eval_metrics = time.perf_counter(), None
    # Pairs of the current epoch whose gradients were applied: the position in the data a checkpoint keeps.
    epoch_pairs: list = []
    pending_pairs: list = []

    def checkpoint(epoch: int, pairs: list) -> None:
        saved = {**{key: state[key] for key in ("step", "tokens", "step_seconds")}, "epoch": epoch}
        folder = save_checkpoint(engine, run_dir, saved, pairs, training.keep_checkpoints, rank)
        if training.checkpoint_hf_export:
            save_hf_model(engine, tokenizer, folder / "hf", config.policy.zero_stage, rank)

    def micro_step(micro: list, real: bool, epoch: int, rows: Waited) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        out, tokens = micro_batch_loss(engine, micro, config, pad_id, device)
        engine.backward(out.losses.mean() * (1.0 if real else 0.0))
        at_boundary = engine.is_gradient_accumulation_boundary()
        lr = engine.get_lr()[0]  # the rate this step uses, read before the scheduler advances
        engine.step()
        if real:
            meter.add(out, tokens)
            pending_pairs.extend(int(row["pair_id"]) for row in micro)
        if at_boundary:
            epoch_pairs.extend(pending_pairs)
            pending_pairs.clear()
            log_step(epoch, lr, rows)
        return at_boundary

    def log_step(epoch: int, lr: float, rows: Waited) -> None:
        step_seconds = time.perf_counter() - rows.step_started
        state["step"] += 1
        step = state["step"]
        metrics = meter.combined(device)
        waited = all_reduce([rows.seconds], device)[0] / world_size
        state["tokens"] += metrics["tokens"]
        state["step_seconds"] += step_seconds
        record = {"step": step, "epoch": epoch, "lr": lr, **metrics,
                  "tokens_per_second": metrics["tokens"] / max(step_seconds, 1e-9),
                  "data_wait_seconds": waited, "step_seconds": step_seconds,
                  "elapsed_seconds": time.perf_counter() - started, "time": time.time(), **memory_metrics()}
        line = None
        if rank == 0 and (step % training.log_every == 0 or step == 1):
            record.update(scorer_throughput())
            line = (f"[train] step {step}/~{total_steps} epoch {epoch} loss {metrics['loss']:.4f} "
                    f"acc {metrics['reward_accuracy']:.2f} margin {metrics['reward_margin']:.4f} "
                    f"lr {lr:.2e} tok/s {record['tokens_per_second']:.0f} data wait {waited:.2f}s")
        log.write(record, line)
        meter.reset()
        rows.seconds = 0.0
        rows.step_started = time.perf_counter()

    stopped = False
    for epoch in range(first_epoch, training.epochs):
        skip = done_in_epoch if epoch == first_epoch else set()
        epoch_pairs[:] = sorted(skip)
        rows = Waited(row for row in train_shard.iter_rows() if int(row["pair_id"]) not in skip)
        for micro, real in synced_micro_batches(rows, config, device, pad_id):
            if not micro_step(micro, real, epoch, rows):
                continue
            if training.max_steps and state["step"] >= training.max_steps:
                stopped = True
                break
            if training.checkpoint_every and state["step"] % training.checkpoint_every == 0:
                checkpoint(epoch, epoch_pairs)
        if stopped:
            checkpoint(epoch, epoch_pairs)
            if rank == 0:
                print(f"[train] stopped at max_steps {training.max_steps}; run the same job again to resume",
                      flush=True)
            break
        # A partial accumulation at the end of the epoch is applied, not thrown away.
        while engine.micro_steps % training.gradient_accumulation_steps:
            micro_step([dummy_row(pad_id)], False, epoch, rows)
        if eval_shard is not None:
            eval_metrics = evaluate(engine, eval_shard, config, pad_id, device)
            log.write({"step": state["step"], "epoch": epoch, "eval": eval_metrics},
                      f"[eval] epoch {epoch} loss {eval_metrics['loss']:.4f} "
                      f"reward accuracy {eval_metrics['reward_accuracy']:.3f} on {eval_metrics['pairs']} pairs")
        checkpoint(epoch + 1, [])

    train_seconds = time.perf_counter() - started
    save_hf_model(engine, tokenizer, run_dir / "model", config.policy.zero_stage, rank)
    summary = {"steps": state["step"], "complete": not stopped, "train_seconds": train_seconds,
               "tokens": state["tokens"], "tokens_per_second": state["tokens"] / max(state["step_seconds"], 1e-9),
               "eval": eval_metrics, "model_dir": str(run_dir / "model")}
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    ray.train.report({"steps": state["step"], "tokens_per_second": summary["tokens_per_second"]})
