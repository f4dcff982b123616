"""The LLM judge: prompt templates, strict verdict parsing, and the two backends that ask the judge.

Templates use FastChat's judge_prompts.jsonl format (name, type, system_prompt, prompt_template, output_format),
so a user can point judge.prompts at FastChat's file; ours (assets/judge_prompts.jsonl) are written for this
project under the same names. A verdict is read only from the exact `[[...]]` form the prompt asks for; anything
else is unparseable, and says why.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from tgdpo_ray.errors import UserError
from tgdpo_ray.questions import Question

DEFAULT_PROMPTS = Path(__file__).parent / "assets" / "judge_prompts.jsonl"
# MT-Bench grades these categories against a reference answer when one exists.
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
# Every placeholder a template may use; a template naming any other fails when the file is loaded.
PLACEHOLDERS = ("question", "answer", "answer_a", "answer_b", "ref_answer_1", "ref_answer_2", "question_1",
                "question_2", "answer_1", "answer_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
CHOICE = re.compile(r"\[\[\s*([ABC])\s*\]\]")


class JudgeError(UserError, RuntimeError):
    """A prompt file, key or endpoint the judge cannot work with; the message names it."""


def load_prompts(path: Optional[str]) -> dict[str, dict]:
    """name -> template record. Checks every template can be filled before any model loads."""
    path = Path(path) if path else DEFAULT_PROMPTS
    if not path.is_file():
        raise JudgeError(f"judge prompts file not found: {path}")
    prompts = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, kind, template = record["name"], record["type"], record["prompt_template"]
            template.format(**{key: "" for key in PLACEHOLDERS})
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
            raise JudgeError(f"{path}, line {number}: not a judge prompt record ({type(err).__name__}: {err}); "
                             "expected name, type, system_prompt, prompt_template") from None
        if kind not in ("single", "pairwise"):
            raise JudgeError(f"{path}, line {number}: type must be single or pairwise, got {kind!r}")
        prompts[name] = record
    return prompts


def prompt_name(mode: str, turn: int, with_reference: bool) -> str:
    """FastChat's names: single-v1, single-math-v1-multi-turn, pair-v2, pair-math-v1-multi-turn, ..."""
    if mode == "single":
        base = "single-math-v1" if with_reference else "single-v1"
    else:
        base = "pair-math-v1" if with_reference else "pair-v2"
    return base + ("-multi-turn" if turn == 2 else "")


def uses_reference(question: Question) -> bool:
    return question.category in REFERENCE_CATEGORIES and bool(question.reference)


def render(prompts: dict[str, dict], mode: str, question: Question, turn: int,
           answers: list[list[str]]) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) judging `turn` of one answer (single) or two answers (pairwise, A then B).
    Turn 2 shows the whole conversation."""
    name = prompt_name(mode, turn, uses_reference(question))
    if name not in prompts:
        raise JudgeError(f"the judge prompts have no template named {name!r} (have: {', '.join(prompts)})")
    reference = list(question.reference or ()) + ["", ""]
    values = {"ref_answer_1": reference[0], "ref_answer_2": reference[1], "question": question.turns[0],
              "question_1": question.turns[0], "question_2": question.turns[-1]}
    if mode == "single":
        values.update(answer=answers[0][0], answer_1=answers[0][0], answer_2=answers[0][-1])
    else:
        (a, b) = answers
        values.update(answer_a=a[0], answer_b=b[0], answer_a_1=a[0], answer_a_2=a[-1], answer_b_1=b[0],
                      answer_b_2=b[-1])
    record = prompts[name]
    messages = [{"role": "user", "content": record["prompt_template"].format(**values)}]
    if record.get("system_prompt"):
        messages.insert(0, {"role": "system", "content": record["system_prompt"]})
    return name, messages


def parse_rating(text: str) -> tuple[Optional[float], Optional[str]]:
    """(score, None) for exactly one distinct [[N]] with 1 <= N <= 10; (None, why) otherwise."""
    found = {float(value) for value in RATING.findall(text)}
    if not found:
        return None, "no [[rating]] in the judgment"
    if len(found) > 1:
        return None, f"several different ratings: {sorted(found)}"
    score = found.pop()
    if not 1 <= score <= 10:
        return None, f"rating {score:g} is outside 1-10"
    return score, None


def parse_choice(text: str) -> tuple[Optional[str], Optional[str]]:
    """("A" | "B" | "tie", None) for exactly one distinct [[A]] / [[B]] / [[C]]; (None, why) otherwise."""
    found = set(CHOICE.findall(text))
    if not found:
        return None, "no [[A]], [[B]] or [[C]] in the judgment"
    if len(found) > 1:
        return None, f"several different verdicts: {sorted(found)}"
    choice = found.pop()
    return ("tie" if choice == "C" else choice), None


class VLLMJudge:
    """The judge model in a vLLM engine on this cluster (generation.VLLMEngine)."""

    def __init__(self, engine, model: str, max_tokens: int):
        self.engine, self.model, self.max_tokens = engine, model, max_tokens

    def complete(self, requests: list[tuple[list[dict], float, int]]) -> list[tuple[str, Optional[str]]]:
        """requests: (messages, temperature, seed) -> (text, error or None) each."""
        from tgdpo_ray.generation import call_engine

        replies = call_engine(self.model, self.engine.chat.remote(
            [messages for messages, _, _ in requests],
            [{"temperature": temperature, "seed": seed, "max_tokens": self.max_tokens}
             for _, temperature, seed in requests]))
        return [(reply["text"], reply["error"]) for reply in replies]


class RateLimit:
    """At most `per_second` request starts per second, across threads."""

    def __init__(self, per_second: float):
        self.interval, self.next_start, self.lock = 1.0 / per_second, 0.0, threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(0.0, start - now))


class OpenAIJudge:
    """Any OpenAI-compatible chat-completions endpoint: retries with backoff, a rate limit, timeouts."""

    # Worth retrying: the server is busy or failed, not the request itself.
    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str], max_tokens: int,
                 retries: int, timeout_s: float, requests_per_second: float, concurrency: int):
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise JudgeError(f"judge.api_key_env: the environment variable {api_key_env} is not set "
                                 "(set it where the job runs)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.model, self.max_tokens, self.retries, self.timeout_s = model, max_tokens, retries, timeout_s
        self.rate, self.concurrency = RateLimit(requests_per_second), concurrency

    def complete(self, requests: list[tuple[list[dict], float, int]]) -> list[tuple[str, Optional[str]]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda request: self.ask(*request), requests))

    def ask(self, messages: list[dict], temperature: float, seed: int) -> tuple[str, Optional[str]]:
        import requests

        body = {"model": self.model, "messages": messages, "temperature": temperature,
                "max_tokens": self.max_tokens, "seed": seed}
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                # Exponential backoff with jitter, so many threads do not retry in lockstep.
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
            self.rate.wait()
            try:
                response = requests.post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
            except requests.RequestException as err:
                problem = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in self.RETRY_STATUS:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:
                # A wrong key, model name or URL fails every request the same way: stop the job and say so.
                raise JudgeError(f"judge endpoint {self.url} answered HTTP {response.status_code}: "
                                 f"{response.text[:300]}")
            try:
                return response.json()["choices"][0]["message"]["content"] or "", None
            except (ValueError, KeyError, IndexError, TypeError):
                return "", f"not a chat completion: {response.text[:200]}"
        return "", f"gave up after {self.retries + 1} attempts ({problem})"
