"""vLLM engines on the cluster, and MT-Bench's two-turn answer flow.

One engine is one Ray actor holding all of its GPUs (vLLM runs its tensor-parallel workers inside it, on that
node). The same engine answers the questions and, for the in-cluster judge, grades the answers. An engine lost
mid-job (its node gone, out of memory, a crash) is started again and its batch sent again, up to the section's
max_restarts (Engine below); callers write a batch's answers only once it has returned, so none is lost or doubled.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import zlib
from pathlib import Path
from typing import Optional

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.config.eval import EngineSection, GenerationSection
from tgdpo_ray.eval.questions import Question
from tgdpo_ray.runtime.placement import ProcessGroup, process_group


class GenerationError(UserError, RuntimeError):
    """An engine that cannot start or answer; the message names the model."""


# The last line of an exception in vLLM's log: the root cause of a failed start, which vLLM's engine-core
# process logs but does not pass up to the caller ("Engine core initialization failed. See root cause above").
ERROR_LINE = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception): .+")


def engine_args(model: str, engine: EngineSection, seed: int, trust_remote_code: bool) -> dict:
    """vllm.LLM's arguments for an engine section."""
    args = {"model": model, "tensor_parallel_size": engine.tensor_parallel_size, "dtype": engine.dtype,
            "max_model_len": engine.max_model_len, "enforce_eager": engine.enforce_eager, "seed": seed,
            "trust_remote_code": trust_remote_code}
    if engine.kv_cache_bytes is not None:
        args["kv_cache_memory_bytes"] = engine.kv_cache_bytes
    else:
        args["gpu_memory_utilization"] = engine.gpu_memory_share
    if not engine.on_gpus:
        # vLLM rewinds a seeded request's random generator after a partial (chunked) prefill, which a CPU
        # generator cannot do ("CPU Generator does not use offset"). Without chunked prefill every prompt is
        # prefilled whole (vLLM then raises its batched-token limit to max_model_len), so seeds are safe.
        args["enable_chunked_prefill"] = False
    return args


def vllm_logging_to(path: Path) -> None:
    """Sends vLLM's log (its processes inherit the setting) to a file: a failed start then leaves one line on
    the console instead of a traceback per process, and the file keeps everything."""
    config = {"version": 1, "disable_existing_loggers": False,
              "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [pid %(process)d] %(message)s"}},
              "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "plain"}},
              "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}}}
    config_path = path.with_suffix(".logging.json")
    config_path.write_text(json.dumps(config))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)


def root_cause(log: Path, err: BaseException) -> str:
    """The most specific reason a start failed: the last exception line vLLM logged, else the exception's."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    found = [line.strip() for line in lines if ERROR_LINE.match(line.strip())]
    reason = found[-1] if found else f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
    return reason.replace(", please check the stack trace above for the root cause", "")


class VLLMEngine:
    """A vLLM engine as a Ray actor: conversations in, generated texts out. A failed start does not kill the
    actor: `start_failure()` says why, so the caller can fail with one clear line."""

    def __init__(self, args: dict):
        self.log = Path(tempfile.mkdtemp(prefix="tgdpo-vllm-")) / "vllm.log"
        vllm_logging_to(self.log)  # before vLLM is imported: it reads the setting once
        from vllm import LLM

        self.failure: Optional[str] = None
        try:
            self.llm = LLM(**args)
        except Exception as err:  # noqa: BLE001 - any failure to start is reported, with vLLM's reason
            self.failure = self.explain(err)
            return
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def start_failure(self) -> Optional[str]:
        return self.failure

    def explain(self, err: BaseException) -> str:
        return f"{root_cause(self.log, err)} (vLLM's log: {self.log} on {platform.node()})"

    def chat(self, conversations: list[list[dict]], sampling: list[dict]) -> list[dict]:
        """One reply per conversation, each with its own sampling settings ({temperature, max_tokens, seed, and
        optionally top_p}).

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
                                         top_p=settings.get("top_p", 1.0),
                                         max_tokens=min(settings["max_tokens"], room)))
            slots.append(slot)
        if prompts:
            try:
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
            except Exception as err:  # noqa: BLE001 - a dead engine: say why, from vLLM's own log
                raise RuntimeError(self.explain(err)) from None
            for slot, output in zip(slots, outputs):
                completion = output.outputs[0]
                replies[slot] = {"text": completion.text, "tokens": len(completion.token_ids),
                                 "prompt_tokens": len(output.prompt_token_ids),
                                 "finish_reason": completion.finish_reason, "error": None}
        return replies


