"""Cache mode: score once into <cache_dir>/<fingerprint>/, then train from it with no scorer at all."""

import json
import os
import re
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from conftest import planned_step_ids, trained_pair_ids
from tgdpo_ray.common.files import resolve_filesystem
from tgdpo_ray.common.model_files import weights_identity
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.scoring.cache import MARKER, fingerprint, scorer_identity
from tgdpo_ray.train.driver import epoch_orders, prepare_data, run_score, run_train, training_stream


def job(tiny_model, demo_data, root: Path, name: str, *overrides: str):
    raw = {
        "run": {"name": name, "output_dir": str(root / "runs")},
        "data": {"train": {"path": str(demo_data["train"]), "limit": 64},
                 "eval": {"path": str(demo_data["test"]), "limit": 16}, "max_length": 64, "max_prompt_length": 32},
        "loss": {"type": "tgdpo"},
        "training": {"epochs": 2, "learning_rate": 1e-3, "max_tokens_per_batch": 1024},
        "policy": {"model": tiny_model},
        "guidance": {"model": tiny_model},
        "scoring": {"mode": "cache", "cache_dir": str(root / "cache")},
    }
    return build_config(raw, overrides=list(overrides))


def roles(run_dir: Path) -> set:
    """The roles of the processes a run started besides the tokenization pass's CPU tasks (which every run has)."""
    found = {json.loads(p.read_text())["role"] for p in (run_dir / "placement").glob("*.json")}
    assert "tokenize" in found
    return found - {"tokenize"}


