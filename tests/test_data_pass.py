"""The tokenization pass (data/tokenize_pass.py) gives what data/preference.prepare_pairs gives in one process: the
same tokens, pair ids and bad-row report, however many shards and workers read the source."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import local_pairs
from tgdpo_ray.common.jsonl import line_starts, read_records, text_lines
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.data.preference import DataError
from tgdpo_ray.data.tokenize_pass import tokenize_split

PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}


def job(tiny_model, tmp_path, path, *overrides: str):
    return build_config({
        "run": {"name": "pass", "output_dir": str(tmp_path / "runs")},
        "data": {"train": {"path": str(path)}, "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "dpo"},
        "policy": {"model": tiny_model},
    }, overrides=list(overrides))


def passed_rows(split) -> list[dict]:
    """The pass's kept pairs as prepare_pairs writes them (plain ints, by pair id)."""
    rows = [{key: [int(v) for v in value] if key.endswith("_ids") else int(value) for key, value in row.items()}
            for row in split.pairs.take_all()]
    return sorted(rows, key=lambda row: row["pair_id"])


def assert_same_as_local(config):
    """The pass and prepare_pairs agree on tokens, ids, lengths and report; returns the split."""
    _, local, _ = local_pairs(config)
    split = tokenize_split("train", config.data.train, config, log=lambda _: None)
    assert passed_rows(split) == local.rows
    assert split.pair_ids.tolist() == [row["pair_id"] for row in local.rows]
    assert split.lengths.tolist() == [[len(row[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
                                      for row in local.rows]
    report = split.report()
    assert {key: report[key] for key in local.report()} == local.report()
    return split


def test_demo_data_gives_the_same_pairs_in_one_shard_or_many(ray_cluster, tiny_model, demo_data, tmp_path):
    whole = assert_same_as_local(job(tiny_model, tmp_path, demo_data["train"]))
    many = assert_same_as_local(job(tiny_model, tmp_path, demo_data["train"], "data.tokenize.shard_mib=0.004",
                                    "data.tokenize.workers=3", "data.train.limit=300"))
    # The second pass read the file in many shards (a progress record each), on as many worker processes as Ray had
    # ready: a Ray started a moment before may run them all in one, so processes are not counted.
    progress = (tmp_path / "runs" / "pass" / "tokenize" / "train").glob("*.jsonl")
    shards = [record for path in progress for record in read_records(path)]
    assert len(shards) > 10 and sum(record["rows"] for record in shards) == 300
    assert len(whole) == 384 and len(many) == 300
    one_shard = job(tiny_model, tmp_path, demo_data["train"], "data.tokenize.workers=1", "data.train.limit=300")
    # The cache key does not depend on how the pass was cut.
    assert tokenize_split("train", one_shard.data.train, one_shard, log=lambda _: None).digest == many.digest


def adversarial_lines() -> bytes:
    """A .jsonl file with every kind of bad row, blank lines, CRLF and lone CR line ends, and a byte-order mark."""
    good = lambda i: json.dumps(dict(PAIR, chosen=f"Blue {i}."))  # noqa: E731
    lines = [
        "\ufeff" + good(0), good(1), "", "   ", good(2) + "\r", good(3), "{not json", "[1, 2]",
        json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}), json.dumps({"prompt": "x"}),
        json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}),
    ]
    text = "\n".join(lines).encode("utf-8") + b"\n" + good(4).encode()[:20] + b"\xff\xfe" + b"\n"
    text += ("\r".join([good(5), good(6)]) + "\r\n" + good(7) + "\n\n" + good(8)).encode()
    return text * 3


