"""Frozen-model scorers: Ray Data actor pools that add per-token log-probs to every pair.

The reference and guidance models never change during a run, so they live in their own actor pools (own
GPUs, own pool sizes) and the trainers never load them. Ray Data's streaming executor moves scored batches
to the trainers with backpressure, so training starts while scoring is still running.
"""

from __future__ import annotations

import os
import time
import numpy as np
import torch

from tgdpo_ray.common.jsonl import append_records
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.job import SCORED_GUIDANCE, JobConfig, ScorerSection
from tgdpo_ray.kernels.attention import enable as enable_attention
from tgdpo_ray.kernels.batches import grid_to_values, pack_by_token_budget, packed_tokens, pad_pairs, score_columns
from tgdpo_ray.kernels.logprobs import answer_logps, padded_logits
from tgdpo_ray.modeling.loading import load_causal_lm, load_token_reward_model
from tgdpo_ray.runtime.placement import pick_device, record_placement
from tgdpo_ray.runtime.ray_start import configure_ray_data


# The prefix of each scorer's output columns (batches.score_columns).
COLUMN_PREFIX = {"reference": "ref", "guidance": "guidance"}


@torch.inference_mode()
def answer_values(model, rows: list, pad_id: int, device: torch.device, chunk_size: int, token_rewards: bool,
                  packing: str = "padded", packed_row_tokens: int = 2048):
    """Per answer token of the chosen and rejected answers of `rows` (lists of float32 arrays): the log-prob
    under a causal LM, or the output of a per-token reward head. Log-probs are computed in the trainers' layout
    (training.packing); a token reward head always reads padded rows."""
    if not token_rewards:
        logps, _ = answer_logps(model, rows, packing, packed_row_tokens, chunk_size, pad_id, device)
        return grid_to_values(logps, rows)
    outputs = padded_logits(model, pad_pairs(rows, pad_id).to(device))
    # The head's output at a token's own position is that token's reward; the label grid holds token i+1 at
    # column i, so shift left by one.
    rewards = torch.zeros(outputs.shape[:2], dtype=torch.float32, device=outputs.device)
    rewards[:, :-1] = outputs[:, 1:, 0].float()
    return grid_to_values(rewards, rows)


