"""The scored-pair cache: score once, train many epochs and many runs.

The reference and guidance log-probs of a pair are a pure function of the pair's token ids (which already
encode the dataset content, the tokenizer, the chat template and the length limits) and of the frozen models'
weights (whole files) and precision. The tokenization pass digests every kept pair's ids and tokens as it goes
(the driver never holds them); that digest and the scorers' identity make the fingerprint. Scored pairs live in
Parquet under `<cache_dir>/<fingerprint>/`, on any filesystem pyarrow knows (a local path, s3://, gs://, ...).

A cache folder counts only once its `_COMPLETE.json` marker exists, written last: a run that died while
writing leaves a folder that is never read as complete, and the next run replaces it.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import partial

from tgdpo_ray.common.files import resolve_filesystem
from tgdpo_ray.common.model_files import weights_identity
from tgdpo_ray.common.progress import every_few_seconds, time_left
from tgdpo_ray.config.job import SCORED_GUIDANCE, JobConfig
from tgdpo_ray.scoring.throughput import ScorerThroughput

CACHE_FORMAT = 2  # bump when the meaning of the cached columns changes
MARKER = "_COMPLETE.json"
CACHE_KEY = "cache_key"  # the column that sends each scored pair to its split's folder as the cache is written
# A cache of at most this many bytes is read by the driver itself: each of Ray Data's read tasks costs a process
# start, seconds that dwarf reading a few MB. Larger caches are read by Ray Data's tasks, never whole here.
DRIVER_READ_BYTES = 64 * 2**20
PROGRESS_EVERY = 20.0  # seconds between the lines of a split being scored into the cache


def scorer_identity(config: JobConfig) -> dict:
    """What the scored values depend on besides the token ids: each scorer's weights and the precision it
    runs in (resolved: a scorer without its own precision runs in the policy's)."""
    identity = {"format": CACHE_FORMAT}
    if config.needs_reference:
        identity["reference"] = [weights_identity(config.reference_model), config.scorer_precision(config.reference)]
    if config.guidance_kind in SCORED_GUIDANCE:
        identity["guidance"] = [weights_identity(config.guidance.model), config.scorer_precision(config.guidance),
                                config.guidance.source]
    return identity


def fingerprint(data_digest: str, identity: dict) -> str:
    """The cache key: the tokenized pairs' digest (data_pass.TokenizedSplit.digest: ids, tokens and any rewards
    that came with the data) and the scorers' identity."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    digest.update(data_digest.encode())
    return digest.hexdigest()[:24]


def is_complete(filesystem, folder: str) -> bool:
    from pyarrow import fs

    return filesystem.get_file_info(f"{folder}/{MARKER}").type == fs.FileType.File


def clear_partial(filesystem, folder: str, log=print) -> None:
    from pyarrow import fs

    if filesystem.get_file_info(folder).type != fs.FileType.NotFound:
        log(f"[cache] {folder} has no {MARKER}: a write that did not finish; scoring again")
        filesystem.delete_dir(folder)


def write_marker(filesystem, folder: str, record: dict) -> None:
    with filesystem.open_output_stream(f"{folder}/{MARKER}") as handle:
        handle.write(json.dumps(record, indent=2).encode())


def cached_scored_splits(splits: list, config: JobConfig, pad_id: int, log=print) -> list:
    """The scored pairs of tokenized splits (data_pass.TokenizedSplit), one dataset per split, read from the
    cache. The splits missing from it are scored first, all in one pass of the pools: each scorer loads its model
    once, not once per split."""
    from tgdpo_ray.runtime.ray_start import configure_ray_data

    configure_ray_data()
    identity = scorer_identity(config)
    filesystem, root = resolve_filesystem(config.scoring.cache_dir)
    keys = [fingerprint(split.digest, identity) for split in splits]
    missing = []
    for split, key in zip(splits, keys):
        where = f"{config.scoring.cache_dir}/{key}"
        if is_complete(filesystem, f"{root}/{key}"):
            log(f"[cache] {split.name}: {len(split)} scored pairs from {where} (no scorer starts)")
        else:
            clear_partial(filesystem, f"{root}/{key}", log)
            log(f"[cache] {split.name}: scoring {len(split)} pairs into {where}")
            missing.append((split, key))
    if missing:
        score_into_cache(missing, identity, filesystem, root, config, pad_id, log)
    # Read once into the object store (spilled to disk if large): later epochs start without read tasks.
    return [read_cache(filesystem, f"{root}/{key}") for key in keys]


def score_into_cache(missing: list, identity: dict, filesystem, root: str, config: JobConfig, pad_id: int, log):
    """Scores the `missing` splits, each given with its key, in one stream through the pools. Each pair carries
    its split's key in the CACHE_KEY column, by which Parquet's directory partitioning writes it into
    <root>/<key>/ (leaving the column out of the files; a file per block of the stream, a few hundred at most).
    Each folder's marker is written last."""
    from tgdpo_ray.scoring.pools import scored_dataset

    name = ", ".join(split.name for split, _ in missing)
    count = sum(len(split) for split, _ in missing)
    tagged = [split.pairs.map_batches(partial(with_cache_key, key=key), batch_format="pyarrow")
              for split, key in missing]
    started = time.perf_counter()
    watching = watch_scoring(config, name, count, log)
    try:
        every_split = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]  # Ray's union of one fails
        scored_dataset(every_split, count, config, pad_id).write_parquet(
            root, filesystem=filesystem, partition_cols=[CACHE_KEY], partitioning_flavor=None)
    finally:
        watching.set()
    seconds = time.perf_counter() - started
    for split, key in missing:
        write_marker(filesystem, f"{root}/{key}", {"pairs": len(split), "split": split.name, "fingerprint": key,
                                                    "scorers": identity, "seconds": seconds})
    log(f"[cache] {name}: scored in {seconds:.1f}s")


