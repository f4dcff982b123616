"""GPU throughput, MFU and peak memory of the trainer's micro-batch loss (TGDPO on cached reference and guidance
log-probs) in every layout, on a random ~0.5B Llama in bf16.

Layouts, all on the same pairs, split into micro-batches by the same token budget (pack_by_token_budget), each
run through the trainer's own step (tgdpo_ray/kernels/step.py: the model prepared by prepare_policy, each
micro-batch's loss by micro_batch_loss, as train/worker.py runs them):
- padded: prompt + chosen and prompt + rejected rows padded to the longest, SDPA with a 2D padding mask;
- packed, shared_prompt: packed rows with the dense [R, 1, L, L] boolean mask, SDPA (training.attention dense);
- shared_prompt_flex, packed_flex: the same rows with FlexAttention and a BlockMask built from document and segment
  ids (training.attention flex, tgdpo_ray/kernels/flex.py);
- shared_prompt_varlen: the same rows cut into attention sequences for FlashAttention's variable-length kernel
  (tgdpo_ray/kernels/varlen.py; on the CPU through SDPA one sequence at a time);
- padded_compiled, shared_prompt_flex_compiled, shared_prompt_varlen_compiled: the same with every decoder layer
  torch.compile'd (training.compile; GPU only).

Before the layouts, two components alone: the fused LM-head log-probs (lm_head_check: eager against compiled chunk
math, chunks of 512 to 2048) and FlexAttention on the shared-prompt block masks (flex_sweep: mask block sizes and
kernel options, next to a plain causal mask and SDPA's causal kernel); the sweep's finite winner runs as the *_tuned
layout.

Plain torch + transformers: it imports tgdpo_ray.kernels, which needs no ray, deepspeed, vllm or pydantic
(tests/test_layout.py checks both), and tgdpo_ray.common.provenance (standard library only) for the JSON's
"provenance". Without a GPU (or with --toy) it runs at toy size on the CPU in fp32 as a smoke test: it checks
that every layout gives the padded layout's losses and that FlexAttention and the varlen sequences give the dense
mask's log-probs, and measures nothing. On a GPU it also compares their gradients with the dense mask's.
Writes a JSON (--out) and prints a table.

    python3 bench/gpu.py [--out bench/results/gpu.json] [--pairs 128] [--max-tokens 16384] [--row-tokens 2048]
                         [--budget-s 300] [--layouts padded,...] [--profile LAYOUT] [--sweep NAMES] [--autotune]
                         [--toy]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_RESULTS = REPO / "bench" / "results" / "gpu.json"

# name: (training.packing, attention, decoder layers compiled). attention: sdpa (the padding mask, or the dense
# packed mask: training.attention dense), flex or varlen (training.attention flex, varlen). Compiled layers run on a
# GPU only (inductor's CPU build takes minutes). The headline layouts come first (padded, the reference;
# FlexAttention, the ratio; varlen, the GPU default; the best): if the run reaches its time budget, what is
# left out is the comparisons. FlexAttention's compiled layout runs before varlen's: on the H100 it ran 15% slower
# after varlen's in the same process (86 against 102 pairs/s), varlen's not after it (the trainers run one).
LAYOUTS = {
    "padded": ("padded", "sdpa", False),
    "shared_prompt_flex": ("shared_prompt", "flex", False),
    "shared_prompt_varlen": ("shared_prompt", "varlen", False),
    "shared_prompt_flex_compiled": ("shared_prompt", "flex", True),
    "shared_prompt_varlen_compiled": ("shared_prompt", "varlen", True),
    # The same with the FlexAttention setting that won the sweep below; skipped where the library's own
    # (flex.MEASURED_SETTINGS) won.
    "shared_prompt_flex_compiled_tuned": ("shared_prompt", "flex", True),
    "packed": ("packed", "sdpa", False),
    "shared_prompt": ("shared_prompt", "sdpa", False),
    "packed_flex": ("packed", "flex", False),
    "padded_compiled": ("padded", "sdpa", True),
}

# FlexAttention settings (flex.py: the BlockMask's block, and the kernel options) tried on the trainer's own block
# masks, torch's defaults first. fwd_* options go to the forward kernel, bwd_* to the backward. fwd: (BLOCK_M,
# BLOCK_N, stages, warps); bwd: (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, stages, warps); every tile divides the
# mask's block. None of them sets ROWS_GUARANTEED_SAFE, which packed rows break (flex.py).


def flex_setting(fwd: tuple = (), bwd: tuple = (), mask_block: int = 128, **options) -> dict:
    options.update(zip(("fwd_BLOCK_M", "fwd_BLOCK_N", "fwd_num_stages", "fwd_num_warps"), fwd))
    options.update(zip(("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2", "bwd_num_stages",
                        "bwd_num_warps"), bwd))
    return {"mask_block": mask_block, "kernel_options": options or None}


FLEX_SWEEP = {
    "default": flex_setting(),
    "library": None,  # flex.MEASURED_SETTINGS for this device: what the trainer runs
    "f128x64_b64x64": flex_setting((128, 64, 3, 4), (64, 64, 64, 64, 3, 4)),
    "f64x128_b32x64": flex_setting((64, 128, 3, 4), (32, 64, 64, 32, 3, 4)),
    "f128x128w8_b64x128w4": flex_setting((128, 128, 2, 8), (64, 128, 128, 64, 3, 4)),
    "f64x64_b32x128": flex_setting((64, 64, 3, 4), (32, 128, 128, 32, 3, 4)),
    "tma": flex_setting(USE_TMA=True),
    # the library's H100 setting since it beat f64x128_b32x64 (the one before) in the whole step, 40.6% MFU to 39.4%
    "f64x64_b32x64": flex_setting((64, 64, 3, 4), (32, 64, 64, 32, 3, 4)),
    # 64-token mask blocks. On the bench's shared-prompt rows the kernels then compute 1.18x the attended pairs
    # instead of 1.33x. On the H100 with torch 2.11 inductor found no backward kernel for them (NoValidChoicesError)
    "m64_f64x64_b32x64": flex_setting((64, 64, 3, 4), (32, 64, 64, 32, 3, 4), mask_block=64),
    "m64_f64x64_b64x64": flex_setting((64, 64, 3, 4), (64, 64, 64, 64, 3, 4), mask_block=64),
}


# The sweep of a default run: torch's defaults, the library's, and the runner-up of the last H100 run.
SWEEP_DEFAULT = ("default", "library", "f64x128_b32x64")


def library_setting(device, head_dim: int) -> dict:
    """flex.MEASURED_SETTINGS for this device and the model's bf16 queries (else flex.DEFAULT_SETTING)."""
    if device.type != "cuda":
        return flex.DEFAULT_SETTING
    by_query = flex.MEASURED_SETTINGS.get(torch.cuda.get_device_capability(device), {})
    return by_query.get((torch.bfloat16, head_dim), flex.DEFAULT_SETTING)


