"""The policy trainer: a Ray Train worker around a DeepSpeed engine.

Workers train pairs that already carry reference and guidance log-probs, so a step is one policy forward and
backward per micro-batch (kernels/step.py). Rank 0 reads the scored stream and deals each optimizer step's
micro-batches to the workers (train/schedule.py); every pair of a step weighs the same in its gradient, however the
token budget cut the step and however its pairs fell on the workers (train_step). The Trainer below is the loop:
fit, one step, held-out evaluation, the probe, checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from tgdpo_ray.common.progress import time_left
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.job import JobConfig
from tgdpo_ray.config.loader import import_function
from tgdpo_ray.kernels.batches import SCORED_KINDS, SCORED_PREFIXES, score_columns
from tgdpo_ray.kernels.losses import (MAX_KEYS, TOKEN_SUM_KEYS, WEIGHT_BINS, Loss, build_loss, finalize_metrics,
                                      metric_sums)
from tgdpo_ray.kernels.step import StepSettings, micro_batch_loss, prepare_policy
from tgdpo_ray.modeling.loading import disable_dropout, load_causal_lm, load_tokenizer, resolve_dtype
from tgdpo_ray.modeling.lora import add_adapters, adapter_summary, merged_state, parameter_counts, save_adapter
from tgdpo_ray.runtime.placement import pick_device, record_placement
from tgdpo_ray.scoring.throughput import ScorerThroughput
from tgdpo_ray.train.checkpoints import load_checkpoint, local_storage, save_checkpoint
from tgdpo_ray.train.schedule import HELD_OUT, STREAM, StepShare, StreamParts, deal_step, plan_steps
from tgdpo_ray.train.tracking import MetricsLog, memory_metrics, scalars

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


def skip_inference_comm_op() -> None:
    """DeepSpeed's TorchBackend builds its shared-memory all-reduce op at the first engine of every process: it
    probes every op's compatibility (compiler subprocesses), then JIT-compiles the op into torch's extension cache
    (about a minute of both cores of a small machine, once per environment) and loads it (seconds, every process).
    The op serves only deepspeed.comm.inference_all_reduce, which training never calls: marked incompatible here,
    it is neither probed nor built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def build_engine(model, config: JobConfig, total_steps: int, world_size: int):
    import deepspeed

    skip_inference_comm_op()

    bf16 = resolve_dtype(config.policy.precision) == torch.bfloat16
    # Every weight of a full fine-tune; the adapters alone under LoRA (the frozen base has no optimizer state).
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.training.learning_rate, weight_decay=config.training.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, config.training.warmup_ratio, config.training.min_lr_ratio)
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(config, world_size, bf16)
    )
    return engine


def dummy_row(pad_id: int) -> dict:
    """A one-token pair for a worker with no micro-batch left in a step: it still joins every collective."""
    values = [column for prefix in SCORED_PREFIXES for kind in SCORED_KINDS for column in score_columns(prefix, kind)]
    return {"pair_id": -1, "prompt_ids": [pad_id], "chosen_ids": [pad_id], "rejected_ids": [pad_id],
            **{key: [0.0] for key in values}}


class Waited:
    """Wraps an iterator and adds up the time spent blocked in next(): the trainer's wait for data."""

    def __init__(self, iterator):
        self.iterator = iter(iterator)
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - started

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def read_ahead(rows) -> Iterator[dict]:
    """`rows`, the first of which is asked for at once in a thread: the scored stream starts, and its scorer pools
    load their models, while this worker loads the policy and builds its engine, rather than after."""
    rows = iter(rows)
    first: dict = {}

    def fetch() -> None:
        try:
            first["row"] = next(rows)
        except BaseException as err:  # re-raised in the reader's thread (StopIteration: an empty stream)
            first["error"] = err

    thread = threading.Thread(target=fetch, name="read-ahead", daemon=True)
    thread.start()

    def all_rows() -> Iterator[dict]:
        thread.join()
        if isinstance(first.get("error"), StopIteration):
            return
        if "error" in first:
            raise first["error"]
        yield first["row"]
        yield from rows

    return all_rows()


