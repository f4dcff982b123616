"""Preference data: load, validate, apply the chat template, truncate and tokenize.

A pair becomes three token lists: `prompt_ids` (the templated prompt, ending with the assistant header),
`chosen_ids` and `rejected_ids` (the templated answers only). Every model in the run scores exactly these ids,
and only answer tokens enter the loss.
"""

from __future__ import annotations

import codecs
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.files import file_name, is_data_file, is_file, parquet_file, read_bytes
from tgdpo_ray.common.jsonl import BadLine, parse_line, text_lines
from tgdpo_ray.config.job import Columns, DataSection, DataSource, RewardColumns
from tgdpo_ray.config.loader import looks_local
from tgdpo_ray.kernels.batches import score_columns

BAD_ROW_REASONS = {
    "missing_field": "a prompt, chosen or rejected field is missing or null",
    "empty_field": "a prompt, chosen or rejected field is empty",
    "non_string_content": "a field or message content is not a string or text parts, or a message is not {role, "
                          "content}",
    "no_common_prompt": "a row without a prompt field whose chosen and rejected conversations share no prompt (TRL's "
                        "implicit-prompt form: the prompt is their common beginning)",
    "identical_responses": "chosen and rejected are identical",
    "prompt_too_long": "the prompt is longer than max_prompt_length (data.long_prompts: bad_row)",
    "bad_token_rewards": "per-token rewards missing, not numbers, or not one per answer token (guidance.source: column)",
    "invalid_utf8": "a .jsonl line, or a string in a Parquet file or dataset, holds bytes that are not UTF-8",
    "invalid_json": "a .jsonl line is not valid JSON",
    "not_an_object": "a .jsonl line or an item of a JSON list is not a JSON object",
}

# Where a row is, in every message and in data_report.json, counting from 1: "line N" is the physical line of a
# text file, as an editor shows it (blank lines count); "row N" is the position of a record in a JSON list, a
# Parquet file or a dataset, which have no lines to point at (a .json file that cannot be parsed at all is
# named by its line).


class DataError(UserError, ValueError):
    """Data that cannot be used; the message names the file and the line or row."""


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RowTally:
    """What one source's rows came to, whoever read them (this process, or the tokenization pass's workers):
    read, kept, skipped per reason with the first examples, truncated. Under data.bad_rows: error the first bad
    row stops the run, named by its file and its line or row."""

    path: str
    bad_rows: str  # error | skip
    total: int = 0
    kept: int = 0
    truncated: int = 0
    bad_counts: Counter = field(default_factory=Counter)
    bad_examples: list[dict] = field(default_factory=list)  # the first few skipped: line or row, reason

    def bad(self, unit: str, number: int, reason: str, detail: str) -> None:
        if self.bad_rows == "error":
            raise DataError(f"{self.path}: {unit} {number}: {reason}: {detail}"
                            " (set data.bad_rows: skip to drop such rows and count them)") from None
        self.bad_counts[reason] += 1
        if len(self.bad_examples) < 20:
            self.bad_examples.append({unit: number, "reason": reason, "detail": detail})

    def finish(self, log=print) -> None:
        if not self.kept:
            raise DataError(f"{self.path}: no usable pairs ({self.total} rows read, {dict(self.bad_counts)})")
        if self.bad_counts:
            counts = ", ".join(f"{reason}={count}" for reason, count in sorted(self.bad_counts.items()))
            log(f"[data] {self.path}: skipped {sum(self.bad_counts.values())} of {self.total} rows ({counts})")

    def report(self) -> dict:
        return {
            "rows_read": self.total,
            "rows_kept": self.kept,
            "rows_skipped": sum(self.bad_counts.values()),
            "skipped_by_reason": dict(self.bad_counts),
            "pairs_truncated": self.truncated,
            "skipped_examples": self.bad_examples,
        }


@dataclass
class PreparedData:
    """A source validated and tokenized in this process (small data, tests and tools; a job's driver uses the
    tokenization pass of data_pass.py instead)."""

    rows: list[dict]  # {"pair_id", "prompt_ids", "chosen_ids", "rejected_ids"}
    tally: RowTally

    @property
    def bad_counts(self) -> Counter:
        return self.tally.bad_counts

    def report(self) -> dict:
        return self.tally.report()


# ---------------------------------------------------------------- loading


def iter_raw_rows(source: DataSource) -> Iterator[tuple[str, int, dict | BadRow]]:
    """(unit, number, row) for every record of a .jsonl / .json / .parquet file (a local path or a URI: files.py),
    a local dataset folder or a hub dataset: unit is "line" or "row", number counts from 1 (see above). A record that cannot be read comes
    as a BadRow, so that data.bad_rows treats it as it treats any other bad row."""
    path, name = os.path.expanduser(source.path), file_name(source.path)
    check_data_file(source)
    if name.endswith(".jsonl"):
        yield from iter_jsonl(path)
    elif name.endswith(".json"):
        yield from iter_json_items(read_json_list(path))
    elif name.endswith(".parquet"):
        yield from iter_arrow(parquet_file(path).read().to_batches())
    else:
        yield from iter_arrow(load_hf_dataset(source).with_format("arrow").iter(batch_size=1000))


