"""Padding-free packing and the fused LM-head log-probs against today's padded computation (CPU, fp32), with the
packed rows' documents kept apart by the dense mask (sdpa, eager) and by FlexAttention's BlockMask (flex)."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tgdpo_ray.kernels import flex, varlen
from tgdpo_ray.kernels.attention import AttentionUnavailableError, resolve
from tgdpo_ray.kernels.batches import IGNORE_INDEX, collate_pairs
from tgdpo_ray.kernels.logprobs import (check_plain_lm_head, lm_head_token_logps, model_attention_mask,
                                        packed_token_logps, packed_attention, token_logps)
from tgdpo_ray.kernels.packing import PROMPT, pack_pairs, pack_rows, pair_span

ATOL = 1e-5


@pytest.fixture(scope="module", params=["sdpa", "eager", "flex", "varlen"])
def model(request, tiny_model):
    """The tiny model under each attention: the dense packed mask with SDPA or eager attention, FlexAttention
    (flex.py: a BlockMask for packed rows, SDPA for padded ones; forward only on the CPU), or the varlen sequences
    (varlen.py: on the CPU through SDPA one sequence at a time, with a backward)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    implementation = "eager" if request.param == "eager" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=implementation)
    if request.param == "flex":
        flex.enable(model)
    if request.param == "varlen":
        varlen.enable(model)
    # A wider init than the default 0.02: the model's outputs then depend strongly on what each token attends to,
    # so a leak across documents shows up far above the tolerances below.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model


def make_pairs(seed: int, count: int, vocab: int) -> list[dict]:
    """Ragged pairs: prompts of 3..40 tokens, answers of 1..30, every fourth pair with a one-token answer."""
    rng = random.Random(seed)

    def ids(length):
        return [rng.randrange(3, vocab) for _ in range(length)]

    pairs = []
    for i in range(count):
        chosen, rejected = rng.randint(1, 30), rng.randint(1, 30)
        if i % 4 == 0:
            chosen = 1
        if i % 4 == 1:
            rejected = 1
        pairs.append({"pair_id": i, "prompt_ids": ids(rng.randint(3, 40)), "chosen_ids": ids(chosen),
                      "rejected_ids": ids(rejected)})
    return pairs


def padded_logps(model, rows):
    """Today's path: full logits of the right-padded [2n, L] grid, then token_logps on the shifted labels."""
    batch = collate_pairs(rows, model.config.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logps(logits, batch["labels"]), batch["labels"] != IGNORE_INDEX


def dpo_margin(logps, mask):
    n = logps.shape[0] // 2
    return torch.where(mask, logps, 0.0)[:n].sum() - torch.where(mask, logps, 0.0)[n:].sum()


# ---------------------------------------------------------------------------
# Packing layout.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_packing_respects_the_budget_and_places_every_pair_once(shared_prompt):
    pairs = make_pairs(1, 40, 500)
    # One pair far above the budget: it must get a row (and a batch) of its own, whole.
    pairs[7] = {"pair_id": 7, "prompt_ids": [5] * 150, "chosen_ids": [6] * 60, "rejected_ids": [7] * 50}
    max_tokens = 200
    batches = pack_pairs(pairs, max_tokens, shared_prompt=shared_prompt, rows_per_batch=3)

    placed = [row["pair_id"] for batch in batches for row in batch.rows]
    assert sorted(placed) == list(range(len(pairs)))
    oversize = [batch for batch in batches if any(row["pair_id"] == 7 for row in batch.rows)]
    assert len(oversize) == 1 and len(oversize[0].rows) == 1
    assert oversize[0].input_ids.shape == (1, pair_span(pairs[7], shared_prompt))
    for batch in batches:
        assert batch.input_ids.shape[0] <= 3
        if batch is not oversize[0]:
            assert batch.input_ids.shape[1] <= max_tokens
        assert batch.real_tokens == sum(pair_span(row, shared_prompt) for row in batch.rows)
    # Several pairs share a row, and the packed layout holds fewer tokens than today's padded one.
    assert max(len(batch.rows) / batch.input_ids.shape[0] for batch in batches) >= 3
    padded = sum(collate_pairs(batch.rows, 0)["input_ids"].numel() for batch in batches)
    assert sum(batch.input_ids.numel() for batch in batches) < padded


def test_pack_rows_is_first_fit_decreasing():
    # 9 opens a row, 7 another, 5 a third; 3 fits after 7, 2 after 5.
    assert pack_rows([5, 3, 7, 2, 9], 10) == [[4], [1, 2], [0, 3]]
    assert pack_rows([12, 4, 4], 10) == [[0], [1, 2]]  # the oversize span is alone; the others pack


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_answer_tokens_land_on_collate_label_grid(shared_prompt):
    pairs = make_pairs(2, 12, 500)
    for batch in pack_pairs(pairs, 150, shared_prompt=shared_prompt, rows_per_batch=2):
        labels = collate_pairs(batch.rows, 0)["labels"]
        assert torch.equal(batch.label_grid(), labels)


def test_shared_layout_positions_and_mask():
    pair = {"prompt_ids": [10, 11, 12], "chosen_ids": [20, 21], "rejected_ids": [30, 31, 32]}
    (batch,) = pack_pairs([pair], 100, shared_prompt=True)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # rejected continues after the prompt
    allowed = batch.attention_mask[0, 0]
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False]  # first rejected token
    assert allowed[4].tolist() == [True, True, True, True, True, False, False, False]  # last chosen token
    # Both first answer tokens are predicted by the last prompt token (column 2).
    assert batch.source_index.tolist() == [2, 3, 2, 5, 6]
    assert batch.target_ids.tolist() == [20, 21, 30, 31, 32]


