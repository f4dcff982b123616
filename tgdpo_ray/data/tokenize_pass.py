"""The tokenization pass: a job's preference data read, validated and tokenized by Ray Data tasks on CPU workers.

The driver cuts each source into shards and reads no row itself: byte ranges of a .jsonl file that each start
a line (their first line numbers come from a counting pass on the workers), runs of a Parquet file's row groups
(from its footer). Two kinds of source cannot be read in parts, so the driver opens them and ships slices
through Ray's object store: a .json list (one document) and a datasets.Dataset (memory-mapped).

Each task reads its shard and runs data.prepare_row on every row, with a tokenizer loaded once per worker
process; the tokens stay in Ray's object store. The driver collects, per pair, its id and three token counts,
plus the bad rows' notes and an order-free digest of all that was kept: counts and lengths, never tokens. It
goes over those notes in the source's order, so data.bad_rows behaves as in data.prepare_pairs: under `error`
the first bad row stops the job (before any scorer or trainer starts), naming its file and 1-based line or row.

A pair's id is its position in its source, whichever task read it: resume, the score cache and the per-step
pair ids see the same ids however many workers tokenize.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.files import file_name, file_size, parquet_file
from tgdpo_ray.common.progress import every_few_seconds, time_left
from tgdpo_ray.common.jsonl import append_records, line_starts, read_records, text_lines
from tgdpo_ray.config.job import DataSection, DataSource, JobConfig, RewardColumns, TokenizeSection
from tgdpo_ray.data.preference import (BadRow, DataError, RowTally, check_data_file, iter_arrow, iter_json_items,
                                       iter_jsonl, load_hf_dataset, prepare_row, read_json_list, unit_of)
from tgdpo_ray.kernels.batches import score_columns
from tgdpo_ray.modeling.loading import load_tokenizer
from tgdpo_ray.runtime.placement import record_placement
from tgdpo_ray.runtime.ray_start import configure_ray_data

TOKEN_COLUMNS = ("pair_id", "prompt_ids", "chosen_ids", "rejected_ids")
REWARD_COLUMNS = score_columns("guidance", "rewards")  # token rewards that came with the data (guidance: column)
# The bad_reason of a note that stops the job whatever data.bad_rows says; its detail is the message.
STOP = "stop"
# What the driver reads of every row: no tokens.
NOTE_COLUMNS = ("pair_id", "number", "prompt_length", "chosen_length", "rejected_length", "truncated",
                "bad_reason", "bad_detail", "digest_high", "digest_low")


@dataclass(frozen=True)
class Shard:
    """A part of a source that one task reads. Rows of all kinds are numbered from `first_index` (their pair
    ids); a .jsonl range also knows its first physical line, for messages."""

    kind: str  # jsonl | parquet | json | arrow
    path: str
    first_index: int
    limit: Optional[int]  # the source's limit: rows from this pair id on are not read
    start: int = 0  # jsonl: the byte range
    end: Optional[int] = None
    first_line: int = 1
    row_groups: tuple[int, ...] = ()  # parquet
    items: Any = None  # json, arrow: an object reference to the slice's items or Arrow table


def shard_rows(shard: Shard) -> Iterator[tuple[int, int, dict | BadRow]]:
    """(pair id, line or row number, row as read) of every row of a shard, up to the source's limit. A file that
    cannot be read here (object storage without this node's credentials, a file gone) ends the rows with a STOP
    row: the driver stops the job with its message instead of Ray's traceback."""
    try:
        if shard.kind == "jsonl":
            rows = iter_jsonl(shard.path, shard.start, shard.end, shard.first_line)
        elif shard.kind == "parquet":
            rows = iter_arrow(parquet_file(shard.path).read_row_groups(list(shard.row_groups)).to_batches(),
                              number=shard.first_index)
        else:
            import ray

            items = ray.get(shard.items)
            rows = (iter_json_items(items, number=shard.first_index) if shard.kind == "json"
                    else iter_arrow(items.to_batches(), number=shard.first_index))
        for index, (_unit, number, row) in enumerate(rows, start=shard.first_index):
            if shard.limit is not None and index >= shard.limit:
                return
            yield index, number, row
    except OSError as err:
        yield shard.first_index, shard.first_line, BadRow(STOP, f"cannot read {shard.path}: {err}")


# ---------------------------------------------------------------- cutting sources into shards


def placement(section: TokenizeSection) -> dict:
    """Ray options of the pass's tasks (data.tokenize)."""
    return dict(num_cpus=section.cpus_per_worker, resources=section.resources or None,
                label_selector=section.node_labels or None)


def make_shards(source: DataSource, section: TokenizeSection) -> list[Shard]:
    """The shards of a source (a local path or a URI: common/files.py)."""
    path, shard_bytes = os.path.expanduser(source.path), int(section.shard_mib * 2**20)
    name = file_name(path)
    check_data_file(source)
    if name.endswith(".jsonl"):
        return jsonl_shards(path, shard_bytes, source.limit, placement(section))
    if name.endswith(".parquet"):
        return parquet_shards(path, shard_bytes, source.limit)
    if name.endswith(".json"):
        items = read_json_list(path)[: source.limit]
        return sliced_shards("json", path, items, len(items), shard_bytes, file_size(path))
    dataset = load_hf_dataset(source).with_format("arrow")  # a slice of it is an Arrow table
    count = min(len(dataset), source.limit or len(dataset))
    size = dataset.data.nbytes * count // max(len(dataset), 1)
    return sliced_shards("arrow", path, dataset, count, shard_bytes, size)


def jsonl_shards(path: str, shard_bytes: int, limit: Optional[int], options: dict) -> list[Shard]:
    """Byte ranges that start lines; when there are several, the workers count each range's lines and rows
    first, so that every range knows its first line number and pair id."""
    import ray

    starts = line_starts(path, shard_bytes)
    ranges = list(zip(starts, starts[1:] + [None]))
    count = ray.remote(count_lines).options(**options)
    counts = [(0, 0)] if len(ranges) == 1 else ray.get([count.remote(path, *span) for span in ranges])
    shards, first_line, first_index = [], 1, 0
    for (start, end), (lines, rows) in zip(ranges, counts):
        if limit is not None and first_index >= limit:
            break
        shards.append(Shard("jsonl", path, first_index, limit, start, end, first_line))
        first_line, first_index = first_line + lines, first_index + rows
    return shards


def count_lines(path: str, start: int, end: Optional[int]) -> tuple[int, int]:
    """(physical lines, non-blank lines) of a byte range, counted as data.iter_jsonl reads them."""
    lines = rows = 0
    for line in text_lines(path, start, end):
        lines += 1
        rows += bool(line.strip())
    return lines, rows


def parquet_shards(path: str, shard_bytes: int, limit: Optional[int]) -> list[Shard]:
    """Runs of row groups of about shard_bytes (uncompressed, as the footer gives it)."""
    metadata = parquet_file(path).metadata
    shards, groups, size, first_index, rows = [], [], 0, 0, 0
    for group in range(metadata.num_row_groups):
        if limit is not None and first_index + rows >= limit:
            break
        groups.append(group)
        size += metadata.row_group(group).total_byte_size
        rows += metadata.row_group(group).num_rows
        if size >= shard_bytes:
            shards.append(Shard("parquet", path, first_index, limit, row_groups=tuple(groups)))
            groups, size, first_index, rows = [], 0, first_index + rows, 0
    if groups:
        shards.append(Shard("parquet", path, first_index, limit, row_groups=tuple(groups)))
    return shards


def sliced_shards(kind: str, path: str, items, count: int, shard_bytes: int, total_bytes: int) -> list[Shard]:
    """Slices of a list or an Arrow table held here, put in the object store: the workers read them there."""
    import ray

    per_shard = max(1, int(count * shard_bytes / max(total_bytes, 1)))
    return [Shard(kind, path, first, None, items=ray.put(items[first: min(first + per_shard, count)]))
            for first in range(0, max(count, 1), per_shard)]


# ---------------------------------------------------------------- the workers' side


@functools.lru_cache(maxsize=4)
def worker_tokenizer(model: str, trust_remote_code: bool, chat_template: Optional[str]):
    """One tokenizer per worker process and model, loaded on its first shard."""
    return load_tokenizer(model, trust_remote_code, chat_template)


def tokenize_shards(batch: dict, shards: list[Shard], data: DataSection, tokenizer_args: tuple,
                    reward_columns: Optional[RewardColumns], chosen_only: bool, run_dir: str, progress: str):
    """A Ray Data map_batches function: every row of the shards named by `batch["id"]`, as one Arrow table of
    tokens (empty for a bad row) and notes."""
    import pyarrow as pa

    record_placement(run_dir, "tokenize")
    rewards = REWARD_COLUMNS if reward_columns else ()
    columns: dict[str, list] = {name: [] for name in (*TOKEN_COLUMNS, *NOTE_COLUMNS, *rewards)}
    for shard_index in batch["id"]:
        rows_before = len(columns["pair_id"])
        for index, number, row in shard_rows(shards[int(shard_index)]):
            try:
                tokens, truncated = prepare_row(worker_tokenizer(*tokenizer_args), row, data, reward_columns,
                                                chosen_only)
                bad = ("", "")
            except BadRow as err:
                tokens, truncated, bad = {}, False, (err.reason, err.detail)
            except UserError as err:  # no row can pass (a chat template, a tokenizer): Ray would lose the message
                tokens, truncated, bad = {}, False, (STOP, str(err))
            ids = [np.asarray(tokens.get(name, ()), dtype=np.int32) for name in TOKEN_COLUMNS[1:]]
            values = [np.asarray(tokens.get(name, ()), dtype=np.float32) for name in rewards]
            digest = row_digest(index, ids + values) if not bad[0] else (0, 0)
            record = {"pair_id": index, **dict(zip(TOKEN_COLUMNS[1:], ids)), "number": number,
                      "prompt_length": len(ids[0]), "chosen_length": len(ids[1]), "rejected_length": len(ids[2]),
                      "truncated": truncated, "bad_reason": bad[0], "bad_detail": bad[1],
                      "digest_high": digest[0], "digest_low": digest[1], **dict(zip(rewards, values))}
            for name, value in record.items():
                columns[name].append(value)
        append_records(Path(progress) / f"{os.getpid()}.jsonl", [{"rows": len(columns["pair_id"]) - rows_before}])
    types = {"prompt_ids": pa.list_(pa.int32()), "chosen_ids": pa.list_(pa.int32()),
             "rejected_ids": pa.list_(pa.int32()), "digest_high": pa.uint64(), "digest_low": pa.uint64(),
             **{name: pa.list_(pa.float32()) for name in rewards}}
    return pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})


