"""On-policy preference pairs (kind: pairs): sample answers with vLLM on the cluster, rank them, keep the best and
the worst as chosen and rejected, as the TGDPO and SimPO recipes built their data.

    samples.jsonl      one record per prompt: every sampled answer, with the sampler's identity
    scores.jsonl       one record per prompt: the ranker's score of every answer (null where it failed)
    pairs.jsonl        the preference pairs (prompt, chosen, rejected) with their provenance: what `kind: train`
                       and `kind: pipeline` read
    pairs_report.json  counts: prompts, pairs, prompts skipped and why, mean best and worst scores

Samples and scores are appended batch by batch, so a stopped job resumes where it was: a prompt already sampled
by the same model with the same settings is not sampled again, an answer already scored by the same ranker is not
scored again. Every answer of a prompt gets its own seed, so its text is the same however prompts are batched.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from tgdpo_ray.runtime.ray_start import start_ray

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.jsonl import append_records, json_digest, read_records, rewrite_records
from tgdpo_ray.common.model_files import weights_identity
from tgdpo_ray.config.job import JobConfig, PairsSection, RewardModelSection
from tgdpo_ray.config.loader import import_function
from tgdpo_ray.data.preference import BadRow, DataError, iter_raw_rows, to_messages
from tgdpo_ray.runtime.placement import check_fits, process_group


class PairsError(UserError, RuntimeError):
    """A ranker that fails on an answer; the message names the ranker and the prompt."""


@dataclass(frozen=True)
class Prompt:
    index: int  # the row's position in the source, from 0 (a pair's pair_id in training is its row in pairs.jsonl)
    where: str  # "line 3" or "row 3": where the row is in the source, for messages
    messages: list  # chat messages, the last one the user's
    value: object  # the prompt as the source holds it (text or messages): the pairs keep it so
    reference: Optional[str]

    @property
    def text(self) -> str:
        """What a rule or a judge is shown as the question: the last user message."""
        return self.messages[-1]["content"]

    @property
    def digest(self) -> str:
        return json_digest([self.messages, self.reference])


def pairs_log(log):
    return lambda message: log(f"[pairs] {message}")


# ---------------------------------------------------------------- prompts


def load_prompts(section: PairsSection, log=print) -> tuple[list[Prompt], dict]:
    """The prompts of pairs.prompts, and the bad rows skipped (reason -> count); a bad row stops the job naming its
    file and line unless pairs.bad_rows is skip."""
    prompts, skipped = [], {}
    source = section.prompts
    for index, (unit, number, row) in enumerate(iter_raw_rows(source)):
        if source.limit is not None and index >= source.limit:
            break
        try:
            if isinstance(row, BadRow):
                raise row
            if section.prompt_column not in row:
                raise BadRow("missing_field", f"no {section.prompt_column!r} field (fields: {sorted(row)})")
            messages = to_messages(row[section.prompt_column], section.prompt_column, "user")
            if messages[-1]["role"] != "user":
                raise BadRow("non_string_content", f"{section.prompt_column}: the last message is not the user's")
        except BadRow as bad:
            if section.bad_rows == "error":
                raise DataError(f"{source.path}: {unit} {number}: {bad.reason}: {bad.detail} (set pairs.bad_rows: "
                                "skip to drop such prompts and count them)") from None
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            continue
        reference = row.get(section.reference_column)
        prompts.append(Prompt(index, f"{unit} {number}", messages, row[section.prompt_column],
                              reference if reference is None or isinstance(reference, str) else json.dumps(reference)))
    if not prompts:
        raise DataError(f"{source.path}: no usable prompts ({dict(skipped)} skipped)")
    if skipped:
        log(f"[pairs] {source.path}: skipped {sum(skipped.values())} bad prompt(s) ({skipped})")
    return prompts, skipped


# ---------------------------------------------------------------- sampling


def sampler_identity(config: JobConfig) -> str:
    """Everything a prompt's answers depend on, besides the prompt: a sample is reused only while it is equal."""
    section = config.pairs
    return json_digest([weights_identity(sampler_model(config)), section.num_samples, section.temperature,
                   section.top_p, section.max_new_tokens, section.generation.max_model_len, config.run.seed])