def test_score_then_train_from_the_cache(ray_cluster, tiny_model, demo_data, tmp_path, monkeypatch):
    import tgdpo_ray.scoring.cache

    monkeypatch.setattr(tgdpo_ray.scoring.cache, "PROGRESS_EVERY", 0.5)
    printed = []
    scored = run_score(job(tiny_model, demo_data, tmp_path, "score"), log=printed.append)
    assert scored["pairs"] == {"train": 64, "eval": 16}
    # Both splits are scored in one pass of the pools: each scorer loaded its model once.
    assert [line for line in printed if "scored in" in line] == [
        next(line for line in printed if line.startswith("[cache] train, eval: scored in "))]
    assert len(list((tmp_path / "runs" / "score" / "placement").glob("reference-*.json"))) == 1
    # While they are scored, a line every PROGRESS_EVERY seconds: each pool's pairs so far (the count itself:
    # tests/test_progress.py), and the time left once a batch is in.
    progress = [line for line in printed if line.startswith("[cache] train, eval: pairs scored: ")]
    assert progress and all(re.fullmatch(r"\[cache\] train, eval: pairs scored: guidance \d+/80, reference \d+/80; "
                                         r"\d+ s so far( ETA \d+s)?", line) for line in progress), printed
    # Each split in its own folder, complete, with its own pairs.
    folders = sorted(p for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 2 and all((folder / MARKER).exists() for folder in folders)
    assert sorted(json.loads((folder / MARKER).read_text())["pairs"] for folder in folders) == [16, 64]
    assert sorted(pq.read_table(folder).num_rows for folder in folders) == [16, 64]
    assert roles(tmp_path / "runs" / "score") == {"reference", "guidance"}

    # Trained while its one worker holds every CPU of the cluster (the pools would hold none): a stream that still
    # had a task to run (a sort, a block cut) would wait forever. The cached pairs are sorted and cut into blocks
    # before the trainer starts.
    printed.clear()
    every_cpu = ray_cluster.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60  # the scorer pools above give their CPUs back as their actors end
    while ray_cluster.available_resources().get("CPU", 0) < every_cpu and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == every_cpu, "a process of an earlier test holds a CPU"
    config = job(tiny_model, demo_data, tmp_path, "train", f"policy.cpus_per_worker={every_cpu}",
                 "reference.cpus_per_replica=0", "guidance.cpus_per_replica=0")
    summary = run_train(config, log=printed.append)
    assert sum("(no scorer starts)" in line for line in printed) == 2, printed
    assert roles(config.run_dir) == {"policy"}  # both epochs and the held-out set came from the cache
    assert trained_pair_ids(config.run_dir) == {0: list(range(64)), 1: list(range(64))}
    # Cached pairs are sorted into each epoch's order: the same steps as streamed pairs would make.
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    for epoch in (0, 1):
        assert [r["pair_ids"] for r in records if r.get("epoch") == epoch and "eval" not in r] == \
            planned_step_ids(config, epoch)
    assert summary["eval"]["pairs"] == 16

    # The stream's blocks: one scorer batch (reference.batch_size 16) first, then twice as many each time, up
    # to rows / STREAM_BLOCKS (16 held-out + 2 x 64 training pairs, over 2 here).
    monkeypatch.setattr("tgdpo_ray.scoring.pools.STREAM_BLOCKS", 2)
    pad_id, train, held_out = prepare_data(config, log=printed.append)
    stream = training_stream(train, held_out, epoch_orders(train, config), 0, config, pad_id, printed.append)
    blocks = [meta.num_rows for bundle in stream.iter_internal_ref_bundles() for meta in bundle.metadata]
    assert blocks == [16, 32, 64, 32]
    assert [row["part"] for row in stream.take_all()] == [-1] * 16 + [0] * 64 + [1] * 64
    # Past the small head, the sort's partitions (BLOCKS_PER_PARTITION full blocks each) are cut into full
    # blocks: 144 rows over 8 make full blocks of 18, in partitions of 36.
    monkeypatch.setattr("tgdpo_ray.scoring.pools.STREAM_BLOCKS", 8)
    monkeypatch.setattr("tgdpo_ray.scoring.pools.BLOCKS_PER_PARTITION", 2)
    stream = training_stream(train, held_out, epoch_orders(train, config), 0, config, pad_id, printed.append)
    blocks = [meta.num_rows for bundle in stream.iter_internal_ref_bundles() for meta in bundle.metadata]
    assert blocks == [16] + [18] * 7 + [2]
    rows, orders = stream.take_all(), epoch_orders(train, config)
    assert [row["part"] for row in rows] == [-1] * 16 + [0] * 64 + [1] * 64
    assert [row["pair_id"] for row in rows] == held_out.pair_ids.tolist() + [
        int(pair_id) for order in orders for pair_id in train.pair_ids[order]]


def test_a_half_written_cache_is_never_read(ray_cluster, tiny_model, demo_data, tmp_path):
    # The cache named by a URI goes through pyarrow's filesystem layer, as s3:// or gs:// would.
    uri = f"scoring.cache_dir=file://{tmp_path / 'cache'}"
    run_score(job(tiny_model, demo_data, tmp_path, "first", uri, "data.eval=null"))
    (train_folder,) = (tmp_path / "cache").iterdir()
    (train_folder / MARKER).unlink()  # as if the writer died before finishing
    printed = []
    run_score(job(tiny_model, demo_data, tmp_path, "again", uri, "data.eval=null"), log=printed.append)
    assert any("a write that did not finish" in line for line in printed)
    assert (train_folder / MARKER).exists()
    assert roles(tmp_path / "runs" / "again") == {"reference", "guidance"}


def test_the_fingerprint_covers_everything_the_scores_depend_on(ray_cluster, tiny_model, demo_data, tmp_path):
    """Each change below changes the scored values; drop any of them from the fingerprint and this fails."""
    from tgdpo_ray.data.preference import tokenize_pair
    from tgdpo_ray.data.tokenize_pass import tokenize_split, tokenizer_args
    from tgdpo_ray.experiments.demo import make_demo_model
    from tgdpo_ray.modeling.loading import load_tokenizer
    from tgdpo_ray.modeling.tiny import CHATML_TEMPLATE

    other = str(make_demo_model(str(tmp_path / "other"), seed=7))
    copy = shutil.copytree(tiny_model, tmp_path / "copy")

    digests = {}  # one tokenization pass per distinct data, tokenizer and template

    def key(*overrides: str) -> str:
        config = job(tiny_model, demo_data, tmp_path, "x", *overrides)
        data = json.dumps([config.data.model_dump(mode="json"), tokenizer_args(config), config.guidance_kind])
        if data not in digests:
            digests[data] = tokenize_split("train", config.data.train, config, log=lambda line: None).digest
        return fingerprint(digests[data], scorer_identity(config))

    base = key()
    assert key("run.name=y") == base  # where a run writes is not what it scores
    assert key("data.tokenize.shard_mib=0.002") == base  # nor how many workers tokenize it
    template_file = tmp_path / "template.jinja"
    template_file.write_text(CHATML_TEMPLATE)  # the tiny model's own
    assert key(f"data.chat_template={template_file}") == base
    template_file.write_text(CHATML_TEMPLATE.replace("\n", ":\n"))
    assert key(f"guidance.model={copy}") == base  # weights are known by their content, not their folder
    lines = demo_data["train"].read_text().splitlines()
    pair = json.loads(lines[3])
    pair["chosen"] += " indeed"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines[:3] + [json.dumps(pair)] + lines[4:]) + "\n")
    # Rewards that come with the data (guidance.source: column) are part of what a cached pair holds.
    config = job(tiny_model, demo_data, tmp_path, "x")
    tokenizer = load_tokenizer(tiny_model)
    rewarded = []
    for line in lines[:64]:
        row = json.loads(line)
        tokens, _ = tokenize_pair(tokenizer, row, config.data)
        rewarded.append(dict(row, chosen_token_rewards=[0.5] * len(tokens["chosen_ids"]),
                             rejected_token_rewards=[-0.5] * len(tokens["rejected_ids"])))
    with_rewards = tmp_path / "rewarded.jsonl"
    with_rewards.write_text("".join(json.dumps(row) + "\n" for row in rewarded))
    rewarded[5]["chosen_token_rewards"][0] = 0.25
    other_rewards = tmp_path / "rewarded-other.jsonl"
    other_rewards.write_text("".join(json.dumps(row) + "\n" for row in rewarded))
    rewarded_base = key(f"data.train.path={with_rewards}", "guidance.source=column")
    changes = {
        "data content": key(f"data.train.path={edited}"),
        "tokenizer": key(f"policy.model={other}", f"reference.model={tiny_model}"),
        "chat template": key("data.chat_template=" + json.dumps(CHATML_TEMPLATE.replace("<|im_start|>", "<|im_end|>"))),
        "chat template file's content": key(f"data.chat_template={template_file}"),
        # Length limits reach the scores through the token ids they cut.
        "max_length": key("data.max_length=20", "data.max_prompt_length=10"),
        "max_prompt_length": key("data.max_length=20", "data.max_prompt_length=6"),
        "reference weights": key(f"reference.model={other}"),
        "guidance weights": key(f"guidance.model={other}"),
        "reference precision": key("reference.precision=bf16"),
        "guidance precision": key("guidance.precision=bf16"),
        "policy precision (the scorers' default)": key("policy.precision=bf16"),
        "guidance source": key("guidance.source=token_reward_model"),
        "dpo scores the reference alone": key("loss.type=dpo"),
        "token rewards from the data": key(f"data.train.path={other_rewards}", "guidance.source=column"),
    }
    unchanged = [what for what, changed in changes.items() if changed in (base, rewarded_base)]
    assert not unchanged, f"the fingerprint ignores: {unchanged}"
    assert len(set(changes.values())) == len(changes)