def test_adversarial_rows_are_named_and_counted_alike_at_every_cut(ray_cluster, tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(adversarial_lines())
    # The lines of a file read in parts are those of the whole file, wherever the cuts fall.
    whole = list(text_lines(path))
    for every in (1, 7, 50, 10**6):
        starts = line_starts(path, every)
        parts = [line for start, end in zip(starts, starts[1:] + [None]) for line in text_lines(path, start, end)]
        assert parts == whole, every
    for shard_mib in ("0.0001", "16"):  # a range of about 100 bytes (a line or two), and the whole file
        skip = job(tiny_model, tmp_path, path, "data.bad_rows=skip", f"data.tokenize.shard_mib={shard_mib}")
        split = assert_same_as_local(skip)
        assert split.report()["rows_skipped"] == 3 * 7 + 2  # and a byte-order mark inside the file, twice
        error = job(tiny_model, tmp_path, path, f"data.tokenize.shard_mib={shard_mib}")
        with pytest.raises(DataError) as local_error:
            local_pairs(error)
        with pytest.raises(DataError) as pass_error:
            tokenize_split("train", error.data.train, error, log=lambda _: None)
        assert str(pass_error.value) == str(local_error.value)
        assert ": line 7: invalid_json" in str(pass_error.value)


def test_parquet_row_groups_json_lists_and_datasets(ray_cluster, tiny_model, tmp_path):
    import datasets

    rows = [dict(PAIR, chosen=f"Blue {i}.") for i in range(40)]
    rows[13] = dict(PAIR, rejected=PAIR["chosen"])  # identical_responses, at row 14
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet", row_group_size=6)
    (tmp_path / "pairs.json").write_text(json.dumps(rows[:30] + [7] + rows[30:]))  # a number at row 31
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for name, limit in (("pairs.parquet", "25"), ("pairs.json", "null"), ("folder", "25")):
        config = job(tiny_model, tmp_path, tmp_path / name, "data.bad_rows=skip", "data.tokenize.shard_mib=0.0005",
                     f"data.train.limit={limit}")
        split = assert_same_as_local(config)
        assert 14 not in (split.pair_ids + 1).tolist(), name
        with pytest.raises(DataError, match=": row 14: identical_responses"):
            strict = job(tiny_model, tmp_path, tmp_path / name, "data.tokenize.shard_mib=0.0005")
            tokenize_split("train", strict.data.train, strict, log=lambda _: None)


def test_an_error_inside_a_worker_reads_as_the_error_itself(ray_cluster, tiny_model, demo_data, tmp_path):
    template = "{% for message in messages | reverse %}{{ message.content }}{% endfor %}"  # the prompt comes last
    config = job(tiny_model, tmp_path, demo_data["train"], f"data.chat_template='{template}'")
    with pytest.raises(DataError, match="^the chat template does not render the prompt as a prefix"):
        tokenize_split("train", config.data.train, config, log=lambda _: None)


def test_the_epoch_from_lengths_is_the_plan_from_tokens():
    from tgdpo_ray.config.job import TrainingSection
    from tgdpo_ray.kernels.batches import micro_batch_tokens
    from tgdpo_ray.train.schedule import epoch_order, epoch_shape, in_epoch_order, plan_steps

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=(97, 3))
    rows = [{"pair_id": i, "prompt_ids": [0] * p, "chosen_ids": [0] * c, "rejected_ids": [0] * r}
            for i, (p, c, r) in enumerate(lengths.tolist())]
    for packing in ("padded", "packed", "shared_prompt"):
        training = TrainingSection(max_tokens_per_batch=400, max_pairs_per_batch=5, gradient_accumulation_steps=2,
                                   packing=packing)
        for epoch in range(2):
            planned = list(plan_steps(in_epoch_order(rows, 3, epoch, True), training, world_size=2))
            micro_batches = [micro for step in planned for share in step for micro in share]
            shape = epoch_shape(lengths, epoch_order(len(rows), 3, epoch, True), training, 2)
            assert (shape.steps, shape.micro_batches) == (len(planned), len(micro_batches))
            assert shape.tokens == sum(micro_batch_tokens(micro, packing) for micro in micro_batches)