def row_digest(pair_id: int, arrays: list[np.ndarray]) -> tuple[int, int]:
    """128 bits of a kept pair (its id, token ids and data rewards), as two integers the driver sums."""
    digest = hashlib.blake2b(str(pair_id).encode(), digest_size=16)
    for array in arrays:
        digest.update(len(array).to_bytes(8, "little"))
        digest.update(array.tobytes())
    value = digest.digest()
    return int.from_bytes(value[:8], "little"), int.from_bytes(value[8:], "little")


def kept_pairs(table, columns: tuple[str, ...]):
    """The kept rows' token columns (a map_batches function over the pass's tables)."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["bad_reason"], "")).select(list(columns))


# ---------------------------------------------------------------- the driver's side


@dataclass
class TokenizedSplit:
    """One source after the pass: its kept pairs in Ray's object store, and what the driver knows of them."""

    name: str  # train | eval
    pairs: Any  # a Ray dataset of the kept pairs' token columns, by pair id
    pair_ids: np.ndarray  # ascending
    lengths: np.ndarray  # [pairs, 3]: prompt, chosen and rejected tokens, in the order of pair_ids
    digest: str  # of every kept pair's id, tokens and data rewards, whatever the order the workers finished in
    tally: RowTally
    seconds: float

    def __len__(self) -> int:
        return len(self.pair_ids)

    def report(self) -> dict:
        prompt, chosen, rejected = (int(total) for total in self.lengths.sum(axis=0))
        longest = int((self.lengths[:, 0] + self.lengths[:, 1:].max(axis=1)).max())
        return {**self.tally.report(), "tokens": {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                                  "longest_pair": longest},
                "tokenize_seconds": round(self.seconds, 2)}