def write_three_tensors(folder: Path, middle: float) -> Path:
    """A safetensors file of three 1.2 MiB tensors: its first and last MiB hold only the outer two."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"a_embed": torch.zeros(315_000), "b_layer": torch.full((315_000,), middle),
               "c_head": torch.ones(315_000)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder / "model.safetensors"


def test_weights_identity_hashes_whole_files(tmp_path, monkeypatch):
    """A guidance model retrained with frozen embeddings changes only its middle tensors: a new identity."""
    weights = write_three_tensors(tmp_path / "model", middle=0.0)
    assert weights.stat().st_size > 3 * 2**20
    first = weights_identity(str(tmp_path / "model"))
    write_three_tensors(tmp_path / "changed", middle=1.0)
    assert weights_identity(str(tmp_path / "changed")) != first

    # Retrained into the same folder: the new contents are read again (the memo is keyed by size and mtime).
    write_three_tensors(tmp_path / "model", middle=2.0)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a real retrain ends seconds later
    retrained = weights_identity(str(tmp_path / "model"))
    assert retrained not in (first, weights_identity(str(tmp_path / "changed")))

    # Unchanged files are hashed once per process.
    opened = []
    monkeypatch.setattr("tgdpo_ray.scoring.cache.open", lambda *args: opened.append(args) or open(*args), raising=False)
    assert weights_identity(str(tmp_path / "model")) == retrained
    assert opened == []


def test_a_small_cache_is_read_by_the_driver_and_a_large_one_by_ray_data(ray_cluster, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tgdpo_ray.scoring import cache

    folder = tmp_path / "cache"
    folder.mkdir()
    table = pa.table({"pair_id": list(range(10)), "ref_chosen_logps": [[0.5 * i] for i in range(10)]})
    pq.write_table(table.slice(0, 6), folder / "a.parquet")
    pq.write_table(table.slice(6), folder / "b.parquet")
    (folder / MARKER).write_text("{}")  # not data: neither reader may take it for a file of pairs
    filesystem, root = resolve_filesystem(str(folder))
    small = cache.read_cache(filesystem, root)
    monkeypatch.setattr(cache, "DRIVER_READ_BYTES", 0)
    large = cache.read_cache(filesystem, root)
    rows = [sorted(dataset.take_all(), key=lambda row: row["pair_id"]) for dataset in (small, large)]
    assert rows[0] == rows[1] and [row["pair_id"] for row in rows[0]] == list(range(10))
    assert list(rows[0][3]["ref_chosen_logps"]) == [1.5]
