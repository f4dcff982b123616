"""MT-Bench-style evaluation: vLLM answers, an LLM judge, statistics and a report, in one eval folder.

    answers.jsonl     one record per model and question (every turn's text and token count)
    judgments.jsonl   one record per judgment, the judge's raw text kept, unparseable verdicts included
    report.json       the statistics (eval_stats), report.md and PNG charts (eval_report)
    model_answer/, model_judgment/   the same answers and judgments in FastChat's layout (fastchat_export)

Both JSONL files are appended as work finishes, so a re-run (or a job that died) only computes what is missing.
A record is reused only while everything it depends on is unchanged: an answer carries the model's weights
identity and the generation settings, a judgment a digest of the exact messages the judge saw and the judge.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from tgdpo_ray.runtime.ray_start import start_ray

from tgdpo_ray.common.jsonl import append_records, json_digest, read_records, rewrite_records
from tgdpo_ray.common.model_files import weights_identity
from tgdpo_ray.config.eval import EvalModel, EvalSection, JudgeSection
from tgdpo_ray.config.job import JobConfig
from tgdpo_ray.eval.fastchat_export import write_fastchat_files
from tgdpo_ray.eval.generation import Engine, answer_questions, engine_group
from tgdpo_ray.eval.judge import (FASTCHAT_ASKS, PARSERS, OpenAIJudge, RuleJudge, VLLMJudge, check_references,
                                  load_prompts, render)
from tgdpo_ray.eval.questions import Question, load_questions
from tgdpo_ray.eval.report import format_table, write_eval_report
from tgdpo_ray.eval.stats import length_summary, pairwise_summary, single_summary
from tgdpo_ray.runtime.placement import check_fits

JUDGE_BATCH = 32  # judgments asked per round trip; each batch is on disk, with a progress line, before the next


def eval_log(log):
    return lambda message: log(f"[eval] {message}")


def answer_identity(model: EvalModel, evaluation: EvalSection, seed: int) -> str:
    generation = evaluation.generation
    return json_digest([weights_identity(model.path), generation.max_new_tokens, generation.temperatures, seed,
                   generation.max_model_len])


# ---------------------------------------------------------------- answers


def collect_answers(config: JobConfig, models: list[EvalModel], questions: list[Question], log=print) -> list[dict]:
    evaluation, path = config.eval, config.eval_dir / "answers.jsonl"
    generation = evaluation.generation
    identity = {model.name: answer_identity(model, evaluation, config.run.seed) for model in models}
    wanted = {(model.name, q.question_id) for model in models for q in questions}
    done = {(r["model"], r["question_id"]): r for r in read_records(path, eval_log(log))
            if identity.get(r["model"]) == r.get("identity") and (r["model"], r["question_id"]) in wanted}
    todo = [model for model in models if any((model.name, q.question_id) not in done for q in questions)]
    if len(done):
        log(f"[eval] answers: {len(done)} of {len(wanted)} already on disk, reused")
    write = threading.Lock()

    def answer(model: EvalModel, engine) -> None:
        missing = [q for q in questions if (model.name, q.question_id) not in done]
        engine.wait_started()
        progress = Progress(f"{model.name}: answered", sum(len(q.turns) for q in missing), "turns", eval_log(log))
        for start in range(0, len(missing), generation.questions_per_batch):
            batch = missing[start:start + generation.questions_per_batch]
            records = answer_questions(engine, model.name, batch, generation, config.run.seed)
            for record in records:
                record["identity"] = identity[model.name]
            with write:  # each batch is on disk before the next one starts
                append_records(path, records)
                done.update({(model.name, record["question_id"]): record for record in records})
            progress.advance(sum(len(record["turns"]) for record in records),
                             sum(sum(record["tokens"]) for record in records))

    concurrent = generation.concurrent_models
    for start in range(0, len(todo), concurrent):
        group = todo[start:start + concurrent]
        engines = []
        try:
            for model in group:
                log(f"[eval] {model.name}: starting a vLLM engine for {model.path}")
                engines.append(Engine(model.path, generation, config.run.seed, "eval.generation",
                                      model.trust_remote_code, eval_log(log)))
            with ThreadPoolExecutor(len(group)) as pool:  # the engines answer at once
                list(pool.map(answer, group, engines))
        finally:
            release(engines)
    answers = [done[(model.name, q.question_id)] for model in models for q in questions]
    rewrite_records(path, answers)
    return answers


class Progress:
    """One line per step of long work: done of total, tokens per second, and the time left at that pace (`log`
    adds the job's prefix)."""

    def __init__(self, what: str, total: int, unit: str, log=print):
        self.what, self.total, self.unit, self.log = what, total, unit, log
        self.done, self.tokens, self.began = 0, 0, time.monotonic()

    def advance(self, count: int, tokens: int = 0) -> None:
        self.done, self.tokens = self.done + count, self.tokens + tokens
        elapsed = max(time.monotonic() - self.began, 1e-9)
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        rate = f", {self.tokens / elapsed:.1f} tokens/s" if self.tokens else ""
        self.log(f"{self.what} {self.done}/{self.total} {self.unit}{rate}, {elapsed:.1f} s so far, "
                 f"about {left:.1f} s left")


def release(engines: list) -> None:
    for engine in engines:
        engine.release()


# ---------------------------------------------------------------- judgments


def judgment_tasks(evaluation: EvalSection, questions: list[Question], answers: list[dict], names: list[str],
                   prompts: Optional[dict]) -> list[dict]:
    """Every judgment the report needs, with what the judge will see: the chat messages of an LLM judge, or the
    question, reference and answers a rule judge scores (prompts is None)."""
    by_key = {(record["model"], record["question_id"]): record for record in answers}
    mode, judge_id = evaluation.judge.mode, evaluation.judge.identity
    # A verdict read by other rules is another judgment: switching judge.parse judges again. The default adds
    # nothing, so judgments made before judge.parse existed are still reused.
    parse = [] if evaluation.judge.parse == "tgdpo-ray" else [evaluation.judge.parse]
    if mode == "single":
        shown = [({"model": name}, [name]) for name in names]
    else:  # every comparison in both orders: "ab" shows model_a's answer first, "ba" model_b's
        shown = [(fields, order) for a, b in evaluation.comparisons(names)
                 for fields, order in (({"model_a": a, "model_b": b, "order": "ab"}, [a, b]),
                                       ({"model_a": a, "model_b": b, "order": "ba"}, [b, a]))]
    tasks = []
    for question in questions:
        for turn in range(1, len(question.turns) + 1):
            for fields, order in shown:
                records = [by_key[(model, question.question_id)] for model in order]
                if prompts is None:
                    reference = (question.reference or ())[turn - 1:turn]
                    prompt, messages = "rule", {"question": question.turns[turn - 1],
                                                "reference": reference[0] if reference else None,
                                                "answers": [r["turns"][turn - 1] for r in records]}
                else:
                    prompt, messages = render(prompts, mode, question, turn, [r["turns"][:turn] for r in records])
                # Two models may give the same answer: the digest names the judgment as well as its messages.
                where = [mode, fields, question.question_id, turn]
                tasks.append({
                    "mode": mode, **fields, "question_id": question.question_id, "category": question.category,
                    "turn": turn, "prompt": prompt, "judge": judge_id,
                    "digest": json_digest([where, messages, judge_id, *parse]),
                    # An answer that could not be generated is not sent to the judge (see judge_all).
                    "answer_errors": [r["errors"][turn - 1] for r in records if r["errors"][turn - 1]],
                    "messages": messages,
                })
    return tasks


def read_verdict(task: dict, text: str, parse: str = "tgdpo-ray") -> tuple[dict, Optional[str]]:
    """The verdict fields of a judgment record, and why parsing failed (None when it did not); `parse` is
    judge.parse, whose rules read the text (judge.PARSERS)."""
    parse_rating, parse_choice = PARSERS[parse]
    if task["mode"] == "single":
        score, why = parse_rating(text)
        return {"score": score}, why
    choice, why = parse_choice(text)
    return choice_fields(task, choice), why


def choice_fields(task: dict, choice: Optional[str]) -> dict:
    """A pairwise verdict ("A": the answer shown first, "B", "tie" or None) and the model it names."""
    shown_first, shown_second = ((task["model_a"], task["model_b"]) if task["order"] == "ab"
                                 else (task["model_b"], task["model_a"]))
    winner = {"A": shown_first, "B": shown_second, "tie": "tie", None: None}[choice]
    return {"verdict": choice, "winner": winner}


def judge_all(start_backend, evaluation: EvalSection, tasks: list[dict], path: Path, log=print) -> list[dict]:
    """Asks the judge for every task not already on disk (start_backend() gives the judge, only when needed).
    An unparseable verdict is asked again (sampling at judge.retry_temperature) up to judge.parse_retries
    times, then recorded as unparseable with its text."""
    done = {r["digest"]: r for r in read_records(path, eval_log(log))}
    todo = [task for task in tasks if task["digest"] not in done]
    if len(tasks) > len(todo):
        log(f"[eval] judgments: {len(tasks) - len(todo)} of {len(tasks)} already on disk, reused")
    backend = start_backend() if todo else None
    progress = Progress("judged", len(todo), "judgments", eval_log(log))
    unparseable = 0
    for start in range(0, len(todo), JUDGE_BATCH):
        batch, finished = todo[start:start + JUDGE_BATCH], []
        for task in batch:
            if task["answer_errors"]:
                finished.append(judgment_record(task, "", {}, 0,
                                                "answer missing: " + "; ".join(task["answer_errors"]), []))
        asking = [task for task in batch if not task["answer_errors"]]
        if evaluation.judge.backend == "rule":
            finished += [rule_judgment(backend, task) for task in asking]
        else:
            finished += ask_llm_judge(backend, evaluation.judge, asking)
        append_records(path, finished)
        for record in finished:
            done[record["digest"]] = record
        unparseable += sum(record["error"] is not None for record in finished)
        progress.advance(len(batch))
        if unparseable:
            log(f"[eval] unparseable or failed judgments so far: {unparseable}")
    judgments = [done[task["digest"]] for task in tasks]
    rewrite_records(path, judgments)
    return judgments


def ask_llm_judge(backend, judge: JudgeSection, asking: list[dict]) -> list[dict]:
    """Judgment records for tasks, asking again while a verdict cannot be parsed: ours sample at
    retry_temperature, up to parse_retries times; judge.parse fastchat asks as FastChat does (FASTCHAT_ASKS)."""
    finished = []
    earlier: dict[str, list[str]] = {task["digest"]: [] for task in asking}
    fastchat = judge.parse == "fastchat"
    attempt = 0
    while asking:
        attempt += 1
        # FastChat repeats the same request; ours samples warmer so the judge can answer differently.
        temperature = judge.temperature if attempt == 1 or fastchat else judge.retry_temperature
        replies = backend.complete([(task["messages"], temperature, zlib.crc32(f"{task['digest']}/{attempt}"
                                                                                 .encode())) for task in asking])
        again = []
        for task, (text, error) in zip(asking, replies):
            fields, why = read_verdict(task, text, judge.parse) if error is None else ({}, error)
            asks = FASTCHAT_ASKS[task["mode"]] if fastchat else judge.parse_retries + 1
            if why is not None and error is None and attempt < asks:
                earlier[task["digest"]].append(text)
                again.append(task)
                continue
            finished.append(judgment_record(task, text, fields, attempt, why, earlier[task["digest"]]))
        asking = again
    return finished


def rule_judgment(backend, task: dict) -> dict:
    """A rule judge's record: its score of the answer (single), or the better-scored answer (pairwise)."""
    scores = backend.scores(task)
    text = "rule scores: " + ", ".join(f"{score:g}" for score in scores)
    if task["mode"] == "single":
        return judgment_record(task, text, {"score": scores[0]}, 1, None, [])
    first, second = scores
    choice = "A" if first > second else "B" if second > first else "tie"
    return judgment_record(task, text, choice_fields(task, choice), 1, None, [])


def judgment_record(task: dict, text: str, fields: dict, attempts: int, error: Optional[str],
                    earlier_texts: list[str]) -> dict:
    record = {key: value for key, value in task.items() if key not in ("messages", "answer_errors")}
    if task["mode"] == "single":
        record["score"] = fields.get("score")
    else:
        record.update(verdict=fields.get("verdict"), winner=fields.get("winner"))
    record.update(judge_text=text, attempts=attempts, error=error, earlier_texts=earlier_texts)
    return record


def start_judge(judge: JudgeSection, seed: int, engines: list, log=print, key: str = "eval.judge"):
    """The judge backend; a vLLM engine it starts is added to `engines`, for the caller to release. `key` names
    the judge's config section in errors."""
    if judge.backend == "rule":
        return RuleJudge(judge.function)
    if judge.backend == "openai":
        return OpenAIJudge(judge.base_url, judge.model, judge.api_key_env, judge.max_tokens, judge.request_retries,
                           judge.timeout_s, judge.requests_per_second, judge.concurrency)
    log(f"judge: starting a vLLM engine for {judge.model}")
    engines.append(Engine(judge.model, judge, seed, key, log=log))
    engines[-1].wait_started()
    return VLLMJudge(engines[-1], judge.model, judge.max_tokens)


# ---------------------------------------------------------------- the job


def evaluated_models(config: JobConfig, trained: Optional[dict[str, str]] = None) -> list[EvalModel]:
    """kind eval: eval.models. A pipeline: its trained policies (name -> model dir) first, then eval.models."""
    trained_models = [EvalModel(name=name, path=path) for name, path in (trained or {}).items()]
    return trained_models + list(config.eval.models)


def run_eval(config: JobConfig, trained: Optional[dict[str, str]] = None, log=print) -> dict:
    """Answers, judgments, statistics and the report in config.eval_dir; returns the summary (report.json)."""
    evaluation, judge = config.eval, config.eval.judge
    models = evaluated_models(config, trained)
    names = [model.name for model in models]
    # Everything that can be wrong with the inputs fails here, before any model loads.
    questions = load_questions(evaluation.questions.path, split=evaluation.questions.split,
                               categories=tuple(evaluation.generation.temperatures),
                               references=evaluation.questions.references, limit=evaluation.questions.limit)
    if judge.backend == "rule":
        RuleJudge(judge.function)  # imports the function now, not after the answers
        prompt_set, prompts = "none (rule judge)", None
    else:
        prompt_set = judge.prompts or ("fastchat" if evaluation.questions.path == "mt_bench" else "tgdpo-ray")
        prompts = load_prompts(prompt_set)
        check_references(questions)
    eval_dir = config.eval_dir
    eval_dir.mkdir(parents=True, exist_ok=True)
    log(f"[eval] {len(questions)} questions, models {names}, judge {judge.identity} ({judge.mode} mode, "
        f"prompts {prompt_set}), writing to {eval_dir}")

    start_ray(config)
    check_fits([engine_group("answer engines", evaluation.generation,
                             min(evaluation.generation.concurrent_models, len(models)))])
    if judge.backend == "vllm":
        check_fits([engine_group("judge engine", judge)])
    answers = collect_answers(config, models, questions, log)

    tasks = judgment_tasks(evaluation, questions, answers, names, prompts)
    judge_engines: list = []
    try:
        judgments = judge_all(lambda: start_judge(judge, config.run.seed, judge_engines, eval_log(log)), evaluation,
                              tasks, eval_dir / "judgments.jsonl", log)
    finally:
        release(judge_engines)

    samples, seed = evaluation.bootstrap_samples, config.run.seed
    summary = {
        "mode": judge.mode, "judge": judge.identity, "judge_prompts": prompt_set, "judge_parse": judge.parse,
        "questions": len(questions),
        "models": names,
        "scores": single_summary(judgments, samples, seed, answers=answers) if judge.mode == "single" else None,
        "pairwise": (pairwise_summary(judgments, samples, seed, answers=answers) if judge.mode == "pairwise"
                     else None),
        "lengths": length_summary(answers),
        "answer_errors": sum(error is not None for record in answers for error in record["errors"]),
        "unparseable_judgments": sum(record["error"] is not None for record in judgments),
        "judgments": len(judgments),
    }
    (eval_dir / "report.json").write_text(json.dumps(summary, indent=2))
    report = write_eval_report(eval_dir, summary)
    log("\n" + format_table(summary))
    log(f"\n[eval] {summary['unparseable_judgments']} of {len(judgments)} judgments unparseable or failed "
        f"(kept in judgments.jsonl); report: {report}")
    fastchat_files = write_fastchat_files(eval_dir, answers, judgments, tasks)
    log(f"[eval] FastChat's layout (for its show_result.py --input-file): {eval_dir / 'model_answer'}/, "
        + ", ".join(str(path) for path in fastchat_files["judgments"]))
    return summary
