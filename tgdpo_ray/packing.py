"""Padding-free packing of preference pairs, and answer-token log-probs that never build a [tokens x vocab] tensor.

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
chosen token and the first rejected token are both predicted by the last prompt token. packed_token_logps puts the
log-probs on exactly the [2n, W] grid that collate_pairs' labels use for the same pairs (row i: prompt + chosen of
pair i, row n + i: prompt + rejected; answer token j at column len(prompt) - 1 + j), so losses, values_to_grid and
grid_to_values work unchanged.

Attention masks (mask="4d"): a boolean [R, 1, L, L] mask, True where a query may attend to a key. transformers'
masking_utils returns a 4D attention_mask unchanged (it neither adds the causal pattern nor looks at position_ids),
so the mask must be complete: causal, per document, and the rejected-not-to-chosen rule. SDPA takes it as a boolean
mask; eager attention adds the mask to the scores, so packed_token_logps turns it into an additive one there.
mask="position_ids" (shared_prompt=False, one row per batch): no mask at all; transformers finds the documents where
the position ids restart (flash_attention_2 then runs varlen kernels; sdpa and eager build the block mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tgdpo_ray.losses import IGNORE_INDEX, token_logps

MASK_MODES = ("4d", "position_ids")
# Segments of a document, for the rule that rejected tokens never see chosen ones.
PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, L] long; padding (pad_id) only at the end of a row shorter than L
    position_ids: torch.Tensor  # [R, L] long; restart at 0 for each document
    attention_mask: Optional[torch.Tensor]  # [R, 1, L, L] bool, True = may attend; None for mask="position_ids"
    source_index: torch.Tensor  # [N] flat index (row * L + column) of the hidden state that predicts answer token k
    target_ids: torch.Tensor  # [N] the id of answer token k
    grid_rows: torch.Tensor  # [N] row of answer token k on collate_pairs' label grid of `rows`
    grid_cols: torch.Tensor  # [N] its column there
    grid_shape: tuple[int, int]  # (2n, W): the shape of collate_pairs(rows)["labels"]
    rows: list  # the n pairs of this batch, in grid order; pass these to values_to_grid / grid_to_values
    real_tokens: int  # tokens of the documents (the padding excluded)

    def to(self, device) -> PackedBatch:
        tensors = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: value.to(device) for name, value in tensors.items()
                                            if isinstance(value, torch.Tensor)})

    def label_grid(self) -> torch.Tensor:
        """The labels collate_pairs(rows) gives: answer token ids on the grid, IGNORE_INDEX elsewhere."""
        labels = torch.full(self.grid_shape, IGNORE_INDEX, dtype=torch.long, device=self.target_ids.device)
        labels[self.grid_rows, self.grid_cols] = self.target_ids
        return labels


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

    mask="4d": a boolean [R, 1, L, L] mask (sdpa or eager attention). mask="position_ids": no mask, one row per
    batch, documents found from the position ids (flash_attention_2 varlen on GPU); not for shared_prompt, whose
    rejected position ids jump back to the end of the prompt and would be taken for a new document."""
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
    return [build_packed_batch(pairs, group, shared_prompt, mask == "4d", pad_id) for group in groups]