class FrozenScorer:
    """A Ray Data callable class: one instance per actor, holding one frozen model (a causal LM scored for
    per-token log-probs, or a token reward model scored for per-token rewards)."""

    def __init__(self, role: str, model: str, precision: str, trust_remote_code: bool, pad_id: int,
                 max_tokens: int, chunk_size: int, run_dir: str, token_rewards: bool = False,
                 packing: str = "padded", packed_row_tokens: int = 2048, attention: str = "auto"):
        self.role = role
        self.batch_log = RunDir(run_dir).scoring / f"{role}-{os.getpid()}.jsonl"
        self.batch_log.parent.mkdir(parents=True, exist_ok=True)
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.chunk_size = chunk_size
        self.token_rewards = token_rewards
        # A token reward head reads padded rows, so its micro-batches are cut by their padded size.
        self.packing = "padded" if token_rewards else packing
        self.packed_row_tokens = packed_row_tokens
        self.device = pick_device()
        started = time.perf_counter()
        load = load_token_reward_model if token_rewards else load_causal_lm
        self.model = load(model, precision, trust_remote_code).to(self.device).eval()
        enable_attention(self.model, self.packing, attention, self.device, training=False, dtype=self.model.dtype)
        record_placement(run_dir, role, load_seconds=round(time.perf_counter() - started, 2),
                         attention=getattr(self.model.config, "_attn_implementation", None))

    def __call__(self, batch: dict) -> dict:
        started = time.perf_counter()
        rows = [
            {"pair_id": pair_id, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
            for pair_id, p, c, r in zip(batch["pair_id"], batch["prompt_ids"], batch["chosen_ids"],
                                        batch["rejected_ids"])
        ]
        chosen, rejected = [], []
        # The scorer batch is cut again by the token budget, so one long pair cannot blow up memory.
        for micro in pack_by_token_budget(rows, self.max_tokens, packing=self.packing):
            micro_chosen, micro_rejected = answer_values(self.model, micro, self.pad_id, self.device,
                                                         self.chunk_size, self.token_rewards, self.packing,
                                                         self.packed_row_tokens)
            chosen += micro_chosen
            rejected += micro_rejected
        chosen_column, rejected_column = score_columns(COLUMN_PREFIX[self.role],
                                                       "rewards" if self.token_rewards else "logps")
        batch[chosen_column], batch[rejected_column] = ragged(chosen), ragged(rejected)
        # One line per batch: the pool's throughput over time, for `report` and for checking that training
        # started before scoring ended; the pairs by id, for checking that every pair was scored.
        tokens = packed_tokens(rows, shared_prompt=False)
        append_records(self.batch_log, [{"time": time.time(), "pairs": len(rows), "tokens": tokens,
                                         "seconds": time.perf_counter() - started,
                                         "pair_ids": [int(row["pair_id"]) for row in rows]}])
        return batch


def ragged(arrays: list) -> np.ndarray:
    """A 1-D object array of variable-length arrays: the numpy form Ray Data stores as a list column."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def pool_options(section: ScorerSection) -> dict:
    """map_batches' options for an actor pool sized and placed by a scorer section (the scorer pools, and the
    pairs job's reward model)."""
    from ray.data import ActorPoolStrategy

    low, high = section.replica_range
    return dict(batch_size=section.batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(min_size=low, max_size=high), num_cpus=section.cpus_per_replica,
                num_gpus=section.gpus_per_replica, resources=section.resources or None,
                label_selector=section.node_labels or None)


def add_scorer(dataset, role: str, section: ScorerSection, model: str, config: JobConfig, pad_id: int,
               token_rewards: bool = False):
    return dataset.map_batches(
        FrozenScorer,
        fn_constructor_kwargs=dict(
            role=role,
            model=model,
            precision=config.scorer_precision(section),
            trust_remote_code=section.trust_remote_code,
            pad_id=pad_id,
            max_tokens=config.training.max_tokens_per_batch,
            chunk_size=config.training.logp_chunk_size,
            run_dir=str(config.run_dir),
            token_rewards=token_rewards,
            packing=config.training.packing,
            packed_row_tokens=config.training.packed_row_tokens,
            attention=config.training.attention,
        ),
        **pool_options(section),
    )


# The driver of a stream cut into many small blocks grew by about 0.7 MB a block (40k pairs in 625 blocks: 619 ->
# 1070 MiB; in 40 blocks it stayed flat; DEVELOPERS.md), so a stream has at most this many blocks of its full size.
STREAM_BLOCKS = 256


# Full blocks per partition of the sort that orders a stream: a partition per block is slower to sort (300k pairs on
# 2 cores: 20.0 s in 263 partitions, 14.6 s in 23 of up to 16 blocks).
BLOCKS_PER_PARTITION = 16


def stream_blocks(rows: int, first_rows: int) -> tuple[list[int], int]:
    """How a stream of `rows` rows is cut: (where the sort's partitions start, the first at 0 left out; the rows of
    a full block). The first block holds first_rows (a scorer batch) and each next one twice as many, up to a full
    block of rows / STREAM_BLOCKS; the rest is sorted in partitions of BLOCKS_PER_PARTITION full blocks, which the
    stream then cuts. The first step waits for one scorer batch, not for a block of thousands of pairs (3,906 at a
    million pairs: most of the 480 s between tokenization and the first step in bench/data_path.py on 2 cores,
    before), while the stream stays within about STREAM_BLOCKS blocks."""
    full = max(first_rows, -(-rows // STREAM_BLOCKS))
    starts, start, size = [], 0, first_rows
    while size < full and start + size < rows:
        start += size
        starts.append(start)
        size *= 2
    step = full * BLOCKS_PER_PARTITION
    return starts + list(range(start + step, rows, step)), full


def scored_dataset(pairs, count: int, config: JobConfig, pad_id: int):
    """`count` tokenized pairs (a Ray dataset, in any order) -> reference pool -> guidance pool, computed first
    in blocks of about a scorer batch (more when there are many pairs)."""
    block_rows = max(config.reference.batch_size, -(-count // STREAM_BLOCKS))
    return with_scorers(pairs.repartition(target_num_rows_per_block=block_rows).materialize(), config, pad_id)


def with_scorers(blocks, config: JobConfig, pad_id: int):
    """Pairs already computed in blocks (a materialized Ray dataset) -> reference pool -> guidance pool: the
    stream the trainers consume. The pairs were computed before any scorer or trainer holds a CPU (their order
    included), so while the stream runs only the scorer pools compute in it: a cluster whose CPUs the trainers
    and scorers hold entirely still moves. Each replica gets blocks, and training starts on the first."""
    configure_ray_data()
    dataset = blocks
    if config.needs_reference:
        dataset = add_scorer(dataset, "reference", config.reference, config.reference_model, config, pad_id)
    if config.guidance_kind in SCORED_GUIDANCE:
        dataset = add_scorer(dataset, "guidance", config.guidance, config.guidance.model, config, pad_id,
                             token_rewards=config.guidance_kind == "token_reward_model")
    return dataset
