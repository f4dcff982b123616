"""Guidance sources besides the implicit one: a token reward model, and per-token rewards in the data."""

import json

import pytest
import torch

from tgdpo_ray.config.job import DataSection, RewardColumns
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.data.preference import DataError, prepare_pairs
from tgdpo_ray.experiments.demo import make_demo_model
from tgdpo_ray.kernels.losses import PairBatch, TGDPOLoss
from tgdpo_ray.modeling.loading import load_token_reward_model
from tgdpo_ray.scoring.pools import answer_values
from tgdpo_ray.train.driver import run_train


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return str(make_demo_model(str(tmp_path_factory.mktemp("token-reward")), token_reward_head=True))


@pytest.fixture(scope="module")
def rewarded_data(tokenizer, demo_data, tmp_path_factory):
    """Demo pairs with +0.5 on every chosen token and -0.5 on every rejected token, of exactly our tokenization."""
    data = DataSection.model_validate({"train": str(demo_data["train"]), "max_length": 64, "max_prompt_length": 32})
    rows = [json.loads(line) for line in demo_data["train"].read_text().splitlines()[:32]]
    tokens = prepare_pairs(data.train, data, tokenizer).rows[:32]
    for row, tokenized in zip(rows, tokens):
        row["chosen_token_rewards"] = [0.5] * len(tokenized["chosen_ids"])
        row["rejected_token_rewards"] = [-0.5] * len(tokenized["rejected_ids"])
    path = tmp_path_factory.mktemp("rewarded") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rewards_form_equals_the_implicit_form():
    torch.manual_seed(0)
    shape = (3, 6)
    policy_c, policy_r, ref_c, ref_r, guide_c, guide_r = (torch.randn(shape) for _ in range(6))
    mask_c, mask_r = torch.rand(shape) > 0.3, torch.rand(shape) > 0.3
    loss = TGDPOLoss(beta=0.1, alpha=0.5)
    policy_and_reference = dict(policy_chosen_logps=policy_c, policy_rejected_logps=policy_r, chosen_mask=mask_c,
                                rejected_mask=mask_r, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    implicit = loss(PairBatch(**policy_and_reference, guidance_chosen_logps=guide_c, guidance_rejected_logps=guide_r))
    direct = loss(PairBatch(**policy_and_reference, chosen_token_rewards=0.1 * (guide_c - ref_c),
                            rejected_token_rewards=0.1 * (guide_r - ref_r)))
    assert torch.allclose(implicit.losses, direct.losses, atol=1e-7)


def test_reward_columns_are_read_truncated_and_checked(tokenizer, rewarded_data, tmp_path):
    columns = RewardColumns()
    data = DataSection.model_validate({"train": str(rewarded_data), "max_length": 64, "max_prompt_length": 32})
    rows = prepare_pairs(data.train, data, tokenizer, reward_columns=columns).rows
    assert rows and all(len(r["guidance_chosen_rewards"]) == len(r["chosen_ids"]) for r in rows)
    short = DataSection.model_validate({"train": str(rewarded_data), "max_length": 24, "max_prompt_length": 16})
    truncated = prepare_pairs(short.train, short, tokenizer, reward_columns=columns).rows
    assert truncated and all(len(r["guidance_rejected_rewards"]) == len(r["rejected_ids"]) for r in truncated)

    broken = json.loads(rewarded_data.read_text().splitlines()[0])
    broken["chosen_token_rewards"] = broken["chosen_token_rewards"][:-1]
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(broken) + "\n")
    bad = DataSection.model_validate({"train": str(path)})
    with pytest.raises(DataError, match=r"line 1: bad_token_rewards: 'chosen_token_rewards' has \d+ values for"):
        prepare_pairs(bad.train, bad, tokenizer, reward_columns=columns)


def test_token_reward_head_output_lands_on_its_token(reward_model, tokenizer, demo_data):
    data = DataSection.model_validate({"train": str(demo_data["train"]), "max_length": 64, "max_prompt_length": 32})
    rows = prepare_pairs(data.train, data, tokenizer).rows[:3]
    model = load_token_reward_model(reward_model, "fp32").eval()
    chosen, _ = answer_values(model, rows, tokenizer.pad_token_id, torch.device("cpu"), 64, token_rewards=True)
    for row, values in zip(rows, chosen):
        ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
        with torch.no_grad():
            head = model(input_ids=ids).logits[0, len(row["prompt_ids"]):, 0]
        assert torch.allclose(torch.from_numpy(values), head, atol=1e-5)


def run(tiny_model, root, name, train, guidance):
    config = build_config({
        "run": {"name": name, "output_dir": str(root)},
        "data": {"train": {"path": str(train), "limit": 32}, "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "tgdpo", "beta": 0.1, "alpha": 0.5},
        "training": {"epochs": 1, "learning_rate": 1e-4},
        "policy": {"model": tiny_model},
        "guidance": guidance,
    })
    summary = run_train(config)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    roles = {json.loads(p.read_text())["role"] for p in (config.run_dir / "placement").glob("*.json")}
    return summary, records, roles


def test_a_token_reward_model_guides_through_its_pool(ray_cluster, tiny_model, reward_model, demo_data, tmp_path):
    summary, records, roles = run(tiny_model, tmp_path, "reward-model", demo_data["train"],
                                  {"source": "token_reward_model", "model": reward_model})
    assert roles == {"policy", "reference", "guidance", "tokenize"}
    assert any(abs(r["chosen_weight_mean"] - 0.1) > 1e-5 for r in records)  # the head's rewards move the weights