def sampler_model(config: JobConfig) -> str:
    return config.pairs.model or config.policy.model


def sample_settings(section: PairsSection, seed: int, prompt: Prompt) -> list[dict]:
    # A seed per prompt and sample: an answer's text does not depend on which batch or engine sampled it.
    return [{"temperature": section.temperature, "top_p": section.top_p, "max_tokens": section.max_new_tokens,
             "seed": zlib.crc32(f"{seed}/{prompt.index}/{sample}".encode())} for sample in range(section.num_samples)]


def sample_answers(config: JobConfig, prompts: list[Prompt], log=print) -> dict[int, dict]:
    """prompt index -> its samples record, sampling the prompts not already on disk."""
    from tgdpo_ray.eval.flow import Progress, release
    from tgdpo_ray.eval.generation import Engine

    section, path = config.pairs, config.run_dir / "samples.jsonl"
    identity, model = sampler_identity(config), sampler_model(config)
    wanted = {prompt.index: prompt.digest for prompt in prompts}
    done = {r["prompt_index"]: r for r in read_records(path, pairs_log(log))
            if r.get("identity") == identity and wanted.get(r["prompt_index"]) == r.get("prompt_digest")}
    todo = [prompt for prompt in prompts if prompt.index not in done]
    if done:
        log(f"[pairs] samples: {len(done)} of {len(prompts)} prompts already on disk, reused")
    if not todo:
        return done
    size = section.prompts_per_batch
    batches = [todo[start:start + size] for start in range(0, len(todo), size)]
    progress = Progress("sampled", len(todo), "prompts", pairs_log(log))
    lock = threading.Lock()

    def sample_with(engine) -> None:
        engine.wait_started()
        while True:
            with lock:  # each engine takes the next batch when it is free
                if not batches:
                    return
                batch = batches.pop(0)
            conversations = [prompt.messages for prompt in batch for _ in range(section.num_samples)]
            settings = [s for prompt in batch for s in sample_settings(section, config.run.seed, prompt)]
            replies = engine.chat(conversations, settings)
            records = []
            for number, prompt in enumerate(batch):
                answers = replies[number * section.num_samples:(number + 1) * section.num_samples]
                records.append({"prompt_index": prompt.index, "prompt_digest": prompt.digest, "identity": identity,
                                "answers": [reply["text"] for reply in answers],
                                "finish_reasons": [reply["finish_reason"] for reply in answers],
                                "tokens": [reply["tokens"] for reply in answers],
                                "errors": [answer_error(reply) for reply in answers]})
            with lock:  # each batch is on disk before the engine takes the next
                append_records(path, records)
                done.update({record["prompt_index"]: record for record in records})
                progress.advance(len(batch), sum(sum(record["tokens"]) for record in records))

    engines = []
    try:
        for _ in range(min(section.engines, len(batches))):
            log(f"[pairs] starting a vLLM engine for {model}")
            engines.append(Engine(model, section.generation, config.run.seed, "pairs.generation",
                                  section.trust_remote_code, pairs_log(log)))
        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(sample_with, engines))
    finally:
        release(engines)
    return done


def answer_error(reply: dict) -> Optional[str]:
    """Why an answer cannot be ranked: vLLM's error, or nothing written (no pair can hold an empty answer)."""
    if reply["error"] is None and not reply["text"].strip():
        return "empty answer"
    return reply["error"]


# ---------------------------------------------------------------- ranking


def rank_answers(config: JobConfig, prompts: list[Prompt], samples: dict[int, dict], log=print) -> dict[int, dict]:
    """prompt index -> its scores record ({scores, errors, ...}), scoring the prompts not already on disk. A
    failed answer (vLLM's error, or an unparseable judgment) is not scored: its score is None."""
    ranker, path = config.pairs.ranker, config.run_dir / "scores.jsonl"
    keys = {prompt.index: json_digest([prompt.digest, samples[prompt.index]["identity"], ranker.identity])
            for prompt in prompts}
    done = {r["prompt_index"]: r for r in read_records(path, pairs_log(log)) if keys.get(r["prompt_index"]) == r["key"]}
    todo = [prompt for prompt in prompts if prompt.index not in done]
    if done:
        log(f"[pairs] scores: {len(done)} of {len(prompts)} prompts already on disk, reused")
    if not todo:
        return done
    rank = {"rule": rank_by_rule, "judge": rank_by_judge, "reward_model": rank_by_reward_model}[ranker.type]
    for records in rank(config, todo, samples, log):  # each batch is on disk before the next
        for record in records:
            record.update(key=keys[record["prompt_index"]], ranker=ranker.identity)
        append_records(path, records)
        done.update({record["prompt_index"]: record for record in records})
    return done


