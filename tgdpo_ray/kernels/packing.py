"""Padding-free packing of preference pairs: the packed and shared_prompt layouts of training.packing.

Today's layout (batches.collate_pairs) pads every prompt + answer row of a micro-batch to the longest one. Here the
pairs are packed back to back into rows of at most `max_tokens` tokens instead, several documents per row, each
document attending only to itself, with position ids that restart at 0 for each document, so every token sees exactly
what it sees in the padded layout and gets the same hidden state.

Two layouts of a pair:
- shared_prompt=False: two documents, [prompt | chosen] and [prompt | rejected].
- shared_prompt=True: one document [prompt | chosen | rejected]. The prompt is computed once. Rejected tokens attend
  to the prompt and to earlier rejected tokens, never to chosen ones, and their position ids continue from the end
  of the prompt as if chosen were not there: the result is the same as with two documents.

The answer tokens are scored through explicit indices, not a shifted label grid: in the shared layout the first
chosen token and the first rejected token are both predicted by the last prompt token. A PackedBatch maps them onto
exactly the [2n, W] grid that collate_pairs' labels use for the same pairs (row i: prompt + chosen of pair i, row
n + i: prompt + rejected; answer token j at column len(prompt) - 1 + j), so the log-probs that
logprobs.packed_token_logps puts there work unchanged with the losses, values_to_grid and grid_to_values.

Attention masks, one rule (may_attend): causal, within a document, and never a rejected token to a chosen one.
- mask="4d": a boolean [R, 1, L, L] mask, True where a query may attend to a key. transformers' masking_utils returns
  a 4D attention_mask unchanged (it neither adds the causal pattern nor looks at position_ids), so the mask must be
  complete. SDPA takes it as a boolean mask; eager attention adds the mask to the scores, so
  logprobs.model_attention_mask turns it into an additive one there. Its cost grows with L^2 whatever the documents.
- mask="flex": no dense mask; the batch carries each position's document and segment ids, from which flex.py builds
  a FlexAttention BlockMask, whose kernel skips the blocks no query of a document may see, and its attention spans,
  from which varlen.py runs FlashAttention's variable-length kernel.
- mask="position_ids" (shared_prompt=False, one row per batch): no mask at all; transformers finds the documents where
  the position ids restart (flash_attention_2 then runs varlen kernels; sdpa and eager build the block mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from tgdpo_ray.kernels.batches import IGNORE_INDEX, to_device

MASK_MODES = ("4d", "flex", "position_ids")
# mask="flex" rows are at least one FlexAttention block long: on CUDA a shorter query takes another kernel (flex
# decoding), and each such shape is one more compiled graph (the trainers' one-pair filler rows are 4 tokens).
FLEX_MIN_LENGTH = 128
# Segments of a document, for the rule that rejected tokens never see chosen ones.
PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, L] long; padding (pad_id) only at the end of a row shorter than L
    position_ids: torch.Tensor  # [R, L] long; restart at 0 for each document
    attention_mask: Optional[torch.Tensor]  # [R, 1, L, L] bool, True = may attend; only for mask="4d"
    document: torch.Tensor  # [R, L] long: the document of each position (each pad is one of its own)
    segment: torch.Tensor  # [R, L] long: PROMPT, CHOSEN or REJECTED
    source_index: torch.Tensor  # [N] flat index (row * L + column) of the hidden state that predicts answer token k
    target_ids: torch.Tensor  # [N] the id of answer token k
    grid_rows: torch.Tensor  # [N] row of answer token k on collate_pairs' label grid of `rows`
    grid_cols: torch.Tensor  # [N] its column there
    grid_shape: tuple[int, int]  # (2n, W): the shape of collate_pairs(rows)["labels"]
    rows: list  # the n pairs of this batch, in grid order; pass these to values_to_grid / grid_to_values
    real_tokens: int  # tokens of the documents (the padding excluded)
    # [S, 5] long, one row per attention sequence, (row, prefix_start, prefix_end, start, end): the queries at columns
    # [start, end) of that row attend causally to the keys [prefix_start, prefix_end) + [start, end). A document is
    # one sequence without a prefix; in the shared layout a pair is two, prompt + chosen, and rejected with the
    # prompt as its prefix. The padding is in none.
    attention_spans: torch.Tensor
    # varlen.VarlenPlan of these spans, built on the host where the model attends through varlen (logprobs.lay_out)
    varlen_plan: Optional[Any] = None

    def to(self, device) -> PackedBatch:
        """Every tensor (and the varlen plan) on `device`, copied without blocking (batches.to_device)."""
        moved = {field.name: to_device(value, device) for field in dataclasses.fields(self)
                 if isinstance(value := getattr(self, field.name), torch.Tensor)}
        if self.varlen_plan is not None:
            moved["varlen_plan"] = self.varlen_plan.to(device)
        return dataclasses.replace(self, **moved)

    def label_grid(self) -> torch.Tensor:
        """The labels collate_pairs(rows) gives: answer token ids on the grid, IGNORE_INDEX elsewhere."""
        labels = torch.full(self.grid_shape, IGNORE_INDEX, dtype=torch.long, device=self.target_ids.device)
        labels[self.grid_rows, self.grid_cols] = self.target_ids
        return labels

    def answer_grid(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid, mask): one value per answer token [N] placed on the grid (0 elsewhere), and True on the answers."""
        index = (self.grid_rows, self.grid_cols)  # on values' device: the batch was moved there whole
        grid = torch.zeros(self.grid_shape, dtype=values.dtype, device=values.device).index_put(index, values)
        mask = torch.zeros(self.grid_shape, dtype=torch.bool, device=values.device).index_put(
            index, torch.ones_like(values, dtype=torch.bool))
        return grid, mask