def sweep_setting(name: str, device, head_dim: int) -> dict:
    return FLEX_SWEEP[name] if FLEX_SWEEP[name] is not None else library_setting(device, head_dim)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPU throughput, MFU and peak memory of the trainer's micro-batch "
                                     "loss in every layout (padded, packed, shared prompt; SDPA and FlexAttention)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON path (default on a GPU: {GPU_RESULTS.relative_to(REPO)}; toy runs write only here)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per layout (default 128; toy 12)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget of a micro-batch (16384; toy 384)")
    parser.add_argument("--row-tokens", type=int, default=None, help="packed row length (2048; toy 128)")
    parser.add_argument("--timed-passes", type=int, default=None, help="timed passes over the pairs per layout (1)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no further layout after this many seconds (the SDPA layouts come first)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ",".join(LAYOUTS))
    parser.add_argument("--profile", default="best", metavar="LAYOUT",
                        help="after the layouts, one more pass of this layout, if measured, under torch.profiler: "
                             "GPU kernel time by kind and the top kernels, into the JSON's `profile` (default: "
                             "best, the layout of the best MFU; none: no profile)")
    parser.add_argument("--sweep", default=",".join(SWEEP_DEFAULT),
                        help="FlexAttention settings (mask block, kernel options) to time on the shared-prompt "
                             "block masks before the layouts (GPU only), about 10 s each: comma-separated subset of "
                             + ",".join(FLEX_SWEEP)
                             + f" (default {','.join(SWEEP_DEFAULT)}); none: no sweep")
    parser.add_argument("--autotune", action="store_true",
                        help="the sweep also times torch.compile(mode='max-autotune-no-cudagraphs'), which prints "
                             "the configs inductor chose (a minute or more of compiling)")
    parser.add_argument("--toy", action="store_true", help="the CPU smoke run even where a GPU is present")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags are answered before the imports below: no torch needed

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Run as `python3 bench/gpu.py` from a checkout that is not pip-installed (the GPU image): find tgdpo_ray beside us.
sys.path.insert(0, str(REPO))

from tgdpo_ray.common.provenance import provenance  # noqa: E402  (standard library only)
from tgdpo_ray.kernels import flex, varlen  # noqa: E402
from tgdpo_ray.kernels import logprobs as logprobs_module  # noqa: E402
from tgdpo_ray.kernels.batches import micro_batch_tokens, pack_by_token_budget, packed_tokens  # noqa: E402
from tgdpo_ray.kernels.logprobs import answer_logps, lay_out, lm_head_token_logps, token_logps  # noqa: E402
from tgdpo_ray.kernels.losses import TGDPOLoss  # noqa: E402
from tgdpo_ray.kernels.packing import pack_pairs, pair_span  # noqa: E402
from tgdpo_ray.kernels.step import StepSettings, micro_batch_loss, prepare_policy  # noqa: E402
from packing import make_pairs  # noqa: E402  (bench/packing.py, imported from its folder, as trl_compare does)

# Two sizes. gpu: a Llama-3-shaped ~0.5B model (GQA, 128k vocabulary, tied embeddings) on long-tailed pairs of up
# to 2048 + 2048 + 2048 tokens. toy: a CPU smoke run of the same code in seconds.
SIZES = {
    "gpu": {
        "model": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128_256},
        "dtype": torch.bfloat16,
        # (shortest, longest, median) tokens; log-normal with sigma 1, clipped
        "prompt": (16, 2048, 192), "answer": (8, 2048, 256),
        "pairs": 128, "max_tokens": 16_384, "row_tokens": 2048, "warmup_passes": 1, "timed_passes": 1,
        "logp_mean": -9.0,  # cached reference / guidance log-probs around this
    },
    "toy": {
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512},
        "dtype": torch.float32,
        "prompt": (3, 48, 12), "answer": (1, 40, 10),
        "pairs": 12, "max_tokens": 384, "row_tokens": 128, "warmup_passes": 1, "timed_passes": 1,
        "logp_mean": -6.5,
    },
}

# TGDPO with the job config's defaults (the authors' beta 0.1 and alpha 0.5; tests/test_config.py checks that they
# are the config's), on cached reference and guidance log-probs, as the trainers run it.
TRAINER_LOSS = TGDPOLoss()
LOGP_CHUNK = 1024  # training.logp_chunk_size's default

FLOPS_FORMULA = ("model FLOPs per pass = 6 * non_embedding_params * computed_tokens"
                 " + 12 * layers * heads * head_dim * attended_pairs"
                 " + 6 * hidden * vocab * answer_tokens; computed_tokens: the real (non-pad) tokens the layout runs"
                 " (the prompt twice in padded and packed, once in shared_prompt); attended_pairs: the (query, key)"
                 " pairs the mask allows on real tokens (causal per document, self included); the last term is the"
                 " LM head (tied to the embedding) on the answer tokens only. Forward + backward = 3x forward;"
                 " recomputation, padding and masked-out attention are not counted. MFU = FLOPs / seconds /"
                 " peak_tflops_measured.")


# ---------------------------------------------------------------------------
# Device peak, data and model.
# ---------------------------------------------------------------------------