def step_settings(config: JobConfig) -> StepSettings:
    """What a micro-batch reads of the job config (kernels/step.py)."""
    training = config.training
    return StepSettings(layout=training.packing, packed_row_tokens=training.packed_row_tokens,
                        logp_chunk_size=training.logp_chunk_size, with_reference=config.needs_reference,
                        guidance_kind=config.guidance_kind, zero3=config.policy.zero_stage == 3)


class MetricSums:
    """Sums over the micro-batches of one optimizer step (or one evaluation), combined across workers."""

    def __init__(self, config: JobConfig):
        # Every loss with a reference also reports plain DPO's loss, so runs of different losses compare.
        self.dpo_rewards = config.needs_reference
        tgdpo = config.loss.type == "tgdpo"
        self.keys = SUM_KEYS + (("dpo_loss_sum",) if self.dpo_rewards else ()) + (TOKEN_SUM_KEYS if tgdpo else ()) \
            + ("tokens",)
        self.histograms = ("chosen_weight_histogram", "rejected_weight_histogram") if tgdpo else ()
        self.max_keys = MAX_KEYS if tgdpo else ()
        # Tensors on the device from the first micro-batch on: read once, in combined(), not per micro-batch.
        self.sums = dict.fromkeys(self.keys, 0.0)
        self.maxima = dict.fromkeys(self.max_keys, -math.inf)
        self.counts = dict.fromkeys(self.histograms, 0.0)

    def add(self, out, tokens: int) -> None:
        for key, value in metric_sums(out, self.dpo_rewards).items():
            if key in self.maxima:  # a maximum, not a sum
                self.maxima[key] = torch.clamp(value, min=self.maxima[key])
            else:
                self.sums[key] = self.sums[key] + value
        self.sums["tokens"] += tokens
        for key in self.histograms:
            self.counts[key] = self.counts[key] + out.stats[key].double()

    def combined(self, device) -> dict:
        flat = torch.cat([torch.as_tensor(self.sums[key], dtype=torch.float64, device=device).reshape(1)
                          for key in self.keys]
                         + [torch.zeros(WEIGHT_BINS, dtype=torch.float64, device=device) + self.counts[key]
                            for key in self.histograms])
        dist.all_reduce(flat)  # one collective for every sum of the step
        reduced = flat.tolist()
        totals = dict(zip(self.keys, reduced))
        if self.max_keys:
            maxima = torch.cat([torch.as_tensor(self.maxima[key], dtype=torch.float64, device=device).reshape(1)
                                for key in self.max_keys])
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            totals.update(zip(self.max_keys, maxima.tolist()))
        metrics = {**finalize_metrics(totals), "pairs": int(totals["pairs"]), "tokens": int(totals["tokens"])}
        if "weighted_tokens" in totals:
            metrics["answer_tokens"] = int(totals["weighted_tokens"])
        for index, key in enumerate(self.histograms):
            start = len(self.keys) + index * WEIGHT_BINS
            metrics[key] = [int(c) for c in reduced[start: start + WEIGHT_BINS]]
        return metrics


@dataclass
class StepResult:
    metrics: dict  # summed over the step's micro-batches and workers, then averaged over its pairs
    lr: float  # the learning rate this step used
    grad_norm: Optional[float]  # of the step's mean-loss gradient, before clipping


