"""A user's files named by a local path or by a URI of any filesystem pyarrow knows (s3://bucket/key,
gs://bucket/key, hdfs://host/path, file:///path): the one home for telling which a name is and for opening it,
so that data, prompts, questions and the score cache read the same from a laptop's disk and from object storage.

pyarrow finds the credentials as the cloud's own tools do (AWS_ACCESS_KEY_ID or ~/.aws, the GCS application
default credentials); a URI's query sets the rest, e.g. s3://bucket/pairs.jsonl?endpoint_override=minio:9000&scheme=http
for an S3-compatible server. The processes that read a file (the tokenization pass's workers) need the same access.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import urlparse

from tgdpo_ray.common.errors import UserError

# What a data source's name ends with when it is one file (anything else is a dataset folder or a hub name).
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class UnreachableFile(UserError, RuntimeError):
    """A URI whose filesystem could not be asked (no credentials, no such bucket, no answer); the message names it."""


def is_uri(name: str) -> bool:
    return "://" in str(name)


def file_name(name: str) -> str:
    """The name without a URI's query: what its suffix is read from (pairs.jsonl?endpoint_override=... is .jsonl)."""
    return urlparse(name).path if is_uri(name) else str(name)


def is_data_file(name: str) -> bool:
    return file_name(name).endswith(DATA_FILE_SUFFIXES)


def resolve_filesystem(name: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    from pyarrow import fs

    if is_uri(name):
        return fs.FileSystem.from_uri(name)
    return fs.LocalFileSystem(), str(Path(name).expanduser().resolve())


def is_file(name: str) -> bool:
    """A file exists under that name (a URI asks its filesystem; one that cannot be asked raises UnreachableFile)."""
    if not is_uri(name):
        return os.path.isfile(os.path.expanduser(name))
    from pyarrow import fs

    filesystem, path = resolve_filesystem(name)
    try:
        return filesystem.get_file_info(path).type == fs.FileType.File
    except OSError as err:
        raise UnreachableFile(f"cannot reach {name}: {err}") from None


def file_size(name: str) -> int:
    if not is_uri(name):
        return os.path.getsize(os.path.expanduser(name))
    filesystem, path = resolve_filesystem(name)
    return filesystem.get_file_info(path).size


def open_binary(name: str):
    """A seekable binary file object (readline, seek, tell, read) over a local file or a URI's object."""
    if not is_uri(name):
        return open(os.path.expanduser(name), "rb")
    filesystem, path = resolve_filesystem(name)
    return io.BufferedReader(filesystem.open_input_file(path))


def read_bytes(name: str) -> bytes:
    with open_binary(name) as handle:
        return handle.read()


def parquet_file(name: str):
    """A pyarrow ParquetFile (its footer read; row groups read on demand)."""
    import pyarrow.parquet as pq

    filesystem, path = resolve_filesystem(name)
    return pq.ParquetFile(path, filesystem=filesystem)
