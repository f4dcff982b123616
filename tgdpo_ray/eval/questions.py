"""MT-Bench-style evaluation questions: load them from a JSONL file or a Hugging Face dataset and validate them.

A question is `{"question_id": .., "category": .., "turns": [turn1, turn2], "reference": [..]}` (reference optional),
the format of MT-Bench's question.jsonl. `load_questions("shipped")` reads our own small set
(assets/questions.jsonl), `load_questions("mt_bench")` FastChat's MT-Bench (see mt_bench.py).
Every problem is reported as a QuestionError that names the file and the line (or the dataset and the row).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.files import is_file, is_uri
from tgdpo_ray.common.jsonl import BadLine, numbered_lines
from tgdpo_ray.config.loader import looks_local
from tgdpo_ray.eval.mt_bench import mt_bench_file

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SHIPPED_QUESTIONS = Path(__file__).parent / "assets" / "questions.jsonl"


class QuestionError(UserError, ValueError):
    """Questions or references that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Question:
    question_id: str  # MT-Bench ids are ints; strings let ids from any source compare alike
    category: str
    turns: tuple[str, ...]  # 1 or 2 user turns, each asked after the model's answer to the previous one
    reference: tuple[str, ...] | None = None  # a reference answer per turn (maybe fewer), or None


def load_questions(
    path: str,
    *,
    split: str = "train",
    categories: Iterable[str] = MT_BENCH_CATEGORIES,
    references: str | None = None,
    limit: int | None = None,
) -> list[Question]:
    """Questions of a local .jsonl file, a hub dataset, "shipped" or "mt_bench" (FastChat's 80, with GPT-4's
    reference answers unless `references` names other ones); `references` (JSONL) overrides inline ones."""
    allowed = (categories,) if isinstance(categories, str) else tuple(categories)
    if limit is not None and limit < 0:
        raise QuestionError(f"limit must be 0 or more, got {limit}")
    if path == "mt_bench":
        path = str(mt_bench_file("questions"))
        references = references or str(mt_bench_file("references"))

    # The whole file is validated (and the references file too) before anything is cut or used.
    questions: list[Question] = []
    first_seen: dict[str, str] = {}  # question_id -> where it first appeared
    for source, where, row in _rows(path, split):
        question = _parse_question(row, f"{source}, {where}", allowed)
        if question.question_id in first_seen:
            raise QuestionError(f"{source}, {where}: duplicate question_id {question.question_id!r} "
                                f"(first at {first_seen[question.question_id]})")
        first_seen[question.question_id] = where
        questions.append(question)
    if not questions:
        raise QuestionError(f"{path}: no questions (the file or dataset is empty)")

    if references is not None:
        turns_by_id = {question.question_id: len(question.turns) for question in questions}
        overrides = _load_references(references, turns_by_id)
        questions = [replace(q, reference=overrides.get(q.question_id, q.reference)) for q in questions]
    return questions if limit is None else questions[:limit]


# ---------------------------------------------------------------- reading


def _rows(path: str, split: str) -> Iterator[tuple[str, str, dict]]:
    """(source name, "line N" / "row N", row) of every non-blank row, numbered from 1."""
    if path == "shipped":
        path = str(SHIPPED_QUESTIONS)
    local = os.path.expanduser(path)
    if is_file(local):  # a local file or an object a URI names (files.py)
        yield from _jsonl_rows(local)
    elif (looks_local(path) or is_uri(path)) and not os.path.isdir(local):
        raise QuestionError(f"questions file does not exist: {path}")
    else:  # a hub dataset name, or a dataset folder written by save_to_disk
        for number, row in enumerate(_dataset(path, split), start=1):
            yield path, f"row {number}", row


def _jsonl_rows(path: str) -> Iterator[tuple[str, str, dict]]:
    try:
        for number, row in numbered_lines(path):
            if isinstance(row, BadLine):
                raise QuestionError(f"{path}, line {number}: {row}")
            yield path, f"line {number}", row
    except OSError as err:
        raise QuestionError(f"cannot read {path}: {err.strerror or err}") from None