def with_cache_key(table, key: str):
    """A block of a split's pairs with the CACHE_KEY column: the split's folder name."""
    import pyarrow as pa

    return table.append_column(CACHE_KEY, pa.array([key] * len(table), type=pa.string()))


def watch_scoring(config: JobConfig, name: str, pairs: int, log):
    """A line every PROGRESS_EVERY seconds while splits (`name`: theirs) are scored into the cache: each pool's pairs
    so far, from the pools' batch logs in the run folder (silent on a cluster without a shared run folder), and the
    time left at the slowest pool's rate."""
    throughput = ScorerThroughput(config.run_dir)
    before = {pool: totals.pairs for pool, totals in throughput.read().items()}  # scored earlier in the run
    pools = ["reference"] * config.needs_reference + ["guidance"] * (config.guidance_kind in SCORED_GUIDANCE)

    def report(seconds: float) -> None:
        totals = throughput.read()
        done = {pool: (totals[pool].pairs if pool in totals else 0) - before.get(pool, 0) for pool in pools}
        slowest = min(done.values(), default=0)  # a pool that has not logged yet has scored none
        scored = ", ".join(f"{pool} {count}/{pairs}" for pool, count in sorted(done.items()))
        log(f"[cache] {name}: pairs scored: {scored}; {seconds:.0f} s so far {time_left(slowest, pairs, seconds)}"
            .rstrip())

    return every_few_seconds(report, PROGRESS_EVERY)


def read_cache(filesystem, folder: str):
    import pyarrow.parquet as pq
    import ray
    from pyarrow import fs

    files = filesystem.get_file_info(fs.FileSelector(folder))
    if sum(info.size for info in files if info.path.endswith(".parquet")) <= DRIVER_READ_BYTES:
        return ray.data.from_arrow(pq.read_table(folder, filesystem=filesystem))  # skips the _COMPLETE.json marker
    return ray.data.read_parquet(folder, filesystem=filesystem).materialize()