def watch_progress(folder: Path, name: str, shards: int, log, every: float = 20.0) -> threading.Event:
    """A line every `every` seconds from the shards' records in `folder`, until the returned event is set (a long
    pass says how far it is; on a cluster without a shared run folder it stays silent)."""
    def report(seconds: float) -> None:
        done = [record for path in folder.glob("*.jsonl") for record in read_records(path)]
        log(f"[data] {name}: {len(done)}/{shards} shards tokenized, {sum(r['rows'] for r in done)} rows, "
            f"{seconds:.0f} s so far {time_left(len(done), shards, seconds)}".rstrip())

    return every_few_seconds(report, every)


def tokenizer_args(config: JobConfig) -> tuple:
    """What the workers load their tokenizer from; a chat template file is read here, where its path is known."""
    template = config.data.chat_template
    if template and os.path.isfile(template):
        template = Path(template).read_text()
    return config.policy.model, config.policy.trust_remote_code, template


def tokenize_split(name: str, source: DataSource, config: JobConfig, log=print) -> TokenizedSplit:
    """Runs the pass over one source (Ray must be started) and checks its rows in the source's order."""
    started = time.perf_counter()
    rewards = config.guidance.reward_columns if config.guidance_kind == "column" else None
    passed = run_pass(name, source, config, rewards, log)
    tally = RowTally(source.path, config.data.bad_rows)
    pair_ids, lengths, digest = read_notes(passed, tally, unit_of(source))
    tally.finish(log)
    columns = TOKEN_COLUMNS + (REWARD_COLUMNS if rewards else ())
    pairs = passed.map_batches(partial(kept_pairs, columns=columns), batch_format="pyarrow", batch_size=None)
    split = TokenizedSplit(name, pairs, pair_ids, lengths, digest, tally, time.perf_counter() - started)
    log(f"[data] {name}: {len(split)} pairs of {tally.total} rows tokenized in {split.seconds:.1f}s")
    return split


