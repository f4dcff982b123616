"""Progress lines of long work: the time left, and a report on a timer."""

import time

from tgdpo_ray.common.progress import every_few_seconds, time_left


def test_time_left_is_at_the_rate_so_far():
    assert time_left(0, 10, 5.0) == ""  # nothing done: no rate yet
    assert time_left(2, 10, 30.0) == "ETA 2m00s"
    assert time_left(1, 100, 100.0) == "ETA 2h45m"
    assert time_left(9, 10, 9.0) == "ETA 1s"
    assert time_left(10, 10, 9.0) == "ETA 0s"


def test_a_timed_report_runs_until_stopped():
    seen = []
    stop = every_few_seconds(seen.append, every=0.05)
    time.sleep(0.5)
    stop.set()
    count = len(seen)
    time.sleep(0.2)
    assert count >= 3 and len(seen) <= count + 1  # it stops (one call may have been under way)
    assert seen == sorted(seen) and seen[0] >= 0.05


def test_cache_scoring_counts_each_pools_pairs_of_this_split(tmp_path, monkeypatch):
    import json

    import tgdpo_ray.scoring.cache as cache
    from tgdpo_ray.config.loader import build_config

    config = build_config({"run": {"name": "r", "output_dir": str(tmp_path)}, "data": {"train": "x.jsonl"},
                           "policy": {"model": "m"}, "loss": {"type": "dpo"}}, check_paths=False)
    logs = config.run_dir / "scoring"
    logs.mkdir(parents=True)

    def batch(path, pairs):  # one line as a scorer actor appends it per batch
        with open(path, "a") as handle:
            handle.write(json.dumps({"time": time.time(), "pairs": pairs, "tokens": 10 * pairs, "seconds": 0.5}) + "\n")

    batch(logs / "reference-1.jsonl", 16)  # the held-out split, scored before
    monkeypatch.setattr(cache, "PROGRESS_EVERY", 0.05)
    seen = []
    stop = cache.watch_scoring(config, "train", 64, seen.append)
    time.sleep(0.3)
    batch(logs / "reference-1.jsonl", 8)
    batch(logs / "reference-2.jsonl", 8)  # a second actor of the pool
    time.sleep(0.3)
    stop.set()
    assert seen[0].startswith("[cache] train: pairs scored: reference 0/64; ") and "ETA" not in seen[0]
    assert seen[-1].startswith("[cache] train: pairs scored: reference 16/64; ") and " ETA " in seen[-1]
