"""The LLM judge: prompt templates, strict verdict parsing, and the two backends that ask the judge.

Templates use FastChat's judge_prompts.jsonl format (name, type, system_prompt, prompt_template, output_format),
so a user can point judge.prompts at FastChat's file; ours (assets/judge_prompts.jsonl) are written for this
project under the same names. By default (eval.judge.parse tgdpo-ray) a verdict is read only from the exact `[[...]]`
form the prompt asks for; anything else is unparseable, and says why. eval.judge.parse fastchat reads it as
FastChat does (PARSERS).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.files import is_file
from tgdpo_ray.common.jsonl import BadLine, numbered_lines
from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.loader import import_function
from tgdpo_ray.eval.mt_bench import mt_bench_file
from tgdpo_ray.eval.questions import Question

OUR_PROMPTS = Path(__file__).parent / "assets" / "judge_prompts.jsonl"
# MT-Bench grades these categories against a reference answer when one exists.
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
# Every placeholder a template may use; a template naming any other fails when the file is loaded.
PLACEHOLDERS = ("question", "answer", "answer_a", "answer_b", "ref_answer_1", "ref_answer_2", "question_1",
                "question_2", "answer_1", "answer_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
CHOICE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# eval.judge.parse fastchat reads verdicts with FastChat's own patterns (fastchat/llm_judge/common.py): the first
# [[N]], else the first [N]. Its third pattern ("Rating: N") is computed there but its result never becomes the
# rating, so it changes nothing and is left out here.
FASTCHAT_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
FASTCHAT_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
# FastChat checks the pairwise markers in this order: the first one present wins, whatever else the text holds.
FASTCHAT_CHOICES = (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"))
# How often FastChat asks its judge for one verdict while none parses: run_judge_single's retries=5 (single mode),
# run_judge_pair asks once. It asks again with the same request at the same temperature, never sampling warmer.
FASTCHAT_ASKS = {"single": 5, "pairwise": 1}


class JudgeError(UserError, RuntimeError):
    """A prompt file, key or endpoint the judge cannot work with; the message names it."""


def prompt_set_file(prompt_set: str) -> str:
    """The file of a judge prompt set: fastchat (FastChat's MT-Bench prompts), tgdpo-ray (ours), or a path or a
    URI (files.py)."""
    if prompt_set == "fastchat":
        return str(mt_bench_file("judge_prompts"))
    return str(OUR_PROMPTS) if prompt_set == "tgdpo-ray" else os.path.expanduser(prompt_set)


def load_prompts(prompt_set: str) -> dict[str, dict]:
    """name -> template record, of a prompt set (see prompt_set_file). Checks every template can be filled
    before any model loads."""
    path = prompt_set_file(prompt_set)
    if not is_file(path):
        raise JudgeError(f"judge prompts file not found: {path}")
    prompts = {}
    for number, record in numbered_lines(path):
        try:
            if isinstance(record, BadLine):
                raise ValueError(str(record))
            name, kind, template = record["name"], record["type"], record["prompt_template"]
            template.format(**{key: "" for key in PLACEHOLDERS})
        except (KeyError, IndexError, TypeError, ValueError) as err:
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
    return question.category in REFERENCE_CATEGORIES


def check_references(questions: list[Question]) -> None:
    """Math, reasoning and coding questions are judged against a reference answer (as in MT-Bench): one without
    it fails here, before any model loads, instead of being judged silently with the plain prompt."""
    missing = [q for q in questions if uses_reference(q) and len(q.reference or ()) < len(q.turns)]
    if missing:
        named = ", ".join(f"{q.question_id} ({q.category})" for q in missing[:10])
        raise JudgeError(f"{len(missing)} question(s) of a reference-guided category (math, reasoning, coding) "
                         f"have no reference answer for every turn: {named}; add `reference` to them or set "
                         "eval.questions.references")


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


def parse_rating_fastchat(text: str) -> tuple[Optional[float], Optional[str]]:
    """FastChat's reading of a score: the first [[N]], else the first [N], whatever N is (no 1-10 check, so
    [[11]] is 11); (None, why) where FastChat records score -1."""
    match = FASTCHAT_RATING.search(text) or FASTCHAT_RATING_BACKUP.search(text)
    if match is None:
        return None, "no [[rating]] or [rating] in the judgment (FastChat records score -1)"
    # FastChat turns the text into a number with ast.literal_eval, which raises on a leading zero ("[[07]]") and
    # stops its run; float reads 7.
    return float(match.group(1)), None


def parse_choice_fastchat(text: str) -> tuple[Optional[str], Optional[str]]:
    """FastChat's reading of a pairwise verdict: the first of [[A]], [[B]], [[C]] (tie) found in the text, checked
    in that order; (None, why) where FastChat records "error"."""
    for marker, choice in FASTCHAT_CHOICES:
        if marker in text:
            return choice, None
    return None, 'no [[A]], [[B]] or [[C]] in the judgment (FastChat records "error")'


# eval.judge.parse -> (single-mode parser, pairwise parser); each returns (verdict, None) or (None, why).
PARSERS = {"tgdpo-ray": (parse_rating, parse_choice), "fastchat": (parse_rating_fastchat, parse_choice_fastchat)}


class VLLMJudge:
    """The judge model in a vLLM engine on this cluster (generation.VLLMEngine)."""

    def __init__(self, engine, model: str, max_tokens: int):
        self.engine, self.model, self.max_tokens = engine, model, max_tokens

    def complete(self, requests: list[tuple[list[dict], float, int]]) -> list[tuple[str, Optional[str]]]:
        """requests: (messages, temperature, seed) -> (text, error or None) each."""
        replies = self.engine.chat(
            [messages for messages, _, _ in requests],
            [{"temperature": temperature, "seed": seed, "max_tokens": self.max_tokens}
             for _, temperature, seed in requests])
        return [(reply["text"], reply["error"]) for reply in replies]


class RateLimit:
    """At most `per_second` request starts per second, spaced at least 1/per_second apart, across threads and event
    loops. A start is counted when its caller is let through, not when it queues: callers that wake late (a busy
    event loop) do not then go out in a burst."""

    def __init__(self, per_second: float):
        self.interval, self.next_start, self.lock = 1.0 / per_second, 0.0, threading.Lock()

    def reserve(self) -> float:
        """0.0: start now (counted); otherwise the seconds to wait before asking again."""
        with self.lock:
            now = time.monotonic()
            if now >= self.next_start:
                self.next_start = now + self.interval
                return 0.0
            return self.next_start - now

    def wait(self) -> None:
        while (delay := self.reserve()) > 0:
            time.sleep(delay)

    async def wait_async(self) -> None:
        while (delay := self.reserve()) > 0:
            await asyncio.sleep(delay)


class OpenAIJudge:
    """Any OpenAI-compatible chat-completions endpoint through the `openai` client (AsyncOpenAI): retries with
    backoff, a rate limit, a limit on requests in flight, timeouts."""

    # Retries are ours; the client gets max_retries=0. Its own retries re-send from inside one create() call:
    # a rate limit taken around the call would not space them, they would sleep holding a concurrency slot, and
    # the error we record could not say how many attempts failed. Ours wait for the rate limit on every attempt
    # (it sits in the HTTP request hook: whatever goes on the wire waits for its slot), back off outside the
    # concurrency limit, honour Retry-After, and record the last problem. The client gives the typed errors.
    RETRY_STATUS = (408, 409, 429)  # and every 5xx: the server is busy or failed, not the request itself
    PLACEHOLDER_KEY = "EMPTY"  # the client needs some key; local servers (vLLM without --api-key) ignore it
    MAX_BACKOFF_S = 30.0
    MAX_RETRY_AFTER_S = 120.0  # a server's Retry-After is honoured up to this

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str], max_tokens: int,
                 retries: int, timeout_s: float, requests_per_second: float, concurrency: int):
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise JudgeError(f"judge.api_key_env: the environment variable {api_key_env} is not set "
                                 "(set it where the job runs)")
        # Only the key named by api_key_env is ever sent: never the client's ambient OPENAI_API_KEY (nor an
        # Authorization header from OPENAI_CUSTOM_HEADERS), which is what the client would use given None.
        self.api_key = key or self.PLACEHOLDER_KEY
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.max_tokens, self.retries, self.timeout_s = model, max_tokens, retries, timeout_s
        self.rate, self.concurrency = RateLimit(requests_per_second), concurrency
        self.quiet_client_logs()

    def complete(self, requests: list[tuple[list[dict], float, int]]) -> list[tuple[str, Optional[str]]]:
        """requests: (messages, temperature, seed) -> (text, error or None) each, in order. Synchronous: runs its
        own event loop (in a helper thread when the caller is inside one already)."""
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._complete(requests))
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._complete(requests)).result()

    def ask(self, messages: list[dict], temperature: float, seed: int) -> tuple[str, Optional[str]]:
        return self.complete([(messages, temperature, seed)])[0]

    async def _complete(self, requests: list[tuple[list[dict], float, int]]) -> list[tuple[str, Optional[str]]]:
        import openai

        # The rate limit waits in the HTTP client's request hook: a start is when a request goes on the wire, after
        # the client's own set-up. A client (and its connection pool) per call: they belong to this call's loop.
        http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [self._request_starts]})
        async with openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                                      timeout=self.timeout_s, http_client=http,
                                      default_headers={"Authorization": f"Bearer {self.api_key}"}) as client:
            in_flight = asyncio.Semaphore(self.concurrency)
            tasks = [asyncio.ensure_future(self._ask(client, in_flight, *request)) for request in requests]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                # A JudgeError (or a cancellation) stops the job: nothing else is left running or sending.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    def backoff_s(self, attempt: int) -> float:
        """Before retry `attempt` (1, 2, ...): exponential backoff with jitter, so that many requests do not retry
        in lockstep. A server's Retry-After, when it sent one, is waited at least."""
        return min(self.MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())

    async def _request_starts(self, request) -> None:
        await self.rate.wait_async()

    async def _ask(self, client, in_flight: asyncio.Semaphore, messages: list[dict], temperature: float,
                   seed: int) -> tuple[str, Optional[str]]:
        import openai

        problem, retry_after = "no attempt", None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(max(self.backoff_s(attempt), retry_after or 0.0))
            async with in_flight:
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=self.model, messages=messages, temperature=temperature, max_tokens=self.max_tokens,
                        seed=seed)
                except openai.APIConnectionError as err:  # APITimeoutError included
                    cause = err.__cause__
                    problem = f"{type(err).__name__}: {err}" + (f" ({type(cause).__name__}: {cause})"
                                                                if cause is not None else "")
                    retry_after = None
                    continue
                except openai.APIStatusError as err:
                    status, text = err.status_code, err.response.text
                    if status in self.RETRY_STATUS or status >= 500:
                        problem, retry_after = f"HTTP {status}: {text[:200]}", self.retry_after_s(err.response)
                        continue
                    # A wrong key, model name or URL fails every request the same way: stop the job and say so.
                    raise JudgeError(f"judge endpoint {self.url} answered HTTP {status}: {text[:300]}") from None
            try:
                return raw.parse().choices[0].message.content or "", None
            except (ValueError, AttributeError, KeyError, IndexError, TypeError):
                return "", f"not a chat completion: {raw.text[:200]}"
        return "", f"gave up after {self.retries + 1} attempts ({problem})"

    @classmethod
    def retry_after_s(cls, response) -> Optional[float]:
        """A Retry-After (or retry-after-ms) header in seconds, when it is a number up to the cap."""
        for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                seconds = float(response.headers.get(header, "")) * scale
            except ValueError:
                continue
            if 0 < seconds <= cls.MAX_RETRY_AFTER_S:
                return seconds
        return None

    @staticmethod
    def quiet_client_logs() -> None:
        """The openai client and its HTTP libraries log every request (INFO, DEBUG); our retries say enough: keep them
        to warnings unless someone configured those loggers (or OPENAI_LOG) on purpose."""
        for name in ("openai", "httpx2", "httpx", "httpcore2", "httpcore"):
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.WARNING)


class RuleJudge:
    """A Python function that scores answers (eval.judge.function, "module:function"), called as
    f(question, answer, reference) for each turn; a verifiable task (exact answers, unit tests) needs no LLM."""

    def __init__(self, function: str):
        try:
            self.function = import_function(function, "judge.function")
        except ConfigError as err:
            raise JudgeError(str(err)) from None
        self.name = function

    def scores(self, task: dict) -> list[float]:
        """The score of each answer shown in the task (one in single mode, two in pairwise mode)."""
        given = task["messages"]
        scores = []
        for answer in given["answers"]:
            try:
                score = self.function(given["question"], answer, given["reference"])
            except Exception as err:  # noqa: BLE001 - a bug in the user's rule stops the job, named
                raise JudgeError(f"judge.function {self.name} raised {type(err).__name__}: {err} (question "
                                 f"{task['question_id']}, turn {task['turn']})") from None
            if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
                raise JudgeError(f"judge.function {self.name} returned {score!r} for question "
                                 f"{task['question_id']}, turn {task['turn']}: expected a number")
            scores.append(float(score))
        return scores
