"""Cache mode: score once into <cache_dir>/<fingerprint>/, then train from it with no scorer at all."""

import json
from pathlib import Path

import pytest

from tgdpo_ray.cache import MARKER, fingerprint, scorer_identity, weights_identity
from tgdpo_ray.config import build_config
from tgdpo_ray.run import run_score, run_train


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, include_dashboard=False)
    yield ray
    ray.shutdown()


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
    return {json.loads(p.read_text())["role"] for p in (run_dir / "placement").glob("*.json")}


def test_score_then_train_from_the_cache(ray_cluster, tiny_model, demo_data, tmp_path):
    printed = []
    scored = run_score(job(tiny_model, demo_data, tmp_path, "score"), log=printed.append)
    assert scored["pairs"] == {"train": 64, "eval": 16}
    folders = sorted(p for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 2 and all((folder / MARKER).exists() for folder in folders)
    assert roles(tmp_path / "runs" / "score") == {"reference", "guidance"}

    printed.clear()
    config = job(tiny_model, demo_data, tmp_path, "train")
    summary = run_train(config, log=printed.append)
    assert sum("(no scorer starts)" in line for line in printed) == 2, printed
    assert roles(config.run_dir) == {"policy"}  # both epochs and the held-out set came from the cache
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["pairs"] for r in records if "eval" not in r) == 2 * 64
    assert summary["eval"]["pairs"] == 16


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


def test_the_fingerprint_covers_data_limits_and_weights(tiny_model, demo_data, tmp_path):
    from tgdpo_ray.models import load_tokenizer, make_tiny_model
    from tgdpo_ray.run import prepare_data

    base = job(tiny_model, demo_data, tmp_path, "x")
    _, train, _ = prepare_data(base)
    key = fingerprint(train.rows, scorer_identity(base))
    assert key == fingerprint(train.rows, scorer_identity(job(tiny_model, demo_data, tmp_path, "y")))

    _, shorter, _ = prepare_data(job(tiny_model, demo_data, tmp_path, "x", "data.max_length=20",
                                     "data.max_prompt_length=10"))
    assert fingerprint(shorter.rows, scorer_identity(base)) != key  # a length limit changes the token ids
    assert fingerprint(train.rows[:-1], scorer_identity(base)) != key  # so does the data content
    other = str(make_tiny_model(str(tmp_path / "other"), seed=7))
    assert weights_identity(other) != weights_identity(tiny_model)
    assert fingerprint(train.rows, scorer_identity(job(tiny_model, demo_data, tmp_path, "x",
                                                        f"guidance.model={other}"))) != key
    dpo = job(tiny_model, demo_data, tmp_path, "x", "loss.type=dpo")
    assert fingerprint(train.rows, scorer_identity(dpo)) != key  # dpo caches the reference alone
    assert load_tokenizer(tiny_model).pad_token_id is not None
