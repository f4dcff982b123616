"""The data path at scale: the tokenization pass's throughput with 1 and 2 CPU workers, and the driver's peak memory
when a job trains a few steps on 100k and on 1M pairs. Writes bench/results/data_path.json.

Targets (issue 16): the driver's peak RSS does not grow with the number of pairs (within 20% from 100k to 1M),
and the pass is faster with 2 workers than with 1. Issue 34: the first optimizer step comes at most 60 s after
the end of tokenization at 1M pairs, and at most 1.5x the 100k figure.

The pairs are synthetic, of UltraFeedback-like lengths: long-tailed prompts (median 40 words) and answers
(median 100 words), up to about 2000 tokens a pair, written once to a local Parquet file under bench/.work/. The
tokenizer is the tiny model's byte-level BPE, trained on the same word list (8192 tokens, about 1.3 per word).
Each training run is its own process with its own local Ray, so that its peak RSS is its own.

    .venv/bin/python bench/data_path.py [--pairs 1000000] [--small 100000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tgdpo_ray.common.provenance import provenance

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "data_path"
RESULTS = HERE / "results" / "data_path.json"
ROWS_PER_GROUP = 5_000


def words(count: int, seed: int = 0) -> np.ndarray:
    """Pronounceable made-up words of 1-4 syllables."""
    rng = np.random.default_rng(seed)
    onsets, vowels, codas = list("bcdfghjklmnprstvwz") + ["st", "tr", "ch", "sh"], list("aeiou") + ["ea", "ou"], [
        "", "", "n", "r", "s", "t", "l", "nd"]
    return np.array(["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                             for _ in range(rng.integers(1, 5))) for _ in range(count)], dtype=object)


def texts(rng, vocabulary: np.ndarray, count: int, median_words: float, most_words: int) -> list[str]:
    lengths = np.minimum(rng.lognormal(np.log(median_words), 0.8, size=count).astype(int) + 1, most_words)
    picks = rng.integers(0, len(vocabulary), size=int(lengths.sum()))
    ends = np.cumsum(lengths)
    return [" ".join(vocabulary[picks[end - length: end]]) + "." for end, length in zip(ends, lengths)]


def write_pairs(path: Path, pairs: int, vocabulary: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string()), ("chosen", pa.string()),
                                           ("rejected", pa.string())])) as writer:
        for start in range(0, pairs, ROWS_PER_GROUP):
            count = min(ROWS_PER_GROUP, pairs - start)
            writer.write_table(pa.table({"prompt": texts(rng, vocabulary, count, 40, 600),
                                         "chosen": texts(rng, vocabulary, count, 100, 1000),
                                         "rejected": texts(rng, vocabulary, count, 100, 1000)}))


def job(model: str, data: Path, name: str, limit: int, workers: int | None = None) -> "JobConfig":  # noqa: F821
    from tgdpo_ray.config.loader import build_config

    return build_config({
        "run": {"name": name, "output_dir": str(WORK / "runs"), "resume": False},
        "data": {"train": {"path": str(data), "limit": limit}, "max_length": 2048, "max_prompt_length": 1024,
                 "tokenize": {"workers": workers, "shard_mib": 4}},  # a row group (about 8 MiB) a shard
        "loss": {"type": "dpo"},
        "training": {"epochs": 1, "learning_rate": 1e-4, "max_tokens_per_batch": 4096, "max_steps": 3,
                     "log_every": 1},
        "policy": {"model": model},
        "ray": {"num_cpus": 2},
    })


def train_few_steps(model: str, data: Path, pairs: int) -> dict:
    """In this process (started by main for each size): a job that tokenizes `pairs` pairs and trains 3 steps.
    first_step_after_tokenize_s: from the driver's line that ends the tokenization pass to the first optimizer
    step's record (its end; both wall-clock times of this machine): the ordering, the trainers' start, and the
    wait for the first scored pairs."""
    from tgdpo_ray.train.driver import run_train

    tokenized = []

    def log(line: str) -> None:
        if line.startswith("[data] train: ") and " tokenized in " in line:
            tokenized.append(time.time())
        print(line, flush=True)

    started = time.perf_counter()
    summary = run_train(job(model, data, f"train-{pairs}", pairs), log=log)
    run = WORK / "runs" / f"train-{pairs}"
    report = json.loads((run / "data_report.json").read_text())["train"]
    first_step = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    return {"pairs": report["rows_kept"], "steps": summary["steps"], "seconds": round(time.perf_counter() - started, 1),
            "tokenize_seconds": report["tokenize_seconds"],
            "first_step_after_tokenize_s": round(first_step["time"] - tokenized[0], 1),
            "first_step_data_wait_s": round(first_step["data_wait_seconds"], 1),
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def tokenize_throughput(model: str, data: Path, pairs: int) -> dict:
    """Pairs per second of the pass alone, with 1 and then 2 workers (after a warm-up that loads the tokenizer
    into the worker processes)."""
    import ray

    from tgdpo_ray.data.tokenize_pass import tokenize_split

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    quiet = lambda line: None  # noqa: E731
    warm = job(model, data, "warm", 2 * ROWS_PER_GROUP)
    tokenize_split("train", warm.data.train, warm, quiet)
    rates = {}
    for workers in (1, 2):
        config = job(model, data, f"tokenize-{workers}", pairs, workers)
        split = tokenize_split("train", config.data.train, config, quiet)
        rates[workers] = {"pairs": len(split), "seconds": round(split.seconds, 1),
                          "pairs_per_second": round(len(split) / split.seconds, 1),
                          "tokens": split.report()["tokens"]}
        print(f"[bench] tokenize {workers} worker(s): {rates[workers]['pairs_per_second']} pairs/s", flush=True)
    ray.shutdown()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--train-one", type=int, help=argparse.SUPPRESS)  # the child process of one training size
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data, model = WORK / f"pairs-{args.pairs}.parquet", WORK / "model"

    if args.train_one:
        print("RESULT " + json.dumps(train_few_steps(str(model), data, args.train_one)), flush=True)
        return

    vocabulary = words(6000)
    if not data.exists():
        started = time.perf_counter()
        write_pairs(data, args.pairs, vocabulary)
        print(f"[bench] wrote {args.pairs} pairs to {data} in {time.perf_counter() - started:.0f}s", flush=True)
    if not model.exists():
        from tgdpo_ray.modeling.tiny import make_tiny_model

        corpus = [" ".join(np.random.default_rng(seed).choice(vocabulary, 200)) for seed in range(2000)]
        make_tiny_model(str(model), corpus, vocab_size=8192)

    throughput = tokenize_throughput(str(model), data, args.small)
    runs = {}
    for pairs in (args.small, args.pairs):
        child = subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--train-one", str(pairs)],
                               capture_output=True, text=True)
        result = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not result:
            sys.exit(f"the training run on {pairs} pairs failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
        runs[pairs] = json.loads(result[0].removeprefix("RESULT "))
        print(f"[bench] {pairs} pairs: {runs[pairs]}", flush=True)

    small, large = runs[args.small], runs[args.pairs]
    results = {
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "data": {"pairs": args.pairs, "file_mib": round(data.stat().st_size / 2**20, 1),
                 "tokens_of_first_small": throughput[1]["tokens"]},
        "tokenize": {f"{workers}_workers": {k: v for k, v in rate.items() if k != "tokens"}
                     for workers, rate in throughput.items()},
        "tokenize_speedup_2_vs_1_workers": round(throughput[1]["seconds"] / throughput[2]["seconds"], 3),
        "training_runs": {str(pairs): run for pairs, run in runs.items()},
        "driver_peak_rss_ratio_1m_vs_100k": round(large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"], 3),
        "first_step_after_tokenize_ratio_1m_vs_100k": round(large["first_step_after_tokenize_s"]
                                                            / small["first_step_after_tokenize_s"], 3),
        # One training run per size, each in its own child process.
        "provenance": provenance(shlex.join(["python", "bench/data_path.py", *sys.argv[1:]]), runs_trained=len(runs)),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