def actor_options(engine: EngineSection) -> dict:
    gpus = engine.tensor_parallel_size if engine.on_gpus else 0
    env = {}
    if not engine.on_gpus:
        # Ray sets OMP_NUM_THREADS=1 in an actor holding one CPU, and vLLM's automatic thread binding pins every
        # engine of a node to the same cores: a CPU engine computes with the threads of the CPUs it holds.
        # Without multiprocessing, vLLM runs its engine core and its one worker inside the actor (the actor's
        # environment already sets the threads): each start saves two process spawns, about 11 s on 2 cores.
        env = {"OMP_NUM_THREADS": str(max(1, int(engine.cpus_per_engine))), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    options = {"num_cpus": engine.cpus_per_engine, "num_gpus": gpus, "resources": dict(engine.resources),
               "runtime_env": {"env_vars": env}}
    if engine.node_labels:
        options["label_selector"] = dict(engine.node_labels)
    return options


def engine_group(name: str, engine: EngineSection, count: int = 1) -> ProcessGroup:
    """`count` engines as a process group, for cluster.check_fits."""
    options = actor_options(engine)
    return process_group(name, engine, (count, count), options["num_cpus"], options["num_gpus"])


def start_actor(model: str, engine: EngineSection, seed: int, trust_remote_code: bool = False):
    """Starts an engine's actor; wait_started tells whether the model loaded."""
    import ray

    # vLLM's CPU backend and tensor parallelism start worker processes of their own inside the actor.
    remote = ray.remote(VLLMEngine).options(**actor_options(engine), max_concurrency=1)
    return remote.remote(engine_args(model, engine, seed, trust_remote_code))


class Engine:
    """A vLLM engine on the cluster, started again when its actor is lost (up to `section.max_restarts` times in
    the engine's life), with a line saying so; the batch it was answering is sent again. `key` names the engine's
    config section (eval.generation, eval.judge, pairs.generation) in errors and lines."""

    def __init__(self, model: str, section: EngineSection, seed: int, key: str, trust_remote_code: bool = False,
                 log=print):
        self.model, self.section, self.seed, self.key = model, section, seed, key
        self.trust_remote_code, self.log = trust_remote_code, log
        self.restarts = 0
        self.actor = start_actor(model, section, seed, trust_remote_code)

    def wait_started(self) -> None:
        import ray

        while True:
            try:
                return wait_started(self.actor, self.model, self.section, self.key,
                                    lost=(ray.exceptions.RayActorError,))
            except ray.exceptions.RayActorError as err:
                self.replace(err, "while it loaded its model")

    def chat(self, conversations: list[list[dict]], sampling: list[dict]) -> list[dict]:
        import ray

        while True:
            try:
                return call_engine(self.model, self.actor.chat.remote(conversations, sampling),
                                   lost=(ray.exceptions.RayActorError,))
            except ray.exceptions.RayActorError as err:
                self.replace(err, f"with {len(conversations)} conversation(s) to answer, which go to the new one")
                self.wait_started()

    def replace(self, err: BaseException, when: str) -> None:
        """A new actor for a lost one (it has not loaded its model yet)."""
        import ray

        if self.restarts >= self.section.max_restarts:
            raise GenerationError(f"vLLM engine for {self.model} was lost ({type(err).__name__}) {when}, after "
                                  f"{self.restarts} restart(s): {self.key}.max_restarts is "
                                  f"{self.section.max_restarts}") from None
        self.restarts += 1
        self.log(f"vLLM engine for {self.model} was lost ({type(err).__name__}) {when}: starting it again "
                 f"(restart {self.restarts} of {self.section.max_restarts})")
        ray.kill(self.actor)  # whatever is left of it: its GPUs go to the new one
        self.actor = start_actor(self.model, self.section, self.seed, self.trust_remote_code)

    def release(self) -> None:
        import ray

        ray.kill(self.actor)  # frees its GPUs (and vLLM's worker processes) for the next engine


def wait_started(handle, model: str, engine: EngineSection, key: str, lost: tuple = ()) -> None:
    """Waits for the engine's actor to load its model; a failure is one GenerationError naming the model, the
    memory it asked for and the config key (`key`: eval.generation or eval.judge) that changes it. The exception
    types in `lost` are raised as they are."""
    failure = call_engine(model, handle.start_failure.remote(), lost)
    if failure is None:
        return
    if engine.kv_cache_bytes is not None:
        asked = (f"it asked for a {engine.kv_cache_bytes / 2**20:.0f} MiB KV cache: change "
                 f"{key}.kv_cache_memory_bytes, or {key}.max_model_len")
    else:
        asked = (f"it may take {engine.gpu_memory_share:g} of each GPU's memory: change "
                 f"{key}.gpu_memory_utilization, {key}.kv_cache_memory_bytes or {key}.max_model_len")
    raise GenerationError(f"vLLM engine for {model} could not start: {failure}; {asked}")


def call_engine(model: str, pending, lost: tuple = ()):
    """ray.get that turns an engine's failure (an actor that died, out of memory) into one message; the
    exception types in `lost` are raised as they are (Engine restarts the actor)."""
    import ray

    try:
        return ray.get(pending)
    except lost:
        raise
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
    first = engine.chat(conversations, [turn_sampling(q, 1, generation, seed) for q in questions])
    fields = {"turns": "text", "tokens": "tokens", "prompt_tokens": "prompt_tokens",
              "finish_reasons": "finish_reason", "errors": "error"}
    records = [{"model": model_name, "question_id": q.question_id, "category": q.category,
                **{field: [reply[key]] for field, key in fields.items()}} for q, reply in zip(questions, first)]
    follow_ups = [i for i, q in enumerate(questions) if len(q.turns) > 1]
    second = engine.chat(
        [conversations[i] + [{"role": "assistant", "content": records[i]["turns"][0]},
                             {"role": "user", "content": questions[i].turns[1]}] for i in follow_ups],
        [turn_sampling(questions[i], 2, generation, seed) for i in follow_ups])
    for i, reply in zip(follow_ups, second):
        for field, key in fields.items():
            records[i][field].append(reply[key])
    return records
