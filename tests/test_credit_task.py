"""The credit-assignment task of `tgdpo-ray reproduce`: its pairs, its oracle rewards in the trainer's own
tokenization, and the probe's metrics against a plain per-example computation."""

import dataclasses
import json
import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from tgdpo_ray.config.job import DataSection, RewardColumns
from tgdpo_ray.data.preference import prepare_pairs
from tgdpo_ray.experiments.credit.colours import filler_sentences, make_colour_task
from tgdpo_ray.experiments.credit.task import (FILLER_LENGTH, encode_probe_set, make_task, make_task_model,
                                               preference_pair, slot_probe, warm_start_pair, write_task_data,
                                               write_warm_start_data)
from tgdpo_ray.modeling.loading import load_tokenizer

DATA = DataSection.model_validate({"train": "unused", "max_length": 64, "max_prompt_length": 16})


@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    return make_task_model(tmp_path_factory.mktemp("task-model"), make_task(0))


@pytest.fixture(scope="module")
def task_data(task_model, tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("task-data"), make_task(3), 3, train_pairs=48,
                           probe_answers_per_key=2, tokenizer=load_tokenizer(str(task_model)), data=DATA, reward=1.5)


def test_each_seed_draws_its_own_bijection_over_the_keys():
    first, second = make_task(1), make_task(2)
    for task in (first, second):
        assert sorted(task.mapping) == sorted(task.mapping.values()) == sorted(task.keys)
    assert first.mapping != second.mapping and make_task(1) == first
    with pytest.raises(ValueError, match="keys must be between 2"):
        make_task(0, keys=1)


def test_a_pair_differs_in_its_filler_and_its_value_and_only_the_value_decides():
    task, rng = make_task(5), random.Random(0)
    for key in task.keys:
        pair = preference_pair(task, rng, key)
        chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
        assert chosen[-3:] == [key, "=>", task.mapping[key]]
        assert rejected[-3:-1] == [key, "=>"] and rejected[-1] != task.mapping[key] and rejected[-1] in task.keys
        assert len(chosen) == len(rejected) == FILLER_LENGTH + 3
        assert set(chosen[:-3]) | set(rejected[:-3]) <= set(task.filler)
    # The warm start never shows f: its value is uniform over the keys whatever the key.
    values = Counter(warm_start_pair(task, rng, task.keys[0])["chosen"].split()[-1] for _ in range(4000))
    expected = 4000 / len(task.keys)
    assert set(values) == set(task.keys)
    assert all(abs(count - expected) < 5 * expected ** 0.5 for count in values.values()), values  # 5 sigma


def test_oracle_rewards_land_on_the_value_in_the_trainers_tokenization(task_model, task_data):
    tokenizer = load_tokenizer(str(task_model))
    rows = [json.loads(line) for line in task_data["train"].read_text().splitlines()]
    # The data path accepts them as they are: one number per answer token.
    for prefix in ("oracle", "shuffled"):
        columns = RewardColumns(chosen=f"{prefix}_chosen", rejected=f"{prefix}_rejected")
        source = DATA.model_copy(update={"train": DATA.train.model_copy(update={"path": str(task_data["train"])})})
        prepared = prepare_pairs(source.train, source, tokenizer, reward_columns=columns)
        assert len(prepared.rows) == len(rows) and not prepared.bad_counts
    for row, tokens in zip(rows, prepared.rows):
        for side, value, sign in (("chosen", row["value"], 1.5), ("rejected", row["wrong_value"], -1.5)):
            ids, rewards = tokens[f"{side}_ids"], row[f"oracle_{side}"]
            marked = [index for index, reward in enumerate(rewards) if reward != 0]
            assert [rewards[index] for index in marked] == [sign]
            assert tokenizer.decode([ids[marked[0]]]).strip() == value
            assert sorted(row[f"shuffled_{side}"]) == sorted(rewards)  # the same rewards, elsewhere
    moved = sum(row["shuffled_chosen"] != row["oracle_chosen"] for row in rows)
    assert moved > len(rows) // 2


