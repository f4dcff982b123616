"""Where a published result came from: the code's commit (and whether the checkout had changes), the command, the
date and the machine. Every script that writes into bench/results puts this under a "provenance" key.

Standard library only, with torch imported lazily for the GPU's name: bench/gpu.py imports this on GPU images that
have torch and nothing else (no pydantic, no ray)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # the tgdpo_ray folder


def _git(*args: str) -> str | None:
    """A git command's stdout, run in the package's folder; None when git is missing or the command fails."""
    try:
        done = subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _memory_gib() -> float | None:
    """Total RAM in GiB, to 0.1, from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def last_commit_of(path: str) -> str | None:
    """The last commit that changed a file, named from the repository's root (e.g. a pre-registration); None
    outside git."""
    found = _git("log", "-1", "--format=%H", "--", f":(top){path}")
    return (found.strip() or None) if found else None


def provenance(command: str, runs_trained: int | None = None) -> dict:
    """The provenance block of a result: {"code_commit", "dirty", "command", "date", "machine", "runs_trained"}.

    code_commit: HEAD of the git checkout the package lives in (None when it is not one, or git is missing).
    dirty: whether that checkout has changes (untracked files under outputs/ aside); None without a commit.
    date: now, UTC, ISO 8601 to the second. machine: {"cpus", "memory_gib", "gpu", "platform"}."""
    # The package must be tracked by the repository git finds: an install inside some other checkout (a venv in
    # a project folder) would otherwise report that project's commit.
    tracked = _git("ls-files", "--error-unmatch", "__init__.py") is not None
    head = _git("rev-parse", "HEAD") if tracked else None
    commit = head.strip() if head else None
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain")  # porcelain paths are relative to the repository's root
        if status is not None:
            changes = [line for line in status.splitlines() if line and not line.startswith("?? outputs/")]
            dirty = bool(changes)
    return {
        "code_commit": commit,
        "dirty": dirty,
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": _gpu(),
                    "platform": platform.platform()},
        "runs_trained": runs_trained,
    }
