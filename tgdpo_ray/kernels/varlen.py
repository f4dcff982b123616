"""Variable-length attention for the packed layouts: FlashAttention's varlen kernel on the documents of packed rows.

FlexAttention (flex.py) evaluates the packing rule in every block where two documents meet, and on the H100 its
kernels ran at 27 to 33% of SDPA's FlashAttention speed. Here no mask is evaluated at all: each packed row is cut into
attention sequences (packing.PackedBatch.attention_spans), and FlashAttention's variable-length kernel runs each one
causally. A document is one sequence. In the shared layout a pair is two: prompt + chosen, and the rejected answer,
whose keys are the prompt's followed by its own (the prompt's keys and values are gathered twice; its queries are
computed once). The kernel aligns a causal mask to the bottom right when a sequence has more keys than queries, so
rejected token i sees the whole prompt and rejected tokens 0..i: exactly packing.may_attend. A row's padding is one
more sequence, causal within itself: the sequences' queries are then every position of the batch in order, so the
queries and the output need no gather. No document sees the padding, so its outputs, never read, change nothing.

The models run it through transformers' attention interface as ATTENTION. A packed batch reaches the layers as a
VarlenPlan in the keyword argument PLAN_ARGUMENT (transformers hands keyword arguments down to the attention
function), with an empty 4D tensor as attention_mask, which transformers passes through without building a mask;
inputs without a plan (padded rows) go to SDPA with their own mask. On CUDA the kernel is torch's
torch.nn.attention.varlen.varlen_attn (torch 2.9 and later; bf16 or fp16; it takes fewer key and value heads than
query heads, as grouped-query models have); elsewhere the same sequences run through SDPA one by one (slow, exact,
with a backward: the CPU tests train through it).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from tgdpo_ray.kernels.batches import to_device
from tgdpo_ray.kernels.flex import refuse_unsupported, run_model_under
from tgdpo_ray.kernels.packing import PackedBatch

ATTENTION = "tgdpo_varlen"  # the attn_implementation name our models run under
PLAN_ARGUMENT = "tgdpo_varlen_plan"  # the model keyword argument that carries a packed batch's VarlenPlan
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # what FlashAttention's varlen kernel takes


class VarlenPlan(NamedTuple):
    """A packed batch's attention sequences as the varlen kernel takes them, on the model's device."""

    key_index: torch.Tensor  # [Tk] flat position (row * L + column) of each key, sequence after sequence (prefix first)
    cu_query: torch.Tensor  # [S + 1] int32: where each sequence's queries start in the flat batch (every token)
    cu_key: torch.Tensor  # [S + 1] int32: where each sequence's keys start in key_index
    max_query: int  # the longest sequence's queries
    max_key: int  # and keys

    def to(self, device) -> VarlenPlan:
        return self._replace(key_index=to_device(self.key_index, device), cu_query=to_device(self.cu_query, device),
                             cu_key=to_device(self.cu_key, device))


def concatenated_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """arange(starts[0], starts[0] + lengths[0]), arange(starts[1], ...), ... concatenated, without a Python loop."""
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()), device=starts.device)


def cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)


def with_padding(spans: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """A packed batch's attention spans (row, prefix_start, prefix_end, start, end), and one more for each row that
    ends in padding (its queries the padding, no prefix), in the order of their queries in the batch."""
    ends = torch.zeros(rows, dtype=spans.dtype).scatter_reduce(0, spans[:, 0], spans[:, 4], "amax")
    padded_rows = torch.nonzero(ends < length).flatten()
    padding_start = ends[padded_rows]
    padding = torch.stack([padded_rows, padding_start, padding_start, padding_start,
                           torch.full_like(padded_rows, length)], 1)
    spans = torch.cat([spans, padding])
    return spans[torch.argsort(spans[:, 0] * length + spans[:, 3], stable=True)]


def plan(batch: PackedBatch) -> VarlenPlan:
    """The VarlenPlan of a packed batch, built on the host from its attention spans (their lengths are read as
    numbers: on a GPU that would wait for the device); VarlenPlan.to copies it without blocking."""
    rows, length = batch.input_ids.shape
    row, prefix_start, prefix_end, start, end = with_padding(batch.attention_spans, rows, length).unbind(1)
    base = row * length
    query_lengths, prefix_lengths = end - start, prefix_end - prefix_start
    key_starts = torch.stack([prefix_start, start], 1).flatten() + base.repeat_interleave(2)
    key_lengths = torch.stack([prefix_lengths, query_lengths], 1).flatten()
    return VarlenPlan(
        key_index=concatenated_ranges(key_starts, key_lengths),
        cu_query=cumulative(query_lengths),
        cu_key=cumulative(prefix_lengths + query_lengths),
        max_query=int(query_lengths.max()),
        max_key=int((prefix_lengths + query_lengths).max()),
    )


def model_inputs(varlen_plan: VarlenPlan, rows: int, device) -> dict:
    """The attention inputs of a packed batch of `rows` rows for a model under ATTENTION: its plan (on `device`),
    and an empty 4D mask that transformers' mask builder passes through as it is (it would build a [R, 1, L, L]
    mask from nothing)."""
    return {"attention_mask": torch.empty((rows, 1, 0, 0), dtype=torch.bool, device=device),
            PLAN_ARGUMENT: varlen_plan}


# torch's varlen_attn and how this torch spells its keywords, set by enable(): a compiled decoder layer then finds
# them in a global instead of tracing an import and a signature lookup. Empty where this torch has no varlen_attn.
FLASH: dict = {}


def enable(model) -> None:
    """Run `model` (a Hugging Face model on its device, before any DeepSpeed wrapping) under ATTENTION."""
    global FLASH
    run_model_under(model, ATTENTION, attention_forward)
    try:
        FLASH = flash_call()
    except RuntimeError:
        FLASH = {}  # the CPU path needs none; a CUDA call raises flash_call's error then


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query [B, H, L, D], key and value [B, H_kv, L, D]; returns the output as
    [B, L, H, D] and no weights."""
    varlen_plan = kwargs.pop(PLAN_ARGUMENT, None)
    if varlen_plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    refuse_unsupported(module, dropout, kwargs, "variable-length attention")
    rows, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    # [B, H, L, D] -> one row of tokens [B * L, H, D]: the sequences' queries in order; their keys and values.
    flat_query = query.transpose(1, 2).reshape(rows * length, heads, head_dim)
    flat_key, flat_value = (states.transpose(1, 2).reshape(rows * length, kv_heads, head_dim)
                            .index_select(0, varlen_plan.key_index) for states in (key, value))
    scale = scaling if scaling is not None else head_dim ** -0.5
    run = flash_varlen if query.device.type == "cuda" else sdpa_varlen
    attended = run(flat_query, flat_key, flat_value, varlen_plan, scale)
    return attended.view(rows, length, heads, head_dim), None