def scores_record(prompt: Prompt, scores: list, errors: list, **extra) -> dict:
    return {"prompt_index": prompt.index, "scores": scores, "errors": errors, **extra}


def rank_by_rule(config: JobConfig, prompts: list[Prompt], samples: dict[int, dict], log=print):
    from tgdpo_ray.eval.flow import Progress

    function_name = config.pairs.ranker.function
    function = import_function(function_name, "pairs.ranker.function")
    progress = Progress("ranked", len(prompts), "prompts", pairs_log(log))
    batch_size = config.pairs.prompts_per_batch
    for start in range(0, len(prompts), batch_size):
        records = []
        for prompt in prompts[start:start + batch_size]:
            record = samples[prompt.index]
            scores = [None if error else rule_score(function, function_name, prompt, answer)
                      for answer, error in zip(record["answers"], record["errors"])]
            records.append(scores_record(prompt, scores, record["errors"]))
        progress.advance(len(records))
        yield records


def rule_score(function, name: str, prompt: Prompt, answer: str) -> float:
    try:
        score = function(prompt.text, answer, prompt.reference)
    except Exception as err:  # noqa: BLE001 - a bug in the user's rule stops the job, named
        raise PairsError(f"pairs.ranker.function {name} raised {type(err).__name__}: {err} (prompt at "
                         f"{prompt.where} of the prompts file)") from None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
        raise PairsError(f"pairs.ranker.function {name} returned {score!r} for the prompt at {prompt.where}: "
                         "expected a number")
    return float(score)


def rank_by_judge(config: JobConfig, prompts: list[Prompt], samples: dict[int, dict], log=print):
    """An LLM judge grades every answer 1-10 with the single-answer prompt (judge.prompts, ours by default),
    asking again while a verdict cannot be parsed, as the evaluation does."""
    from tgdpo_ray.eval.flow import Progress, ask_llm_judge, release, start_judge
    from tgdpo_ray.eval.judge import load_prompts as load_judge_prompts
    from tgdpo_ray.eval.judge import render
    from tgdpo_ray.eval.questions import Question

    judge = config.pairs.ranker.judge
    templates = load_judge_prompts(judge.prompts or "tgdpo-ray")
    engines: list = []
    try:
        backend = start_judge(judge, config.run.seed, engines, pairs_log(log), key="pairs.ranker.judge")
        progress = Progress("ranked", len(prompts), "prompts", pairs_log(log))
        batch_size = config.pairs.prompts_per_batch
        for start in range(0, len(prompts), batch_size):
            batch, tasks = prompts[start:start + batch_size], []
            for prompt in batch:
                question = Question(str(prompt.index), "pairs", (prompt.text,), None)
                for sample, (answer, error) in enumerate(zip(samples[prompt.index]["answers"],
                                                             samples[prompt.index]["errors"])):
                    if error is None:
                        _, messages = render(templates, "single", question, 1, [[answer]])
                        tasks.append({"mode": "single", "prompt_index": prompt.index, "sample": sample,
                                      "digest": json_digest([prompt.digest, sample, answer]), "messages": messages})
            judged = {(r["prompt_index"], r["sample"]): r for r in ask_llm_judge(backend, judge, tasks)}
            records = []
            for prompt in batch:
                answers = range(len(samples[prompt.index]["answers"]))
                found = [judged.get((prompt.index, sample)) for sample in answers]
                records.append(scores_record(
                    prompt, [r and r["score"] for r in found],
                    [samples[prompt.index]["errors"][s] or (r and r["error"]) for s, r in zip(answers, found)],
                    judge_texts=[r and r["judge_text"] for r in found]))
            progress.advance(len(batch))
            yield records
    finally:
        release(engines)