def matmul_tflops(device, n: int = 8192, warmup: int = 5, iters: int = 20) -> float:
    """Measured bf16 dense matmul rate (TFLOP/s): the mean over `iters` n x n x n products, timed by CUDA events."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        torch.matmul(a, b, out=out)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / iters
    del a, b, out
    torch.cuda.empty_cache()
    return 2 * n ** 3 / seconds / 1e12


def make_model(size: dict, device, toy: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**size["model"], max_position_embeddings=8192, tie_word_embeddings=True, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=size["dtype"], attn_implementation="sdpa")
    if toy:
        # A wider init than 0.02 (as tests/test_packing.py): outputs then depend strongly on what each token attends
        # to, so a mask that leaks across documents or answers shows far above the tolerances.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 0.2)
    return model.to(device).train()


def non_embedding_params(model) -> int:
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    excluded = embedding.numel() + (0 if head is embedding else head.numel())
    return sum(p.numel() for p in model.parameters()) - excluded


# ---------------------------------------------------------------------------
# The trainer's step itself (tgdpo_ray/kernels/step.py): the model prepared as the trainers prepare theirs, and
# their micro-batch loss. One model serves every layout, so each layout starts from the model's own attention and
# uncompiled layers.
# ---------------------------------------------------------------------------

# The bench's attention names: sdpa (the dense mask in packed rows, the padding mask in padded ones) is
# training.attention dense.
TRAINING_ATTENTION = {"sdpa": "dense", "flex": "flex", "varlen": "varlen"}


def prepare_layout(model, packing: str, attention: str, compiled: bool, device) -> None:
    """The model as the trainers prepare theirs (step.prepare_policy) for this layout; FlexAttention on a CPU,
    which has no backward there, for its forward only."""
    model.set_attn_implementation("sdpa")
    for layer in model.get_decoder().layers:
        layer._compiled_call_impl = None  # what nn.Module.compile set: the previous layout's compiled layers
    prepare_policy(model, packing, TRAINING_ATTENTION[attention], device, model.dtype, compile=compiled,
                   training=not (attention == "flex" and device.type == "cpu"))


def step_settings(packing: str, row_tokens: int) -> StepSettings:
    """TGDPO guided by a model (implicit guidance): reference and guidance log-probs both cached by the scorers."""
    return StepSettings(layout=packing, packed_row_tokens=row_tokens, logp_chunk_size=LOGP_CHUNK,
                        with_reference=True, guidance_kind="implicit")


# ---------------------------------------------------------------------------
# Work per layout, timing.
# ---------------------------------------------------------------------------


def layout_work(rows: list, packing: str) -> dict:
    """Real tokens, attended (query, key) pairs and answer tokens the layout computes for these pairs."""
    def causal(s):
        return s * (s + 1) // 2

    tokens = attended = answers = 0
    for row in rows:
        p, c, r = (len(row[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
        answers += c + r
        if packing == "shared_prompt":
            # prompt + chosen causal; each rejected token sees the prompt and the rejected tokens up to itself
            tokens += p + c + r
            attended += causal(p + c) + r * p + causal(r)
        else:  # padded and packed: [prompt | chosen] and [prompt | rejected]; padded's padding is not counted
            tokens += 2 * p + c + r
            attended += causal(p + c) + causal(p + r)
    return {"computed_tokens": tokens, "attended_pairs": attended, "answer_tokens": answers}


def model_flops(work: dict, cfg, body_params: int) -> float:
    attention_width = cfg.num_attention_heads * cfg.head_dim
    return (6 * body_params * work["computed_tokens"]
            + 12 * cfg.num_hidden_layers * attention_width * work["attended_pairs"]
            + 6 * cfg.hidden_size * cfg.vocab_size * work["answer_tokens"])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_pass(model, batches: list, packing: str, row_tokens: int, device, backward: bool) -> dict:
    """One optimizer step's micro-batches: the loss and, as the trainer, the backward of its mean per micro-batch.
    Returns pair_id -> [loss, chosen reward, rejected reward]."""
    kept = []
    for rows in batches:
        out, _ = micro_batch_loss(model, rows, TRAINER_LOSS, step_settings(packing, row_tokens),
                                  model.config.pad_token_id, device)
        if backward:
            out.losses.mean().backward()
        # Kept on the device and read after the pass, as the trainer reads its metrics once a step: reading them
        # per micro-batch would make the host wait for the GPU between micro-batches.
        kept.append((rows, torch.stack([out.losses.detach().float(), out.chosen_rewards.detach().float(),
                                        out.rejected_rewards.detach().float()], 1)))
    return {row["pair_id"]: value for rows, values in kept for row, value in zip(rows, values.cpu().tolist())}


def host_packing_seconds(batches: list, packing: str, attention: str, row_tokens: int, pad_id: int) -> float:
    """CPU time to build one pass's model inputs alone, no model: the packed SDPA layouts build their dense
    [R, 1, L, L] mask on the host, which can rival the GPU's time; the flex layouts build [R, L] ids, and the
    varlen layouts their sequences' indices too."""
    started = time.perf_counter()
    for rows in batches:
        lay_out(rows, packing, row_tokens, TRAINING_ATTENTION[attention], pad_id)
    return time.perf_counter() - started


def run_layout(model, pairs: list, name: str, size: dict, args, device, body_params: int) -> tuple[dict, dict]:
    packing, attention, compiled = LAYOUTS[name]
    prepare_layout(model, packing, attention, compiled, device)
    # FlexAttention has no CPU backward: the toy run checks its forward only.
    backward = not (attention == "flex" and device.type == "cpu")
    batches = list(pack_by_token_budget(pairs, args.max_tokens, packing=packing))
    grad_mode = contextlib.nullcontext() if backward else torch.no_grad()

    with grad_mode:
        started = time.perf_counter()
        for _ in range(size["warmup_passes"]):  # compiles (flex), cuBLAS and allocator warm-up
            run_pass(model, batches, packing, args.row_tokens, device, backward)
        sync(device)
        warmup_s = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        started = time.perf_counter()
        for _ in range(size["timed_passes"]):
            per_pair = run_pass(model, batches, packing, args.row_tokens, device, backward)
        sync(device)
        seconds = (time.perf_counter() - started) / size["timed_passes"]
    model.zero_grad(set_to_none=True)

    work = layout_work(pairs, packing)
    flops = model_flops(work, model.config, body_params)
    trainer_tokens = packed_tokens(pairs, shared_prompt=False)  # as training counts tokens/s: same in all layouts
    losses = [per_pair[i][0] for i in sorted(per_pair)]
    result = {
        "packing": packing, "attention": attention, "compiled_layers": compiled,
        "mask": "2D padding" if packing == "padded" else {"sdpa": "dense 4D bool", "flex": "BlockMask",
                                                          "varlen": "attention sequences"}[attention],
        "flex_setting": flex.model_setting(model) if attention == "flex" and device.type == "cuda" else None,
        "backward": backward, "micro_batches": len(batches), "seconds": round(seconds, 4),
        "warmup_seconds": round(warmup_s, 2),
        "host_packing_seconds": round(host_packing_seconds(batches, packing, attention, args.row_tokens,
                                                           model.config.pad_token_id), 3),
        "pairs_per_s": round(len(pairs) / seconds, 3),
        "tokens_per_s": round(trainer_tokens / seconds, 1),
        "computed_tokens_per_s": round(work["computed_tokens"] / seconds, 1),
        **work, "budget_tokens": sum(micro_batch_tokens(rows, packing) for rows in batches),  # padding included
        "model_tflop_per_pass": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / seconds / 1e12, 2),
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None),
        "loss_mean": sum(losses) / len(losses),
        "losses_finite": all(math.isfinite(v) for values in per_pair.values() for v in values),
    }
    return result, per_pair