def flash_call() -> dict:
    """varlen_attn and how this torch spells a causal call: is_causal in its first version, window_size (-1, 0)
    since (torch 2.11 has window_size); enable_gqa where the signature has it (torch 2.12 and later refuse fewer key
    heads without it; the kernel has always taken them)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        raise RuntimeError(f"variable-length attention needs torch 2.9 or later (torch.nn.attention.varlen); this "
                           f"is torch {torch.__version__}: use training.attention flex or dense") from error
    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return {"function": varlen_attn, "causal": causal, "takes_scale": "scale" in parameters,
            "takes_gqa": "enable_gqa" in parameters}


def kernel_available(device: torch.device) -> bool:
    """Whether FlashAttention's varlen kernel runs on this CUDA device: torch has it (2.9 and later) and the GPU is
    an Ampere or later (compute capability 8.0), as FlashAttention asks."""
    try:
        flash_call()
    except RuntimeError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def flash_varlen(query, key, value, varlen_plan: VarlenPlan, scale: float) -> torch.Tensor:
    """FlashAttention's varlen kernel: query [Tq, H, D], key and value [Tk, H_kv, D] -> [Tq, H, D]."""
    if query.dtype not in KERNEL_DTYPES:
        raise ValueError(f"FlashAttention's varlen kernel takes bf16 or fp16, not {query.dtype}: set the model's "
                         "precision to bf16")
    found = FLASH or flash_call()
    options = dict(found["causal"])
    if found["takes_gqa"] and key.shape[1] != query.shape[1]:
        options["enable_gqa"] = True
    if found["takes_scale"]:
        options["scale"] = scale
    elif abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        raise RuntimeError(f"this torch's varlen_attn takes no scale, and the model asks for {scale}")
    return found["function"](query, key, value, varlen_plan.cu_query, varlen_plan.cu_key, varlen_plan.max_query,
                             varlen_plan.max_key, **options)


def sdpa_varlen(query, key, value, varlen_plan: VarlenPlan, scale: float) -> torch.Tensor:
    """The same as flash_varlen, one sequence at a time through SDPA with the kernel's causal mask (aligned to the
    bottom right: query i of q sees keys 0 .. i + k - q)."""
    cu_query, cu_key = varlen_plan.cu_query.tolist(), varlen_plan.cu_key.tolist()
    outputs = []
    for q_from, q_to, k_from, k_to in zip(cu_query, cu_query[1:], cu_key, cu_key[1:]):
        q, k, v = (states.transpose(0, 1) for states in (query[q_from:q_to], key[k_from:k_to], value[k_from:k_to]))
        allowed = torch.ones(q_to - q_from, k_to - k_from, dtype=torch.bool, device=query.device).tril(
            (k_to - k_from) - (q_to - q_from))
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=k.shape[0] != q.shape[0]).transpose(0, 1))
    return torch.cat(outputs)
