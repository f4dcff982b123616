"""Scaling benchmark: scoring throughput of one pool with 1, 2 and 4 replicas, and the time the trainers wait
for data in stream mode versus cache mode. Prints a table and writes bench/results/scaling.json.

On a 2-core machine the absolute numbers are small; the ratios are what matters (and 4 replicas on 2 cores
cannot beat 2: the table shows where the cores run out).

    .venv/bin/python bench/scaling.py [--pairs 512] [--hidden-size 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from tgdpo_ray.common.provenance import provenance

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
RESULTS = HERE / "results" / "scaling.json"


def job(model: str, data: Path, name: str, **sections) -> "JobConfig":  # noqa: F821
    from tgdpo_ray.config.loader import build_config

    raw = {"run": {"name": name, "output_dir": str(WORK / "runs"), "resume": False},
           "data": {"train": str(data), "max_length": 96, "max_prompt_length": 48},
           "loss": {"type": "dpo"},
           "training": {"epochs": 2, "learning_rate": 1e-4, "max_tokens_per_batch": 2048},
           "policy": {"model": model}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return build_config(raw)


def scorer_throughput(run_dir: Path) -> float:
    batches = [json.loads(line) for path in (run_dir / "scoring").glob("*.jsonl") for line in path.read_text().splitlines()]
    start = min(b["time"] - b["seconds"] for b in batches)
    return sum(b["pairs"] for b in batches) / (max(b["time"] for b in batches) - start)


def data_wait(run_dir: Path) -> tuple[float, float]:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "eval" not in s]
    return sum(s["data_wait_seconds"] for s in steps), sum(s["step_seconds"] for s in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import ray

    from tgdpo_ray.experiments.demo import make_demo_model, write_demo_data
    from tgdpo_ray.train.driver import run_score, run_train

    shutil.rmtree(WORK, ignore_errors=True)
    model = str(make_demo_model(str(WORK / "model"), hidden_size=args.hidden_size, layers=args.layers))
    data = write_demo_data(str(WORK / "data"), train_pairs=args.pairs, test_pairs=1)["train"]
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    quiet = lambda *_: None  # noqa: E731

    scoring = {}
    for attempt, replicas in enumerate((1, 1, 2, 4)):  # the first run warms things up; measured again after
        config = job(model, data, f"score-{attempt}", reference={"replicas": replicas, "batch_size": 16},
                     scoring={"mode": "cache", "cache_dir": str(WORK / f"cache-{attempt}")})
        run_score(config, log=quiet)
        scoring[replicas] = scorer_throughput(config.run_dir)
        print(f"scoring, {replicas} replica(s): {scoring[replicas]:.1f} pairs/s", flush=True)

    waits = {}
    for mode in ("stream", "cache"):
        # Cache mode reads what the scoring runs wrote: the same data, model and limits.
        config = job(model, data, f"train-{mode}", reference={"replicas": 1, "batch_size": 16},
                     scoring={"mode": mode, "cache_dir": str(WORK / "cache-1")})
        run_train(config, log=quiet)
        waits[mode] = data_wait(config.run_dir)
        print(f"training, {mode} mode: waited {waits[mode][0]:.1f}s for data in {waits[mode][1]:.1f}s of steps",
              flush=True)
    ray.shutdown()

    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"hidden_size": args.hidden_size, "layers": args.layers}, "pairs": args.pairs, "epochs": 2,
        "scoring_pairs_per_second": {str(k): round(v, 2) for k, v in scoring.items()},
        "scoring_speedup_2_vs_1": round(scoring[2] / scoring[1], 3),
        "scoring_speedup_4_vs_1": round(scoring[4] / scoring[1], 3),
        "data_wait_seconds": {mode: round(wait, 2) for mode, (wait, _) in waits.items()},
        "data_wait_share": {mode: round(wait / max(total, 1e-9), 3) for mode, (wait, total) in waits.items()},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "provenance": provenance(shlex.join(["python", "bench/scaling.py", *sys.argv[1:]]), runs_trained=len(waits)),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| measure | value |\n|---|---|")
    for replicas, speed in scoring.items():
        print(f"| scoring pairs/s, {replicas} replica(s) | {speed:.1f} ({speed / scoring[1]:.2f}x) |")
    for mode, (wait, total) in waits.items():
        print(f"| trainer data wait, {mode} mode | {wait:.1f}s of {total:.1f}s in steps ({wait / max(total, 1e-9):.0%}) |")
    print(f"\nwritten to {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
