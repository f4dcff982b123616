"""What one micro-batch of pairs costs the policy: the one function the trainers run and bench/gpu.py times.

It reads in one direction:

    rows ─lay_out─> inputs and scored values (host) ─.to─> forward, answer log-probs ─> PairBatch ─> loss

Torch only, like the rest of kernels/: it takes plain arguments (StepSettings, not a JobConfig), so the same code
runs in a Ray Train worker around a DeepSpeed engine and on a bare torch GPU image around a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.kernels import attention
from tgdpo_ray.kernels.batches import micro_batch_tokens, pair_batch, scored_grids, to_device
from tgdpo_ray.kernels.logprobs import batch_logps, lay_out, packed_attention
from tgdpo_ray.kernels.losses import Loss, LossOutput


@dataclass(frozen=True)
class StepSettings:
    """The keys of a job config that a micro-batch reads (train/worker.py builds them from training.* and the
    job's scorers)."""

    layout: str  # training.packing, resolved: padded, packed or shared_prompt
    packed_row_tokens: int = 2048  # training.packed_row_tokens
    logp_chunk_size: int = 1024  # training.logp_chunk_size
    with_reference: bool = True  # the loss reads reference log-probs (every loss but simpo and sft)
    guidance_kind: Optional[str] = None  # TGDPO's guidance: implicit, token_reward_model or column; None: no guidance
    zero3: bool = False  # the model is a ZeRO-3 engine: every forward goes through it (logprobs.packed_token_logps)


def micro_batch_loss(model, rows: Sequence, loss: Loss, settings: StepSettings, pad_id: int,
                     device) -> tuple[LossOutput, int]:
    """The loss of one micro-batch under `model` (a DeepSpeed engine, or a plain Hugging Face model), and its
    tokens: prompt + chosen and prompt + rejected in every layout, so that tokens/s compares across layouts."""
    # 1. On the host: the rows in the layout, for the attention the model runs under; the values the rows carry
    #    from the scorers on the same label grid.
    inputs = lay_out(rows, settings.layout, settings.packed_row_tokens, packed_attention(model), pad_id)
    grids = scored_grids(rows, inputs.grid_shape[1], settings.with_reference, settings.guidance_kind)
    # 2. To the device, once (pinned and non-blocking on a GPU).
    inputs = inputs.to(device)
    grids = {name: to_device(grid, device) for name, grid in grids.items()}
    # 3. The forward and the answer tokens' log-probs.
    logps, answer_mask = batch_logps(model, inputs, settings.logp_chunk_size, model if settings.zero3 else None)
    # 4. The loss.
    return loss(pair_batch(logps, answer_mask, grids)), micro_batch_tokens(rows, "packed")


class CompileError(UserError, ValueError):
    """training.compile on a model this project cannot compile layer by layer."""


def compile_decoder_layers(model, backend: str = "inductor") -> None:
    """Regional compilation: torch.compile each decoder layer in place. The layers share one compiled graph (their
    weights are its inputs), so the compile costs one layer's, and a new micro-batch shape recompiles that one
    graph (dynamic after the second), not the whole model."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise CompileError(f"training.compile: {type(model).__name__} keeps no decoder layers in "
                           "model.get_decoder().layers; set training.compile false")
    for layer in layers:
        layer.compile(backend=backend)


def prepare_policy(model, layout: str, attention_choice: str, device: torch.device, dtype: torch.dtype,
                   compile: bool = False, compile_backend: str = "inductor", training: bool = True):
    """The policy (a Hugging Face model on `device`, before any DeepSpeed wrapping) put under the attention its
    packed rows run with (training.attention, resolved for the device and the `dtype` it will compute in), and
    its decoder layers compiled when asked (training.compile). training=False allows an attention without a
    backward here (FlexAttention on a CPU: bench/gpu.py's toy run measures its forward). Returns the model."""
    attention.enable(model, layout, attention_choice, device, training=training, dtype=dtype)
    if compile:
        compile_decoder_layers(model, compile_backend)
    return model