def _dataset(name: str, split: str) -> Iterable[dict]:
    import datasets

    try:
        if os.path.isdir(os.path.expanduser(name)):
            loaded = datasets.load_from_disk(os.path.expanduser(name))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001
        # datasets raises many types; the user needs the name and the reason on one line.
        reason = " ".join(str(err).split()) or type(err).__name__
        raise QuestionError(f"cannot load questions dataset {name!r} (split {split!r}): {reason}") from None


# ---------------------------------------------------------------- validation


def _parse_question(row: dict, where: str, allowed: tuple[str, ...]) -> Question:
    question_id = _question_id(row, where)
    turns = row.get("turns")
    if turns is None:
        raise QuestionError(f"{where}: missing 'turns' (a list of 1 or 2 user messages)")
    if not _strings(turns) or not 1 <= len(turns) <= 2 or not all(turn.strip() for turn in turns):
        raise QuestionError(f"{where}: 'turns' must be a list of 1 or 2 non-empty strings, got {_short(turns)}")
    category = row.get("category")
    if category is None:
        raise QuestionError(f"{where}: missing 'category' (one of {', '.join(allowed)})")
    if category not in allowed:
        raise QuestionError(f"{where}: category {category!r} is not one of {', '.join(allowed)}")
    reference = _reference(row.get("reference"), len(turns), f"{where}: 'reference'")
    return Question(question_id, category, tuple(turns), reference)


def _question_id(row: dict, where: str) -> str:
    value = row.get("question_id")
    if value is None:
        raise QuestionError(f"{where}: missing 'question_id'")
    # bool is an int in Python, but True as an id is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise QuestionError(f"{where}: 'question_id' must be an integer or a string, got {_short(value)}")
    if not str(value).strip():
        raise QuestionError(f"{where}: 'question_id' is empty")
    return str(value)


def _reference(value: Any, turns: int, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not _strings(value):
        raise QuestionError(f"{what} must be a list of strings (one per turn), got {_short(value)}")
    if len(value) > turns:
        raise QuestionError(f"{what} has {len(value)} entries but the question has {turns} turn(s)")
    return tuple(value) or None


def _load_references(path: str, turns_by_id: dict[str, int]) -> dict[str, tuple[str, ...]]:
    """question_id -> reference, from lines of ours ({"reference": [..]}) or FastChat's ({"choices": [..]}) shape."""
    if not is_file(os.path.expanduser(path)):
        raise QuestionError(f"references file does not exist: {path}")
    found: dict[str, tuple[str, ...]] = {}
    first_seen: dict[str, str] = {}
    for source, where, row in _jsonl_rows(os.path.expanduser(path)):
        at = f"{source}, {where}"
        question_id = _question_id(row, at)
        if question_id not in turns_by_id:
            raise QuestionError(f"{at}: question_id {question_id!r} is not among the questions")
        if question_id in first_seen:
            raise QuestionError(f"{at}: duplicate question_id {question_id!r} (first at {first_seen[question_id]})")
        first_seen[question_id] = where
        if "reference" in row:
            value = row["reference"]
        elif "choices" in row:
            choices = row["choices"]
            # FastChat's reference answers: the first choice's turns are the reference, one per turn.
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                raise QuestionError(f"{at}: 'choices' must be a non-empty list of {{index, turns}} objects")
            value = choices[0].get("turns")
            if value is None:
                raise QuestionError(f"{at}: choices[0] has no 'turns'")
        else:
            raise QuestionError(f"{at}: expected 'reference' (a list of strings) or FastChat's 'choices'")
        reference = _reference(value, turns_by_id[question_id], f"{at}: reference")
        if reference is None:
            raise QuestionError(f"{at}: the reference is empty")
        found[question_id] = reference
    if not found:
        raise QuestionError(f"{path}: no references (the file is empty)")
    return found


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
