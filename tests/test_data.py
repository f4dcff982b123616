"""Preference data: loading every supported source, chat templates, truncation, bad rows, batch layout."""

import json

import pytest
import torch

from tgdpo_ray.config.job import DataSection
from tgdpo_ray.data.preference import DataError, prepare_pairs, tokenize_pair
from tgdpo_ray.experiments.demo import rule_score, write_demo_data
from tgdpo_ray.kernels.batches import (IGNORE_INDEX, collate_pairs, grid_to_values, pack_by_token_budget, padded_tokens,
                                       values_to_grid)

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
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: invalid_json: .*\(column 2\)"):
        prepare_pairs(data.train, data, tokenizer)


BAD_ROWS = {
    "missing_field": {"prompt": "p", "chosen": "a"},
    "empty_field": {"prompt": "p", "chosen": "  ", "rejected": "b"},
    "non_string_content": {"prompt": "p", "chosen": [{"role": "assistant", "content": 7}], "rejected": "b"},
    "identical_responses": {"prompt": "p", "chosen": "same", "rejected": "same"},
    "prompt_too_long": {"prompt": "word " * 200, "chosen": "a", "rejected": "b"},
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_stops_the_run_with_its_line(tokenizer, tmp_path, reason):
    # A blank line counts: the number is the file's physical line, as an editor shows it.
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(PLAIN)}\n\n{json.dumps(PLAIN)}\n{json.dumps(BAD_ROWS[reason])}\n")
    data = section(path, long_prompts="bad_row", max_length=128, max_prompt_length=64)
    with pytest.raises(DataError) as info:
        prepare_pairs(data.train, data, tokenizer)
    assert str(info.value).startswith(f"{path}: line 4: {reason}: ")


def write_records(path, rows):
    """rows as a .json list or a .parquet file, which have records but no lines."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("name", ["bad.json", "bad.parquet"])
def test_files_without_lines_name_the_row_counting_from_one(tokenizer, tmp_path, name):
    path = write_records(tmp_path / name, [PLAIN, PLAIN, BAD_ROWS["identical_responses"]])
    data = section(path)
    with pytest.raises(DataError) as info:
        prepare_pairs(data.train, data, tokenizer)
    assert str(info.value).startswith(f"{path}: row 3: identical_responses: ")
    skipped = section(path, bad_rows="skip")
    report = prepare_pairs(skipped.train, skipped, tokenizer).report()
    assert report["skipped_examples"] == [{"row": 3, "reason": "identical_responses",
                                           "detail": "chosen and rejected are identical"}]


def test_a_json_list_item_that_is_not_an_object_is_a_bad_row(tokenizer, tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([PLAIN, "just text", PLAIN]))
    data = section(path)
    with pytest.raises(DataError, match=r"list.json: row 2: not_an_object: "):
        prepare_pairs(data.train, data, tokenizer)
    skipped = section(path, bad_rows="skip")
    assert prepare_pairs(skipped.train, skipped, tokenizer).report()["skipped_by_reason"] == {"not_an_object": 1}


def test_invalid_json_in_a_json_file_names_its_line(tokenizer, tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[\n" + json.dumps(PLAIN) + ",\n{oops}\n]")
    data = section(path, bad_rows="skip")  # one document: nothing to skip, the file cannot be read
    with pytest.raises(DataError, match=r"list.json: line 3: not valid JSON \(.*, column 2\)"):
        prepare_pairs(data.train, data, tokenizer)


def test_byte_order_mark_is_read_as_utf8_sig(tokenizer, tmp_path):
    expected = expected_ids(tokenizer, tmp_path)
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + (json.dumps(PLAIN) + "\n").encode())
    (tmp_path / "bom.json").write_bytes(bom + json.dumps([PLAIN]).encode())
    for name in ("bom.jsonl", "bom.json"):
        data = section(tmp_path / name)
        assert prepare_pairs(data.train, data, tokenizer).rows == expected, name


def line_with_bad_byte() -> bytes:
    return json.dumps({**PLAIN, "chosen": "apple XX"}).encode().replace(b"XX", b"\xff\xfe")


def test_invalid_utf8_line_names_the_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PLAIN).encode() + b"\n" + line_with_bad_byte() + b"\n")
    data = section(path)
    with pytest.raises(DataError) as info:
        prepare_pairs(data.train, data, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}: line 2: invalid_utf8: byte 0xff at column ") and "not UTF-8" in message


def test_invalid_utf8_in_a_json_file_names_its_line(tokenizer, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b"[\n" + json.dumps(PLAIN).encode() + b",\n" + line_with_bad_byte() + b"\n]")
    data = section(path, bad_rows="skip")  # one document: it cannot be decoded, so nothing can be skipped
    with pytest.raises(DataError, match=r"latin1.json: line 3: not valid UTF-8 \(byte 0xff\)"):
        prepare_pairs(data.train, data, tokenizer)


def test_invalid_utf8_string_in_parquet_is_a_bad_row(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow checks UTF-8 when casting, not when reading a file: build the column from raw buffers, as a writer
    # that never validated would have.
    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00")
    prompts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff\xfe")])
    table = pa.table({"prompt": prompts, "chosen": ["apple", "apple"], "rejected": ["stone", "stone"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    data = section(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: row 2: invalid_utf8: a string holds byte 0xff"):
        prepare_pairs(data.train, data, tokenizer)
    skipped = section(tmp_path / "bad.parquet", bad_rows="skip")
    prepared = prepare_pairs(skipped.train, skipped, tokenizer)
    assert len(prepared.rows) == 1 and prepared.report()["skipped_by_reason"] == {"invalid_utf8": 1}


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
    assert [example["line"] for example in report["skipped_examples"]] == list(range(2, 8))  # 1-based lines


def test_unreadable_lines_are_skipped_and_counted_like_other_bad_rows(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(PLAIN).encode(), b"{not json", line_with_bad_byte(), b"[1, 2]", json.dumps(PLAIN).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = section(path, bad_rows="skip")
    printed = []
    prepared = prepare_pairs(data.train, data, tokenizer, log=printed.append)
    report = prepared.report()
    assert report["rows_read"] == 5 and report["rows_kept"] == 2
    assert report["skipped_by_reason"] == {"invalid_json": 1, "invalid_utf8": 1, "not_an_object": 1}
    assert [(e["line"], e["reason"]) for e in report["skipped_examples"]] == [
        (2, "invalid_json"), (3, "invalid_utf8"), (4, "not_an_object")]
    assert "skipped 3 of 5 rows" in printed[0]


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


def test_an_append_after_a_line_cut_short_starts_a_line_of_its_own(tmp_path):
    """A process that dies while appending leaves its last line without a newline: the next record must not be
    written onto it (and be lost with it when the broken line is skipped)."""
    from tgdpo_ray.common.jsonl import append_records, read_records

    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n{"b": ')
    append_records(path, [{"c": 2}])
    append_records(path, [{"d": 3}])
    assert path.read_text() == '{"a": 1}\n{"b": \n{"c": 2}\n{"d": 3}\n'
    assert read_records(path) == [{"a": 1}, {"c": 2}, {"d": 3}]