def attention_check(model, pairs: list, packing: str, attention: str, args, device) -> dict:
    """On the first micro-batch: the answer log-probs with `attention` (flex or varlen) against those with the dense
    mask (SDPA) and, on a GPU, the gradients of their summed DPO-style margin (FlexAttention has no CPU backward)."""
    rows = next(iter(pack_by_token_budget(pairs, args.max_tokens, packing=packing)))
    with_grad = device.type == "cuda"
    results = {}
    for attention in ("sdpa", attention):
        prepare_layout(model, packing, attention, False, device)
        model.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            logps, answers = answer_logps(model, rows, packing, args.row_tokens, LOGP_CHUNK,
                                          model.config.pad_token_id, device)
            if with_grad:
                n = len(rows)
                (logps[:n].sum() - logps[n:].sum()).backward()
        grads = ({name: param.grad.float() for name, param in model.named_parameters() if param.grad is not None}
                 if with_grad else {})
        results[attention] = (logps.detach(), answers, grads)
    model.zero_grad(set_to_none=True)
    (dense_logps, dense_answers, dense_grads), (other_logps, other_answers, other_grads) = results.values()
    check = {"answers_equal": bool(torch.equal(other_answers, dense_answers)),
             "max_abs_logp_diff": float((other_logps - dense_logps).abs().max()), "pairs": len(rows)}
    if with_grad:
        # Per parameter tensor: |other - dense| / |dense| (norms), the largest over the model.
        check["max_grad_rel_diff"] = max(float((other_grads[name] - grad).norm() / grad.norm().clamp_min(1e-30))
                                         for name, grad in dense_grads.items())
        check["grad_tensors"] = len(dense_grads)
    return check


# Kernel name patterns -> what they compute, for the profile's breakdown (the first match wins).
KERNEL_KINDS = (
    ("flex attention", ("flex_attention",)),
    ("attention (flash, sdpa)", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_")),
    ("compiled fusion", ("triton_",)),
    ("copy / cast", ("copy", "cast", "convert")),
    ("reduction", ("reduce", "softmax", "norm", "sum", "max")),
    ("elementwise", ("elementwise", "vectorized")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, patterns in KERNEL_KINDS if any(p in lowered for p in patterns)), "other")


def profile_layout(model, pairs: list, name: str, args, device, top: int = 20) -> dict:
    """One pass of a layout (already warmed up by its measurement) under torch.profiler: GPU kernel time by kind
    (matmul, attention, fusions, elementwise...), the kernels with the most time, and how much of the pass's wall
    time the GPU was busy. Kernels only: an op's time would count its kernels twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    packing, attention, compiled = LAYOUTS[name]
    prepare_layout(model, packing, attention, compiled, device)
    batches = list(pack_by_token_budget(pairs, args.max_tokens, packing=packing))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        run_pass(model, batches, packing, args.row_tokens, device, backward=device.type == "cuda")
        sync(device)
    wall = time.perf_counter() - started
    model.zero_grad(set_to_none=True)

    kernels = sorted((event for event in prof.key_averages() if event.device_type == DeviceType.CUDA),
                     key=lambda event: event.self_device_time_total, reverse=True)
    busy = sum(event.self_device_time_total for event in kernels) / 1e6
    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = kernel_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_device_time_total / 1e6
    return {"layout": name, "wall_seconds": round(wall, 3), "gpu_busy_seconds": round(busy, 3),
            "note": "under the profiler, so slower than the measured pass",
            "by_kind_seconds": {kind: round(seconds, 4) for kind, seconds in
                                sorted(by_kind.items(), key=lambda item: -item[1])},
            "top_kernels": [{"name": event.key[:120], "kind": kernel_kind(event.key), "calls": event.count,
                             "gpu_seconds": round(event.self_device_time_total / 1e6, 4)}
                            for event in kernels[:top]]}


def logp_memory(device, hidden: int, vocab: int, tokens: int = 8192, chunk: int = LOGP_CHUNK) -> dict:
    """Peak GPU memory (GiB) added by forward + backward of the answer-token log-probs at a 128k vocabulary, bf16,
    LM-head weight gradient included: full logits + fp32 log_softmax, full logits + the repo's chunked
    token_logps (the padded path), and the fused LM head (the packed paths)."""
    torch.manual_seed(0)
    weight = torch.empty(vocab, hidden, device=device, dtype=torch.bfloat16).normal_(0, 0.02).requires_grad_()
    hidden_states = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    modes = {
        "plain": lambda: torch.log_softmax((hidden_states @ weight.T).float(), -1).gather(-1, targets[:, None])[:, 0],
        "chunked": lambda: token_logps((hidden_states @ weight.T)[None], targets[None], chunk)[0],
        "fused": lambda: lm_head_token_logps(hidden_states, weight, None, targets, chunk),
    }
    result = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk": chunk, "dtype": "bfloat16"}
    for mode, logps in modes.items():
        weight.grad = hidden_states.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        logps().sum().backward()
        torch.cuda.synchronize()
        result[f"{mode}_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2 ** 30, 3)
    result["reduction_fused_vs_plain"] = round(result["plain_gib"] / result["fused_gib"], 2)
    return result  # its tensors are freed with this frame; the caller empties the allocator's cache


def timed(device, function, repeats: int) -> float:
    """Mean seconds of function() over `repeats` calls after one warm-up call (compiles)."""
    function()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    sync(device)
    return (time.perf_counter() - started) / repeats


def lm_head_check(device, hidden: int, vocab: int, tokens: int, repeats: int = 3) -> dict:
    """Forward + backward of the fused LM-head log-probs (logprobs.lm_head_token_logps) on `tokens` answer tokens:
    the chunk math eager with the weight gradient summed outside the matmul (logprobs.FUSED_CHUNK_MATH off, as
    before), against the compiled chunk math with the sum inside the matmul, at several chunk sizes. The gradients
    of each against the eager ones: the largest relative difference (norms) of the hidden and weight gradients."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    weight = torch.empty(vocab, hidden, device=device, dtype=dtype).normal_(0, 0.02).requires_grad_()
    states = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    upstream = torch.randn(tokens, device=device)
    variants = (("eager_512", False, 512), ("fused_512", True, 512), ("fused_1024", True, 1024),
                ("fused_2048", True, 2048))
    result = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""),
              "repeats": repeats}
    reference = None
    try:
        for name, fused, chunk in variants:
            logprobs_module.FUSED_CHUNK_MATH = fused

            def step():
                logps = lm_head_token_logps(states, weight, None, targets, chunk)
                return torch.autograd.grad((logps * upstream).sum(), (states, weight))

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(device, step, repeats)
            # On the host: the eager gradients held on the device would add to the fused variants' peaks.
            grads = [grad.float().cpu() for grad in step()]
            reference = reference or grads
            result[name] = {
                "seconds": round(seconds, 5),
                # The model FLOPs, 6 * hidden * vocab * tokens, as MFU counts them (not the recomputed logits).
                "tflops": round(6 * hidden * vocab * tokens / seconds / 1e12, 1),
                "peak_memory_gib": (round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                                    if device.type == "cuda" else None),
                "max_grad_rel_diff_vs_eager": max(float((grad - ref).norm() / ref.norm())
                                                  for grad, ref in zip(grads, reference)),
            }
    finally:
        logprobs_module.FUSED_CHUNK_MATH = True
    result["speedup_fused_512_vs_eager_512"] = round(result["eager_512"]["seconds"] / result["fused_512"]["seconds"], 3)
    return result


