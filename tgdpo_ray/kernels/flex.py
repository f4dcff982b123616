"""FlexAttention for the packed layouts: attention that skips the blocks a packed row's documents never see.

The dense [R, 1, L, L] mask of packing.py makes SDPA compute every (query, key) pair of a row and keeps it off its
fast kernels. Here the same rule (packing.may_attend) becomes a FlexAttention BlockMask: the kernel visits only
the blocks (128 x 128 by default) where some query may attend to some key, so a row of many short documents costs
about what its documents cost.

The models run it through transformers' attention interface under our own name, ATTENTION. Our function sends a
BlockMask to FlexAttention (compiled on CUDA, eager elsewhere) and any other mask to SDPA, so the same model still
reads padded rows. FlexAttention has no backward on the CPU: there it serves forward passes (the scorers, tests)
only (attention.py resolves training.attention).
"""

from __future__ import annotations

import functools

import torch

from tgdpo_ray.kernels.batches import to_device
from tgdpo_ray.kernels.packing import PackedBatch, may_attend

try:  # torch 2.5 and later
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = create_block_mask = flex_attention = None

ATTENTION = "tgdpo_flex"  # the attn_implementation name our models run under

# Dynamo's limit of compiled graphs per function. Every micro-batch has its own [rows, length] shape (dynamic after
# the second), and one row, no_grad evaluation and compiled layers each add graphs: past the default of 8, calls
# fall back to FlexAttention's unfused form, which materialises every score. 64 is what bench/gpu.py measured with.
RECOMPILE_LIMIT = 64


# How FlexAttention runs on a CUDA device, by compute capability, then by (dtype, head_dim): tiles that fit one head
# size and dtype may not fit another's shared memory. A setting is
# - mask_block: the BlockMask's block size (queries and keys). The kernels skip whole blocks only; a smaller block
#   wastes less on the masked corners of the blocks where documents meet. Every kernel tile must divide it.
# - kernel_options: torch's FlexKernelOptions (tiles, stages and warps of the forward and backward kernels), or
#   None for torch's defaults, whose tiles divide the default block of 128.
# Each entry was measured by bench/gpu.py's sweep on the trainer's own shared-prompt block masks and then in the
# whole trainer step; anything else runs DEFAULT_SETTING. On the H100 (torch 2.11, bf16, head_dim 64) the forward
# took 0.8 ms with 64 x 64 tiles, 0.9 with 64 x 128 and 2.1 with torch's default 128 x 128; the backward's tiles
# mattered less. In the whole compiled step 64 x 64 gave 40.6% MFU, 64 x 128 39.4% (README, On a GPU). Never
# ROWS_GUARANTEED_SAFE: the kernel's running max starts at -inf, and the option drops its guard for a query row that
# sees no key in the first block it visits; in a packed row, a block of the previous document's keys, or of the
# chosen answer's for a rejected token, is such a block: the step's losses came out NaN with it.
DEFAULT_SETTING = {"mask_block": 128, "kernel_options": None}
MEASURED_SETTINGS = {
    (9, 0): {
        (torch.bfloat16, 64): {
            "mask_block": 128,
            "kernel_options": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
                               "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                               "bwd_num_stages": 3, "bwd_num_warps": 4},
        },
    },
}
# (dtype, head_dim) -> setting for this process's CUDA device, set by enable(). The mask's block is looked up with
# the model's dtype when the mask is built, the kernel options with the query's at each call: the same dtype (the
# policy is loaded in fp32 and cast to bf16 by DeepSpeed before its first forward).
SETTINGS: dict = {}


def setting(dtype: torch.dtype, head_dim: int) -> dict:
    """The FlexAttention setting (mask_block, kernel_options) for queries of this dtype and head size here."""
    return SETTINGS.get((dtype, head_dim), DEFAULT_SETTING)


def model_setting(model) -> dict:
    """setting() for a Hugging Face model's attention (its dtype, and its config's head size)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return setting(model.dtype, head_dim)


def run_model_under(model, name: str, forward) -> None:
    """Run `model` under our attention `name` (flex.py's and varlen.py's): transformers learns `forward` for the
    name, and SDPA's mask for the inputs it builds a mask for (padded rows); dynamo may keep RECOMPILE_LIMIT graphs
    per function."""
    import torch._dynamo as dynamo
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def enable(model) -> None:
    """Run `model` (a Hugging Face model on its device, before any DeepSpeed wrapping) under ATTENTION."""
    global SETTINGS
    run_model_under(model, ATTENTION, attention_forward)
    if model.device.type == "cuda":
        SETTINGS = dict(MEASURED_SETTINGS.get(torch.cuda.get_device_capability(model.device), {}))


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled, it materialises every score (slow on a GPU)."""
    return torch.compile(flex_attention)


def refuse_unsupported(module, dropout: float, kwargs: dict, attention: str) -> None:
    """What some models ask of their attention beyond the mask, which the packed rows' `attention` does not apply:
    refused rather than silently left out."""
    if dropout > 0:
        raise ValueError(f"{attention} here runs without attention dropout: turn it off (policy.disable_dropout)")
    asked = [name for name in ("softcap", "s_aux", "sliding_window") if kwargs.get(name) is not None]
    if asked:
        raise ValueError(f"{type(module).__name__} asks its attention for {', '.join(asked)}, which the packed rows' "
                         f"{attention} does not apply: use training.packing padded (the model's own masks)")


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query [B, H, L, D], key and value [B, H_kv, L, D]; returns the output as
    [B, L, H, D] and no weights."""
    if BlockMask is None or not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    refuse_unsupported(module, dropout, kwargs, "FlexAttention")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads & (heads - 1):  # FlexAttention's grouped-query path wants a power-of-two head count
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    # Inside a compiled region (a compiled decoder layer) the enclosing compile takes FlexAttention in whole.
    compile_here = query.device.type == "cuda" and not torch.compiler.is_compiling()
    run = compiled_flex_attention() if compile_here else flex_attention
    chosen = setting(query.dtype, query.shape[-1])
    if tuple(attention_mask.BLOCK_SIZE) != (chosen["mask_block"],) * 2:  # the kernel tiles must divide the blocks
        raise ValueError(f"a BlockMask of {tuple(attention_mask.BLOCK_SIZE)} blocks, but {query.dtype} queries of "
                         f"head size {query.shape[-1]} run with blocks of {chosen['mask_block']}: build the mask "
                         "with block_mask(batch, device, model_setting(model)['mask_block'])")
    options = chosen["kernel_options"] if query.device.type == "cuda" else None
    output = run(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != heads,
                 kernel_options=options)
    return output.transpose(1, 2).contiguous(), None


def block_mask(batch: PackedBatch, device, block: int = DEFAULT_SETTING["mask_block"]):
    """The BlockMask of a batch packed with mask="flex": packing.may_attend on its document and segment ids, in
    blocks of `block` queries by `block` keys."""
    document, segment = to_device(batch.document, device), to_device(batch.segment, device)
    rows, length = document.shape

    def mask_mod(row, head, query, key):
        return may_attend(document, segment, row, query, key)

    # Evaluated on the [R, L, L] grid once per micro-batch: milliseconds on a GPU, and no compile of its own.
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=device,
                             BLOCK_SIZE=block)
