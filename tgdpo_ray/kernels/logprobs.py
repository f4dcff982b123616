"""Log-probs of the answer tokens of preference pairs, in every layout of training.packing, for the trainers (the
policy, through step.micro_batch_loss) and the scorers (the frozen reference and guidance models, answer_logps)
alike: lay_out on the host, one move to the device, then batch_logps.

Both paths gather log-probs without ever building an fp32 [tokens x vocab] tensor:
- padded (batches.collate_pairs): the model's logits, then a log-softmax chunk by chunk (token_logps);
- packed and shared_prompt (packing.pack_pairs): the decoder body, then the LM head on the answer-predicting hidden
  states only, chunk by chunk (lm_head_token_logps).
Either way the log-probs land on collate_pairs' [2n, W] label grid, so a reference log-prob computed by a scorer sits
exactly where the trainer computes the policy log-prob of the same token.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tgdpo_ray.kernels import flex, varlen
from tgdpo_ray.kernels.batches import IGNORE_INDEX, PaddedBatch, pad_pairs
from tgdpo_ray.kernels.packing import PackedBatch, pack_pairs, pair_span


# ---------------------------------------------------------------------------
# The chunk math of both paths: a chunk of logits [c, V] in the model's dtype in, fp32 statistics or the gradient
# in the logits' dtype out. On CUDA it runs compiled: inductor reads each chunk once or twice, where eager code
# writes and reads fp32 copies of it several times (the LM head's elementwise work was a large share of a GPU
# step). Elsewhere it runs eager: inductor's CPU build costs seconds per shape.
# ---------------------------------------------------------------------------


def chunk_logsumexp_and_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (logsumexp, logit of the target) of each row of logits [c, V], targets [c]."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1), logits.gather(-1, targets[:, None]).squeeze(-1)


def chunk_logits_grad(logits: torch.Tensor, logsumexp: torch.Tensor, grad: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """d (grad * log_softmax(logits)[target]) / d logits = grad * (onehot(target) - softmax(logits)), per row, in
    the logits' dtype: -grad * p everywhere, then the target's entry grad * (1 - p) overwritten, computed whole in
    fp32 (the sum of two rounded terms would lose it where p is near 1)."""
    grad, logsumexp, targets = grad[:, None], logsumexp[:, None], targets[:, None]
    result = (logits.float() - logsumexp).exp_().mul_(-grad).to(logits.dtype)  # in place: one fp32 temporary
    target_probs = torch.exp(logits.gather(-1, targets).float() - logsumexp)
    return result.scatter_(-1, targets, (grad * (1 - target_probs)).to(logits.dtype))


# False: the chunk math eager and the weight gradient summed outside the matmul everywhere (bench/gpu.py measures
# both ways on a GPU).
FUSED_CHUNK_MATH = True


@functools.cache
def _compiled(function):
    return torch.compile(function, dynamic=True)


def chunk_op(function, device: torch.device):
    """`function` compiled on CUDA (once per process), as is elsewhere."""
    return _compiled(function) if FUSED_CHUNK_MATH and device.type == "cuda" else function


@functools.cache
def _fp32_accumulating_matmul(device_type: str) -> bool:
    """Whether torch.addmm here takes bf16 factors into an fp32 sum (out_dtype; CUDA in recent torch)."""
    if device_type != "cuda":
        return False
    total = torch.ones(2, 2, device=device_type)  # ones: an implementation that dropped the sum would give 2
    factor = torch.ones(2, 2, device=device_type, dtype=torch.bfloat16)
    try:
        torch.addmm(total, factor, factor, out_dtype=torch.float32, out=total)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool((total == 3).all())


def add_matmul_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total (fp32) += a @ b (the model's dtype). Where cuBLAS can, it adds inside the matmul: no [V, H] product
    in bf16 is written and read back, which cost more than the matmul itself for the LM head's weight gradient."""
    if FUSED_CHUNK_MATH and _fp32_accumulating_matmul(total.device.type):
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.add_(a @ b)


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
        logsumexp_and_target = chunk_op(chunk_logsumexp_and_target, logits.device)

        num_tokens = flat_logits.shape[0]
        logsumexp = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        label_logits = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logsumexp[start:end], label_logits[start:end] = logsumexp_and_target(flat_logits[start:end],
                                                                                 safe_labels[start:end])

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
        logits_grad = chunk_op(chunk_logits_grad, logits.device)

        grad_logits = torch.empty_like(flat_logits)
        for start in range(0, flat_logits.shape[0], chunk_size):
            end = min(start + chunk_size, flat_logits.shape[0])
            grad_logits[start:end] = logits_grad(flat_logits[start:end], logsumexp[start:end], g[start:end],
                                                 safe_labels[start:end])

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
        logsumexp_and_target = chunk_op(chunk_logsumexp_and_target, hidden.device)
        logsumexp = torch.empty(num, dtype=torch.float32, device=hidden.device)
        target_logits = torch.empty(num, dtype=torch.float32, device=hidden.device)
        for start in range(0, num, chunk_size):
            end = min(start + chunk_size, num)
            # Logits in the model's dtype (as the LM head gives them); the softmax statistics in fp32.
            logits = F.linear(hidden[start:end], weight, bias)
            logsumexp[start:end], target_logits[start:end] = logsumexp_and_target(logits, targets[start:end])
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunk_size = chunk_size
        return target_logits - logsumexp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        logits_grad = chunk_op(chunk_logits_grad, hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulators: the weight gradient sums over every chunk, bf16 sums would lose the small ones.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        g = grad_output.float()
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            chunk = hidden[start:end]
            grad_logits = logits_grad(F.linear(chunk, weight, bias), logsumexp[start:end], g[start:end],
                                      targets[start:end])
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                add_matmul_(grad_weight, grad_logits.t(), chunk)
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


def packed_attention(model) -> str:
    """How `model` (or the DeepSpeed engine around it) attends in packed rows: "flex" under flex.ATTENTION (a
    BlockMask), "varlen" under varlen.ATTENTION (FlashAttention's varlen kernel), else "dense" (the [R, 1, L, L]
    mask). The first two pack without the dense mask (mask="flex")."""
    name = getattr(getattr(model, "module", model).config, "_attn_implementation", None)
    return {flex.ATTENTION: "flex", varlen.ATTENTION: "varlen"}.get(name, "dense")


def packed_attention_inputs(model, batch: PackedBatch) -> dict:
    """The model's attention inputs for a packed batch on its device: a BlockMask under flex.ATTENTION, the
    batch's VarlenPlan under varlen.ATTENTION, else the dense mask in the implementation's form, or none for
    mask="position_ids"."""
    attention, device = packed_attention(model), batch.input_ids.device
    if attention == "flex":
        return {"attention_mask": flex.block_mask(batch, device, flex.model_setting(model)["mask_block"])}
    if attention == "varlen":
        # lay_out builds the plan on the host; a batch packed by other means gets it here (on a GPU, reading its
        # lengths then waits for the device).
        varlen_plan = batch.varlen_plan if batch.varlen_plan is not None else varlen.plan(batch).to(device)
        return varlen.model_inputs(varlen_plan, batch.input_ids.shape[0], device)
    if batch.attention_mask is None:
        return {"attention_mask": None}
    # ZeRO-3's partitioned weights are empty placeholders: the dtype comes from the model there.
    return {"attention_mask": model_attention_mask(batch.attention_mask, model.config, model.dtype)}


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
    DeepSpeed engine or DDP), and `batch` is on its device. Only the answer-predicting hidden states go through
    the LM head.

    zero3_engine: the DeepSpeed ZeRO-3 engine around `model`. Its partitioned weights are gathered only inside
    module calls, and its gradient accumulation needs every forward to go through the engine (called around it,
    only the last micro-batch of a step kept its gradient: the engine's forward resets ZeRO-3's per-forward
    backward state). The engine computes logits for the columns that hold answer-predicting states
    (logits_to_keep), then a chunked log-softmax; no fused head."""
    check_plain_lm_head(model.config)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # use_cache=False: with a cache, transformers would not look for packed documents in the position ids.
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
              **packed_attention_inputs(model, batch), "use_cache": False}
    if zero3_engine is None:
        hidden = decoder(**inputs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source_index)
        logps = lm_head_token_logps(selected, head.weight, head.bias, batch.target_ids, chunk_size)
    else:
        width = batch.input_ids.shape[1]
        rows, columns = batch.source_index // width, batch.source_index % width
        kept = torch.unique(columns)  # sorted
        logits = zero3_engine(**inputs, logits_to_keep=kept).logits  # [rows, kept columns, vocab]
        logps = token_logps(logits[rows, torch.searchsorted(kept, columns)].unsqueeze(0),
                            batch.target_ids.unsqueeze(0), chunk_size)[0]
    return batch.answer_grid(logps)


# ---------------------------------------------------------------------------
# A micro-batch of pairs: laid out on the host, moved to the device once, then its answer log-probs.
# ---------------------------------------------------------------------------


def lay_out(rows: Sequence, layout: str, packed_row_tokens: int, attention: str, pad_id: int):
    """The model inputs of `rows` in `layout` (training.packing: padded, packed or shared_prompt) on the host: a
    PaddedBatch, or a PackedBatch for a model that attends through `attention` (packed_attention: dense, flex or
    varlen). A packed micro-batch fills rows of about packed_row_tokens tokens, never less than its longest pair,
    so that it stays one batch and one backward."""
    if layout == "padded":
        return pad_pairs(rows, pad_id)
    shared_prompt = layout == "shared_prompt"
    width = max([packed_row_tokens] + [pair_span(row, shared_prompt) for row in rows])
    mask = "4d" if attention == "dense" else "flex"
    (batch,) = pack_pairs(rows, width, shared_prompt, rows_per_batch=len(rows), mask=mask, pad_id=pad_id)
    if attention == "varlen":
        batch.varlen_plan = varlen.plan(batch)
    return batch


def padded_logits(model, batch: PaddedBatch, **forward) -> torch.Tensor:
    """The model's output [2n, L, ...] on a padded batch on its device: a causal LM's logits, or a token reward
    head's values. `forward`: more keyword arguments of the model's forward."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **forward).logits