def may_attend(document: torch.Tensor, segment: torch.Tensor, row, query, key) -> torch.Tensor:
    """The packed layouts' one attention rule, on broadcastable index tensors: causal, within a document, and a
    rejected token never sees a chosen one. The dense mask evaluates it on the whole [R, L, L] grid; FlexAttention
    calls it as its mask_mod, block by block."""
    rejected_to_chosen = (segment[row, query] == REJECTED) & (segment[row, key] == CHOSEN)
    return (query >= key) & (document[row, query] == document[row, key]) & ~rejected_to_chosen


def dense_mask(document: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """may_attend on every (row, query, key): the [R, 1, L, L] boolean mask of SDPA (True = may attend)."""
    rows, length = document.shape
    row = torch.arange(rows, device=document.device)[:, None, None]
    position = torch.arange(length, device=document.device)
    return may_attend(document, segment, row, position[None, :, None], position[None, None, :])[:, None]


def pair_span(row, shared_prompt: bool) -> int:
    """Tokens a pair takes in a packed row."""
    prompt, chosen, rejected = len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])
    return prompt + chosen + rejected if shared_prompt else 2 * prompt + chosen + rejected


def pack_rows(spans: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of the spans in each row, no row above max_tokens. A pair keeps its documents
    in one row. A span above max_tokens gets a row of its own (never split, never dropped), which nothing joins.
    Deterministic: ties keep the input order, and the indices of a row are returned in increasing order.
    Quadratic in the number of rows: meant for the pairs of one step or a window of them, not a whole data set."""
    order = sorted(range(len(spans)), key=lambda i: -spans[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r in range(len(rows)):
            if spans[i] <= room[r]:
                rows[r].append(i)
                room[r] -= spans[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens - spans[i])  # negative for an oversize pair: nothing fits after it
    return [sorted(row) for row in rows]


def pack_pairs(pairs: Sequence, max_tokens: int, shared_prompt: bool = False, rows_per_batch: int = 1,
               mask: str = "4d", pad_id: int = 0) -> list[PackedBatch]:
    """Pack pairs ({"prompt_ids", "chosen_ids", "rejected_ids"}) into batches of up to rows_per_batch rows of at most
    max_tokens tokens each (width L = the longest row of the batch). Every pair lands in exactly one batch; an
    oversize pair (pair_span > max_tokens) forms a batch of one row on its own, as wide as the pair.

    mask="4d": a boolean [R, 1, L, L] mask (sdpa or eager attention). mask="flex": document and segment ids only,
    for a FlexAttention BlockMask (flex.py). mask="position_ids": no mask, one row per batch, documents found from
    the position ids (flash_attention_2 varlen on GPU); not for shared_prompt, whose rejected position ids jump
    back to the end of the prompt and would be taken for a new document."""
    if max_tokens < 1 or rows_per_batch < 1:
        raise ValueError(f"max_tokens and rows_per_batch must be >= 1, got {max_tokens} and {rows_per_batch}")
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    if mask == "position_ids" and (shared_prompt or rows_per_batch != 1):
        raise ValueError("mask='position_ids' needs shared_prompt=False and rows_per_batch=1: transformers detects "
                         "packed documents only in a single row, and only where the position ids restart at 0")
    spans = [pair_span(pair, shared_prompt) for pair in pairs]
    rows = pack_rows(spans, max_tokens)

    # Consecutive rows form a batch; an oversize row goes alone so that it does not widen the others.
    groups: list[list[list[int]]] = []
    current: list[list[int]] = []
    for row in rows:
        if sum(spans[i] for i in row) > max_tokens:
            groups.append([row])
            continue
        if len(current) == rows_per_batch:
            groups.append(current)
            current = []
        current.append(row)
    if current:
        groups.append(current)
    min_length = FLEX_MIN_LENGTH if mask == "flex" else 1
    return [build_packed_batch(pairs, group, shared_prompt, mask == "4d", pad_id, min_length) for group in groups]


class RowWriter:
    """Writes documents into one row of a packed batch's tensors, left to right, and records which hidden state
    scores each answer token."""

    def __init__(self, batch: dict, row: int):
        self.batch, self.row = batch, row
        self.offset = 0  # the next free column
        self.doc = 0  # the document being written

    def place(self, ids: list, positions_from: int, part: int) -> int:
        """Write ids at the current offset, position ids counting from positions_from; returns the column of the
        first one."""
        start, end, batch, row = self.offset, self.offset + len(ids), self.batch, self.row
        batch["input_ids"][row, start:end] = torch.tensor(ids, dtype=torch.long)
        batch["position_ids"][row, start:end] = torch.arange(positions_from, positions_from + len(ids))
        batch["document"][row, start:end] = self.doc
        batch["segment"][row, start:end] = part
        self.offset = end
        return start

    def score(self, answer: list, first: int, last_prompt: int, grid_row: int, prompt_len: int) -> None:
        """Answer token j sits at column first + j; the hidden state one column earlier predicts it, except for
        j = 0, predicted by the last prompt token (in the shared layout not the column before)."""
        if not answer:
            return
        length = self.batch["input_ids"].shape[1]
        columns = torch.arange(first - 1, first + len(answer) - 1)
        columns[0] = last_prompt
        self.batch["source_index"].append(self.row * length + columns)
        self.batch["target_ids"].append(torch.tensor(answer, dtype=torch.long))
        self.batch["grid_rows"].append(torch.full((len(answer),), grid_row, dtype=torch.long))
        self.batch["grid_cols"].append(torch.arange(prompt_len - 1, prompt_len - 1 + len(answer)))

    def pad(self) -> None:
        """Each padding position is a one-token document: it attends to itself alone (a query with nothing to
        attend to would make NaNs in SDPA), and FlexAttention computes no more of the padding than its diagonal
        blocks."""
        length = self.batch["input_ids"].shape[1]
        self.batch["position_ids"][self.row, self.offset:] = torch.arange(length - self.offset)
        self.batch["document"][self.row, self.offset:] = self.doc + torch.arange(length - self.offset)


def build_packed_batch(pairs: Sequence, row_indices: list[list[int]], shared_prompt: bool, with_mask: bool,
                       pad_id: int, min_length: int = 1) -> PackedBatch:
    """One batch: row r holds the pairs pairs[i] for i in row_indices[r], back to back; rows padded to the longest,
    and to at least min_length."""
    batch_pairs = sorted(i for row in row_indices for i in row)
    grid_row_of = {i: k for k, i in enumerate(batch_pairs)}  # pair i's chosen grid row; rejected is n + that
    n = len(batch_pairs)
    spans = [sum(pair_span(pairs[i], shared_prompt) for i in row) for row in row_indices]
    shape = (len(row_indices), max(spans + [min_length]))
    built = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
             "position_ids": torch.zeros(shape, dtype=torch.long), "document": torch.zeros(shape, dtype=torch.long),
             "segment": torch.full(shape, PROMPT, dtype=torch.long),
             "source_index": [], "target_ids": [], "grid_rows": [], "grid_cols": []}
    attention_spans = []
    for r, row in enumerate(row_indices):
        writer = RowWriter(built, r)
        for i in row:
            prompt, chosen, rejected = (list(pairs[i][key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
            p, k = len(prompt), grid_row_of[i]
            if shared_prompt:
                start = writer.place(prompt, 0, PROMPT)
                first = writer.place(chosen, p, CHOSEN)
                writer.score(chosen, first, start + p - 1, k, p)
                # Positions as if chosen were absent: rejected continues right after the prompt.
                first = writer.place(rejected, p, REJECTED)
                writer.score(rejected, first, start + p - 1, n + k, p)
                attention_spans += [(r, start, start, start, first), (r, start, start + p, first, writer.offset)]
                writer.doc += 1
            else:
                for answer, part, grid_row in ((chosen, CHOSEN, k), (rejected, REJECTED, n + k)):
                    start = writer.place(prompt, 0, PROMPT)
                    first = writer.place(answer, p, part)
                    writer.score(answer, first, start + p - 1, grid_row, p)
                    attention_spans.append((r, start, start, start, writer.offset))
                    writer.doc += 1
        writer.pad()

    width = max(len(pairs[i]["prompt_ids"]) + max(len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"]))
                for i in batch_pairs)
    return PackedBatch(
        input_ids=built["input_ids"],
        position_ids=built["position_ids"],
        attention_mask=dense_mask(built["document"], built["segment"]) if with_mask else None,
        document=built["document"],
        segment=built["segment"],
        source_index=torch.cat(built["source_index"]),
        target_ids=torch.cat(built["target_ids"]),
        grid_rows=torch.cat(built["grid_rows"]),
        grid_cols=torch.cat(built["grid_cols"]),
        grid_shape=(2 * n, width),
        rows=[pairs[i] for i in batch_pairs],
        real_tokens=sum(spans),
        attention_spans=torch.tensor(attention_spans, dtype=torch.long),
    )