def build_packed_batch(pairs: Sequence, row_indices: list[list[int]], shared_prompt: bool, with_mask: bool,
                       pad_id: int) -> PackedBatch:
    """One batch: row r holds the pairs pairs[i] for i in row_indices[r], back to back."""
    batch_pairs = sorted(i for row in row_indices for i in row)
    grid_row_of = {i: k for k, i in enumerate(batch_pairs)}  # pair i's chosen grid row; rejected is n + that
    n = len(batch_pairs)
    spans = [sum(pair_span(pairs[i], shared_prompt) for i in row) for row in row_indices]
    length = max(spans)

    input_ids = torch.full((len(row_indices), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(row_indices), length), dtype=torch.long)
    document = torch.zeros((len(row_indices), length), dtype=torch.long)
    segment = torch.full((len(row_indices), length), PROMPT, dtype=torch.long)
    source, targets, grid_rows, grid_cols = [], [], [], []

    for r, row in enumerate(row_indices):
        offset, doc = 0, 0

        def place(ids: list, positions: range, part: int) -> int:
            """Write ids at the current offset of row r; returns the column of the first one."""
            nonlocal offset
            start, end = offset, offset + len(ids)
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, start:end] = torch.tensor(positions, dtype=torch.long)
            document[r, start:end] = doc
            segment[r, start:end] = part
            offset = end
            return start

        def score(answer: list, first: int, last_prompt: int, grid_row: int, prompt_len: int) -> None:
            """Answer token j sits at column first + j; the hidden state one column earlier predicts it, except
            for j = 0, predicted by the last prompt token (in the shared layout not the column before)."""
            for j, token in enumerate(answer):
                source.append(r * length + (last_prompt if j == 0 else first + j - 1))
                targets.append(token)
                grid_rows.append(grid_row)
                grid_cols.append(prompt_len - 1 + j)

        for i in row:
            prompt, chosen, rejected = (list(pairs[i][key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
            p, k = len(prompt), grid_row_of[i]
            if shared_prompt:
                start = place(prompt, range(p), PROMPT)
                first = place(chosen, range(p, p + len(chosen)), CHOSEN)
                score(chosen, first, start + p - 1, k, p)
                # Positions as if chosen were absent: rejected continues right after the prompt.
                first = place(rejected, range(p, p + len(rejected)), REJECTED)
                score(rejected, first, start + p - 1, n + k, p)
                doc += 1
            else:
                for answer, part, grid_row in ((chosen, CHOSEN, k), (rejected, REJECTED, n + k)):
                    start = place(prompt, range(p), PROMPT)
                    first = place(answer, range(p, p + len(answer)), part)
                    score(answer, first, start + p - 1, grid_row, p)
                    doc += 1
        # The padding is a document of its own: a query row with nothing to attend to would make NaNs in SDPA.
        position_ids[r, offset:] = torch.arange(length - offset)
        document[r, offset:] = doc

    attention_mask = None
    if with_mask:
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        same_document = document[:, :, None] == document[:, None, :]
        rejected_to_chosen = (segment[:, :, None] == REJECTED) & (segment[:, None, :] == CHOSEN)
        attention_mask = (causal & same_document & ~rejected_to_chosen)[:, None]

    width = max(len(pairs[i]["prompt_ids"]) + max(len(pairs[i]["chosen_ids"]), len(pairs[i]["rejected_ids"]))
                for i in batch_pairs)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        source_index=torch.tensor(source, dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
        grid_rows=torch.tensor(grid_rows, dtype=torch.long),
        grid_cols=torch.tensor(grid_cols, dtype=torch.long),
        grid_shape=(2 * n, width),
        rows=[pairs[i] for i in batch_pairs],
        real_tokens=sum(spans),
    )


# ---------------------------------------------------------------------------
# Log-probs of the answer tokens: decoder body, then the LM head on the answer-predicting hidden states only.
# ---------------------------------------------------------------------------


class _LMHeadTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target] per row, chunk by chunk. Only hidden, the weights and one fp32
    logsumexp per row are saved; backward recomputes each chunk's logits, so at most [chunk_size x vocab] logits (and
    their gradient) exist at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        num = hidden.shape[0]
        logsumexp = torch.empty(num, dtype=torch.float32, device=hidden.device)
        target_logits = torch.empty(num, dtype=torch.float32, device=hidden.device)
        for start in range(0, num, chunk_size):
            end = min(start + chunk_size, num)
            # Logits in the model's dtype (as the LM head gives them), then fp32 for the softmax, as token_logps.
            logits = F.linear(hidden[start:end], weight, bias).float()
            logsumexp[start:end] = torch.logsumexp(logits, dim=-1)
            target_logits[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunk_size = chunk_size
        return target_logits - logsumexp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators: the weight gradient sums over every chunk, bf16 sums would lose the small ones.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            chunk = hidden[start:end]
            g = grad_output[start:end, None].float()
            # d logp[target] / d logits = onehot(target) - softmax(logits)
            grad_logits = torch.exp(F.linear(chunk, weight, bias).float() - logsumexp[start:end, None])
            grad_logits.mul_(-g).scatter_add_(-1, targets[start:end, None], g)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                grad_weight.add_(grad_logits.t() @ chunk)
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def lm_head_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """fp32 log-prob of targets [N] under the logits hidden [N, H] @ weight [V, H].T (+ bias [V]); peak extra
    memory O(chunk_size x V)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, H] and targets {tuple(targets.shape)} [N]")
    return _LMHeadTokenLogps.apply(hidden, weight, bias, targets, chunk_size)


def model_attention_mask(allowed: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """The [R, 1, L, L] boolean mask in the form the model's attention takes (masking_utils passes it on as is)."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == "sdpa":
        return allowed  # scaled_dot_product_attention: boolean, True = attend
    if implementation == "eager":
        # eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere.
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"a 4d packing mask needs attn_implementation 'sdpa' or 'eager', not {implementation!r}; "
                     "with flash_attention_2 pack with mask='position_ids' (shared_prompt=False)")


def check_plain_lm_head(config) -> None:
    """The fused head computes hidden @ W.T (+ b) only: refuse models that scale or cap the logits after it."""
    for name, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise ValueError(f"{type(config).__name__}.{name}={value}: the model transforms its logits after the "
                             "LM head, which packed_token_logps does not reproduce")


def packed_token_logps(model, batch: PackedBatch, chunk_size: int = 1024,
                       zero3_engine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, mask), both [2n, W] as collate_pairs' labels of batch.rows: fp32 log-prob of each answer token,
    0.0 off the answers, and True on the answers. `model` is a Hugging Face causal LM (unwrapped: model.module of a
    DeepSpeed engine or DDP). Only the answer-predicting hidden states go through the LM head.

    zero3_engine: the DeepSpeed ZeRO-3 engine around `model`. Its partitioned weights are gathered only inside
    module calls, and its gradient accumulation needs every forward to go through the engine (called around it,
    only the last micro-batch of a step kept its gradient: the engine's forward resets ZeRO-3's per-forward
    backward state). The engine computes logits for the columns that hold answer-predicting states
    (logits_to_keep), then a chunked log-softmax; no fused head."""
    check_plain_lm_head(model.config)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = head.weight.device
    attention_mask = None
    if batch.attention_mask is not None:
        # ZeRO-3's partitioned weights are empty placeholders: the dtype comes from the model there.
        attention_mask = model_attention_mask(batch.attention_mask.to(device), model.config, model.dtype)
    # use_cache=False: with a cache, transformers would not look for packed documents in the position ids.
    inputs = {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
              "attention_mask": attention_mask, "use_cache": False}
    source = batch.source_index.to(device)
    targets = batch.target_ids.to(device)
    if zero3_engine is None:
        hidden = decoder(**inputs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, source)
        logps = lm_head_token_logps(selected, head.weight, head.bias, targets, chunk_size)
    else:
        rows, columns = source // batch.input_ids.shape[1], source % batch.input_ids.shape[1]
        kept = torch.unique(columns)  # sorted
        logits = zero3_engine(**inputs, logits_to_keep=kept).logits  # [rows, kept columns, vocab]
        logps = token_logps(logits[rows, torch.searchsorted(kept, columns)].unsqueeze(0), targets.unsqueeze(0),
                            chunk_size)[0]

    index = (batch.grid_rows.to(device), batch.grid_cols.to(device))
    grid = torch.zeros(batch.grid_shape, dtype=logps.dtype, device=device).index_put(index, logps)
    mask = torch.zeros(batch.grid_shape, dtype=torch.bool, device=device).index_put(
        index, torch.ones_like(logps, dtype=torch.bool))
    return grid, mask


def micro_batch_token_logps(model, rows: Sequence, shared_prompt: bool, row_tokens: int, chunk_size: int,
                            zero3_engine=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The trainers' and scorers' entry point: one micro-batch of pairs packed into rows of about row_tokens
    tokens (never less than its longest pair, so that it stays one batch and one backward), scored as
    packed_token_logps. Returns (log-probs, mask, real tokens)."""
    width = max([row_tokens] + [pair_span(row, shared_prompt) for row in rows])
    (batch,) = pack_pairs(rows, width, shared_prompt, rows_per_batch=len(rows))
    logps, mask = packed_token_logps(model, batch, chunk_size, zero3_engine)
    return logps, mask, batch.real_tokens