class RewardScorer:
    """A Ray Data callable class: a sequence-classification reward model scoring conversations (one actor each)."""

    def __init__(self, model: str, precision: str, trust_remote_code: bool, max_length: int):
        import torch
        from transformers import AutoModelForSequenceClassification

        from tgdpo_ray.modeling.loading import load_tokenizer, resolve_dtype
        from tgdpo_ray.runtime.placement import pick_device

        self.device = pick_device()
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.tokenizer.truncation_side = "left"  # keep the answer, which is what is scored
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, dtype=resolve_dtype(precision), trust_remote_code=trust_remote_code).to(self.device).eval()
        if self.model.config.pad_token_id is None:  # it finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length, self.torch = max_length, torch

    def __call__(self, batch: dict) -> dict:
        texts = [self.tokenizer.apply_chat_template(json.loads(conversation), tokenize=False)
                 for conversation in batch["conversation"]]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                                add_special_tokens=False).to(self.device)
        with self.torch.inference_mode():
            output = self.model(**inputs)
        # ArmoRM's own head returns its preference score as `score`; a plain classification head has one logit.
        score = output.score if self.torch.is_tensor(getattr(output, "score", None)) else output.logits[:, 0]
        batch["score"] = score.reshape(-1).float().cpu().numpy()
        return batch


def reward_pool_group(section: RewardModelSection):
    return process_group("reward model", section, section.replica_range, section.cpus_per_replica,
                         section.gpus_per_replica)


def rank_by_reward_model(config: JobConfig, prompts: list[Prompt], samples: dict[int, dict], log=print):
    """Every answer through the reward model's Ray Data actor pool, streamed: a prompt's record is written as soon
    as all of its answers are scored (Ray Data keeps the order)."""
    import ray
    from tgdpo_ray.eval.flow import Progress
    from tgdpo_ray.runtime.ray_start import configure_ray_data
    from tgdpo_ray.scoring.pools import pool_options

    section = config.pairs.ranker.reward_model
    items = [{"prompt_index": prompt.index, "sample": sample,
              "conversation": json.dumps(prompt.messages + [{"role": "assistant", "content": answer}])}
             for prompt in prompts
             for sample, (answer, error) in enumerate(zip(samples[prompt.index]["answers"],
                                                          samples[prompt.index]["errors"])) if error is None]
    by_index = {prompt.index: prompt for prompt in prompts}
    scores: dict[int, dict[int, float]] = {prompt.index: {} for prompt in prompts}
    pending = [prompt.index for prompt in prompts]  # in order: Ray Data preserves it
    progress = Progress("ranked", len(prompts), "prompts", pairs_log(log))

    def finished_records() -> list[dict]:
        records = []
        while pending:
            record = samples[pending[0]]
            expected = sum(error is None for error in record["errors"])
            if len(scores[pending[0]]) < expected:
                break
            index = pending.pop(0)
            records.append(scores_record(by_index[index], [scores[index].get(s) for s in range(len(record["answers"]))],
                                         record["errors"]))
        return records

    if items:
        configure_ray_data()
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // section.batch_size)).map_batches(
            RewardScorer, fn_constructor_kwargs=dict(model=section.model, precision=section.precision or "auto",
                                                     trust_remote_code=section.trust_remote_code,
                                                     max_length=section.max_length),
            **pool_options(section))
        for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
            for index, sample, score in zip(batch["prompt_index"], batch["sample"], batch["score"]):
                scores[int(index)][int(sample)] = float(score)
            records = finished_records()
            if records:
                progress.advance(len(records))
                yield records
    records = finished_records()  # prompts whose answers all failed
    if records:
        progress.advance(len(records))
        yield records


# ---------------------------------------------------------------- pairs