def test_the_probe_matches_a_plain_computation_one_answer_at_a_time(task_model, task_data, tmp_path):
    tokenizer = load_tokenizer(str(task_model))
    reference = AutoModelForCausalLM.from_pretrained(str(task_model)).eval()
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_pretrained(str(task_model)).eval()
    with torch.no_grad():  # another model than the reference, so that the KL is not zero
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    probe = str(task_data["probe"])
    measured = slot_probe(policy, tokenizer, "cpu", examples=probe, reference=str(task_model))

    records = [json.loads(line) for line in task_data["probe"].read_text().splitlines()]
    key_ids = [tokenizer(f" {key}", add_special_tokens=False)["input_ids"][0] for key in sorted(make_task(3).keys)]
    probabilities, hits, kls, margins, masses = [], [], [], [], []
    for record in records:
        conversation = [{"role": "user", "content": record["prompt"]}, {"role": "assistant",
                                                                          "content": record["answer"]}]
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        prompt_ids = encode(tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=False))
        ids = torch.tensor([encode(tokenizer.apply_chat_template(conversation, tokenize=False))])
        with torch.no_grad():
            logps, ref_logps = (torch.log_softmax(m(input_ids=ids).logits[0].float(), -1) for m in (policy, reference))
        value_id = tokenizer(f" {record['value']}", add_special_tokens=False)["input_ids"][0]
        slot = max(i for i, token in enumerate(ids[0].tolist()) if token == value_id) - 1
        probabilities.append(logps[slot, value_id].exp())
        others = [logps[slot, key_id].exp() for key_id in key_ids if key_id != value_id]
        margins.append(logps[slot, value_id] - torch.stack(others).sum().log())
        masses.append(logps[slot, key_ids].exp().sum())
        hits.append(key_ids[int(logps[slot, key_ids].argmax())] == value_id)
        filler = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + FILLER_LENGTH)
        kls += [(logps[p].exp() * (logps[p] - ref_logps[p])).sum() for p in filler]
    assert measured["slot_probability"] == pytest.approx(float(torch.stack(probabilities).mean()), rel=1e-4)
    assert measured["slot_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert measured["filler_kl"] == pytest.approx(float(torch.stack(kls).mean()), rel=1e-4)
    assert measured["slot_margin"] == pytest.approx(float(torch.stack(margins).mean()), rel=1e-4)
    assert measured["allowed_mass"] == pytest.approx(float(torch.stack(masses).mean()), rel=1e-4)
    assert measured["filler_kl"] > 1e-4
    # The reference against itself: no drift.
    assert slot_probe(reference, tokenizer, "cpu", examples=probe, reference=str(task_model))["filler_kl"] == \
        pytest.approx(0.0, abs=1e-6)


def test_a_bad_probe_line_names_its_file_and_line(task_model, tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text(json.dumps({"prompt": "key: amber", "answer": "the amber => basil", "key": "amber",
                                "value": "basil"}) + "\n" + json.dumps({"prompt": "key: amber"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: no \['answer', 'key', 'value'\]"):
        encode_probe_set(str(path), load_tokenizer(str(task_model)))


def test_the_warm_start_file_holds_every_key_equally_often(tmp_path):
    task = make_task(0)
    path = write_warm_start_data(tmp_path / "warm.jsonl", task, seed=0, pairs=48)
    keys = Counter(json.loads(line)["prompt"].split(": ")[1] for line in path.read_text().splitlines())
    assert set(keys.values()) == {48 // len(task.keys)} and set(keys) == set(task.keys)


def test_the_colours_task_is_a_bijection_in_single_tokens_of_smollm2_with_held_out_fillers(smollm2, tmp_path):
    task = make_colour_task(1)
    assert sorted(task.mapping) == sorted(task.keys) and sorted(task.mapping.values()) == sorted(task.values)
    assert make_colour_task(2).mapping != task.mapping and make_colour_task(1) == task
    assert not set(filler_sentences(held_out=True)) & set(filler_sentences(held_out=False))
    tokenizer = load_tokenizer(smollm2)
    data = DataSection.model_validate({"train": "unused", "max_length": 128, "max_prompt_length": 96})
    paths = write_task_data(tmp_path, task, 1, train_pairs=16, probe_answers_per_key=2, tokenizer=tokenizer,
                            data=data, reward=1.0)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    probe = [json.loads(line) for line in paths["probe"].read_text().splitlines()]
    trained_fillers = {row[side].split(" The ")[0] for row in train for side in ("chosen", "rejected")}
    assert trained_fillers <= set(filler_sentences(held_out=False))
    assert {row["answer"].split(" The ")[0] for row in probe} <= set(filler_sentences(held_out=True))
    for row in train:
        assert row["chosen"].endswith(f"The {row['key']}'s colour is {task.mapping[row['key']]}.")
        assert row["wrong_value"] != row["value"] and row["rejected"].endswith(f"is {row['wrong_value']}.")
        assert sorted(row["oracle_chosen"])[-1] == 1.0 and sorted(row["oracle_rejected"])[0] == -1.0
    # The pre-registered reference check: the start puts at least half of its slot probability on the colours.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    measured = slot_probe(model, tokenizer, "cpu", examples=str(paths["probe"]), reference=smollm2,
                          marker=task.marker, slot_line_tokens=task.slot_line_tokens)
    assert measured["allowed_mass"] >= 0.5 and measured["filler_kl"] == pytest.approx(0.0, abs=1e-6)
    assert measured["slot_margin"] < 0  # the start does not know f: below an even split with the other colours
    with pytest.raises(ValueError, match="splits 'yak' into 2 tokens"):
        write_task_data(tmp_path, dataclasses.replace(task, keys=("yak",) + task.keys[1:]), 1, 4, 1, tokenizer,
                        data, 1.0)
