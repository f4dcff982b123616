"""training.attention: which attention a model runs on packed rows, resolved for its device and dtype.

- dense: packing.py's [rows, 1, L, L] boolean mask with SDPA. Any device; the reference the others are tested against.
- flex: FlexAttention with a block mask built from document ids (flex.py). It has no backward on the CPU.
- varlen: FlashAttention's variable-length kernel on the rows' attention sequences (varlen.py). On CUDA it takes
  bf16 or fp16; on the CPU the same sequences run through SDPA one by one (exact, with a backward, slow).
- auto: varlen on CUDA where torch has its kernel and the model computes in bf16 or fp16, else flex there; dense
  elsewhere. On an H100 (README, On a GPU: three runs) varlen gave 4 to 6% more pairs/s than flex in the whole
  trainer step, at the same losses.

Padded rows keep the model's own attention with a padding mask, whatever the choice.
"""

from __future__ import annotations

import torch

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.kernels import flex, varlen

CHOICES = ("auto", "dense", "flex", "varlen")


class AttentionUnavailableError(UserError, RuntimeError):
    """A training.attention that cannot run here; the message says why and what to set."""


def resolve(attention: str, device: torch.device, training: bool, dtype: torch.dtype) -> str:
    """training.attention for a model on `device` computing in `dtype`: "dense", "flex" or "varlen"."""
    if attention not in CHOICES:
        raise ValueError(f"training.attention must be one of {CHOICES}, got {attention!r}")
    on_cuda = device.type == "cuda"
    if attention == "auto":
        if not on_cuda:
            return "dense"
        if dtype in varlen.KERNEL_DTYPES and varlen.kernel_available(device):
            return "varlen"
        return "flex" if flex.flex_attention is not None else "dense"
    if attention == "flex":
        if flex.flex_attention is None:
            raise AttentionUnavailableError(f"training.attention flex: torch {torch.__version__} has no "
                                            "FlexAttention (it needs torch 2.5 or later); set training.attention "
                                            "to auto or dense")
        if training and not on_cuda:
            raise AttentionUnavailableError(
                f"training.attention flex: FlexAttention has no backward on {device.type} in torch "
                f"{torch.__version__}, so a trainer there cannot use it; set training.attention to auto (varlen or "
                "flex on CUDA, the dense mask elsewhere), dense or varlen")
    if attention == "varlen" and on_cuda:
        if dtype not in varlen.KERNEL_DTYPES:
            raise AttentionUnavailableError(f"training.attention varlen: FlashAttention's varlen kernel takes bf16 "
                                            f"or fp16, and this model computes in {dtype}; set the model's precision "
                                            "to bf16, or training.attention to auto, flex or dense")
        if not varlen.kernel_available(device):
            raise AttentionUnavailableError(
                f"training.attention varlen: no variable-length attention kernel for {device} in torch "
                f"{torch.__version__} (torch.nn.attention.varlen: torch 2.9 and later, on Ampere or later GPUs); set "
                "training.attention to auto, flex or dense")
    return attention


def enable(model, packing: str, attention: str, device: torch.device, training: bool, dtype: torch.dtype) -> None:
    """Put `model` (a Hugging Face model on `device`, before any DeepSpeed wrapping) under the attention its packed
    rows run with; padded rows keep the model's own attention and padding mask."""
    if packing == "padded":
        return
    chosen = resolve(attention, device, training, dtype)
    if chosen == "flex":
        flex.enable(model)
    elif chosen == "varlen":
        varlen.enable(model)
