"""The optimizer step: the pairs of each step follow the seed and the data, never timing; every pair of a step
weighs the same however the step is cut into micro-batches and dealt to workers; the policy trains in train mode
(gradient checkpointing really runs) with dropout off."""

import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import local_pairs
from safetensors.torch import load_file

from tgdpo_ray.config.job import TrainingSection
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.kernels.batches import pack_by_token_budget
from tgdpo_ray.train.driver import run_train
from tgdpo_ray.train.schedule import HELD_OUT, StepShare, StreamParts, epoch_order, in_epoch_order, plan_steps

PAIRS = 12


def rows_of_lengths(lengths: list[int]) -> list[dict]:
    return [{"pair_id": index, "prompt_ids": [1] * 4, "chosen_ids": [2] * length, "rejected_ids": [3] * length}
            for index, length in enumerate(lengths)]


def test_each_epoch_has_its_own_seeded_order_and_file_order_without_shuffle():
    ids = list(range(100))
    orders = {(seed, epoch): epoch_order(len(ids), seed, epoch, True).tolist() for seed in (0, 1) for epoch in (0, 1)}
    assert all(sorted(order) == ids for order in orders.values())  # permutations: every pair once
    assert len({tuple(order) for order in orders.values()}) == 4  # another seed or epoch: another order
    assert orders[(0, 1)] == epoch_order(len(ids), 0, 1, True).tolist()  # the same on every call
    assert orders[(0, 0)] != ids
    rows = rows_of_lengths([5] * 10)
    assert [row["pair_id"] for row in in_epoch_order(rows[::-1], 0, 3, shuffle=False)] == list(range(10))


def test_rank_0_reads_the_stream_part_by_part_and_past_the_parts_it_no_longer_needs():
    stream = [{"part": part, "pair_id": pair_id} for part, pair_id in
              [(HELD_OUT, 7), (HELD_OUT, 8), (0, 2), (0, 1), (1, 1), (1, 2), (2, 2), (2, 1)]]
    parts = StreamParts(iter(stream))
    assert [row["pair_id"] for row in parts.rows_of(HELD_OUT)] == [7, 8]
    # Workers restarted in epoch 1 read past epoch 0, and a part left half read is read past in turn.
    assert [row["pair_id"] for row in parts.rows_of(1)] == [1, 2]
    epoch_2 = parts.rows_of(2)
    assert next(epoch_2)["pair_id"] == 2
    assert list(parts.rows_of(3)) == []  # the stream has ended
    with pytest.raises(RuntimeError, match="no part 0 .*part 1"):  # a stream started after the checkpoint's epoch
        StreamParts(iter(stream[4:])).rows_of(0)


def test_the_stream_is_read_ahead_in_a_thread_and_its_errors_reach_the_reader():
    from tgdpo_ray.train.worker import read_ahead

    asked = threading.Event()

    def stream():
        asked.set()  # the first row is asked for before anyone reads
        yield from ({"pair_id": index} for index in range(3))

    rows = read_ahead(stream())
    assert asked.wait(timeout=10)
    assert [row["pair_id"] for row in rows] == [0, 1, 2]
    assert list(read_ahead(iter([]))) == []

    def failing():
        raise ValueError("scorer pool failed")
        yield

    with pytest.raises(ValueError, match="scorer pool failed"):
        list(read_ahead(failing()))


