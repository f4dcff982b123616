"""Pairs to model inputs: token-budget micro-batches, padded tensors, and per-token values in and out.

Scorers and trainers use the same layout, so a reference log-prob computed in a scorer lands on exactly the
position where the trainer computes the policy log-prob of the same token.

Layout of a micro-batch of n pairs: rows 0..n-1 hold prompt + chosen, rows n..2n-1 prompt + rejected, right
padded to the longest row, width L. The label grid has the same [2n, L] shape as the logits: column i holds
token i+1 (the one the logits at i predict), so answer token j of a pair whose prompt has P tokens sits at
column P - 1 + j. Keeping the logits' shape avoids slicing them, which would copy [tokens x vocab].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from tgdpo_ray.kernels.losses import PairBatch

# The label of a grid position that holds no answer token (torch's cross-entropy ignore_index).
IGNORE_INDEX = -100


def pair_lengths(row) -> tuple[int, int, int]:
    return len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])


class MicroBatchSize:
    """A micro-batch's size in a layout (training.packing), pairs joining one at a time: padded counts chosen
    and rejected rows padded to the longest pair; packed counts each pair's prompt twice, shared_prompt once."""

    def __init__(self, packing: str = "padded"):
        self.packing = packing
        self.pairs = self.prompts = self.answers = self.longest = 0

    def _tokens(self, pairs: int, prompts: int, answers: int, longest: int) -> int:
        if self.packing == "padded":
            return 2 * pairs * longest
        return answers + (prompts if self.packing == "shared_prompt" else 2 * prompts)

    @property
    def tokens(self) -> int:
        return self._tokens(self.pairs, self.prompts, self.answers, self.longest)

    def with_pair(self, prompt: int, chosen: int, rejected: int) -> int:
        """The size once a pair of these lengths joins."""
        return self._tokens(self.pairs + 1, self.prompts + prompt, self.answers + chosen + rejected,
                            max(self.longest, prompt + max(chosen, rejected)))

    def add(self, prompt: int, chosen: int, rejected: int) -> "MicroBatchSize":
        self.pairs += 1
        self.prompts += prompt
        self.answers += chosen + rejected
        self.longest = max(self.longest, prompt + max(chosen, rejected))
        return self


def micro_batch_tokens(rows: Sequence, packing: str = "padded") -> int:
    """What a micro-batch costs in the given layout (training.packing): padded, packed or shared_prompt."""
    size = MicroBatchSize(packing)
    for row in rows:
        size.add(*pair_lengths(row))
    return size.tokens


def padded_tokens(rows: Sequence) -> int:
    return micro_batch_tokens(rows, "padded")


def packed_tokens(rows: Sequence, shared_prompt: bool) -> int:
    return micro_batch_tokens(rows, "shared_prompt" if shared_prompt else "packed")


def cut_by_token_budget(items: Iterable[tuple[Any, tuple[int, int, int]]], max_tokens: int,
                        max_pairs: Optional[int] = None, packing: str = "padded") -> Iterator[list]:
    """Greedy, order-preserving, over (item, (prompt, chosen, rejected) lengths): a micro-batch grows while its
    size in the layout `packing` stays within max_tokens (and it holds at most max_pairs pairs). A pair larger
    than the budget on its own still forms a micro-batch of one: it is never dropped."""
    return (batch for batch, _ in cut_with_sizes(items, max_tokens, max_pairs, packing))


def cut_with_sizes(items: Iterable[tuple[Any, tuple[int, int, int]]], max_tokens: int,
                   max_pairs: Optional[int] = None, packing: str = "padded") -> Iterator[tuple[list, MicroBatchSize]]:
    """cut_by_token_budget's micro-batches, each with its size (sized once, as it grows)."""
    batch: list = []
    size = MicroBatchSize(packing)
    for item, lengths in items:
        if batch and (size.with_pair(*lengths) > max_tokens or len(batch) == max_pairs):
            yield batch, size
            batch, size = [], MicroBatchSize(packing)
        batch.append(item)
        size.add(*lengths)
    if batch:
        yield batch, size


def pack_by_token_budget(rows: Iterable, max_tokens: int, max_pairs: Optional[int] = None,
                         packing: str = "padded") -> Iterator[list]:
    """The rows cut into micro-batches (cut_by_token_budget)."""
    return cut_by_token_budget(((row, pair_lengths(row)) for row in rows), max_tokens, max_pairs, packing)


