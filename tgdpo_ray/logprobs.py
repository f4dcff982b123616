"""Log-probs of the answer tokens of preference pairs: one entry point, answer_logps, for the trainers (the policy)
and the scorers (the frozen reference and guidance models), in every layout of training.packing.

Both paths gather log-probs without ever building an fp32 [tokens x vocab] tensor:
- padded (batches.collate_pairs): the model's logits, then a log-softmax chunk by chunk (token_logps);
- packed and shared_prompt (packing.pack_pairs): the decoder body, then the LM head on the answer-predicting hidden
  states only, chunk by chunk (lm_head_token_logps).
Either way the log-probs land on collate_pairs' [2n, W] label grid, so a reference log-prob computed by a scorer sits
exactly where the trainer computes the policy log-prob of the same token.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tgdpo_ray import flex
from tgdpo_ray.batches import IGNORE_INDEX, collate_pairs
from tgdpo_ray.packing import PackedBatch, pack_pairs, pair_span


# ---------------------------------------------------------------------------
# The padded layout: per-token log-probs of given logits, chunked so no full fp32 [tokens x vocab] tensor exists.
# ---------------------------------------------------------------------------


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk_size):
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        # Masked rows gather index 0 (any valid index) and are zeroed afterwards.
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))

        num_tokens = flat_logits.shape[0]
        logsumexp = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        label_logits = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk = flat_logits[start:end].float()  # only this chunk is upcast
            logsumexp[start:end] = torch.logsumexp(chunk, dim=-1)
            label_logits[start:end] = chunk.gather(-1, safe_labels[start:end, None]).squeeze(-1)

        logps = torch.where(valid, label_logits - logsumexp, torch.zeros_like(logsumexp))
        ctx.save_for_backward(logits, labels, logsumexp)
        ctx.chunk_size = chunk_size
        return logps.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, labels, logsumexp = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
        # Zeroing g on masked rows makes their whole gradient row zero.
        g = torch.where(valid, grad_output.reshape(-1).float(), torch.zeros_like(logsumexp))

        grad_logits = torch.empty_like(flat_logits)
        for start in range(0, flat_logits.shape[0], chunk_size):
            end = min(start + chunk_size, flat_logits.shape[0])
            g_chunk = g[start:end, None]
            # d logp[label] / d logits = onehot(label) - softmax(logits)
            probs = torch.exp(flat_logits[start:end].float() - logsumexp[start:end, None])
            grad_chunk = -probs * g_chunk
            grad_chunk.scatter_add_(-1, safe_labels[start:end, None], g_chunk)
            grad_logits[start:end] = grad_chunk.to(logits.dtype)

        return grad_logits.view(logits.shape), None, None


def token_logps(logits, labels, chunk_size=1024):
    """Log-prob of each label under `logits` ([..., vocab], [...]); float32, 0.0 where label == -100."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    return _ChunkedTokenLogps.apply(logits, labels, chunk_size)


# ---------------------------------------------------------------------------
# The packed layouts: decoder body, then the LM head on the answer-predicting hidden states only.
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


def runs_flex(model) -> bool:
    """Whether `model` (or the DeepSpeed engine around it) runs under flex.ATTENTION: its packed rows then take a
    BlockMask, built from document ids, instead of the dense mask."""
    return getattr(getattr(model, "module", model).config, "_attn_implementation", None) == flex.ATTENTION


def packed_attention_mask(model, batch: PackedBatch, device):
    """What the model's attention takes for a packed batch: a BlockMask under flex.ATTENTION, else the dense mask
    in the implementation's form, or None for a batch packed with mask="position_ids"."""
    if runs_flex(model):
        return flex.block_mask(batch, device)
    if batch.attention_mask is None:
        return None
    # ZeRO-3's partitioned weights are empty placeholders: the dtype comes from the model there.
    return model_attention_mask(batch.attention_mask.to(device), model.config, model.dtype)


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
    attention_mask = packed_attention_mask(model, batch, device)
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
    return batch.answer_grid(logps)


# ---------------------------------------------------------------------------
# The entry point: a micro-batch of pairs in the configured layout.
# ---------------------------------------------------------------------------


def padded_logits(model, rows: Sequence, pad_id: int, device, **forward) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) of collate_pairs(rows): the model's output [2n, L, ...] on the right-padded rows (a causal
    LM's logits, or a token reward head's values) and the shifted answer labels [2n, L]. `forward`: more keyword
    arguments of the model's forward."""
    batch = collate_pairs(rows, pad_id)
    outputs = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    **forward).logits
    return outputs, batch["labels"].to(device)


def answer_logps(model, rows: Sequence, layout: str, packed_row_tokens: int, chunk_size: int, pad_id: int, device,
                 zero3_engine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, answer mask), both [2n, W] as collate_pairs' labels of `rows`: the fp32 log-prob of each answer
    token under `model`, 0.0 off the answers, and True on the answers.

    layout (training.packing): padded, packed or shared_prompt. In the packed layouts the micro-batch is packed
    into rows of about packed_row_tokens tokens, never less than its longest pair, so that it stays one batch and
    one backward. `model`: a Hugging Face causal LM, or the DeepSpeed engine around one (the packed layouts run the
    module it wraps); one under flex.ATTENTION attends through a FlexAttention BlockMask, others through the dense
    mask. zero3_engine: `model` again where it is a ZeRO-3 engine (see packed_token_logps)."""
    if layout == "padded":
        # No KV cache: nothing is generated, and under a compiled layer each cache layer's state recompiles it.
        logits, labels = padded_logits(model, rows, pad_id, device, use_cache=False)
        return token_logps(logits, labels, chunk_size), labels != IGNORE_INDEX
    shared_prompt = layout == "shared_prompt"
    width = max([packed_row_tokens] + [pair_span(row, shared_prompt) for row in rows])
    mask = "flex" if runs_flex(model) else "4d"
    (batch,) = pack_pairs(rows, width, shared_prompt, rows_per_batch=len(rows), mask=mask, pad_id=pad_id)
    return packed_token_logps(getattr(model, "module", model), batch, chunk_size, zero3_engine)
