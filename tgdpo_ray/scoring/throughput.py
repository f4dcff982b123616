"""How fast each scorer pool delivers, read back from the pools' batch logs (<run_dir>/scoring/<pool>-<pid>.jsonl,
one line per batch an actor scored: pools.py writes them). The trainers log it per step, the cache's progress
lines count from it, and `report` plots it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tgdpo_ray.common.run_dir import RunDir


@dataclass
class PoolTotals:
    """What one scorer pool has delivered, from its batch log lines ({time, pairs, tokens, seconds} each)."""

    pairs: int = 0
    start: float = math.inf  # the earliest batch's start
    end: float = -math.inf  # the latest batch's end
    busy_seconds: float = 0.0  # the pool's actors' own compute time, summed

    def add(self, batch: dict) -> None:
        self.pairs += batch["pairs"]
        self.start = min(self.start, batch["time"] - batch["seconds"])
        self.end = max(self.end, batch["time"])
        self.busy_seconds += batch["seconds"]

    @property
    def pairs_per_second(self) -> float:
        """Over the pool's span, from its first batch's start to its last batch's end."""
        return self.pairs / max(self.end - self.start, 1e-9)

    @property
    def pairs_per_busy_second(self) -> float:
        return self.pairs / max(self.busy_seconds, 1e-9)


class ScorerThroughput:
    """Each scorer pool's totals so far, from the pools' batch logs (<run_dir>/scoring/<pool>-<pid>.jsonl).
    Reads only the lines added since the last call: the cost per logged step stays flat over a long run."""

    def __init__(self, run_dir: Path):
        self.folder = RunDir(run_dir).scoring
        self.offsets: dict[Path, int] = {}
        self.pools: dict[str, PoolTotals] = {}

    def read(self) -> dict[str, PoolTotals]:
        for path in sorted(self.folder.glob("*.jsonl")):
            with open(path) as handle:
                handle.seek(self.offsets.get(path, 0))
                lines = handle.readlines()
            complete = [line for line in lines if line.endswith("\n")]  # a line being written waits
            self.offsets[path] = self.offsets.get(path, 0) + sum(len(line.encode()) for line in complete)
            pool = self.pools.setdefault(path.name.split("-")[0], PoolTotals())
            for batch in map(json.loads, complete):
                pool.add(batch)
        return self.pools

    def __call__(self) -> dict[str, float]:
        """The step record's fields: <pool>_pairs_per_second of every pool that has scored."""
        return {f"{name}_pairs_per_second": pool.pairs_per_second for name, pool in self.read().items()
                if pool.pairs}