def collate_pairs(rows: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and the shifted labels, all [2n, L] (labels IGNORE_INDEX off the answers)."""
    sequences, answer_lengths = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            sequences.append(list(row["prompt_ids"]) + list(row[side]))
            answer_lengths.append(len(row[side]))
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, answer_length) in enumerate(zip(sequences, answer_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        start = len(seq) - answer_length
        labels[i, start - 1: len(seq) - 1] = input_ids[i, start: len(seq)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PaddedBatch:
    """The padded layout of a micro-batch (collate_pairs): rows 0..n-1 prompt + chosen, n..2n-1 prompt + rejected."""

    input_ids: torch.Tensor  # [2n, L]
    attention_mask: torch.Tensor  # [2n, L], 1 on the tokens, 0 on the padding
    labels: torch.Tensor  # [2n, L]: answer token i+1 at column i, IGNORE_INDEX elsewhere

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)

    def to(self, device) -> PaddedBatch:
        return PaddedBatch(*(to_device(tensor, device) for tensor in (self.input_ids, self.attention_mask,
                                                                       self.labels)))


def pad_pairs(rows: Sequence, pad_id: int) -> PaddedBatch:
    return PaddedBatch(**collate_pairs(rows, pad_id))


def answer_columns(rows: Sequence) -> list[tuple[int, int]]:
    """(first grid column, number of tokens) of each of the 2n answers, in collate_pairs' row order."""
    spans = []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            spans.append((len(row["prompt_ids"]) - 1, len(row[side])))
    return spans


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`, without waiting for the GPU: a copy from pageable memory first waits for all the
    work queued on the stream, so each input of a micro-batch would leave the GPU idle while the host prepares the
    next; a copy from pinned memory is queued like a kernel (the pinned block is not reused before it is done)."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def values_to_grid(rows: Sequence, chosen_key: str, rejected_key: str, width: int) -> torch.Tensor:
    """Per-answer-token values (e.g. reference log-probs) placed on the [2n, width] label grid, 0 elsewhere."""
    grid = torch.zeros((2 * len(rows), width), dtype=torch.float32)
    keys = [chosen_key] * len(rows) + [rejected_key] * len(rows)
    for i, ((start, length), key, row) in enumerate(zip(answer_columns(rows), keys, list(rows) + list(rows))):
        values = np.array(row[key], dtype=np.float32)  # a copy: Ray's buffers are read-only
        if len(values) != length:
            raise ValueError(f"pair {row.get('pair_id')}: {key} has {len(values)} values for {length} tokens")
        grid[i, start: start + length] = torch.from_numpy(values)
    return grid


def grid_to_values(grid: torch.Tensor, rows: Sequence) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The inverse of values_to_grid: per-answer arrays for the chosen and the rejected answers."""
    grid = grid.float().cpu().numpy()
    spans = answer_columns(rows)
    arrays = [grid[i, start: start + length].copy() for i, (start, length) in enumerate(spans)]
    return arrays[: len(rows)], arrays[len(rows):]


# The per-answer-token values a pair carries besides its token ids, each in a chosen and a rejected column: the
# reference and guidance scorers' log-probs, and token rewards (a token reward model's, or the data's).
SCORED_PREFIXES = ("ref", "guidance")
SCORED_KINDS = ("logps", "rewards")


def score_columns(prefix: str, kind: str) -> tuple[str, str]:
    """The columns {prefix}_chosen_{kind} and {prefix}_rejected_{kind} (prefix in SCORED_PREFIXES, kind in
    SCORED_KINDS): where the scorers write and pair_batch reads."""
    return f"{prefix}_chosen_{kind}", f"{prefix}_rejected_{kind}"


def scored_grids(rows: Sequence, width: int, with_reference: bool, guidance_kind: Optional[str]) -> dict:
    """The values `rows` carry from the scorers (or the data) that the loss reads, each on the [2n, width] label
    grid, on the host: "ref_logps" (with_reference), and TGDPO's guidance (JobConfig.guidance_kind): the guidance
    model's log-probs "guidance_logps" (implicit), or the token rewards themselves "guidance_rewards"
    (token_reward_model, column)."""
    wanted = [("ref", "logps")] if with_reference else []
    if guidance_kind == "implicit":
        wanted.append(("guidance", "logps"))
    elif guidance_kind is not None:
        wanted.append(("guidance", "rewards"))
    return {f"{prefix}_{kind}": values_to_grid(rows, *score_columns(prefix, kind), width) for prefix, kind in wanted}


# Each of scored_grids' values, and the PairBatch fields of its chosen and rejected halves.
GRID_FIELDS = {"ref_logps": ("ref_chosen_logps", "ref_rejected_logps"),
               "guidance_logps": ("guidance_chosen_logps", "guidance_rejected_logps"),
               "guidance_rewards": ("chosen_token_rewards", "rejected_token_rewards")}


def pair_batch(policy_logps: torch.Tensor, answer_mask: torch.Tensor, grids: dict) -> PairBatch:
    """The loss inputs of a micro-batch: the policy's log-probs and answer mask ([2n, W] on the label grid) split
    into chosen and rejected, with the scored_grids on the same grid and device."""
    n = answer_mask.shape[0] // 2
    batch = PairBatch(policy_chosen_logps=policy_logps[:n], policy_rejected_logps=policy_logps[n:],
                      chosen_mask=answer_mask[:n], rejected_mask=answer_mask[n:])
    for name, grid in grids.items():
        chosen, rejected = GRID_FIELDS[name]
        setattr(batch, chosen, grid[:n])
        setattr(batch, rejected, grid[n:])
    return batch