def test_padding_attends_to_itself_alone():
    long = {"prompt_ids": [10, 11, 12], "chosen_ids": [20, 21], "rejected_ids": [30, 31, 32]}
    short = {"prompt_ids": [13], "chosen_ids": [22], "rejected_ids": [33]}
    (batch,) = pack_pairs([long, short], 8, shared_prompt=True, rows_per_batch=2)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32], [13, 22, 33, 0, 0, 0, 0, 0]]
    allowed = batch.attention_mask[1, 0]
    assert torch.equal(allowed[3:, 3:], torch.eye(5, dtype=torch.bool))  # each pad sees itself, no other pad
    assert not allowed[3:, :3].any() and not allowed[:3, 3:].any()  # and the pair never sees the padding
    assert allowed[2].tolist()[:3] == [True, False, True]  # (its rejected token sees the prompt and itself)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_attention_spans_are_the_mask(shared_prompt):
    """varlen.py's sequences (each span's queries see its prefix and, causally, themselves) allow exactly what the
    dense mask allows on the real tokens; varlen adds one span of each row's padding, so its queries tile the batch."""
    batches = pack_pairs(make_pairs(11, 20, 500), 150, shared_prompt=shared_prompt, rows_per_batch=3)
    assert any(len(batch.rows) > 3 for batch in batches)
    for batch in batches:
        rows, length = batch.input_ids.shape
        from_spans = torch.zeros((rows, length, length), dtype=torch.bool)
        for row, prefix_start, prefix_end, start, end in batch.attention_spans.tolist():
            from_spans[row, start:end, prefix_start:prefix_end] = True
            from_spans[row, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        real = torch.zeros((rows, length), dtype=torch.bool)
        for row, _, _, start, end in batch.attention_spans.tolist():
            real[row, start:end] = True
        assert int(real.sum()) == batch.real_tokens  # every real token is a query of exactly one span
        dense = batch.attention_mask[:, 0] & real[:, :, None] & real[:, None, :]
        assert torch.equal(from_spans, dense)
        # varlen's sequences: the spans and each row's padding, whose queries are every position in order.
        spans = varlen.with_padding(batch.attention_spans, rows, length)
        plan = varlen.plan(batch)
        assert (spans[:, 0] * length + spans[:, 3]).tolist() == plan.cu_query[:-1].tolist()
        assert plan.cu_query[-1] == rows * length and plan.cu_key[-1] == len(plan.key_index)
        documents = batch.attention_spans.tolist()
        padding = [span for span in spans.tolist() if span not in documents]
        assert len(spans) == len(documents) + len(padding)
        assert sum(end - start for _, _, _, start, end in padding) == rows * length - batch.real_tokens
        assert all(prefix_start == prefix_end == start for _, prefix_start, prefix_end, start, _ in padding)


def test_mask_forms_and_refusals():
    (batch,) = pack_pairs(make_pairs(9, 3, 500), 1000, shared_prompt=True)
    allowed = batch.attention_mask
    sdpa, eager, flash = (SimpleNamespace(_attn_implementation=name) for name in ("sdpa", "eager", "flash_attention_2"))
    assert model_attention_mask(allowed, sdpa, torch.bfloat16) is allowed
    additive = model_attention_mask(allowed, eager, torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert (additive[allowed] == 0).all() and (additive[~allowed] == torch.finfo(torch.bfloat16).min).all()
    with pytest.raises(ValueError, match="position_ids"):
        model_attention_mask(allowed, flash, torch.bfloat16)
    check_plain_lm_head(SimpleNamespace(final_logit_softcapping=None, logit_scale=1.0))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_plain_lm_head(SimpleNamespace(final_logit_softcapping=30.0))
    moved = batch.to("cpu")
    assert torch.equal(moved.attention_mask, allowed) and moved.rows is batch.rows

    # training.attention: auto is the dense mask off CUDA, and flex on CUDA for an fp32 model (varlen's kernel takes
    # half precision); flex cannot train on the CPU (no backward there); varlen runs anywhere (SDPA on the CPU).
    cpu, cuda, fp32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    assert resolve("auto", cpu, training=True, dtype=torch.bfloat16) == "dense"
    assert resolve("auto", cuda, training=True, dtype=fp32) == "flex"
    assert resolve("dense", cuda, training=True, dtype=fp32) == "dense"
    assert resolve("flex", cpu, training=False, dtype=fp32) == "flex"
    assert resolve("varlen", cpu, training=True, dtype=fp32) == "varlen"
    with pytest.raises(AttentionUnavailableError, match="no backward on cpu.*training.attention"):
        resolve("flex", cpu, training=True, dtype=fp32)
    with pytest.raises(AttentionUnavailableError, match="varlen.*bf16 or fp16.*float32"):
        resolve("varlen", cuda, training=True, dtype=fp32)
    with pytest.raises(ValueError, match="one of"):
        resolve("flash", cpu, training=True, dtype=fp32)
    # A model that asks its attention for more than the mask (Gemma 2's soft cap) is refused, not silently served.
    (flex_batch,) = pack_pairs(make_pairs(9, 3, 500), 1000, shared_prompt=True, mask="flex")
    heads = torch.zeros(1, 2, flex_batch.input_ids.shape[1], 16)
    with pytest.raises(ValueError, match="softcap.*training.packing padded"):
        flex.attention_forward(torch.nn.Module(), heads, heads, heads, flex.block_mask(flex_batch, cpu), softcap=30.0)


def test_position_ids_mode_is_recognised_by_transformers():
    from transformers.masking_utils import find_packed_sequence_indices

    pairs = make_pairs(3, 6, 500)
    batches = pack_pairs(pairs, 400, mask="position_ids")
    for batch in batches:
        assert batch.attention_mask is None and batch.input_ids.shape[0] == 1
        # transformers finds two documents per pair, each as long as prompt + answer.
        documents = find_packed_sequence_indices(batch.position_ids)
        lengths = torch.bincount(documents[0]).tolist()
        assert sorted(lengths) == sorted(len(row["prompt_ids"]) + len(row[side]) for row in batch.rows
                                         for side in ("chosen_ids", "rejected_ids"))
    with pytest.raises(ValueError):
        pack_pairs(pairs, 400, shared_prompt=True, mask="position_ids")


# ---------------------------------------------------------------------------
# Packed log-probs and gradients equal the padded ones.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shared_prompt,rows_per_batch", [(False, 1), (False, 3), (True, 1), (True, 3)])
def test_packed_logps_equal_padded(model, shared_prompt, rows_per_batch):
    pairs = make_pairs(4, 24, model.config.vocab_size)
    mask = "4d" if packed_attention(model) == "dense" else "flex"  # as logprobs.answer_logps packs for this model
    batches = pack_pairs(pairs, 180, shared_prompt=shared_prompt, rows_per_batch=rows_per_batch, mask=mask,
                         pad_id=model.config.pad_token_id)
    assert any(len(batch.rows) >= 3 for batch in batches)  # several pairs per batch
    assert all((batch.attention_mask is None) == (mask == "flex") for batch in batches)  # no dense mask for these
    # FlexAttention rows are at least one 128-token block long (one kernel and one compiled graph for short ones).
    assert mask != "flex" or all(batch.input_ids.shape[1] >= 128 for batch in batches)
    if packed_attention(model) == "flex":  # enable() let dynamo keep a graph per shape class (past 8: unfused)
        assert torch._dynamo.config.recompile_limit >= flex.RECOMPILE_LIMIT
    with torch.no_grad():
        for batch in batches:
            packed, packed_mask = packed_token_logps(model, batch, chunk_size=37)
            padded, padded_mask = padded_logps(model, batch.rows)
            assert torch.equal(packed_mask, padded_mask)
            # FlexAttention's CPU math and the varlen sequences sum in another order: up to 1.3e-6 relative (1.05e-5
            # on a log-prob of -8).
            torch.testing.assert_close(packed, padded, atol=ATOL, rtol=1e-5 if mask == "flex" else 0)
            assert (packed[packed_mask] < 0).all()


def test_position_ids_mode_equals_padded(model):
    pairs = make_pairs(5, 12, model.config.vocab_size)
    with torch.no_grad():
        for batch in pack_pairs(pairs, 250, mask="position_ids"):
            packed, _ = packed_token_logps(model, batch)
            padded, _ = padded_logps(model, batch.rows)
            # FlexAttention and the varlen sequences sum in another order (see above)
            rtol = 1e-5 if packed_attention(model) != "dense" else 0
            torch.testing.assert_close(packed, padded, atol=ATOL, rtol=rtol)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_packed_gradients_equal_padded(model, shared_prompt):
    if packed_attention(model) == "flex":
        pytest.skip("FlexAttention has no CPU backward: bench/gpu.py compares its gradients on a GPU")
    pairs = make_pairs(6, 16, model.config.vocab_size)
    batches = pack_pairs(pairs, 200, shared_prompt=shared_prompt, rows_per_batch=2, pad_id=model.config.pad_token_id)

    def gradients(logps_of):
        model.zero_grad(set_to_none=True)
        for batch in batches:
            dpo_margin(*logps_of(batch)).backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    padded = gradients(lambda batch: padded_logps(model, batch.rows))
    packed = gradients(lambda batch: packed_token_logps(model, batch, chunk_size=50))
    assert padded.keys() == packed.keys()
    for name, grad in padded.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(packed[name], grad, atol=ATOL * scale, rtol=1e-4, msg=name)


def test_flex_mask_blocks_of_64_equal_padded(tiny_model, monkeypatch):
    """The mask block of flex.SETTINGS (on CUDA: the device's measured setting) reaches the BlockMask; a finer mask
    gives the same log-probs (the blocks it skips hold no attended pair) and skips the padding but its diagonal."""
    from transformers import AutoModelForCausalLM

    from tgdpo_ray.kernels.logprobs import packed_attention_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    flex.enable(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    monkeypatch.setattr(flex, "SETTINGS", {(torch.float32, head_dim): {"mask_block": 64, "kernel_options": None}})
    pairs = make_pairs(4, 24, model.config.vocab_size)
    with torch.no_grad():
        for batch in pack_pairs(pairs, 180, shared_prompt=True, rows_per_batch=3, mask="flex",
                                pad_id=model.config.pad_token_id):
            assert packed_attention_inputs(model, batch)["attention_mask"].BLOCK_SIZE == (64, 64)
            packed, packed_mask = packed_token_logps(model, batch, chunk_size=37)
            padded, padded_mask = padded_logps(model, batch.rows)
            assert torch.equal(packed_mask, padded_mask)
            torch.testing.assert_close(packed, padded, atol=ATOL, rtol=1e-5)
    # A row of 10 tokens padded to 250: each query block past the first visits its own diagonal block alone.
    long = {"prompt_ids": [5] * 200, "chosen_ids": [6] * 25, "rejected_ids": [7] * 25}
    short = {"prompt_ids": [5] * 4, "chosen_ids": [6] * 3, "rejected_ids": [7] * 3}
    (wide,) = pack_pairs([long, short], 250, shared_prompt=True, rows_per_batch=2, mask="flex")
    assert wide.input_ids.shape == (2, 250)
    mask = flex.block_mask(wide, "cpu", 64)
    assert (mask.kv_num_blocks[1, 0] + mask.full_kv_num_blocks[1, 0]).tolist() == [1, 1, 1, 1]
    # A mask in other blocks than the setting's is refused: on CUDA its blocks must fit the kernel's tiles.
    heads = torch.zeros(1, 2, wide.input_ids.shape[1], head_dim)
    with pytest.raises(ValueError, match="blocks of 64"):
        flex.attention_forward(torch.nn.Module(), heads, heads, heads, flex.block_mask(wide, "cpu"))


# ---------------------------------------------------------------------------
# Isolation: nothing crosses documents, and rejected never sees chosen.
# ---------------------------------------------------------------------------


def shifted(ids, model):
    """Other token ids, same length."""
    vocab = model.config.vocab_size
    return [(token + 7 - 3) % (vocab - 3) + 3 for token in ids]


def leaky(batch):
    """The same batch with a plain causal mask over each whole row: what a missing document mask would do. Dense:
    the causal mask itself; FlexAttention: one document and one segment per row, which its rule makes causal;
    varlen: one sequence per row."""
    rows, length = batch.input_ids.shape
    causal = torch.ones((length, length), dtype=torch.bool).tril().expand(rows, 1, -1, -1)
    return dataclasses.replace(batch, attention_mask=causal, document=torch.zeros_like(batch.document),
                               segment=torch.full_like(batch.segment, PROMPT),
                               attention_spans=torch.tensor([(row, 0, 0, 0, length) for row in range(rows)]))


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_no_token_attends_across_documents(model, shared_prompt):
    pairs = make_pairs(7, 6, model.config.vocab_size)
    (batch,) = pack_pairs(pairs, 10_000, shared_prompt=shared_prompt)  # all pairs in one row
    assert batch.input_ids.shape[0] == 1 and len(batch.rows) == 6
    changed = [dict(pair) for pair in pairs]
    changed[2] = dict(pairs[2], prompt_ids=shifted(pairs[2]["prompt_ids"], model))  # same lengths
    (other,) = pack_pairs(changed, 10_000, shared_prompt=shared_prompt)
    n = len(pairs)
    keep = torch.ones(2 * n, dtype=torch.bool)
    keep[[2, n + 2]] = False  # pair 2's chosen and rejected rows

    with torch.no_grad():
        before, mask = packed_token_logps(model, batch)
        after, _ = packed_token_logps(model, other)
        assert (before[~keep] - after[~keep]).abs().max() > 1e-3  # the changed pair did change
        torch.testing.assert_close(after[keep], before[keep], atol=1e-6, rtol=0)
        # The check has teeth: without the document mask the later pairs would change.
        leaked = packed_token_logps(model, leaky(other))[0] - packed_token_logps(model, leaky(batch))[0]
        assert leaked[keep].abs().max() > 1e-3


def test_rejected_never_sees_chosen(model):
    pairs = make_pairs(8, 4, model.config.vocab_size)
    largest_leak = 0.0
    for pair in pairs:
        changed = dict(pair, chosen_ids=shifted(pair["chosen_ids"], model))
        # One pair per batch: its row is one document, so leaky() is exactly "rejected may see chosen".
        (batch,) = pack_pairs([pair], 10_000, shared_prompt=True)
        (other,) = pack_pairs([changed], 10_000, shared_prompt=True)
        with torch.no_grad():
            before, _ = packed_token_logps(model, batch)
            after, _ = packed_token_logps(model, other)
            assert (before[0] - after[0]).abs().max() > 1e-3  # chosen log-probs changed
            torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)
            leaked = packed_token_logps(model, leaky(other))[0] - packed_token_logps(model, leaky(batch))[0]
            largest_leak = max(largest_leak, leaked[1].abs().max().item())
    # The check has teeth: were rejected to see chosen, its log-probs would change (one-token rejected answers,
    # predicted by the prompt alone, cannot show it; the others do).
    assert largest_leak > 1e-3


# ---------------------------------------------------------------------------
# The fused LM-head log-prob Function.
# ---------------------------------------------------------------------------


def plain_head_logps(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_matches_log_softmax_gather(with_bias):
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 300, 32, 1000
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, dtype=torch.float64) * 0.5).requires_grad_()
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, vocab, (tokens,))
    upstream = torch.randn(tokens, dtype=torch.float64)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    fused = lm_head_token_logps(hidden, weight, bias, targets, chunk_size=64)  # 300 = 4 x 64 + a ragged chunk
    plain = plain_head_logps(hidden, weight, bias, targets)
    # The fused path computes in fp32 (like token_logps); the plain one here in fp32 too, from fp64 inputs.
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    fused_grads = torch.autograd.grad(fused, inputs, upstream)
    plain_grads = torch.autograd.grad(plain, inputs, upstream)
    for got, want in zip(fused_grads, plain_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that aten ops create while the mode is on, freed ones excluded.

    Every op's outputs are recorded by storage with a weak reference, and the live total is taken after each op,
    so this sees what the CPU allocator holds for the computation (forward, saved tensors, backward) without relying
    on RSS, which the allocator's caching and glibc make unreliable. Tensors that existed before are not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def peak_bytes(logps_fn, tokens, hidden_size=64, vocab=16384):
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with PeakLiveBytes() as tracker:
        logps = logps_fn(hidden, weight, targets)
        logps.sum().backward()
        del logps
    assert hidden.grad is not None and weight.grad is not None
    return tracker.peak


def test_fused_head_memory_does_not_grow_with_tokens_times_vocab():
    vocab, chunk = 16384, 128
    logits_bytes = 2048 * vocab * 4  # one fp32 [2048 x vocab] tensor: 128 MiB

    def fused(hidden, weight, targets):
        return lm_head_token_logps(hidden, weight, None, targets, chunk_size=chunk)

    def plain(hidden, weight, targets):
        return plain_head_logps(hidden, weight, None, targets)

    plain_peak = peak_bytes(plain, 2048, vocab=vocab)
    fused_small, fused_large = peak_bytes(fused, 512, vocab=vocab), peak_bytes(fused, 2048, vocab=vocab)
    assert plain_peak >= logits_bytes  # the tracker does see the full logits of the plain computation
    # The fused peak is a few [chunk x vocab] buffers plus the fp32 weight gradient, whatever the token count:
    assert fused_large <= 4 * chunk * vocab * 4 + 2 * vocab * 64 * 4
    assert fused_large < plain_peak / 10
    # and 4x the tokens adds only O(tokens x hidden), far less than one more [1536 x vocab] tensor.
    assert fused_large - fused_small < 0.02 * 1536 * vocab * 4


# ---------------------------------------------------------------- the trainer's and scorers' entry points


@pytest.mark.parametrize("zero_stage", [2, 3])  # ZeRO-3 goes through the unfused head (module call)
def test_the_trainer_loss_and_gradients_are_the_same_in_every_layout(one_process_group, tiny_model, zero_stage):
    """micro_batch_loss through a real DeepSpeed engine (ZeRO-2, and ZeRO-3 with its partitioned weights), TGDPO
    with reference and guidance log-probs from the data: padded vs packed vs shared prompt, with the dense mask, the
    varlen sequences, (losses only) FlexAttention, and with the decoder layers compiled (training.compile) and
    checkpointed."""
    import numpy as np
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoConfig

    from tgdpo_ray.config.loader import build_config
    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.kernels.step import micro_batch_loss
    from tgdpo_ray.train.worker import build_engine, load_policy, step_settings

    rng = np.random.default_rng(0)
    rows = make_pairs(seed=5, count=6, vocab=AutoConfig.from_pretrained(tiny_model).vocab_size)
    for row in rows:
        for side in ("chosen", "rejected"):
            length = len(row[f"{side}_ids"])
            row[f"ref_{side}_logps"] = rng.normal(-3.0, 1.0, length).astype(np.float32)
            row[f"guidance_{side}_logps"] = rng.normal(-3.0, 1.0, length).astype(np.float32)
    # (layout, decoder layers compiled, attention in packed rows): the trainer's compiled layers once, on ZeRO-2
    # (ZeRO-3 refuses them), with gradient checkpointing as well (the two together: each checkpointed layer's
    # recompute runs the compiled one); the varlen sequences through both engines (their plan is a keyword argument
    # that must reach the layers through ZeRO-3's module call).
    variants = [("padded", False, "dense"), ("packed", False, "dense"), ("shared_prompt", False, "dense"),
                ("shared_prompt", False, "varlen")]
    if zero_stage == 2:
        variants.append(("shared_prompt", True, "dense"))
    results, flex_losses = {}, {}
    for packing, compiled, attention in variants:
        config = build_config({"data": {"train": "x.jsonl"}, "policy": {"model": tiny_model, "zero_stage": zero_stage},
                               "guidance": {"model": tiny_model}, "loss": {"type": "tgdpo"},
                               "training": {"packing": packing, "attention": attention, "packed_row_tokens": 64,
                                            "compile": compiled,
                                            "gradient_checkpointing": compiled,
                                            # Traced and run through AOTAutograd as with inductor, without its C++
                                            # build (15 s here); bench/gpu.py runs inductor on a GPU.
                                            "compile_backend": "aot_eager"}},
                              check_paths=False)
        # A fresh engine per variant, its model loaded as the trainers load it: the gradients read below are
        # exactly this variant's.
        engine = build_engine(load_policy(config, torch.device("cpu")), config, total_steps=1, world_size=1)
        if zero_stage == 3:  # the weights really are partitioned: only a module call can see them
            assert all(param.numel() == 0 for param in engine.module.parameters())
        assert packed_attention(engine) == attention  # load_policy put the model under training.attention
        assert all((layer._compiled_call_impl is not None) == compiled for layer in engine.module.model.layers)
        assert engine.module.is_gradient_checkpointing == compiled
        engine.train()  # as train_step: checkpointed layers recompute in train mode only (dropout is off)
        out, tokens = micro_batch_loss(engine, rows, build_loss(config.loss), step_settings(config), pad_id=0,
                                       device=torch.device("cpu"))
        engine.backward(out.losses.sum())
        results[packing, compiled, attention] = (out.losses.detach().clone(), tokens, [
            safe_get_full_grad(param).clone() for param in engine.module.parameters()])
        if packing != "padded" and not compiled and attention == "dense":  # FlexAttention through the same engine,
            flex.enable(engine.module)                                      # forward only (no CPU backward)
            assert packed_attention(engine) == "flex"
            with torch.no_grad():
                flex_out, _ = micro_batch_loss(engine, rows, build_loss(config.loss), step_settings(config), pad_id=0,
                                               device=torch.device("cpu"))
                flex_losses[packing, compiled, attention] = flex_out.losses
    losses, padded_tokens, grads = results["padded", False, "dense"]
    assert any(grad.abs().max() > 0 for grad in grads)
    assert set(flex_losses) == {("packed", False, "dense"), ("shared_prompt", False, "dense")}
    for variant in variants[1:]:
        other_losses, tokens, other_grads = results[variant]
        torch.testing.assert_close(other_losses, losses, atol=ATOL, rtol=1e-4)
        if variant in flex_losses:
            torch.testing.assert_close(flex_losses[variant], losses, atol=ATOL, rtol=1e-4)
        for a, b in zip(other_grads, grads):
            torch.testing.assert_close(a, b, atol=ATOL * max(1.0, b.abs().max().item()), rtol=1e-4)
        assert tokens == padded_tokens == sum(pair_span(row, False) for row in rows)  # the same measure


def test_the_scorer_gives_the_same_values_in_every_layout(model):
    from tgdpo_ray.scoring.pools import answer_values

    rows = make_pairs(seed=9, count=5, vocab=model.config.vocab_size)
    padded = answer_values(model, rows, 0, torch.device("cpu"), 64, token_rewards=False)
    for packing in ("packed", "shared_prompt"):
        values = answer_values(model, rows, 0, torch.device("cpu"), 64, token_rewards=False, packing=packing,
                               packed_row_tokens=48)
        for side in (0, 1):
            for a, b in zip(values[side], padded[side]):
                assert a.shape == b.shape
                assert abs(a - b).max() < ATOL
