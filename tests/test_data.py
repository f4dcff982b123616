"""Preference data: loading every supported source, chat templates, truncation, bad rows, batch layout."""

import json

import pytest
import torch

from tgdpo_ray.batches import collate_pairs, grid_to_values, pack_by_token_budget, padded_tokens, values_to_grid
from tgdpo_ray.config import DataSection
from tgdpo_ray.data import DataError, prepare_pairs, tokenize_pair
from tgdpo_ray.demo_data import rule_score, write_demo_data
from tgdpo_ray.losses import IGNORE_INDEX

PLAIN = {"prompt": "Repeat: apple river", "chosen": "apple river", "rejected": "apple stone"}


def section(path, **extra) -> DataSection:
    return DataSection.model_validate({"train": str(path), **extra})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_plain_strings_use_the_chat_template(tokenizer, tmp_path):
    tokens, truncated = tokenize_pair(tokenizer, PLAIN, section(tmp_path / "x.jsonl"))
    assert not truncated
    prompt = tokenizer.decode(tokens["prompt_ids"])
    assert prompt == "<|im_start|>user\nRepeat: apple river<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokens["chosen_ids"]) == "apple river<|im_end|>\n"
    assert tokenizer.decode(tokens["rejected_ids"]) == "apple stone<|im_end|>\n"


def test_ultrafeedback_messages_match_plain_strings(tokenizer, tmp_path):
    user = {"role": "user", "content": PLAIN["prompt"]}
    row = {
        "prompt": [user],
        # UltraFeedback repeats the prompt inside each answer's conversation.
        "chosen": [user, {"role": "assistant", "content": PLAIN["chosen"]}],
        "rejected": [user, {"role": "assistant", "content": PLAIN["rejected"]}],
    }
    data = section(tmp_path / "x.jsonl")
    assert tokenize_pair(tokenizer, row, data) == tokenize_pair(tokenizer, PLAIN, data)
    # A string prompt with message-list answers (UltraFeedback binarized) gives the same ids too.
    assert tokenize_pair(tokenizer, {**row, "prompt": PLAIN["prompt"]}, data) == tokenize_pair(tokenizer, PLAIN, data)


