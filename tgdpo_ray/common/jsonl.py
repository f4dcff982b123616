"""JSON Lines, the one home for reading and writing them.

Two kinds of file: a user's input (preference data, questions, references, judge prompts), read line by line with
each line's 1-based number and, for a bad line, why it is bad, so the caller can name the file and the line; and
the records this project appends as work finishes (metrics, scorer batch logs, answers, judgments), whose last
line may have been cut short by a process that died while writing it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from tgdpo_ray.common.files import open_binary


@dataclass(frozen=True)
class BadLine:
    """A line of a user's JSONL file that is not a JSON object."""

    reason: str  # invalid_utf8 | invalid_json | not_an_object
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def numbered_lines(path: Union[str, Path]) -> Iterator[tuple[int, Union[dict, BadLine]]]:
    """(1-based line number, the line's JSON object or a BadLine) for every non-blank line of a user's file."""
    for line_number, line in enumerate(text_lines(path), start=1):
        if line.strip():
            yield line_number, parse_line(line)


def text_lines(path: Union[str, Path], start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """The lines of a user's text file (a local path or a URI: files.py), or of its bytes [start, end) when a
    range starts a line: a file read in parts (data_pass.py) gives exactly the lines of the whole file read at
    once."""
    # utf-8-sig drops a byte-order mark (at the file's start only); surrogateescape keeps bytes that are not
    # UTF-8 (as lone surrogates), so that only the line holding them is bad and the lines after it are still read.
    encoding = "utf-8-sig" if start == 0 else "utf-8"
    if start == 0 and end is None:
        with open_binary(str(path)) as handle:
            yield from io.TextIOWrapper(handle, encoding=encoding, errors="surrogateescape")
        return
    with open_binary(str(path)) as handle:
        handle.seek(start)
        chunk = handle.read() if end is None else handle.read(end - start)
    yield from io.TextIOWrapper(io.BytesIO(chunk), encoding=encoding, errors="surrogateescape")


def line_starts(path: Union[str, Path], every: int) -> list[int]:
    """Byte offsets that cut a file into ranges of about `every` bytes, each starting a line (0 first)."""
    starts = [0]
    with open_binary(str(path)) as handle:
        size = handle.seek(0, os.SEEK_END)
        while starts[-1] + every < size:
            handle.seek(starts[-1] + every)
            handle.readline()  # to the end of the line the cut fell in: a cut after "\n" splits neither "\r\n"
            if handle.tell() >= size:  # nor a UTF-8 character
                break
            starts.append(handle.tell())
    return starts


def parse_line(line: str) -> Union[dict, BadLine]:
    try:
        line.encode("utf-8")  # fails exactly where surrogateescape kept a byte that is not UTF-8
    except UnicodeEncodeError as err:
        byte = ord(line[err.start]) - 0xDC00
        return BadLine("invalid_utf8", f"byte 0x{byte:02x} at column {err.start + 1} is not UTF-8")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return BadLine("invalid_json", f"{err.msg} (column {err.colno})")
    if not isinstance(row, dict):
        return BadLine("not_an_object", f"a JSON {type(row).__name__}, expected an object")
    return row


def json_digest(value) -> str:
    """A short digest of a JSON value (keys sorted): what a record on disk was computed from, to know when to reuse
    it (eval answers and judgments, pairs samples and scores)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def read_records(path: Path, log=None) -> list[dict]:
    """The records of a file this project appended to ([] when it does not exist). A line cut short by a process
    that died while writing it is skipped, and counted to `log` when one is given (its work is done again)."""
    if not path.exists():
        return []
    records, broken = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            broken += 1
    if broken and log is not None:
        log(f"{path.name}: {broken} incomplete line(s) from an interrupted run ignored (recomputed)")
    return records


def append_records(path: Path, records: list[dict]) -> None:
    # A line cut short by a process that died must not swallow the next record: start on a line of its own.
    text = "".join(json.dumps(record) + "\n" for record in records)
    with path.open("a+b") as out:  # opened at its end; writes always append
        if out.tell():
            out.seek(-1, os.SEEK_END)
            if out.read(1) != b"\n":
                text = "\n" + text
        out.write(text.encode())


def rewrite_records(path: Path, records: list[dict]) -> None:
    """Leaves exactly `records` in the file, atomically: a crash leaves the old file or the new one."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in records))
    partial.replace(path)
