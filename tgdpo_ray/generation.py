"""vLLM engines on the cluster, and MT-Bench's two-turn answer flow.

One engine is one Ray actor holding all of its GPUs (vLLM runs its tensor-parallel workers inside it, on that
node). The same engine answers the questions and, for the in-cluster judge, grades the answers.
"""

from __future__ import annotations

import os
import zlib
from typing import Optional

from tgdpo_ray.config import EngineSection, GenerationSection
from tgdpo_ray.errors import UserError
from tgdpo_ray.questions import Question


class GenerationError(UserError, RuntimeError):
    """An engine that cannot start or answer; the message names the model."""


class VLLMEngine:
    """A vLLM engine as a Ray actor: conversations in, generated texts out."""

    def __init__(self, model: str, engine: dict, seed: int, trust_remote_code: bool = False):
        from vllm import LLM

        self.llm = LLM(
            model=model, tensor_parallel_size=engine["tensor_parallel_size"], dtype=engine["dtype"],
            max_model_len=engine["max_model_len"], gpu_memory_utilization=engine["gpu_memory_utilization"],
            enforce_eager=engine["enforce_eager"], seed=seed, trust_remote_code=trust_remote_code,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def chat(self, conversations: list[list[dict]], sampling: list[dict]) -> list[dict]:
        """One reply per conversation, each with its own sampling settings ({temperature, max_tokens, seed}).

        A conversation that leaves no room to answer within max_model_len gets an `error` instead of a text, so
        one long prompt never fails the whole batch."""
        from vllm import SamplingParams

        replies: list[Optional[dict]] = [None] * len(conversations)
        prompts, params, slots = [], [], []
        for slot, (conversation, settings) in enumerate(zip(conversations, sampling)):
            ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            room = self.max_model_len - len(ids)
            if room < 1:
                replies[slot] = {"text": "", "tokens": 0, "prompt_tokens": len(ids), "finish_reason": "error",
                                 "error": f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}"}
                continue
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(temperature=settings["temperature"], seed=settings.get("seed"),
                                         max_tokens=min(settings["max_tokens"], room)))
            slots.append(slot)
        if prompts:
            for slot, output in zip(slots, self.llm.generate(prompts, params, use_tqdm=False)):
                completion = output.outputs[0]
                replies[slot] = {"text": completion.text, "tokens": len(completion.token_ids),
                                 "prompt_tokens": len(output.prompt_token_ids),
                                 "finish_reason": completion.finish_reason, "error": None}
        return replies


def actor_options(engine: EngineSection) -> dict:
    gpus = engine.tensor_parallel_size if engine.on_gpus else 0
    # vLLM logs every request at INFO; the job's own progress lines say what is happening.
    quiet = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    options = {"num_cpus": engine.cpus_per_engine, "num_gpus": gpus, "resources": dict(engine.resources),
               "runtime_env": {"env_vars": quiet}}
    if engine.node_labels:
        options["label_selector"] = dict(engine.node_labels)
    return options


def engine_group(name: str, engine: EngineSection, count: int = 1) -> dict[str, tuple[int, dict, dict]]:
    """The engines as a process group for run.check_groups_fit."""
    from tgdpo_ray.run import held_resources

    options = actor_options(engine)
    each = held_resources(options["num_cpus"], options["num_gpus"], options["resources"])
    return {name: (count, each, dict(engine.node_labels))}


def start_engine(model: str, engine: EngineSection, seed: int, trust_remote_code: bool = False):
    import ray

    # vLLM's CPU backend and tensor parallelism start worker processes of their own inside the actor.
    remote = ray.remote(VLLMEngine).options(**actor_options(engine), max_concurrency=1)
    return remote.remote(model, engine.model_dump(), seed, trust_remote_code)


def call_engine(model: str, pending):
    """ray.get that turns an engine's failure (a model that does not load, out of memory) into one message."""
    import ray

    try:
        return ray.get(pending)
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None) or err
        raise GenerationError(f"vLLM engine for {model}: {type(cause).__name__}: {str(cause).splitlines()[0]}") \
            from None


def turn_sampling(question: Question, turn: int, generation: GenerationSection, seed: int) -> dict:
    # A seed per question and turn: sampled answers (writing, roleplay) are the same on every re-run.
    return {"temperature": generation.temperatures[question.category], "max_tokens": generation.max_new_tokens,
            "seed": zlib.crc32(f"{seed}/{question.question_id}/{turn}".encode())}


def answer_questions(engine, model_name: str, questions: list[Question], generation: GenerationSection,
                     seed: int) -> list[dict]:
    """MT-Bench's flow: all first turns in one batch, then every second turn asked after the model's own first
    answer, in the model's chat template. Returns one answers.jsonl record per question."""
    conversations = [[{"role": "user", "content": q.turns[0]}] for q in questions]
    first = call_engine(model_name, engine.chat.remote(
        conversations, [turn_sampling(q, 1, generation, seed) for q in questions]))
    fields = {"turns": "text", "tokens": "tokens", "prompt_tokens": "prompt_tokens",
              "finish_reasons": "finish_reason", "errors": "error"}
    records = [{"model": model_name, "question_id": q.question_id, "category": q.category,
                **{field: [reply[key]] for field, key in fields.items()}} for q, reply in zip(questions, first)]
    follow_ups = [i for i, q in enumerate(questions) if len(q.turns) > 1]
    second = call_engine(model_name, engine.chat.remote(
        [conversations[i] + [{"role": "assistant", "content": records[i]["turns"][0]},
                             {"role": "user", "content": questions[i].turns[1]}] for i in follow_ups],
        [turn_sampling(questions[i], 2, generation, seed) for i in follow_ups]))
    for i, reply in zip(follow_ups, second):
        for field, key in fields.items():
            records[i][field].append(reply[key])
    return records