def gradient_norm(engine) -> float:
    """The norm of the (already averaged) gradients of an unpartitioned fp32 engine; ZeRO and bf16 engines
    record their own in step()."""
    norms = [param.grad.detach().float().norm() for param in engine.module.parameters() if param.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def train_step(engine, share: StepShare, config: JobConfig, loss: Loss, pad_id: int, device,
               world_size: int) -> StepResult:
    """One optimizer step: its gradient is that of the mean loss over exactly the step's real pairs.

    DeepSpeed averages gradients over the workers, so each micro-batch contributes its summed loss times
    world_size / step_pairs, and DeepSpeed must not divide by the accumulation steps again (scale_wrt_gas).
    A worker dealt fewer micro-batches than gradient_accumulation_steps runs zero-weight fillers, so that every
    worker makes the same collective calls."""
    engine.train()  # from_pretrained and held-out evaluation leave the policy in eval mode
    meter = MetricSums(config)
    accumulation = config.training.gradient_accumulation_steps
    batches = share.micro_batches + [[dummy_row(pad_id)]] * (accumulation - len(share.micro_batches))
    weight = world_size / share.step_pairs
    settings = step_settings(config)
    lr = engine.get_lr()[0]  # read before the scheduler advances
    norm = None
    for index, rows in enumerate(batches):
        real = index < len(share.micro_batches)
        last = index == accumulation - 1
        if engine.is_gradient_accumulation_boundary() != last:
            raise RuntimeError(f"DeepSpeed's accumulation boundary is out of step with the loop at micro-batch "
                               f"{index + 1}/{accumulation}")
        out, tokens = micro_batch_loss(engine, rows, loss, settings, pad_id, device)
        engine.backward(out.losses.sum() * (weight if real else 0.0), scale_wrt_gas=False)
        if real:
            meter.add(out, tokens)
        if last and engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
            norm = gradient_norm(engine)
        engine.step()
    if norm is None and engine.get_global_grad_norm() is not None:
        norm = float(engine.get_global_grad_norm())
    return StepResult(meter.combined(device), lr, norm)


def held_out_metrics(engine, rows, config: JobConfig, loss: Loss, pad_id: int, device, rank: int,
                     world_size: int) -> dict:
    """Held-out metrics in eval mode. Rank 0 reads `rows` and deals micro-batches as in training; a worker
    without one runs a zero-weight filler (ZeRO-3 gathers weights collectively in every forward)."""
    meter = MetricSums(config)
    engine.eval()
    plan = plan_steps(rows, config.training, world_size, accumulation=1) if rank == 0 else None
    settings = step_settings(config)
    with torch.no_grad():
        while (share := deal_step(plan, rank, world_size)) is not None:
            for batch in share.micro_batches or [[dummy_row(pad_id)]]:
                out, tokens = micro_batch_loss(engine, batch, loss, settings, pad_id, device)
                if share.micro_batches:
                    meter.add(out, tokens)
    return meter.combined(device)


def save_hf_model(engine, tokenizer, out_dir: Path, config: JobConfig, rank: int,
                  adapter_dir: Optional[Path] = None) -> None:
    """Hugging Face format (safetensors) with the tokenizer: loadable by transformers and vLLM. A LoRA policy is
    saved merged, and its adapters alone in `adapter_dir` (modeling/lora.py)."""
    # Under ZeRO-3 every rank holds a slice of the weights: gathering them is a collective call.
    state = engine._zero3_consolidated_16bit_state_dict() if config.policy.zero_stage == 3 else None
    if rank == 0:
        if state is None:
            state = engine.module.state_dict()
        lora = config.policy.lora
        if lora is not None:
            save_adapter(adapter_dir, state, lora, config.policy.model)
            state = merged_state(state, lora)
        engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint's state.json."""

    step: int = 0
    epoch: int = 0
    tokens: int = 0
    step_seconds: float = 0.0
    epoch_pairs_done: list[int] = field(default_factory=list)  # pairs of `epoch` already trained
    last_eval: Optional[dict] = None  # the latest held-out metrics, kept for a run resumed after its end
    last_eval_step: Optional[int] = None
    base_weights: Optional[str] = None  # a LoRA run's: the identity of policy.model's files (its adapters' base)


def resume_state(engine, rank: int) -> TrainState:
    """The state to start from: that of the checkpoint Ray Train hands back (the latest of this run, whether
    these workers replace failed ones or the job was started again), or a fresh one."""
    found = load_checkpoint(engine, rank)
    if found is None:
        return TrainState()
    where, saved = found
    state = TrainState(**{key: saved[key] for key in TrainState.__dataclass_fields__ if key in saved})
    if rank == 0:
        print(f"[checkpoint] resumed from {where}: step {state.step}, epoch {state.epoch}, "
              f"{len(state.epoch_pairs_done)} pairs of that epoch already trained", flush=True)
    return state


def load_policy(config: JobConfig, device):
    # fp32 master weights; DeepSpeed casts the working copy to bf16 when that is on.
    model = load_causal_lm(config.policy.model, "fp32", config.policy.trust_remote_code).to(device)
    if config.policy.disable_dropout:
        disable_dropout(model)
    if config.policy.lora is not None:
        add_adapters(model, config.policy.lora, config.run.seed)
    training = config.training
    prepare_policy(model, training.packing, training.attention, device,
                   dtype=resolve_dtype(config.policy.precision),  # the dtype DeepSpeed computes in
                   compile=training.compile, compile_backend=training.compile_backend)
    if training.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def step_line(state: TrainState, total_steps: int, result: StepResult, record: dict, steps_here: int,
              last_step: int) -> str:
    """The step's progress line; the time left to last_step (max_steps or the schedule's end) is at the rate of
    this process's steps so far (evaluations, probes and checkpoints included)."""
    metrics = result.metrics
    norm = "" if result.grad_norm is None else f" grad norm {result.grad_norm:.3f}"
    eta = time_left(steps_here, steps_here + last_step - state.step, record["elapsed_seconds"])
    return (f"[train] step {state.step}/{total_steps} epoch {state.epoch} loss {metrics['loss']:.4f} "
            f"acc {metrics['reward_accuracy']:.2f} margin {metrics['reward_margin']:.4f} lr {result.lr:.2e}{norm} "
            f"tok/s {record['tokens_per_second']:.0f} data wait {record['data_wait_seconds']:.2f}s {eta}")


def eval_line(state: TrainState, metrics: dict) -> str:
    dpo = f" (DPO loss {metrics['dpo_loss']:.4f})" if "dpo_loss" in metrics else ""
    return (f"[eval] step {state.step} epoch {state.epoch} loss {metrics['loss']:.4f}{dpo} "
            f"reward accuracy {metrics['reward_accuracy']:.3f} on {metrics['pairs']} pairs")


def probe_line(state: TrainState, values: dict) -> str:
    shown = " ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in values.items())
    return f"[probe] step {state.step} epoch {state.epoch} {shown}"


class Trainer:
    """One Ray Train worker's run: fit() is the loop of optimizer steps, with held-out evaluation, the probe and
    checkpoints between them. Where the run stands is in attributes: `state` (saved in every checkpoint, restored
    from the latest), and the steps last checkpointed and last probed."""

    def __init__(self, config: JobConfig, total_steps: int, has_eval: bool, stream, rank: int, world_size: int,
                 device, base_weights: Optional[str] = None):
        self.config, self.training = config, config.training
        self.total_steps, self.has_eval = total_steps, has_eval
        self.rank, self.world_size, self.device = rank, world_size, device
        self.tokenizer = load_tokenizer(config.policy.model, config.policy.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id
        self.engine = build_engine(load_policy(config, device), config, total_steps, world_size)
        if rank == 0:
            if config.policy.lora is not None:
                print(f"[train] {adapter_summary(config.policy.lora, parameter_counts(self.engine.module))}",
                      flush=True)
            print(f"[train] {self.training.packing} layout, attention "
                  f"{self.engine.module.config._attn_implementation}"
                  f"{', compiled decoder layers' if self.training.compile else ''}, on {device.type}", flush=True)
        self.loss = build_loss(config.loss)
        self.state = resume_state(self.engine, rank)
        self.state.base_weights = base_weights
        self.log = MetricsLog(config, rank, resumed_step=self.state.step or None)
        self.scorer_throughput = ScorerThroughput(config.run_dir)
        self.storage = local_storage(config)
        self.checkpoint_bytes = 0  # this worker's previous checkpoint: what the next needs on disk
        self.saved_step = self.state.step  # a resumed run starts from a checkpoint of its step
        self.probe_function = (import_function(self.training.probe.function, "training.probe.function")
                               if self.training.probe else None)
        # A resumed run recorded its step's probe before stopping.
        self.probed_step = self.state.step if self.state.step else None
        # Rank 0 alone reads the scored stream (a finished run started again has none): the held-out pairs first,
        # kept for every evaluation, then the epochs.
        self.rows = self.parts = self.held_out_rows = None
        if stream is not None:
            self.rows = Waited(stream)
            self.parts = StreamParts(self.rows)
            self.held_out_rows = list(self.parts.rows_of(HELD_OUT)) if has_eval else None
        self.last_step_record: dict = {}  # rank 0: the last step's record, whose numbers a checkpoint reports
        self.first_step = self.state.step  # where this process began: its steps give the time left
        self.last_step = min(total_steps, self.training.max_steps or total_steps)
        self.started = time.perf_counter()

    def fit(self) -> None:
        """Every epoch from where the run stands, then the final model and summary.json."""
        training, state = self.training, self.state
        self.probe()
        stopped = False
        for epoch in range(state.epoch, training.epochs):
            state.epoch = epoch
            plan = self.epoch_plan(epoch) if self.rank == 0 else None  # rank 0 deals every step's micro-batches
            while True:
                if training.max_steps and state.step >= training.max_steps:
                    stopped = True
                    break
                share = self.step(plan)
                if share is None:
                    break
                if self.has_eval and training.eval_every and state.step % training.eval_every == 0:
                    self.evaluate()
                if self.probe_function is not None and state.step % training.probe.every == 0:
                    self.probe()
                if training.checkpoint_every and state.step % training.checkpoint_every == 0:
                    self.checkpoint()
            if stopped:
                if self.saved_step != state.step:
                    self.checkpoint()
                if self.rank == 0:
                    again = "to resume" if training.keep_checkpoints else "and it starts over (keep_checkpoints 0)"
                    print(f"[train] stopped at max_steps {training.max_steps}; run the same job again {again}",
                          flush=True)
                break
            if self.has_eval and state.last_eval_step != state.step:
                self.evaluate()
            state.epoch, state.epoch_pairs_done = epoch + 1, []
            self.checkpoint()
        self.probe()
        self.finish(complete=not stopped)

    def epoch_plan(self, epoch: int):
        """Rank 0's optimizer steps of an epoch; a resumed epoch goes on where its checkpoint left it."""
        done = set(self.state.epoch_pairs_done)
        return plan_steps((row for row in self.parts.rows_of(epoch) if int(row["pair_id"]) not in done),
                          self.training, self.world_size)

    def step(self, plan) -> Optional[StepShare]:
        """One optimizer step of this worker's share of the plan, recorded; None once the epoch has no step left."""
        step_started = time.perf_counter()
        share = deal_step(plan, self.rank, self.world_size)
        if share is None:
            return None
        result = train_step(self.engine, share, self.config, self.loss, self.pad_id, self.device, self.world_size)
        step_seconds = time.perf_counter() - step_started
        state = self.state
        state.step += 1
        state.tokens += result.metrics["tokens"]
        state.step_seconds += step_seconds
        state.epoch_pairs_done += share.step_pair_ids
        if self.rank == 0:
            record = {"step": state.step, "epoch": state.epoch, "lr": result.lr, "grad_norm": result.grad_norm,
                      **result.metrics, "tokens_per_second": result.metrics["tokens"] / max(step_seconds, 1e-9),
                      "data_wait_seconds": self.rows.take_seconds(), "step_seconds": step_seconds,
                      "elapsed_seconds": time.perf_counter() - self.started, "time": time.time(),
                      "pair_ids": share.step_pair_ids, **memory_metrics()}
            self.last_step_record = record
            line = None
            if state.step % self.training.log_every == 0 or state.step == 1:
                record.update(self.scorer_throughput())
                line = step_line(state, self.total_steps, result, record, state.step - self.first_step,
                                 self.last_step)
            self.log.write(record, line)
        return share

    def evaluate(self) -> dict:
        """Held-out metrics, logged and kept in the state (a run resumed after its end reports them)."""
        metrics = held_out_metrics(self.engine, self.held_out_rows, self.config, self.loss, self.pad_id, self.device,
                           self.rank, self.world_size)
        self.log.write({"step": self.state.step, "epoch": self.state.epoch, "eval": metrics},
                       eval_line(self.state, metrics))
        self.state.last_eval, self.state.last_eval_step = metrics, self.state.step
        return metrics

    def probe(self) -> None:
        """training.probe, on rank 0 alone (the other ranks go on to the next step's collectives and wait), once
        per step."""
        if self.rank == 0 and self.probe_function is not None and self.probed_step != self.state.step:
            self.engine.eval()
            with torch.no_grad():
                values = self.probe_function(self.engine.module, self.tokenizer, self.device,
                                             **self.training.probe.arguments)
            self.log.write({"step": self.state.step, "epoch": self.state.epoch, "probe": values},
                           probe_line(self.state, values))
        self.probed_step = self.state.step

    def checkpoint(self) -> None:
        """A checkpoint of the engine and the state (none with keep_checkpoints 0), reported to Ray Train with the
        last step's metrics and the last held-out ones (Result.metrics_dataframe, and keep_best's scoring, which
        gets a fresh evaluation when it ranks by a held-out metric)."""
        if self.training.keep_checkpoints:
            best = self.training.keep_best
            if best and best.metric.startswith("eval/") and self.has_eval \
                    and self.state.last_eval_step != self.state.step:
                self.evaluate()

            def hf_export(folder: Path) -> None:
                save_hf_model(self.engine, self.tokenizer, folder / "hf", self.config, self.rank, folder / "adapter")

            self.checkpoint_bytes = save_checkpoint(
                self.engine, asdict(self.state), self.config.model_dump(mode="json"), self.rank,
                hf_export if self.training.checkpoint_hf_export else None,
                expected_bytes=self.checkpoint_bytes, storage=self.storage, metrics=self.reported_metrics())
        self.saved_step = self.state.step

    def reported_metrics(self) -> dict:
        """What a checkpoint reports to Ray Train (rank 0's counts): the step, the epoch, the last step's scalars
        and the last held-out metrics as eval/<name>."""
        held_out = {f"eval/{key}": value for key, value in scalars(self.state.last_eval or {}).items()}
        return {**scalars(self.last_step_record), **held_out, "step": self.state.step, "epoch": self.state.epoch}

    def finish(self, complete: bool) -> None:
        """The policy in Hugging Face format in <run>/model, and the run's summary.json."""
        state, files = self.state, RunDir(self.config.run_dir)
        train_seconds = time.perf_counter() - self.started
        save_hf_model(self.engine, self.tokenizer, files.model, self.config, self.rank, files.adapter)
        summary = {"steps": state.step, "complete": complete, "train_seconds": train_seconds,
                   "tokens": state.tokens, "tokens_per_second": state.tokens / max(state.step_seconds, 1e-9),
                   "eval": state.last_eval, "eval_step": state.last_eval_step, "model_dir": str(files.model)}
        if self.rank == 0:
            files.summary.write_text(json.dumps(summary, indent=2))
        self.log.close()


def train_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train

    config = JobConfig.model_validate(loop_config["config"])
    if not config.tracking.mlflow_experiment:
        # DeepSpeed's autotuner imports MLflow whenever it is installed: about 1 s of CPU at every worker start of
        # a job that does not log to it. This process serves this run alone, so MLflow reads as not installed.
        sys.modules.setdefault("mlflow", None)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    record_placement(str(config.run_dir), "policy", rank=rank)
    # Rank 0 runs Ray Data's executor in this process: its per-dataset lines would drown the step lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    seed_everything(config.run.seed + rank)
    # The stream starts (and its scorer pools load their models) while this worker loads the policy.
    stream = None
    if rank == 0 and loop_config["has_stream"]:
        stream = read_ahead(ray.train.get_dataset_shard(STREAM).iter_rows())
    trainer = Trainer(config, loop_config["total_steps"], loop_config["has_eval"], stream, rank, world_size,
                      pick_device(), loop_config["base_weights"])
    try:
        trainer.fit()
    except BaseException:
        trainer.log.close(failed=True)  # the trackers' runs end marked failed; a restart resumes them
        raise