def check_data_file(source: DataSource) -> None:
    """A source named as one file (.jsonl / .json / .parquet, local or a URI) that is not there stops the run."""
    path = os.path.expanduser(source.path)
    if is_data_file(path) and not is_file(path):
        raise DataError(f"data file does not exist: {source.path}")


def iter_jsonl(path: str, start: int = 0, end: Optional[int] = None,
               first_line: int = 1) -> Iterator[tuple[str, int, dict | BadRow]]:
    """The non-blank lines of a .jsonl file, or of its bytes [start, end) whose first line is `first_line`."""
    for line_number, line in enumerate(text_lines(path, start, end), start=first_line):
        if line.strip():
            row = parse_line(line)
            yield "line", line_number, BadRow(row.reason, row.detail) if isinstance(row, BadLine) else row


def read_json_list(path: str) -> list:
    """The items of a .json file's list. One document: bytes that are not UTF-8 or JSON that does not parse spoil
    the whole file, so they stop the run whatever data.bad_rows says; the message names the line."""
    raw = read_bytes(path).removeprefix(codecs.BOM_UTF8)  # as utf-8-sig reads it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    return data


def iter_json_items(items: list, number: int = 0) -> Iterator[tuple[str, int, dict | BadRow]]:
    """Items of a JSON list, numbered from number + 1."""
    for number, row in enumerate(items, start=number + 1):
        if not isinstance(row, dict):
            row = BadRow("not_an_object", f"a JSON {type(row).__name__}, expected an object")
        yield "row", number, row


def iter_arrow(batches, number: int = 0) -> Iterator[tuple[str, int, dict | BadRow]]:
    """Rows of Arrow record batches or tables (Parquet, datasets), numbered from number + 1. Arrow does not check
    that strings read from a file are UTF-8: Python decodes them here, so a bad string spoils its row only."""
    for batch in batches:
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:  # rare: decode this batch row by row to find the bad ones
            rows = [_arrow_row(batch.slice(index, 1)) for index in range(batch.num_rows)]
        for row in rows:
            number += 1
            yield "row", number, row


def _arrow_row(one_row) -> dict | BadRow:
    try:
        return one_row.to_pylist()[0]
    except UnicodeDecodeError as err:
        return BadRow("invalid_utf8", f"a string holds byte 0x{err.object[err.start]:02x}, which is not UTF-8")


def load_hf_dataset(source: DataSource):
    """A local dataset folder (Dataset.save_to_disk) or a hub dataset, as a datasets.Dataset (memory-mapped)."""
    import datasets

    if looks_local(source.path) and not os.path.exists(os.path.expanduser(source.path)):
        raise DataError(f"dataset path does not exist: {source.path}")
    try:
        if os.path.isdir(source.path) and os.path.exists(os.path.join(source.path, "dataset_info.json")):
            dataset = datasets.load_from_disk(source.path)  # written by Dataset.save_to_disk
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[source.split]
            return dataset
        return datasets.load_dataset(source.path, source.subset, split=source.split)
    except KeyError:
        raise DataError(f"dataset {source.path!r} has no split {source.split!r}") from None
    except Exception as err:  # datasets raises many types; the user needs the name and the reason
        raise DataError(f"cannot load dataset {source.path!r} (split {source.split!r}): {err}") from None


# ---------------------------------------------------------------- validation


def to_messages(value: Any, field_name: str, default_role: str) -> list[dict]:
    """A plain string becomes one message; a list must hold {role, content} messages whose content is a string or
    a list of text parts ({"type": "text", "text": ...}, as TRL and OpenAI write it)."""
    if value is None:
        raise BadRow("missing_field", f"{field_name} is null")
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty_field", f"{field_name} is empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise BadRow("non_string_content", f"{field_name} is a {type(value).__name__}, not a string or messages")
    if not value:
        raise BadRow("empty_field", f"{field_name} is an empty list")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRow("non_string_content", f"{field_name}[{index}] is not a {{role, content}} message")
        content = message_text(message.get("content"), f"{field_name}[{index}].content")
        if not content.strip():
            raise BadRow("empty_field", f"{field_name}[{index}].content is empty")
        messages.append({"role": message["role"], "content": content})
    return messages