def test_a_step_deals_its_micro_batches_round_robin_at_most_accumulation_each():
    training = TrainingSection(max_tokens_per_batch=10**6, max_pairs_per_batch=2, gradient_accumulation_steps=2)
    steps = list(plan_steps(rows_of_lengths([5] * 11), training, world_size=2))
    # 11 pairs -> micro-batches of 2,2,2,2,2,1; four per step (2 workers x 2).
    ids = [[[row["pair_id"] for row in batch] for batch in share] for step in steps for share in step]
    assert ids == [[[0, 1], [4, 5]], [[2, 3], [6, 7]],  # step 1: worker 0, worker 1
                   [[8, 9]], [[10]]]  # step 2: one micro-batch each, the rest filled in by the trainers


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step over the same 12 pairs, cut and dealt in different ways (SimPO: a per-pair loss that needs
# no scorer). One worker runs in this process with a real DeepSpeed engine; two workers run on Ray.
# ---------------------------------------------------------------------------------------------------------------

BUDGET = 330  # padded tokens: cuts the 12 demo pairs into uneven micro-batches (5, 5, 2 today)


def one_step_config(tiny_model, demo_data, root, workers=1, zero_stage=2, loss="simpo", **training):
    return build_config({
        "run": {"name": f"one-step-{workers}", "output_dir": str(root), "seed": 5},
        "data": {"train": {"path": str(demo_data["train"]), "limit": PAIRS}, "max_length": 64,
                 "max_prompt_length": 32},
        "loss": {"type": loss},
        # Clipping off, no warmup: the step applies the gradient it computed, at the full rate.
        "training": {"epochs": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0, "max_grad_norm": 0.0, "max_steps": 1,
                     **training},
        "policy": {"model": tiny_model, "workers": workers, "zero_stage": zero_stage},
    })


def flat_update(weights: dict, start: dict) -> torch.Tensor:
    return torch.cat([(weights[key].detach().cpu() - start[key]).flatten() for key in sorted(start)])


def step_in_this_process(config) -> tuple[float, float, torch.Tensor]:
    """(loss, gradient norm, weight update) of the first step, planned and dealt as rank 0 of one worker does."""
    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.train.schedule import deal_step
    from tgdpo_ray.train.worker import build_engine, load_policy, train_step

    pad_id, train, _ = local_pairs(config)
    engine = build_engine(load_policy(config, torch.device("cpu")), config, total_steps=1, world_size=1)
    plan = plan_steps(in_epoch_order(train.rows, config.run.seed, 0, shuffle=True), config.training, 1)
    share = deal_step(plan, rank=0, world_size=1)
    assert share.step_pairs == PAIRS and len(share.micro_batches) == config.training.gradient_accumulation_steps
    result = train_step(engine, share, config, build_loss(config.loss), pad_id, torch.device("cpu"), world_size=1)
    if config.policy.zero_stage == 3:  # partitioned weights: the loss and the gradient norm say it all
        return result.metrics["loss"], result.grad_norm, None
    start = load_file(str(Path(config.policy.model) / "model.safetensors"))
    return result.metrics["loss"], result.grad_norm, flat_update(dict(engine.module.named_parameters()), start)


def test_every_pair_of_a_step_weighs_the_same_however_the_step_is_cut(one_process_group, ray_cluster, tiny_model,
                                                                      demo_data, tmp_path):
    whole = step_in_this_process(one_step_config(tiny_model, demo_data, tmp_path, max_tokens_per_batch=10**5))

    config = one_step_config(tiny_model, demo_data, tmp_path, max_tokens_per_batch=BUDGET,
                             gradient_accumulation_steps=3)
    _, train, _ = local_pairs(config)
    sizes = [len(batch) for batch in pack_by_token_budget(in_epoch_order(train.rows, 5, 0, True), BUDGET)]
    assert len(set(sizes)) > 1 and len(sizes) == 3, sizes
    variants = {"one worker, three uneven micro-batches": step_in_this_process(config)}
    # ZeRO-3 in the packed layouts: a forward that bypassed the engine kept only the last micro-batch's gradient.
    for packing in ("packed", "shared_prompt"):
        variants[f"ZeRO-3, {packing}, three micro-batches"] = step_in_this_process(one_step_config(
            tiny_model, demo_data, tmp_path, zero_stage=3, packing=packing, max_tokens_per_batch=BUDGET,
            max_pairs_per_batch=5, gradient_accumulation_steps=3))

    # Two workers: worker 0 gets micro-batches 1 and 3, worker 1 micro-batch 2 and then a zero-weight filler.
    config = one_step_config(tiny_model, demo_data, tmp_path, workers=2, max_tokens_per_batch=BUDGET,
                             gradient_accumulation_steps=2)
    run_train(config)
    record = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["pairs"] == PAIRS
    start = load_file(str(Path(tiny_model) / "model.safetensors"))
    saved = load_file(str(config.run_dir / "model" / "model.safetensors"))
    variants["two workers, one short of micro-batches"] = (record["loss"], record["grad_norm"],
                                                           flat_update(saved, start))

    loss, norm, update = whole
    for name, (other_loss, other_norm, other_update) in variants.items():
        assert other_loss == pytest.approx(loss, rel=1e-6), name
        # The gradient's scale: a pair weighted twice, or a sum divided by the wrong count, changes it.
        assert other_norm == pytest.approx(norm, rel=1e-5), name
        if other_update is None:
            continue
        # Its direction: Adam's first step is about lr * sign(gradient), so elements whose gradient is float
        # noise may differ by a fraction of lr; a pair weighted differently moves many elements.
        difference = ((other_update - update).norm() / update.norm()).item()
        assert difference < 1e-3, f"{name}: the update differs from one whole micro-batch's by {difference}"


# ---------------------------------------------------------------------------------------------------------------
# The policy's mode, in-process with a real DeepSpeed engine (one worker, gloo).
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_runs_from_the_first_step(one_process_group, tiny_model, demo_data, tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.train.worker import build_engine, load_policy, train_step

    config = build_config({"run": {"output_dir": str(tmp_path)}, "loss": {"type": "simpo"},
                           "data": {"train": {"path": str(demo_data["train"]), "limit": 4}, "max_length": 64,
                                    "max_prompt_length": 32},
                           "training": {"gradient_checkpointing": True},
                           "policy": {"model": tiny_model, "zero_stage": 0}})
    pad_id, train, _ = local_pairs(config)
    model = load_policy(config, torch.device("cpu"))
    assert not model.training  # from_pretrained's mode: checkpointing (and dropout) would be off in it
    checkpointed = []
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    for layer in layers:
        def counted(*args, inner=layer._gradient_checkpointing_func, **kwargs):
            checkpointed.append(1)
            return inner(*args, **kwargs)
        layer._gradient_checkpointing_func = counted
    engine = build_engine(model, config, total_steps=1, world_size=1)
    ids = [row["pair_id"] for row in train.rows]
    result = train_step(engine, StepShare([train.rows], len(ids), ids), config, build_loss(config.loss), pad_id,
                        torch.device("cpu"), 1)
    assert len(checkpointed) == len(layers)  # every layer's forward went through the checkpoint
    assert model.training and result.metrics["pairs"] == 4


def test_dropout_is_off_in_the_policy_unless_asked_for(tiny_model, tmp_path):
    import shutil

    from tgdpo_ray.train.worker import load_policy

    folder = tmp_path / "with-dropout"
    shutil.copytree(tiny_model, folder)
    model_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**model_config, "attention_dropout": 0.5}))
    inputs = torch.arange(1, 33).reshape(1, 32)

    def two_forwards(disable: bool):
        config = build_config({"policy": {"model": str(folder), "disable_dropout": disable}, "loss": {"type": "dpo"},
                               "data": {"train": {"path": "unused.jsonl"}}}, check_paths=False)
        model = load_policy(config, torch.device("cpu")).train()
        torch.manual_seed(0)
        with torch.no_grad():
            return model(input_ids=inputs).logits, model(input_ids=inputs).logits

    first, second = two_forwards(disable=True)
    assert torch.equal(first, second)
    first, second = two_forwards(disable=False)
    assert not torch.allclose(first, second)  # the check can fail: dropout at 0.5 does change the logits