def choose_pair(prompt: Prompt, samples: dict, scores: dict) -> tuple[Optional[dict], Optional[str]]:
    """(the pair, None), or (None, why it was skipped): failed (fewer than two answers scored) or tie (the best and
    the worst score, or text, are equal)."""
    scored = [(score, sample) for sample, score in enumerate(scores["scores"]) if score is not None]
    if len(scored) < 2:
        return None, "failed"
    best = max(scored, key=lambda item: (item[0], -item[1]))  # ties go to the lowest sample index
    worst = min(scored, key=lambda item: (item[0], item[1]))
    answers = samples["answers"]
    if best[0] == worst[0] or answers[best[1]] == answers[worst[1]]:
        return None, "tie"
    return {"prompt": prompt.value, "chosen": answers[best[1]], "rejected": answers[worst[1]],
            "prompt_index": prompt.index, "reference": prompt.reference, "chosen_sample": best[1],
            "rejected_sample": worst[1], "chosen_score": best[0], "rejected_score": worst[0],
            "scores": scores["scores"], "finish_reasons": samples["finish_reasons"]}, None


def run_pairs(config: JobConfig, log=print) -> dict:
    """Samples, ranks and writes the pairs of a pairs job into config.run_dir; returns pairs_report.json's summary."""
    from tgdpo_ray.eval.generation import engine_group

    began = time.monotonic()
    section = config.pairs
    prompts, bad_prompts = load_prompts(section, log)  # a bad prompts file fails before any engine starts
    config.run_dir.mkdir(parents=True, exist_ok=True)
    model = sampler_model(config)
    log(f"[pairs] {len(prompts)} prompts x {section.num_samples} answers from {model}, ranked by "
        f"{section.ranker.identity}, into {config.run_dir}")
    start_ray(config)
    # Sampling, then ranking: the engines are released before the ranker's processes start.
    check_fits([engine_group("sampling engines", section.generation, section.engines)])
    if section.ranker.type == "reward_model":
        check_fits([reward_pool_group(section.ranker.reward_model)])
    elif section.ranker.type == "judge" and section.ranker.judge.backend == "vllm":
        check_fits([engine_group("judge engine", section.ranker.judge)])

    samples = sample_answers(config, prompts, log)
    scores = rank_answers(config, prompts, samples, log)
    pairs, skipped = [], {"tie": 0, "failed": 0}
    provenance = {"model": model, "ranker": section.ranker.identity, "num_samples": section.num_samples,
                  "temperature": section.temperature, "seed": config.run.seed}
    for prompt in prompts:
        pair, why = choose_pair(prompt, samples[prompt.index], scores[prompt.index])
        if pair is None:
            skipped[why] += 1
        else:
            pairs.append({**pair, **provenance})
    path = config.run_dir / "pairs.jsonl"
    rewrite_records(path, pairs)
    answers = [samples[prompt.index] for prompt in prompts]
    report = {
        "pairs_file": str(path), "prompts": len(prompts), "pairs": len(pairs),
        "skipped": {**skipped, "bad_prompt": sum(bad_prompts.values())}, "bad_prompts": bad_prompts,
        "answers": sum(len(record["answers"]) for record in answers),
        "failed_answers": sum(score is None for prompt in prompts for score in scores[prompt.index]["scores"]),
        "truncated_answers": sum(reason == "length" for record in answers for reason in record["finish_reasons"]),
        "mean_chosen_score": mean([pair["chosen_score"] for pair in pairs]),
        "mean_rejected_score": mean([pair["rejected_score"] for pair in pairs]),
        "mean_score": mean([score for prompt in prompts for score in scores[prompt.index]["scores"]
                            if score is not None]),
        **provenance, "seconds": round(time.monotonic() - began, 1),
    }
    (config.run_dir / "pairs_report.json").write_text(json.dumps(report, indent=2))
    log(f"[pairs] {len(pairs)} pairs from {len(prompts)} prompts (skipped: {skipped['tie']} ties, "
        f"{skipped['failed']} with fewer than two scored answers, {report['skipped']['bad_prompt']} bad prompts); "
        f"mean score {fmt(report['mean_score'])}, chosen {fmt(report['mean_chosen_score'])}, rejected "
        f"{fmt(report['mean_rejected_score'])}; written to {path}")
    if not pairs:
        raise PairsError(f"no pairs: none of the {len(prompts)} prompts has two answers with different scores "
                         f"({skipped['tie']} ties, {skipped['failed']} with fewer than two scored answers: the "
                         f"errors are in {config.run_dir / 'scores.jsonl'}); sample more answers "
                         "(pairs.num_samples), at a higher pairs.temperature, or rank them otherwise")
    return report


def mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values else None


def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"