def batch_logps(model, batch, chunk_size: int, zero3_engine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, answer mask), both [2n, W] on the label grid: the fp32 log-prob of each answer token of a laid
    out batch (lay_out, on the model's device) under `model`, 0.0 off the answers, and True on the answers.

    `model`: a Hugging Face causal LM, or the DeepSpeed engine around one (the packed layouts run the module it
    wraps). zero3_engine: `model` again where it is a ZeRO-3 engine (see packed_token_logps)."""
    if isinstance(batch, PaddedBatch):
        # No KV cache: nothing is generated, and under a compiled layer each cache layer's state recompiles it.
        logits = padded_logits(model, batch, use_cache=False)
        return token_logps(logits, batch.labels, chunk_size), batch.labels != IGNORE_INDEX
    return packed_token_logps(getattr(model, "module", model), batch, chunk_size, zero3_engine)


def answer_logps(model, rows: Sequence, layout: str, packed_row_tokens: int, chunk_size: int, pad_id: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_logps of `rows` laid out for `model` in `layout` and moved to `device`: what a scorer computes for a
    frozen model (the policy's step is step.micro_batch_loss)."""
    batch = lay_out(rows, layout, packed_row_tokens, packed_attention(model), pad_id).to(device)
    return batch_logps(model, batch, chunk_size)