# ---------------------------------------------------------------------------------------------------------------
# SFT through the same step: the loss a plain transformers forward gives, going down.
# ---------------------------------------------------------------------------------------------------------------


def chosen_answer_nll(model_dir: str, rows: list) -> float:
    """Each pair's chosen answer's negative log-likelihood per token under a plain forward of prompt + chosen, then
    the mean over pairs: what loss.type sft is, computed without any of the trainer's code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            answer = logps.gather(-1, ids[0, 1:, None])[len(row["prompt_ids"]) - 1:, 0]
            losses.append(-answer.mean())
    return float(torch.stack(losses).mean())


def test_sft_trains_the_chosen_answers_likelihood(one_process_group, tiny_model, demo_data, tmp_path):
    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.train.schedule import deal_step
    from tgdpo_ray.train.worker import build_engine, load_policy, train_step

    config = one_step_config(tiny_model, demo_data, tmp_path, loss="sft", max_tokens_per_batch=10**5)
    assert not config.needs_reference and config.guidance_kind is None  # no scorer pool runs
    pad_id, train, _ = local_pairs(config)
    engine = build_engine(load_policy(config, torch.device("cpu")), config, total_steps=4, world_size=1)
    share = deal_step(plan_steps(train.rows, config.training, 1), rank=0, world_size=1)
    sft = build_loss(config.loss)
    # The same pairs, four optimizer steps; each step's loss is computed before its update.
    losses = [train_step(engine, share, config, sft, pad_id, torch.device("cpu"), 1).metrics["loss"] for _ in range(4)]
    assert losses[0] == pytest.approx(chosen_answer_nll(tiny_model, train.rows), rel=1e-5)
    assert losses[-1] < losses[0] - 0.1, losses


def test_sft_trains_on_messages_only_rows(one_process_group, tiny_model, demo_data, tmp_path):
    # TRL's SFT form: one conversation per row and no rejected answer (its ids are empty in the step).
    from tgdpo_ray.kernels.losses import build_loss
    from tgdpo_ray.train.schedule import deal_step
    from tgdpo_ray.train.worker import build_engine, load_policy, train_step

    pairs = [json.loads(line) for line in Path(demo_data["train"]).read_text().splitlines()[:PAIRS]]
    conversations = tmp_path / "messages.jsonl"
    conversations.write_text("".join(json.dumps({"messages": [{"role": "user", "content": pair["prompt"]},
                                                              {"role": "assistant", "content": pair["chosen"]}]}) + "\n"
                                     for pair in pairs))
    config = one_step_config(tiny_model, {"train": conversations}, tmp_path, loss="sft", max_tokens_per_batch=10**5)
    pad_id, train, _ = local_pairs(config)
    assert len(train.rows) == PAIRS and all(row["rejected_ids"] == [] for row in train.rows)
    engine = build_engine(load_policy(config, torch.device("cpu")), config, total_steps=1, world_size=1)
    share = deal_step(plan_steps(train.rows, config.training, 1), rank=0, world_size=1)
    loss = train_step(engine, share, config, build_loss(config.loss), pad_id, torch.device("cpu"), 1).metrics["loss"]
    assert loss == pytest.approx(chosen_answer_nll(tiny_model, train.rows), rel=1e-5)