def block_statistics(masks: list, attended: int) -> dict:
    """How much of the [L x L] grids FlexAttention computes with these BlockMasks: blocks in all, partial ones (the
    mask evaluated per pair) and full ones, and the pairs computed over those attended."""
    block = masks[0].BLOCK_SIZE[0]
    partial = sum(int(mask.kv_num_blocks.sum()) for mask in masks)
    full = sum(int(mask.full_kv_num_blocks.sum()) for mask in masks if mask.full_kv_num_blocks is not None)
    return {"blocks_total": sum(mask.kv_num_blocks.numel() * mask.kv_indices.shape[-1] for mask in masks),
            "blocks_partial": partial, "blocks_full": full,
            "computed_pairs_over_attended": round((partial + full) * block * block / attended, 3)}


def flex_sweep(model, pairs: list, args, device, names: list, autotune: bool, deadline: float) -> dict:
    """FlexAttention alone, forward and backward, on the block masks of the shared-prompt micro-batches of the most
    common [rows, length] shape (random q, k, v of the model's shape): torch's default setting against the
    alternatives in FLEX_SWEEP (and inductor's own autotuning with --autotune), and varlen.py's sequences on the same
    rows, next to two references on the same shapes: FlexAttention with a plain causal mask, and SDPA's causal
    kernel. TFLOP/s count the attended (query, key) pairs: 4 * heads * head_dim per pair forward, 2.5x that
    backward. On the CPU only the forward runs, eager, with torch's defaults (a smoke test of this code)."""
    from collections import Counter

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from tgdpo_ray.kernels.packing import dense_mask

    cfg = model.config
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    on_gpu = device.type == "cuda"
    packed = []
    for rows in pack_by_token_budget(pairs, args.max_tokens, packing="shared_prompt"):
        width = max([args.row_tokens] + [pair_span(row, True) for row in rows])
        packed += pack_pairs(rows, width, True, rows_per_batch=len(rows), mask="flex", pad_id=0)
    (shape, _), = Counter(tuple(batch.document.shape) for batch in packed).most_common(1)
    chosen = [batch for batch in packed if tuple(batch.document.shape) == shape]
    rows, length = shape
    attended = sum(int(dense_mask(batch.document.to(device), batch.segment.to(device)).sum()) for batch in chosen)
    # The block masks by block size: the sweep's, and 64 and 128 always, for the statistics of what each computes.
    masks = {block: [flex.block_mask(batch, device, block) for batch in chosen]
             for block in sorted({sweep_setting(name, device, head_dim)["mask_block"] for name in names} | {64, 128})}
    causal_pairs = rows * length * (length + 1) // 2 * len(chosen)

    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    query = torch.randn(rows, heads, length, head_dim, device=device, dtype=dtype, requires_grad=on_gpu)
    key, value = (torch.randn(rows, kv_heads, length, head_dim, device=device, dtype=dtype, requires_grad=on_gpu)
                  for _ in range(2))
    grad_out = torch.randn_like(query)
    causal_mask = create_block_mask(lambda b, h, q, k: q >= k, B=None, H=None, Q_LEN=length, KV_LEN=length,
                                    device=device)

    def measure(attend, block_masks, pairs_count: int) -> dict:
        """Forward and backward seconds per call, summed over the masks, after one warm-up round; TFLOP/s."""
        events = []
        for round_ in range(1 + (3 if on_gpu else 1)):
            for mask in block_masks:
                if on_gpu:
                    marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                    marks[0].record()
                    out = attend(query, key, value, mask)
                    marks[1].record()
                    grads = torch.autograd.grad(out, (query, key, value), grad_out)
                    marks[2].record()
                    if round_:
                        events.append(marks)
                else:
                    started = time.perf_counter()
                    attend(query, key, value, mask)
                    if round_:
                        events.append(time.perf_counter() - started)
        sync(device)
        # The last call's output and gradients: an option that breaks either is no candidate.
        finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads)) if on_gpu else None
        rounds = len(events) // len(block_masks)
        if on_gpu:
            forward = sum(marks[0].elapsed_time(marks[1]) for marks in events) / 1000 / rounds
            backward = sum(marks[1].elapsed_time(marks[2]) for marks in events) / 1000 / rounds
        else:
            forward, backward = sum(events) / rounds, None
        flop = 4 * heads * head_dim * pairs_count
        return {"finite": finite, "forward_s": round(forward, 5),
                "backward_s": round(backward, 5) if backward else None,
                "forward_tflops": round(flop / forward / 1e12, 1),
                "backward_tflops": round(2.5 * flop / backward / 1e12, 1) if backward else None}

    def flex_with(options, mode=None):
        def attend(q, k, v, mask):
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=kv_heads != heads,
                                  kernel_options=options if on_gpu else None)
        return torch.compile(attend, dynamic=False, mode=mode) if on_gpu else attend

    result = {"rows": rows, "length": length, "micro_batches": len(chosen), "of_micro_batches": len(packed),
              "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "attended_pairs": attended,
              "mask_blocks": {str(block): block_statistics(block_masks, attended)
                              for block, block_masks in masks.items()},
              "note": "seconds per pass over these micro-batches; TFLOP/s on attended pairs (references: on the "
                      "causal pairs of the same shapes)",
              "options": {}, "references": {}}
    for name in (names if on_gpu else ["default"]):
        if time.perf_counter() > deadline:
            result["options"][name] = {"skipped": "time budget spent"}
            continue
        print(f"  flex sweep: {name}", flush=True)
        try:
            chosen_setting = sweep_setting(name, device, head_dim)
            result["options"][name] = {**measure(flex_with(chosen_setting["kernel_options"]),
                                                 masks[chosen_setting["mask_block"]], attended),
                                       "setting": chosen_setting}
        except Exception as error:  # noqa: BLE001 - an option this torch lacks must not end the sweep
            if not on_gpu:
                raise
            result["options"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    # varlen.py on the same rows: the attention sequences through FlashAttention's varlen kernel (eager: one kernel
    # and a few gathers), its output back in FlexAttention's [B, H, L, D].
    print("  flex sweep: varlen sequences", flush=True)
    try:
        plans = [varlen.plan(batch).to(device) for batch in chosen]
        result["varlen"] = measure(lambda q, k, v, plan: varlen.attention_forward(
            None, q, k, v, None, **{varlen.PLAN_ARGUMENT: plan})[0].transpose(1, 2), plans, attended)
    except Exception as error:  # noqa: BLE001
        if not on_gpu:
            raise
        result["varlen"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    references = {"flex_causal": (flex_with(None), [causal_mask] * len(chosen)),
                  "sdpa_causal": (lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(
                      q, k, v, is_causal=True, enable_gqa=kv_heads != heads), [None] * len(chosen))}
    for name, (attend, block_masks) in references.items():
        try:
            result["references"][name] = measure(attend, block_masks, causal_pairs)
        except Exception as error:  # noqa: BLE001
            if not on_gpu:
                raise
            result["references"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    if autotune and on_gpu and time.perf_counter() < deadline:
        print("  flex sweep: max-autotune (inductor prints the configs it chose)", flush=True)
        try:
            result["max_autotune"] = measure(flex_with(None, mode="max-autotune-no-cudagraphs"), masks[128],
                                             attended)
        except Exception as error:  # noqa: BLE001
            result["max_autotune"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    timed_options = {name: r for name, r in result["options"].items()
                     if "forward_s" in r and r["backward_s"] and r["finite"]}
    if timed_options:
        best = min(timed_options, key=lambda name: timed_options[name]["forward_s"] + timed_options[name]["backward_s"])
        result["best"] = best
        result["best_setting"] = timed_options[best]["setting"]
    return result


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def tuned_flex(name: str, setting, head_dim: int):
    """The FlexAttention setting flex.enable picks for this device's bf16 queries: the sweep's winner for a *_tuned
    layout, the library's own (flex.MEASURED_SETTINGS) otherwise."""
    library = dict(flex.MEASURED_SETTINGS)
    if name.endswith("_tuned"):
        capability = torch.cuda.get_device_capability()
        flex.MEASURED_SETTINGS = {**library, capability: {**library.get(capability, {}),
                                                          (torch.bfloat16, head_dim): setting}}
    try:
        yield
    finally:
        flex.MEASURED_SETTINGS = library


def write(results: dict, out) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict) -> None:
    print(f"\n{'layout':<28} {'mb':>4} {'s':>8} {'host s':>7} {'pairs/s':>9} {'tok/s':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>9} {'loss':>9}")
    for name, r in results["layouts"].items():
        if "seconds" not in r:
            print(f"{name:<28} {r.get('error') or r.get('skipped')}")
            continue
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{name:<28} {r['micro_batches']:>4} {r['seconds']:>8.3f} {r['host_packing_seconds']:>7.3f} "
              f"{r['pairs_per_s']:>9.2f} {r['tokens_per_s']:>10.0f} {r['achieved_tflops']:>8.2f} {mfu:>6} "
              f"{memory:>9} {r['loss_mean']:>9.4f}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()

    toy = args.toy or not torch.cuda.is_available()
    size = dict(SIZES["toy" if toy else "gpu"])
    args.pairs = args.pairs or size["pairs"]
    args.max_tokens = args.max_tokens or size["max_tokens"]
    args.row_tokens = args.row_tokens or size["row_tokens"]
    size["timed_passes"] = args.timed_passes or size["timed_passes"]
    out = args.out or (None if toy else GPU_RESULTS)
    if toy and out is not None and out.resolve() == GPU_RESULTS.resolve():
        parser.error(f"a toy run does not overwrite {GPU_RESULTS}: give another --out")
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown or "padded" not in layouts:
        parser.error(f"--layouts: unknown {unknown}; padded (the reference) is always needed")
    sweep_names = [] if args.sweep == "none" else [name.strip() for name in args.sweep.split(",") if name.strip()]
    if set(sweep_names) - set(FLEX_SWEEP):
        parser.error(f"--sweep: unknown {sorted(set(sweep_names) - set(FLEX_SWEEP))}")

    import transformers

    device = torch.device("cpu" if toy else "cuda")
    if toy:
        print("no GPU: toy-size smoke run, no GPU figure measured" if not torch.cuda.is_available()
              else "--toy: toy-size smoke run on the CPU, no GPU figure measured", flush=True)
    else:
        import torch._dynamo as dynamo

        # Every micro-batch has its own [R, L] shape (dynamic after the second), and this one process runs every
        # layout through the same compiled frames, each layout a guard failure of the others' graphs: a trainer
        # runs one layout. A higher limit keeps the later layouts from falling back to eager code.
        if hasattr(dynamo.config, "recompile_limit"):
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)

    results = {
        "device": "cpu" if toy else torch.cuda.get_device_name(),
        "mode": "toy" if toy else "gpu",
        "note": ("no GPU: toy-size smoke run, no GPU figure measured" if toy else
                 "bf16 forward + backward of the TGDPO micro-batch loss; no optimizer step"),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        # Written with the first partial JSON, so a run cut short still says which code and command it was.
        "provenance": provenance(shlex.join(["python3", "bench/gpu.py", *(sys.argv[1:] if argv is None else argv)])),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "peak_tflops_measured": None, "mfu": None, "mfu_layout": None, "shared_prompt_flex_vs_padded": None,
        "flops_formula": FLOPS_FORMULA,
        "definitions": {
            "seconds": "one timed pass over all pairs (every micro-batch's forward, backward and the host-side input "
                       "building), after the warm-up passes",
            "tokens_per_s": "prompt + chosen and prompt + rejected tokens per second, as the trainer counts them: "
                            "the same work in every layout",
            "computed_tokens_per_s": "real (non-pad) tokens the layout runs through the model per second",
            "host_packing_seconds": "CPU time to build one pass's inputs alone (the dense 4D masks are built there)",
            "budget_tokens": "micro_batch_tokens summed: what the token budget counts (padding included in padded)",
            "peak_memory_gib": "torch.cuda.max_memory_allocated over the timed pass (weights and gradients included)",
        },
    }
    hidden, vocab = size["model"]["hidden_size"], size["model"]["vocab_size"]
    if not toy:
        print(f"device: {results['device']}", flush=True)
        results["peak_tflops_measured"] = round(matmul_tflops(device), 1)
        results["peak_tflops_how"] = "bf16 8192^3 torch.matmul, mean of 20 after 5 warm-ups, CUDA events"
        print(f"peak bf16 matmul: {results['peak_tflops_measured']} TFLOP/s", flush=True)
        results["logp_memory"] = logp_memory(device, hidden, vocab)
        torch.cuda.empty_cache()
        print("log-prob peak memory, 8192 tokens x 128k vocab: " + ", ".join(
            f"{mode} {results['logp_memory'][f'{mode}_gib']:.2f} GiB" for mode in ("plain", "chunked", "fused")),
            flush=True)

    model = make_model(size, device, toy)
    body_params = non_embedding_params(model)
    pairs = make_pairs(args.pairs, size["model"]["vocab_size"], prompt=size["prompt"], answer=size["answer"],
                       logp_mean=size["logp_mean"])
    results["model"] = {"architecture": "Llama, random init", **size["model"], "tie_word_embeddings": True,
                        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                        "non_embedding_params_millions": round(body_params / 1e6, 1),
                        "dtype": str(size["dtype"]).replace("torch.", "")}
    results["data"] = {"pairs": args.pairs, "prompt_tokens_min_max_median": size["prompt"],
                       "answer_tokens_min_max_median": size["answer"], "lengths": "log-normal, sigma 1, clipped",
                       "max_tokens_per_micro_batch": args.max_tokens, "packed_row_tokens": args.row_tokens,
                       "warmup_passes": size["warmup_passes"], "timed_passes": size["timed_passes"],
                       "loss": {"type": "tgdpo", **dataclasses.asdict(TRAINER_LOSS)},
                       "reference_and_guidance": "cached log-probs (random, as from the scorers)",
                       "prompt_plus_answers_tokens": packed_tokens(pairs, shared_prompt=False)}
    print(f"model {results['model']['params_millions']}M params ({size['model']['hidden_size']} hidden, "
          f"{size['model']['num_hidden_layers']} layers, vocab {size['model']['vocab_size']}), "
          f"{args.pairs} pairs, {args.max_tokens} tokens per micro-batch, rows of {args.row_tokens}", flush=True)

    print("LM head, fused log-probs: eager vs compiled chunk math", flush=True)
    try:
        results["lm_head"] = lm_head_check(device, hidden, vocab, tokens=256 if toy else args.max_tokens)
    except Exception as error:  # noqa: BLE001 - the layouts still run
        if toy:
            raise
        traceback.print_exc()
        results["lm_head"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    if sweep_names:
        print("FlexAttention settings on the shared-prompt block masks", flush=True)
        try:
            results["flex_sweep"] = flex_sweep(model, pairs, args, device, sweep_names, args.autotune,
                                               deadline=started + 0.45 * args.budget_s)
        except Exception as error:  # noqa: BLE001 - the layouts still run
            if toy:
                raise
            traceback.print_exc()
            results["flex_sweep"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    sweep = results.get("flex_sweep", {})
    tuned_setting = sweep.get("best_setting")  # torch's defaults may win: worth a whole step too
    if tuned_setting == library_setting(device, size["model"]["head_dim"]):
        tuned_setting = None  # the library's own setting won: nothing else to measure
    write(results, out)

    results["layouts"], per_pair = {}, {}
    for name in layouts:
        if time.perf_counter() - started > args.budget_s:
            results["layouts"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        if toy and LAYOUTS[name][2]:
            results["layouts"][name] = {"skipped": "compiled layers run on a GPU only (inductor's CPU build of "
                                                   "every shape takes minutes)"}
            continue
        if name.endswith("_tuned") and tuned_setting is None:
            results["layouts"][name] = {"skipped": "no sweep, or the library's setting won it"}
            continue
        print(f"  {name} ...", flush=True)
        try:
            with tuned_flex(name, tuned_setting, size["model"]["head_dim"]):
                results["layouts"][name], per_pair[name] = run_layout(model, pairs, name, size, args, device,
                                                                      body_params)
        except Exception as error:  # noqa: BLE001 - on the GPU, one failing layout must not lose the others
            if toy:
                raise
            traceback.print_exc()
            results["layouts"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        if "error" in results["layouts"][name]:  # out of the except block, so its traceback no longer holds memory
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        write(results, out)  # after every layout: a run cut short keeps what it measured

    # The same objective in every layout: per-pair losses and rewards against padded's.
    measured = {name: r for name, r in results["layouts"].items() if "seconds" in r}
    for name, r in measured.items():
        if "padded" in per_pair:
            ids = sorted(per_pair["padded"])
            diffs = np.abs(np.array([per_pair[name][i] for i in ids]) - np.array([per_pair["padded"][i] for i in ids]))
            r["max_loss_diff_vs_padded"] = float(diffs[:, 0].max())
            r["max_reward_diff_vs_padded"] = float(diffs[:, 1:].max())
        if toy:  # small: kept for the smoke test
            r["per_pair"] = {str(i): per_pair[name][i] for i in sorted(per_pair[name])}
        if results["peak_tflops_measured"]:
            r["mfu"] = round(r["achieved_tflops"] / results["peak_tflops_measured"], 4)
    finite = {name: r for name, r in measured.items() if r["losses_finite"]}  # a NaN loss is no result
    if not toy and finite:
        best = max(finite, key=lambda name: finite[name].get("mfu") or 0)
        results["mfu"], results["mfu_layout"] = finite[best].get("mfu"), best
    if "padded" in measured:
        results["pairs_per_s_vs_padded"] = {name: round(r["pairs_per_s"] / measured["padded"]["pairs_per_s"], 3)
                                            for name, r in measured.items()}
        if not toy and "shared_prompt_flex" in measured:  # a toy run's speeds mean nothing
            results["shared_prompt_flex_vs_padded"] = results["pairs_per_s_vs_padded"]["shared_prompt_flex"]

    # FlexAttention and varlen against the dense mask, once per packing and attention asked for, uncompiled: also
    # where its layout failed, as a diagnosis (fp32 in the toy run: must agree to 1e-4; bf16 on the GPU: for scale).
    results["attention_check"] = {}
    for packing, attention in sorted({LAYOUTS[name][:2] for name in layouts if LAYOUTS[name][1] != "sdpa"}):
        if time.perf_counter() - started > args.budget_s + 30:
            break
        try:
            results["attention_check"][f"{packing}_{attention}"] = attention_check(model, pairs, packing, attention,
                                                                                   args, device)
        except Exception as error:  # noqa: BLE001
            if toy:
                raise
            traceback.print_exc()
            results["attention_check"][f"{packing}_{attention}"] = {
                "error": f"{type(error).__name__}: {str(error)[:300]}"}

    profiled = results["mfu_layout"] if args.profile == "best" else args.profile
    if profiled in measured:
        with tuned_flex(profiled, tuned_setting, size["model"]["head_dim"]):
            results["profile"] = profile_layout(model, pairs, profiled, args, device)

    results["losses_finite"] = all(r["losses_finite"] for r in measured.values())
    # The GPU image has none of these: the import chain must not need them.
    results["heavy_modules_loaded"] = sorted({name.split(".")[0] for name in sys.modules}
                                             & {"ray", "deepspeed", "vllm", "pydantic"})
    results["complete"] = True
    results["seconds_total"] = round(time.perf_counter() - started, 1)
    write(results, out)

    print_table(results)
    if not toy:
        print(f"\npeak bf16 matmul {results['peak_tflops_measured']} TFLOP/s; best MFU {results['mfu']} "
              f"({results['mfu_layout']}); pairs/s of shared_prompt_flex / padded: "
              f"{results['shared_prompt_flex_vs_padded']}")
    for name, check in results["attention_check"].items():
        print(f"attention check {name}: {check}")
    head = results["lm_head"]
    print(f"LM head: {head['error']}" if "error" in head else
          f"LM head, {head['tokens']} tokens x {head['vocab']} vocab, forward + backward: " + ", ".join(
              f"{name} {head[name]['seconds'] * 1000:.1f} ms (grad diff {head[name]['max_grad_rel_diff_vs_eager']:.1e})"
              for name in head if isinstance(head[name], dict)))
    if "rows" in sweep:
        print(f"FlexAttention sweep, {sweep['micro_batches']} micro-batches of {sweep['rows']} x {sweep['length']}; "
              "attended pairs computed: " + ", ".join(f"{blocks['computed_pairs_over_attended']}x in blocks of "
                                                      f"{block}" for block, blocks in sweep["mask_blocks"].items())
              + f"; best {sweep.get('best')}")
        for name, r in {**sweep["options"], "varlen": sweep["varlen"], **sweep["references"],
                        **({"max_autotune": sweep["max_autotune"]} if "max_autotune" in sweep else {})}.items():
            print(f"  {name:<28} " + (f"fwd {r['forward_s'] * 1000:.1f} ms ({r['forward_tflops']} TFLOP/s), bwd "
                                      f"{(r['backward_s'] or 0) * 1000:.1f} ms ({r['backward_tflops']} TFLOP/s)"
                                      if "forward_s" in r else str(r)))
    if "profile" in results:
        report = results["profile"]
        print(f"profile of {report['layout']}: wall {report['wall_seconds']} s, "
              f"GPU busy {report['gpu_busy_seconds']} s; by kind: {report['by_kind_seconds']}")
        for kernel in report["top_kernels"]:
            print(f"  {kernel['gpu_seconds']:>8.4f} s {kernel['calls']:>6}  {kernel['kind']:<18} {kernel['name']}")
    print(f"total {results['seconds_total']} s; " + (f"written to {out}" if out else "no --out: JSON not written"))
    failed = [name for name, r in results["layouts"].items() if "error" in r]
    if not results["losses_finite"] or failed:
        print(f"FAILED: non-finite losses or failing layouts {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