def message_text(content: Any, where: str) -> str:
    """A message's content as one string: text parts are joined by newlines, as vLLM joins them for a
    text-only model; any other part (an image, audio) is a bad row, since the models here read text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRow("non_string_content", f"{where} is {type(content).__name__}")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRow("non_string_content", f"{where}[{index}] is a {kind!r} part; only text parts are read")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_pair(row: dict, columns: Columns, chosen_only: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen answer messages, rejected answer messages) of one raw row, in any of the forms
    TRL reads: an explicit prompt; no prompt field, the prompt being the common beginning of two whole
    conversations (the implicit-prompt form, as in Anthropic HH); or, when only chosen answers are needed
    (loss.type sft), a messages column alone, whose last assistant message is the answer (rejected is then
    empty)."""
    if columns.prompt not in row and columns.chosen in row and columns.rejected in row:
        return implicit_prompt_pair(row, columns)
    if chosen_only and columns.messages in row and not {columns.prompt, columns.chosen} & row.keys():
        return conversation_as_answer(row[columns.messages], columns.messages)
    for name in (columns.prompt, columns.chosen, columns.rejected):
        if name not in row:
            hint = (f"; a {columns.messages!r}-only row serves loss.type sft only"
                    if columns.messages in row and not chosen_only else "")
            raise BadRow("missing_field", f"no {name!r} field (fields: {sorted(row)}){hint}")
    prompt = to_messages(row[columns.prompt], columns.prompt, "user")
    chosen = _strip_prompt(to_messages(row[columns.chosen], columns.chosen, "assistant"), prompt)
    rejected = _strip_prompt(to_messages(row[columns.rejected], columns.rejected, "assistant"), prompt)
    return checked_answers(prompt, chosen, rejected)


def checked_answers(prompt: list[dict], chosen: list[dict], rejected: list[dict]):
    if not chosen or not rejected:
        raise BadRow("empty_field", "an answer holds only the prompt messages")
    if chosen == rejected:
        raise BadRow("identical_responses", "chosen and rejected are identical")
    return prompt, chosen, rejected


def _strip_prompt(answer: list[dict], prompt: list[dict]) -> list[dict]:
    # UltraFeedback-style answers repeat the whole conversation: keep what follows the prompt.
    return answer[len(prompt):] if answer[: len(prompt)] == prompt else answer


def implicit_prompt_pair(row: dict, columns: Columns):
    """TRL's implicit-prompt form: chosen and rejected are whole conversations (message lists, or strings such
    as Anthropic HH's "\n\nHuman: ...\n\nAssistant: ..."), and the prompt is what they share at the start."""
    chosen_value, rejected_value = row[columns.chosen], row[columns.rejected]
    if isinstance(chosen_value, str) and isinstance(rejected_value, str):
        prompt_text, chosen_text, rejected_text = split_common_text(chosen_value, rejected_value)
        return checked_answers(to_messages(prompt_text, "the common prompt", "user"),
                               to_messages(chosen_text, columns.chosen, "assistant"),
                               to_messages(rejected_text, columns.rejected, "assistant"))
    chosen = to_messages(chosen_value, columns.chosen, "assistant")
    rejected = to_messages(rejected_value, columns.rejected, "assistant")
    if isinstance(chosen_value, str) or isinstance(rejected_value, str):
        raise BadRow("non_string_content", f"with no {columns.prompt!r} field, {columns.chosen!r} and "
                     f"{columns.rejected!r} must both be strings or both conversations")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise BadRow("no_common_prompt", "the two conversations differ from their first message")
    for name, answer in ((columns.chosen, chosen[shared:]), (columns.rejected, rejected[shared:])):
        if answer and answer[0]["role"] != "assistant":
            raise BadRow("no_common_prompt", f"after the {shared} messages the conversations share, {name} goes on "
                         f"with a {answer[0]['role']!r} message, not the assistant's answer")
    return checked_answers(chosen[:shared], chosen[shared:], rejected[shared:])


def split_common_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two whole conversations as text. The prompt is their common
    beginning, cut back to a word boundary so no word is split; words both answers start with stay in the
    prompt (as in TRL), which cannot be told from the prompt without knowing the format."""
    shared = len(os.path.commonprefix([chosen, rejected]))
    if shared < min(len(chosen), len(rejected)) and shared and not chosen[shared - 1].isspace():
        shared = max(chosen.rfind(" ", 0, shared), chosen.rfind("\n", 0, shared)) + 1
    if not chosen[:shared].strip():
        raise BadRow("no_common_prompt", "the two conversations share no words at their start")
    return chosen[:shared].rstrip(), chosen[shared:].lstrip(), rejected[shared:].lstrip()


def conversation_as_answer(value: Any, field_name: str):
    """A messages-only row for SFT: the prompt is every message before the last assistant message, which is the
    answer; there is no rejected answer."""
    messages = to_messages(value, field_name, "user")
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None:
        raise BadRow("missing_field", f"{field_name} holds no assistant message to learn")
    if last == 0:
        raise BadRow("missing_field", f"{field_name} has no message before its first assistant message")
    return messages[:last], [messages[last]], []


# ---------------------------------------------------------------- tokenization


def template_pair(tokenizer, prompt: list[dict], answers: list[list[dict]]) -> tuple[str, list[str]]:
    """The templated prompt (with the generation header) and each answer's text that follows it."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    answer_texts = []
    for answer in answers:
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(
                "the chat template does not render the prompt as a prefix of the conversation, so answer tokens"
                " cannot be separated from prompt tokens; set data.chat_template to a template that does"
            )
        answer_texts.append(full[len(prompt_text):])
    return prompt_text, answer_texts


