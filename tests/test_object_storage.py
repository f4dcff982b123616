"""Data, prompts, questions and judge prompts read from object storage: a real S3 server on localhost (moto's
server mode, a process this module starts), reached through pyarrow's S3 filesystem as a bucket on AWS, MinIO or
any S3-compatible store is. The URIs carry the endpoint in their query, as a user of MinIO writes them."""

import json
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import local_pairs
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.data.preference import DataError, iter_raw_rows
from tgdpo_ray.data.tokenize_pass import STOP, Shard, shard_rows, tokenize_split
from tgdpo_ray.eval.judge import load_prompts
from tgdpo_ray.eval.questions import QuestionError, load_questions

pytest.importorskip("moto", reason="moto (make setup installs it with the dev tools) runs the S3 server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def bucket():
    """s3://data on a moto server: (a function that makes a URI from a key, the pyarrow filesystem)."""
    from pyarrow import fs

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.1)
        # moto takes any key; the URIs name one, so that no process looks for credentials elsewhere.
        s3 = fs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{port}",
                             scheme="http", region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("data")
        yield (lambda key: f"s3://test:test@data/{key}?endpoint_override=127.0.0.1:{port}&scheme=http"
                           "&region=us-east-1"), s3
    finally:
        server.terminate()
        server.wait(timeout=10)


def upload(s3, key: str, data: bytes) -> None:
    with s3.open_output_stream(f"data/{key}") as out:
        out.write(data)


def job(tiny_model, tmp_path, path: str, *overrides: str):
    return build_config({
        "run": {"name": "s3", "output_dir": str(tmp_path / "runs")},
        "data": {"train": {"path": path}, "max_length": 64, "max_prompt_length": 32,
                 "tokenize": {"shard_mib": 0.004}},  # several shards: byte ranges and row groups read remotely
        "loss": {"type": "dpo"},
        "policy": {"model": tiny_model},
    }, overrides=list(overrides))


def test_training_data_in_every_format_reads_from_s3_as_from_disk(ray_cluster, tiny_model, demo_data, tmp_path,
                                                                  bucket):
    uri, s3 = bucket
    lines = demo_data["train"].read_text().splitlines()[:120]
    rows = [json.loads(line) for line in lines]
    local = tmp_path / "pairs.jsonl"
    local.write_text("\n".join(lines) + "\n")
    upload(s3, "pairs.jsonl", local.read_bytes())
    upload(s3, "pairs.json", json.dumps(rows).encode())
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=16)
    upload(s3, "pairs.parquet", parquet.read_bytes())

    quiet = lambda line: None  # noqa: E731
    on_disk = job(tiny_model, tmp_path, str(local))
    expected = tokenize_split("train", on_disk.data.train, on_disk, quiet)
    for key in ("pairs.jsonl", "pairs.json", "pairs.parquet"):
        config = job(tiny_model, tmp_path, uri(key))
        split = tokenize_split("train", config.data.train, config, quiet)
        # The same pairs, tokens and all: the digest covers every kept pair's ids and tokens.
        assert (split.digest, split.pair_ids.tolist(), split.lengths.tolist()) == \
            (expected.digest, expected.pair_ids.tolist(), expected.lengths.tolist()), key
    # The one-process reader (on-policy prompts, the tests' reference) reads the same rows.
    prompts = job(tiny_model, tmp_path, uri("pairs.parquet"))
    assert [row for _, _, row in iter_raw_rows(prompts.data.train)] == rows
    assert local_pairs(prompts)[1].rows == local_pairs(on_disk)[1].rows


def test_a_bad_line_or_a_missing_object_on_s3_is_named(ray_cluster, tiny_model, demo_data, tmp_path, bucket):
    uri, s3 = bucket
    lines = demo_data["train"].read_text().splitlines()[:60]
    lines[41] = '{"prompt": "Name a colour.", "chosen": "Blue."'  # line 42: cut short
    upload(s3, "bad.jsonl", ("\n".join(lines) + "\n").encode())
    config = job(tiny_model, tmp_path, uri("bad.jsonl"))
    with pytest.raises(DataError, match=r"bad\.jsonl.*: line 42: invalid_json"):
        tokenize_split("train", config.data.train, config, lambda line: None)

    missing = job(tiny_model, tmp_path, uri("nowhere.jsonl"))
    with pytest.raises(DataError, match=r"^data file does not exist: s3://.*nowhere\.jsonl"):
        tokenize_split("train", missing.data.train, missing, lambda line: None)

    # A shard a worker cannot read (its object gone since the driver cut the file): a STOP row, whose message the
    # driver raises as the job's error, not Ray's traceback.
    (row,) = [row for _, _, row in shard_rows(Shard("jsonl", uri("gone.jsonl"), 0, None))]
    assert row.reason == STOP and row.detail.startswith("cannot read s3://") and "gone.jsonl" in row.detail


def test_questions_and_judge_prompts_read_from_s3(tmp_path, bucket):
    from tgdpo_ray.eval.judge import OUR_PROMPTS
    from tgdpo_ray.eval.questions import SHIPPED_QUESTIONS

    uri, s3 = bucket
    upload(s3, "questions.jsonl", SHIPPED_QUESTIONS.read_bytes())
    upload(s3, "judge.jsonl", OUR_PROMPTS.read_bytes())
    assert load_questions(uri("questions.jsonl")) == load_questions("shipped")
    assert load_prompts(uri("judge.jsonl")) == load_prompts("tgdpo-ray")

    upload(s3, "broken.jsonl", SHIPPED_QUESTIONS.read_bytes() + b"{not json\n")
    with pytest.raises(QuestionError, match=r"broken\.jsonl.*, line \d+: invalid_json"):
        load_questions(uri("broken.jsonl"))
    with pytest.raises(QuestionError, match="questions file does not exist: s3://"):
        load_questions(uri("absent.jsonl"))