def run_pass(name: str, source: DataSource, config: JobConfig, rewards: Optional[RewardColumns], log):
    """The source's rows tokenized into Ray's object store, with their notes (a materialized Ray dataset)."""
    import ray
    from ray.data import TaskPoolStrategy

    configure_ray_data()  # in the source's order: the first bad row is the first the driver sees
    section = config.data.tokenize
    try:
        shards = make_shards(source, section)
    except OSError as err:  # no access, no answer: one line naming the source
        raise DataError(f"cannot read {source.path}: {err}") from None
    log(f"[data] {name}: tokenizing {source.path} in {len(shards)} shard(s) on "
        f"{section.workers or 'up to all free'} CPU worker(s)")
    progress = config.run_dir / "tokenize" / name
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir(parents=True)
    watching = watch_progress(progress, name, len(shards), log)
    try:
        return ray.data.range(len(shards), override_num_blocks=len(shards)).map_batches(
            partial(tokenize_shards, shards=shards, data=config.data, tokenizer_args=tokenizer_args(config),
                    reward_columns=rewards, chosen_only=config.loss.type == "sft", run_dir=str(config.run_dir),
                    progress=str(progress)),
            batch_size=1, batch_format="numpy", compute=TaskPoolStrategy(size=section.workers),
            **placement(section),
        ).materialize()
    finally:
        watching.set()


def read_notes(passed, tally: RowTally, unit: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(kept pair ids, their [prompt, chosen, rejected] lengths, the digest) from the pass's notes, read in the
    source's order into `tally` (which raises at the first bad row under bad_rows: error)."""
    ids, lengths, sums = [], [], np.zeros(2, dtype=np.uint64)
    for notes in passed.select_columns(list(NOTE_COLUMNS)).iter_batches(batch_size=65536, batch_format="numpy"):
        bad = notes["bad_reason"] != ""
        for row in np.flatnonzero(bad):
            reason, detail = str(notes["bad_reason"][row]), str(notes["bad_detail"][row])
            if reason == STOP:
                raise DataError(detail)
            tally.bad(unit, int(notes["number"][row]), reason, detail)
        kept = ~bad
        tally.total += len(bad)
        tally.kept += int(kept.sum())
        tally.truncated += int(notes["truncated"][kept].sum())
        ids.append(notes["pair_id"][kept])
        lengths.append(np.stack([notes[f"{side}_length"][kept] for side in ("prompt", "chosen", "rejected")], 1))
        sums += np.array([notes["digest_high"][kept].sum(), notes["digest_low"][kept].sum()], dtype=np.uint64)
    pair_ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, dtype=np.int64)
    digest = hashlib.sha256(pair_ids.size.to_bytes(8, "little") + sums.tobytes()).hexdigest()[:24]
    return pair_ids, np.concatenate(lengths).astype(np.int32) if lengths else np.zeros((0, 3), np.int32), digest