def truncate_pair(prompt_ids: list[int], answers: list[list[int]], data: DataSection) -> tuple[list, list, bool]:
    """The prompt loses tokens from the left first (down to max_prompt_length), then answers from the right."""
    longest = max(len(ids) for ids in answers)
    if len(prompt_ids) + longest <= data.max_length:
        return prompt_ids, answers, False
    if len(prompt_ids) > data.max_prompt_length:
        prompt_ids = prompt_ids[-data.max_prompt_length:]
    room = data.max_length - len(prompt_ids)
    return prompt_ids, [ids[:room] for ids in answers], True


def token_rewards(row: dict, name: str, tokens: int) -> list[float]:
    values = row.get(name)
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise BadRow("bad_token_rewards", f"{name!r} is not a list of numbers")
    if len(values) != tokens:
        raise BadRow("bad_token_rewards", f"{name!r} has {len(values)} values for {tokens} answer tokens")
    return [float(v) for v in values]


def tokenize_pair(tokenizer, row: dict, data: DataSection, reward_columns: Optional[RewardColumns] = None,
                  chosen_only: bool = False) -> tuple[dict, bool]:
    """The pair's token ids. chosen_only (loss.type sft) also accepts messages-only rows, whose rejected ids
    are empty."""
    prompt, chosen, rejected = normalize_pair(row, data.columns, chosen_only)
    prompt_text, answer_texts = template_pair(tokenizer, prompt, [answer for answer in (chosen, rejected) if answer])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = encode(prompt_text)
    if data.long_prompts == "bad_row" and len(prompt_ids) > data.max_prompt_length:
        raise BadRow("prompt_too_long", f"prompt has {len(prompt_ids)} tokens > max_prompt_length")
    answers = [encode(text) for text in answer_texts] + [[]] * (not rejected)
    # Rewards from the data are one per answer token of exactly this tokenization, checked before truncation.
    rewards = [token_rewards(row, name, len(ids)) for name, ids in
               zip((reward_columns.chosen, reward_columns.rejected), answers)] if reward_columns else None
    prompt_ids, (chosen_ids, rejected_ids), truncated = truncate_pair(prompt_ids, answers, data)
    if chosen_ids == rejected_ids:
        raise BadRow("identical_responses", "chosen and rejected are identical after truncation")
    tokens = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    if rewards:
        chosen_column, rejected_column = score_columns("guidance", "rewards")
        tokens[chosen_column], tokens[rejected_column] = rewards[0][: len(chosen_ids)], rewards[1][: len(rejected_ids)]
    return tokens, truncated


def unit_of(source: DataSource) -> str:
    """How a row of the source is named in messages: a line of a .jsonl file, a row of anything else."""
    return "line" if file_name(source.path).endswith(".jsonl") else "row"


def prepare_row(tokenizer, row: dict | BadRow, data: DataSection, reward_columns: Optional[RewardColumns] = None,
                chosen_only: bool = False) -> tuple[dict, bool]:
    """tokenize_pair of a row as read: a record that could not be read is a BadRow already."""
    if isinstance(row, BadRow):
        raise row
    return tokenize_pair(tokenizer, row, data, reward_columns, chosen_only)


def prepare_pairs(source: DataSource, data: DataSection, tokenizer, log=print,
                  reward_columns: Optional[RewardColumns] = None, chosen_only: bool = False) -> PreparedData:
    """Validates and tokenizes every row of one source here; bad rows stop the run or are counted, per
    data.bad_rows."""
    prepared = PreparedData(rows=[], tally=RowTally(source.path, data.bad_rows))
    tally = prepared.tally
    for index, (unit, number, row) in enumerate(iter_raw_rows(source)):
        if source.limit is not None and index >= source.limit:
            break
        tally.total += 1
        try:
            tokens, truncated = prepare_row(tokenizer, row, data, reward_columns, chosen_only)
        except BadRow as bad:
            tally.bad(unit, number, bad.reason, bad.detail)
            continue
        tally.kept += 1
        tally.truncated += truncated
        prepared.rows.append({"pair_id": index, **tokens})
    tally.finish(log)
    return prepared