def test_configurable_column_names(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q one", "good": "yes", "bad": "no"}])
    data = section(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    prepared = prepare_pairs(data.train, data, tokenizer)
    assert len(prepared.rows) == 1 and tokenizer.decode(prepared.rows[0]["chosen_ids"]).startswith("yes")


def expected_ids(tokenizer, tmp_path):
    return prepare_pairs(section(write_jsonl(tmp_path / "ref.jsonl", [PLAIN])).train,
                         section(tmp_path / "ref.jsonl"), tokenizer).rows


def test_json_parquet_and_hf_dataset_sources(tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = expected_ids(tokenizer, tmp_path)
    (tmp_path / "list.json").write_text(json.dumps([PLAIN]))
    pq.write_table(pa.Table.from_pylist([PLAIN]), tmp_path / "pairs.parquet")
    # A dataset folder laid out like a hub repository, loaded through datasets.load_dataset.
    (tmp_path / "hub-like" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([PLAIN]), tmp_path / "hub-like" / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_list([PLAIN]).save_to_disk(str(tmp_path / "saved"))
    for source in ("list.json", "pairs.parquet", "hub-like", "saved"):
        data = section(tmp_path / source)
        assert prepare_pairs(data.train, data, tokenizer).rows == expected, source


def test_missing_split_names_the_dataset_and_split(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "hub-like" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([PLAIN]), tmp_path / "hub-like" / "data" / "train-00000-of-00001.parquet")
    data = section(tmp_path, train={"path": str(tmp_path / "hub-like"), "split": "validation"})
    with pytest.raises(DataError) as info:
        prepare_pairs(data.train, data, tokenizer)
    assert "hub-like" in str(info.value) and "validation" in str(info.value)


def test_malformed_jsonl_line_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PLAIN) + "\n{not json\n")
    data = section(path)
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        prepare_pairs(data.train, data, tokenizer)


BAD_ROWS = {
    "missing_field": {"prompt": "p", "chosen": "a"},
    "empty_field": {"prompt": "p", "chosen": "  ", "rejected": "b"},
    "non_string_content": {"prompt": "p", "chosen": [{"role": "assistant", "content": 7}], "rejected": "b"},
    "identical_responses": {"prompt": "p", "chosen": "same", "rejected": "same"},
    "prompt_too_long": {"prompt": "word " * 200, "chosen": "a", "rejected": "b"},
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_stops_the_run_with_its_index(tokenizer, tmp_path, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [PLAIN, PLAIN, BAD_ROWS[reason]])
    data = section(path, long_prompts="bad_row", max_length=128, max_prompt_length=64)
    with pytest.raises(DataError) as info:
        prepare_pairs(data.train, data, tokenizer)
    assert f"row 2: {reason}" in str(info.value) and "bad.jsonl" in str(info.value)


def test_bad_rows_skipped_are_counted_per_reason(tokenizer, tmp_path):
    rows = [PLAIN] + list(BAD_ROWS.values()) + [BAD_ROWS["empty_field"], PLAIN]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    data = section(path, bad_rows="skip", long_prompts="bad_row", max_length=128, max_prompt_length=64)
    printed = []
    prepared = prepare_pairs(data.train, data, tokenizer, log=printed.append)
    report = prepared.report()
    assert report["rows_read"] == len(rows) and report["rows_kept"] == 2
    assert report["skipped_by_reason"] == {reason: 1 for reason in BAD_ROWS} | {"empty_field": 2}
    assert report["rows_kept"] + report["rows_skipped"] == report["rows_read"]  # nothing vanishes
    assert [row["pair_id"] for row in prepared.rows] == [0, len(rows) - 1]
    assert "skipped 6 of 8 rows" in printed[0] and "empty_field=2" in printed[0]


def test_long_prompts_lose_tokens_from_the_left_then_answers_from_the_right(tokenizer, tmp_path):
    words = " ".join(f"w{i}" for i in range(60))
    row = {"prompt": words, "chosen": "apple " * 40, "rejected": "stone " * 40}
    data = section(tmp_path / "x.jsonl", max_length=64, max_prompt_length=24)
    tokens, truncated = tokenize_pair(tokenizer, row, data)
    assert truncated and len(tokens["prompt_ids"]) == 24
    assert tokenizer.decode(tokens["prompt_ids"]).endswith("<|im_start|>assistant\n")  # the end is kept
    assert len(tokens["prompt_ids"]) + len(tokens["chosen_ids"]) == 64
    assert tokenizer.decode(tokens["chosen_ids"]).startswith("apple apple")


def test_collate_masks_prompt_and_padding(tokenizer, tmp_path):
    data = section(tmp_path / "x.jsonl")
    short, _ = tokenize_pair(tokenizer, PLAIN, data)
    long, _ = tokenize_pair(tokenizer, {**PLAIN, "chosen": "apple river " * 5}, data)
    rows = [short, long]
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, max(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows))
    for i, (row, side) in enumerate([(short, "chosen_ids"), (long, "chosen_ids"), (short, "rejected_ids"), (long, "rejected_ids")]):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert labelled == row[side]  # exactly the answer tokens carry labels
        assert batch["attention_mask"][i].sum() == len(row["prompt_ids"]) + len(row[side])


def test_values_grid_round_trip(tokenizer, tmp_path):
    data = section(tmp_path / "x.jsonl")
    rows = [tokenize_pair(tokenizer, {**PLAIN, "chosen": "a " * n}, data)[0] for n in (1, 4)]
    for row in rows:
        row["ref_chosen_logps"] = torch.randn(len(row["chosen_ids"])).tolist()
        row["ref_rejected_logps"] = torch.randn(len(row["rejected_ids"])).tolist()
    width = collate_pairs(rows, 0)["labels"].shape[1]
    grid = values_to_grid(rows, "ref_chosen_logps", "ref_rejected_logps", width)
    chosen, rejected = grid_to_values(grid, rows)
    for row, values in zip(rows, chosen):
        assert values.tolist() == pytest.approx(row["ref_chosen_logps"])
    # Values on the grid sit exactly where the labels are.
    labels = collate_pairs(rows, 0)["labels"]
    assert ((grid != 0) <= (labels != IGNORE_INDEX)).all()


def test_token_budget_packing_keeps_every_pair_in_order():
    rows = [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}
            for p, c, r in [(5, 3, 4), (50, 10, 2), (2, 2, 2), (200, 100, 1), (3, 3, 3)]]
    batches = list(pack_by_token_budget(rows, max_tokens=256))
    assert [row for batch in batches for row in batch] == rows
    for batch in batches:
        assert padded_tokens(batch) <= 256 or len(batch) == 1  # an oversized pair goes alone, never dropped


def test_demo_data_follows_its_rule(tmp_path):
    paths = write_demo_data(str(tmp_path), train_pairs=50, test_pairs=10, seed=3)
    pairs = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(pairs) == 50
    for pair in pairs:
        assert rule_score(pair["prompt"], pair["chosen"]) == 1.0
        assert rule_score(pair["prompt"], pair["rejected"]) < 1.0


def test_pairs_cap_fixes_the_micro_batch_size():
    rows = [{"prompt_ids": [1] * 3, "chosen_ids": [2] * 2, "rejected_ids": [3] * 2} for _ in range(7)]
    batches = list(pack_by_token_budget(rows, max_tokens=10_000, max_pairs=2))
    assert [len(batch) for batch in batches] == [2, 2, 2, 1]
