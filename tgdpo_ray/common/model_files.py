"""A model's files and their identity: the folder that holds them (a local path or the locally cached snapshot of
a hub name) and a digest of their whole contents. The score cache keys scored pairs by it, the evaluation keys
answers by it, and `plan` reads model sizes from the folder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")
CHUNK_BYTES = 8 << 20
# file_digest's memo: (resolved path, size, mtime_ns) -> sha256. A 16 GB model is hashed once per process
# (about 2 GB/s on one core), and again only when a file changes.
FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def model_files(name_or_path: str) -> Optional[Path]:
    """The folder holding a model's files: the path itself, or the locally cached snapshot of a hub name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached here (the scorers will download it): the name is all we know
        return None


def file_digest(path: Path) -> str:
    """The sha256 of a whole file, memoized by (path, size, mtime_ns): a process reads each file once, and
    again only after it was rewritten."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        FILE_DIGESTS[key] = digest.hexdigest()
    return FILE_DIGESTS[key]


def weights_identity(name_or_path: str) -> str:
    """A digest of a model's files: their names and whole contents. Sampling parts of each file is not enough:
    a model retrained with frozen embeddings keeps the first and last MiB of its weights."""
    folder = model_files(name_or_path)
    if folder is None:
        return f"name:{name_or_path}"
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(f"{file.relative_to(folder)}:{file_digest(file)}".encode())
    return digest.hexdigest()
