"""Which pairs train in which optimizer step, and on which worker.

Every epoch visits the pairs in an order drawn from (run.seed, epoch) (training.shuffle; file order when off).
Rank 0 reads the run's scored stream (each epoch in its order), cuts it into token-budget micro-batches and deals each
optimizer step's micro-batches to the workers: worker w gets micro-batches w, w + W, w + 2W, ... of the step, at
most gradient_accumulation_steps of them. The plan is a function of the data, the seed and the config alone,
never of timing: a rerun trains the same pairs in the same steps, and a resumed run continues the plan of the
run it resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby, islice
from typing import Iterable, Iterator, Optional

import numpy as np
import torch.distributed as dist

from tgdpo_ray.config.job import TrainingSection
from tgdpo_ray.kernels.batches import cut_with_sizes, pack_by_token_budget


# The name under which the trainers find the run's one scored stream (run.training_stream): the held-out pairs,
# then every epoch's pairs in the epoch's order, each row tagged with its part: HELD_OUT, or the epoch.
STREAM = "scored"
HELD_OUT = -1


class StreamParts:
    """Rank 0's reader of the scored stream: the rows of one part after another. Parts before the one asked
    for are read past (a run whose workers restarted after a failure reads the stream again from its start)."""

    def __init__(self, rows: Iterable[dict]):
        self.groups = groupby(rows, key=lambda row: int(row["part"]))

    def rows_of(self, part: int) -> Iterator[dict]:
        for key, group in self.groups:
            if key == part:
                return group
            if key > part:
                raise RuntimeError(f"the scored stream has no part {part} (it went on with part {key}): the "
                                   "driver started it later than the checkpoint the workers resumed from")
        return iter(())


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's order of `count` pairs sorted by pair id: the index of the pair at each place, a permutation
    drawn from (seed, epoch), or file order. A function of these four numbers alone, so the order does not
    depend on how many workers read or tokenized the data."""
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch]).permutation(count)


def in_epoch_order(rows: list[dict], seed: int, epoch: int, shuffle: bool) -> list[dict]:
    by_id = sorted(rows, key=lambda row: row["pair_id"])
    return [by_id[index] for index in epoch_order(len(by_id), seed, epoch, shuffle).tolist()]


def lengths_in_order(lengths: np.ndarray, order: np.ndarray, chunk: int = 65536) -> Iterator[tuple[None, list]]:
    """(None, lengths) of each pair in the order, as cut_with_sizes takes them; made a chunk at a time, since a
    list of a million small lists would weigh more than the arrays themselves."""
    for start in range(0, len(order), chunk):
        for pair in lengths[order[start: start + chunk]].tolist():
            yield None, pair


@dataclass
class EpochShape:
    steps: int
    micro_batches: int
    tokens: int  # what the micro-batches cost in the layout (training.packing), padding included


def epoch_shape(lengths: np.ndarray, order: np.ndarray, training: TrainingSection, world_size: int) -> EpochShape:
    """An epoch's optimizer steps, micro-batches and tokens, from the pairs' (prompt, chosen, rejected) token
    counts alone (rows of `lengths`, by pair id) taken in the epoch's order: what plan_steps yields, without
    the tokens themselves, in one pass of the cutter."""
    micro_batches = tokens = 0
    for _, size in cut_with_sizes(lengths_in_order(lengths, order), training.max_tokens_per_batch,
                                  training.max_pairs_per_batch, training.packing):
        micro_batches += 1
        tokens += size.tokens
    steps = -(-micro_batches // (world_size * training.gradient_accumulation_steps))
    return EpochShape(steps, micro_batches, tokens)


@dataclass
class StepShare:
    """One worker's part of an optimizer step."""

    micro_batches: list[list[dict]]
    step_pairs: int  # real pairs of the whole step, over every worker: the divisor of the step's loss
    step_pair_ids: list[int]  # every pair of the step, in plan order


def plan_steps(rows: Iterable[dict], training: TrainingSection, world_size: int,
               accumulation: Optional[int] = None) -> Iterator[list[list[list[dict]]]]:
    """The steps of one pass over `rows`: for each step, every worker's micro-batches."""
    per_worker = training.gradient_accumulation_steps if accumulation is None else accumulation
    micro_batches = pack_by_token_budget(rows, training.max_tokens_per_batch, training.max_pairs_per_batch,
                                         training.packing)
    while True:
        step = list(islice(micro_batches, world_size * per_worker))
        if not step:
            return
        yield [step[worker::world_size] for worker in range(world_size)]


def step_pair_ids(step: list[list[list[dict]]]) -> list[int]:
    """The pair ids of a planned step in plan order (micro-batch k of the step is share k mod W, index k // W)."""
    return [int(row["pair_id"]) for index in range(max(map(len, step))) for share in step if index < len(share)
            for row in share[index]]


def deal_step(plan: Optional[Iterator], rank: int, world_size: int) -> Optional[StepShare]:
    """A collective: rank 0 takes the plan's next step and sends each worker its share (one message per worker,
    which also carries the step's pair count). Every worker gets None when the plan is used up."""
    shares: list = [None] * world_size
    if rank == 0:
        step = next(plan, None)
        if step is not None:
            pair_ids = step_pair_ids(step)
            shares = [StepShare(share, len(pair_ids), pair_ids) for share in step]
    received: list = [None]
    dist.scatter_object_list(received, shares if rank == 0 else None, src=0)
    return received[0]
