"""Job configuration schema: the typed sections of a job spec, every key with its description.

Every section rejects unknown keys, so a typo such as `trainig:` or `policy.zero_stg` fails with the key's
dotted path instead of being silently ignored. Reading files, --set overrides and path checks are in
config_loader.py; README's table of keys is generated from the descriptions here (scripts/config_keys.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.base import Placement, Section
from tgdpo_ray.config.eval import EngineSection, EvalSection, JudgeSection


class RunSection(Section):
    name: str = Field(default="tgdpo", description="the run's name: it writes to <output_dir>/<name>/")
    output_dir: str = Field(default="outputs", description="the folder that holds run folders")
    seed: int = Field(default=0, description="seeds the epochs' pair orders, the trainers' random state and the "
                                             "evaluation's sampling and bootstrap")
    resume: bool = Field(default=True, description="a run whose checkpoints remain continues from the latest one; "
                                                   "false: they are deleted and the run starts over")
    on_config_change: Literal["refuse", "restart"] = Field(
        default="refuse", description="when the latest checkpoint was made under a config whose training differs "
        "(train.checkpoints.RESUMABLE_KEYS may change): refuse stops naming the keys, restart deletes the "
        "checkpoints and starts over")
    checkpoint_storage: Optional[str] = Field(default=None, description=(
        "where the run's checkpoints go, as <checkpoint_storage>/<name>/: a folder every node shares (NFS) or an "
        "s3:// / gs:// URI; null: the run folder (<run_dir>/checkpoints)"))


class DataSource(Section):
    path: str = Field(description="a .jsonl / .json / .parquet file, local or a URI of any filesystem pyarrow "
                                  "knows (s3://bucket/pairs.jsonl, gs://...), a local dataset folder, or a Hugging "
                                  "Face dataset name")
    split: str = Field(default="train", description="the split of a Hugging Face dataset or dataset folder")
    subset: Optional[str] = Field(default=None, description="the Hugging Face dataset configuration name, if it "
                                                            "has several")
    limit: Optional[int] = Field(default=None, gt=0, description="keep only the first N rows (smoke tests); "
                                                                 "null: all")


def path_shorthand(value: Any) -> Any:
    """`train: data/train.jsonl` is shorthand for `train: {path: data/train.jsonl}`."""
    return {"path": value} if isinstance(value, str) else value


class Columns(Section):
    prompt: str = Field(default="prompt", description="the column holding the prompt: a string or chat messages")
    chosen: str = Field(default="chosen", description="the column holding the preferred answer: a string or chat "
                                                      "messages (which may repeat the prompt's first)")
    rejected: str = Field(default="rejected", description="the column holding the dispreferred answer, shaped "
                                                          "as chosen")
    messages: str = Field(default="messages", description="loss.type sft only: a column holding a whole "
                          "conversation, read when a row has no prompt and no chosen; its last assistant message "
                          "is the answer")


class TokenizeSection(Placement):
    workers: Optional[int] = Field(default=None, gt=0, description="Ray Data tasks that read, validate and "
                                   "tokenize at once, each loading the tokenizer once per worker process; null: as "
                                   "many as there are shards and free CPUs")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs each tokenizing task holds")
    shard_mib: float = Field(default=16, gt=0, description="what one task reads: a byte range of a .jsonl file, "
                             "runs of a Parquet file's row groups, or a slice of a .json list or a dataset, of "
                             "about this many MiB")


class DataSection(Section):
    train: Optional[DataSource] = Field(default=None, description="the training pairs; a path alone is shorthand "
                                        "for {path: ...}. Required, except in a pipeline with a pairs section, "
                                        "which trains on the pairs it generates")
    eval: Optional[DataSource] = Field(default=None, description="held-out pairs: loss, DPO loss and reward "
                                       "accuracy after every epoch (and every training.eval_every steps); a path "
                                       "alone is shorthand for {path: ...}; null: none")
    columns: Columns = Field(default=Columns(), description="the names of the data's columns")
    max_length: int = Field(default=1024, gt=1, description="tokens of prompt + answer per sequence")
    max_prompt_length: int = Field(default=512, gt=0, description="prompts are cut from the left to this many "
                                   "tokens when a pair does not fit max_length; smaller than max_length")
    long_prompts: Literal["truncate", "bad_row"] = Field(
        default="truncate", description="a prompt longer than max_prompt_length is cut from the left when the pair "
        "does not fit max_length (truncate), or counted as a bad row (bad_row)")
    bad_rows: Literal["error", "skip"] = Field(
        default="error", description="error: stop at the first bad row, naming the file, row index and reason; "
        "skip: drop bad rows and count them")
    chat_template: Optional[str] = Field(
        default=None, description="a Jinja template, or the path of a file holding one, replacing the tokenizer's "
        "chat template; null: the tokenizer's own")
    tokenize: TokenizeSection = Field(default=TokenizeSection(), description="the tokenization pass: where and "
                                      "how wide Ray Data reads, validates and tokenizes the pairs")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        return path_shorthand(value)

    @model_validator(mode="after")
    def _prompt_fits(self) -> "DataSection":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}),"
                " or no response token would fit"
            )
        return self


class LossSection(Section):
    type: Literal["dpo", "ipo", "simpo", "tgdpo", "sft"] = Field(
        default="tgdpo", description="dpo (sigmoid), ipo (as in TRL), simpo (reference-free, length-normalised), "
        "tgdpo, or sft: the chosen answers' negative log-likelihood, per token and averaged per pair (no reference; "
        "the usual first stage before a preference loss)")
    beta: float = Field(default=0.1, gt=0, description="β: the scale of the policy's log-ratios in the loss (and "
                                                       "of TGDPO's token rewards)")
    alpha: float = Field(default=0.5, ge=0, description="TGDPO guidance strength α; 0 gives DPO exactly")
    simpo_gamma: float = Field(default=0.5, description="SimPO target margin γ")
    clamp_weights: bool = Field(default=False, description="clamp TGDPO token weights at 0 (the authors do not)")
    center_guidance: bool = Field(default=False, description="subtract each answer's mean token reward before "
                                  "TGDPO's weights are formed, so each answer's weights sum to β·length as in "
                                  "DPO (the authors do not)")
    shuffle_guidance: bool = Field(default=False, description="permute each answer's TGDPO token rewards over its "
                                   "tokens before the weights are formed: a control that keeps the rewards and "
                                   "loses their places (the same permutation for a batch every time)")
    normalize_weights: bool = Field(default=False, description="scale each answer's TGDPO token weights (after "
                                    "clamp_weights) to sum to β·length, as DPO's do; with center_guidance and "
                                    "clamp_weights: the guarded form (README), where every chosen token is pushed "
                                    "up and every rejected one down")


class ProbeSection(Section):
    function: str = Field(description="module:function called on the training rank 0 as f(model, tokenizer, device, "
                                      "**arguments) in eval mode without gradients, returning {name: number}; "
                                      "e.g. tgdpo_ray.experiments.credit.task:slot_probe")
    every: int = Field(gt=0, description="optimizer steps between probes; a fresh run also probes before its first "
                                         "step, and every run after its last")
    arguments: dict[str, Any] = Field(default={}, description="keyword arguments of the function (paths as "
                                      "written: use absolute ones on a cluster)")

    @field_validator("function")
    @classmethod
    def _module_and_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError("expected module:function (e.g. tgdpo_ray.experiments.credit.task:slot_probe)")
        return value


class KeepBest(Section):
    metric: str = Field(description="a metric of the checkpoint's report: a training step's (loss, "
                        "reward_accuracy, ...) or a held-out one (eval/dpo_loss, eval/reward_accuracy, ...)")
    mode: Literal["min", "max"] = Field(description="min: the lowest is best (a loss); max: the highest (an "
                                                    "accuracy)")


class TrainingSection(Section):
    epochs: int = Field(default=1, gt=0, description="passes over the training pairs")
    learning_rate: float = Field(default=5e-7, gt=0, description="AdamW's peak learning rate, reached after warmup")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's weight decay")
    warmup_ratio: float = Field(default=0.1, ge=0, le=1, description="the share of optimizer steps in linear "
                                                                     "warmup, before the cosine decay")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="the cosine schedule ends at learning_rate "
                                                                     "x this")
    max_tokens_per_batch: int = Field(default=8192, gt=0, description="padded tokens (chosen + rejected rows) per "
                                                                      "micro-batch, per worker")
    max_pairs_per_batch: Optional[int] = Field(
        default=None, gt=0, description="also cap the pairs per micro-batch: with a budget that always fits this "
        "many pairs, the effective batch is exactly max_pairs_per_batch x gradient_accumulation_steps x "
        "policy.workers pairs; null: the token budget alone")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="micro-batches per worker per optimizer "
                                                                          "step")
    shuffle: bool = Field(default=True, description="each epoch visits the pairs in an order drawn from "
                                                    "(run.seed, epoch); false: file order")
    max_grad_norm: float = Field(default=1.0, ge=0, description="the gradient norm clipped to; 0 turns clipping "
                                                                "off")
    logp_chunk_size: int = Field(default=1024, gt=0, description="tokens per chunk of the log-softmax (its memory: "
                                                                "chunk x vocab, not tokens x vocab)")
    packing: Literal["auto", "padded", "packed", "shared_prompt"] = Field(
        default="auto", description="how a micro-batch of pairs becomes model inputs, for the trainers and the "
        "scorers alike. padded: prompt+chosen and prompt+rejected rows padded to the longest; packed: the same "
        "documents back to back in rows of about packed_row_tokens, each attending only to itself (no padding); "
        "shared_prompt: one document per pair, [prompt | chosen | rejected], the rejected answer attending to the "
        "prompt but never to the chosen one (the prompt is computed once). All three give the same log-probs to "
        "float precision. auto: shared_prompt when the policy trains on GPUs (policy.gpus_per_worker > 0; "
        "measured 2.8x padded's pairs/s on an H100, see README), padded on CPUs")
    packed_row_tokens: int = Field(
        default=2048, gt=0, description="packed layouts: tokens per packed row; a pair longer than this gets a row "
        "as long as itself. With the dense mask a row's attention costs its length squared, so several rows of "
        "about this size cost less than one long row; FlexAttention skips the blocks no document sees")
    attention: Literal["auto", "dense", "flex", "varlen"] = Field(
        default="auto", description="packed layouts: how the documents of a row are kept apart, in the trainers "
        "and the scorers. dense: a [rows, 1, L, L] boolean mask with SDPA; flex: FlexAttention with a block mask "
        "built from document ids (CUDA for training: it has no CPU backward); varlen: FlashAttention's "
        "variable-length kernel on each document (CUDA: bf16 or fp16, Ampere or later; on CPUs exact but slow); "
        "auto: varlen on CUDA where it can run, else flex there, dense elsewhere (varlen measured 4-6% above flex "
        "on an H100, README). All give the same log-probs to float precision")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in backward: less "
                                                                    "memory, about 1/3 more compute")
    compile: bool = Field(default=False, description="torch.compile each decoder layer of the policy (one graph "
                          "shared by all layers): on an H100 1.52x the pairs/s of shared_prompt with varlen "
                          "(43.6% MFU), 1.54x with FlexAttention, after 17-24 s of compiling in the first steps "
                          "(README). Not with ZeRO-3")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        default="inductor", description="training.compile's torch.compile backend: inductor generates fused "
        "kernels; aot_eager and eager only trace (to find where a compile goes wrong, and in the CPU tests, where "
        "inductor's C++ build takes 15 s)")
    log_every: int = Field(default=1, gt=0, description="optimizer steps between console lines (every step goes "
                                                        "to metrics.jsonl)")
    checkpoint_every: int = Field(default=0, ge=0, description="optimizer steps between checkpoints; 0: at epoch "
                                                               "ends only (and at max_steps)")
    eval_every: int = Field(default=0, ge=0, description="optimizer steps between held-out evaluations; 0: at "
                                                         "epoch ends only")
    keep_checkpoints: int = Field(default=2, ge=0, description="the newest K complete checkpoints are kept; 0: "
                                  "none is saved (a stopped run started again starts over)")
    checkpoint_hf_export: bool = Field(default=False, description="also write each checkpoint's policy in "
                                                                  "Hugging Face format (<checkpoint>/hf)")
    keep_best: Optional[KeepBest] = Field(default=None, description="keep the keep_checkpoints best checkpoints "
                                          "by this metric (Ray Train's CheckpointConfig scoring; the newest is "
                                          "kept too, for resuming); a held-out metric is evaluated afresh before "
                                          "each checkpoint. null: the newest")
    export: Literal["last", "best"] = Field(default="last", description="what <run>/model holds: the policy at the "
                                            "run's end, or the best checkpoint's by keep_best (needs "
                                            "checkpoint_hf_export)")
    max_steps: Optional[int] = Field(default=None, gt=0, description="stop after this many optimizer steps, with "
                                                                     "a checkpoint (run again to resume); null: "
                                                                     "every epoch")
    max_failures: int = Field(default=0, ge=-1, description="training-worker failures survived by restarting from "
                                                            "the last checkpoint (-1: any)")
    probe: Optional[ProbeSection] = Field(default=None, description="a metric of the policy itself, recorded every "
                                          "few steps in metrics.jsonl (records with a `probe` key); null: none")

    @model_validator(mode="after")
    def _restarts_need_checkpoints(self) -> "TrainingSection":
        if self.max_failures != 0 and self.keep_checkpoints == 0:
            raise ValueError("max_failures restarts the workers from the last checkpoint, and keep_checkpoints 0 "
                             "saves none: set keep_checkpoints >= 1 or max_failures 0")
        if self.keep_best is not None and self.keep_checkpoints == 0:
            raise ValueError("keep_best chooses among checkpoints, and keep_checkpoints 0 saves none")
        if self.export == "best" and (self.keep_best is None or not self.checkpoint_hf_export):
            raise ValueError("export best copies the best checkpoint's Hugging Face folder: it needs keep_best and "
                             "checkpoint_hf_export true")
        return self


Precision = Literal["auto", "bf16", "fp32"]


# Llama's, Qwen's and Mistral's linear layers: every projection of attention and of the MLP.
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The log-prob kernels read the output head's weight directly, and small models tie it to the embeddings: an
# adapter on either would be skipped or would change both.
LORA_REFUSED_TARGETS = ("lm_head", "embed_tokens")


class LoraSection(Section):
    r: int = Field(default=16, gt=0, description="the adapters' rank")
    alpha: float = Field(default=32, gt=0, description="the adapters' scale is alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] = Field(
        default=list(LORA_DEFAULT_TARGETS), min_length=1,
        description="names of the linear layers that get adapters (a module matches when its name ends with one)")

    @field_validator("target_modules")
    @classmethod
    def _no_head_or_embeddings(cls, value: list[str]) -> list[str]:
        refused = sorted(set(value) & set(LORA_REFUSED_TARGETS))
        if refused:
            raise ValueError(f"{', '.join(refused)} cannot take adapters here: the log-prob kernels read the output "
                             "head's weight directly, and tied embeddings share it")
        return value


class PolicySection(Placement):
    model: str = Field(description="the model to train: a Hugging Face hub name or a local path")
    trust_remote_code: bool = Field(default=False, description="let transformers run the model's own code")
    workers: int = Field(default=1, gt=0, description="Ray Train workers (data parallel)")
    gpus_per_worker: float = Field(default=0, ge=0, description="GPUs each worker holds; 0: CPU training")
    cpus_per_worker: float = Field(default=1, ge=0, description="CPUs each worker holds")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="the DeepSpeed ZeRO stage")
    precision: Precision = Field(default="auto", description="auto: bf16 on GPUs that support it, fp32 "
                                                             "otherwise; or bf16 / fp32")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="torch.distributed's backend; auto: nccl with GPUs and a CUDA build of torch, "
        "gloo otherwise")
    disable_dropout: bool = Field(default=True, description="dropout off in the policy, as the authors' trainer "
                                  "and TRL do for DPO: training log-probs match eval's")
    lora: Optional[LoraSection] = Field(
        default=None, description="train low-rank adapters (peft's LoRA) instead of every weight; null: a full "
        "fine-tune. The export is the merged model, with the adapters beside it in <run>/adapter")


class ScorerSection(Placement):
    model: Optional[str] = Field(default=None, description="the reference model, a hub name or a local path; "
                                                           "null: policy.model")
    trust_remote_code: bool = Field(default=False, description="let transformers run the model's own code")
    replicas: Union[int, tuple[int, int]] = Field(default=1, description="a fixed pool size, or [min, max] for a "
                                                                         "pool Ray Data autoscales")
    gpus_per_replica: float = Field(default=0, ge=0, description="GPUs each replica holds")
    cpus_per_replica: float = Field(default=1, ge=0, description="CPUs each replica holds")
    batch_size: int = Field(default=16, gt=0, description="pairs per scorer call (cut again by "
                                                          "training.max_tokens_per_batch)")
    precision: Optional[Precision] = Field(
        default=None, description="null: the policy's; a scorer in another precision "
        "than the policy gives a log-ratio that is not zero at step 0. Or auto / bf16 / fp32")

    @field_validator("replicas")
    @classmethod
    def _replicas_positive(cls, value: Union[int, tuple[int, int]]) -> Union[int, tuple[int, int]]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"replicas must be >= 1, or [min, max] with 1 <= min <= max; got {value}")
        return value

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas of the pool; a fixed size is both."""
        return (self.replicas, self.replicas) if isinstance(self.replicas, int) else tuple(self.replicas)


class RewardColumns(Section):
    chosen: str = Field(default="chosen_token_rewards", description="the column of the chosen answer's token "
                                                                    "rewards, one number per answer token")
    rejected: str = Field(default="rejected_token_rewards", description="the column of the rejected answer's "
                                                                        "token rewards, one number per answer token")


GuidanceSource = Literal["implicit", "token_reward_model", "column"]


class GuidanceSection(ScorerSection):
    model: Optional[str] = Field(
        default=None, description="the guidance model, a hub name or a local path: required by tgdpo train and "
        "score jobs with source implicit or token_reward_model (e.g. the model folder of a dpo run); a pipeline "
        "trains its own, so leave it out there")
    source: GuidanceSource = Field(
        default="implicit", description="where the token rewards r̂ come from. implicit: r̂ = β (log π_g − log "
        "π_ref), the paper's form, from a causal LM (guidance.model); token_reward_model: guidance.model has a "
        "per-token scalar head (AutoModelForTokenClassification with one label), its output at each answer token "
        "is r̂; column: r̂ comes with the data, one number per answer token (guidance.reward_columns), and no pool "
        "runs")
    reward_columns: RewardColumns = Field(default=RewardColumns(), description="source column: the data's columns "
                                                                               "holding the token rewards")


# The guidance sources (JobConfig.guidance_kind) scored by a guidance model's pool; column needs none.
SCORED_GUIDANCE = ("implicit", "token_reward_model")


class ScoringSection(Section):
    mode: Literal["stream", "cache"] = Field(
        default="stream", description="stream: scored pairs flow straight to the trainers (every epoch scores "
        "again); cache: pairs are scored once into <cache_dir>/<fingerprint>/ and read from there by every later "
        "epoch and run with the same data, tokenizer, limits and scorer weights")
    cache_dir: Optional[str] = Field(
        default=None, description="cache mode: a local path or any pyarrow filesystem URI (s3://bucket/cache, "
        "gs://...); null: <run.output_dir>/cache, shared by the runs (and a pipeline's stages) of that folder")


class TrackingSection(Section):
    wandb_project: Optional[str] = Field(default=None, description="also log to this Weights & Biases project "
                                                                   "(needs the wandb package)")
    wandb_entity: Optional[str] = Field(default=None, description="the Weights & Biases entity (team or user); "
                                                                  "null: wandb's default")
    mlflow_experiment: Optional[str] = Field(default=None, description="also log to this MLflow experiment (needs "
                                                                       "the mlflow package)")
    mlflow_tracking_uri: Optional[str] = Field(default=None, description="the MLflow tracking server; null: "
                                                                         "mlflow's default")
    group: Optional[str] = Field(default=None, description="the W&B group (an MLflow tag) of the run; a pipeline "
                                 "sets its own name for its stages, an experiment its name; null: none")
    job_type: Optional[str] = Field(default=None, description="the W&B job type (an MLflow tag); null: the loss "
                                    "type (a pipeline's stages: sft, dpo, tgdpo)")


class RaySection(Section):
    address: Optional[str] = Field(default=None, description="an existing cluster (\"auto\", \"ray://host:10001\"); "
                                                             "null: RAY_ADDRESS if set, else a local Ray")
    num_cpus: Optional[int] = Field(default=None, description="local Ray only: logical CPUs to declare; null: the "
                                                              "machine's")
    num_gpus: Optional[int] = Field(default=None, description="local Ray only: logical GPUs to declare; null: the "
                                                              "machine's")


class RewardModelSection(ScorerSection):
    model: str = Field(description="a sequence-classification reward model with one label (e.g. Skywork-Reward), "
                                   "or one whose output has a `score` (ArmoRM, with trust_remote_code), a hub name "
                                   "or a local path; it scores prompt + answer in its own chat template")
    max_length: int = Field(default=4096, gt=1, description="tokens of prompt + answer the reward model reads; "
                                                            "longer conversations lose tokens from the left")


class RankerSection(Section):
    type: Literal["rule", "judge", "reward_model"] = Field(
        description="rule: ranker.function scores each answer; judge: an LLM judge grades each answer 1-10 "
        "(ranker.judge: the evaluation's judge keys, single mode); reward_model: a sequence-classification model "
        "in a Ray Data actor pool (ranker.reward_model)")
    function: Optional[str] = Field(default=None, description="rule: module:function called as f(prompt, answer, "
                                    "reference) returning a number, higher is better (e.g. "
                                    "tgdpo_ray.onpolicy.verifiable:instruction_score)")
    judge: Optional[JudgeSection] = Field(default=None, description="judge: the judge backend (vllm or openai) and "
                                          "its engine keys, as eval.judge; it sees the prompt's last user message "
                                          "and one answer")
    reward_model: Optional[RewardModelSection] = Field(default=None, description="reward_model: the model and its "
                                                       "pool (the keys of reference)")

    @model_validator(mode="after")
    def _ranker_needs(self) -> "RankerSection":
        needed = {"rule": "function", "judge": "judge", "reward_model": "reward_model"}[self.type]
        if getattr(self, needed) is None:
            raise ValueError(f"ranker.type {self.type} needs ranker.{needed}")
        if self.type == "rule" and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.function):
            raise ValueError("ranker.function: expected module:function "
                             "(e.g. tgdpo_ray.onpolicy.verifiable:instruction_score)")
        if self.type == "judge" and (self.judge.backend == "rule" or self.judge.mode != "single"):
            raise ValueError("ranker.judge: use backend vllm or openai in single mode (for a rule, ranker.type rule)")
        return self

    @property
    def identity(self) -> str:
        """Names the ranker in the pairs' provenance; scores are reused only from the same ranker."""
        if self.type == "rule":
            return f"rule:{self.function}"
        if self.type == "judge":
            return f"judge:{self.judge.identity}"
        return f"reward_model:{self.reward_model.model}"


class PairsSection(Section):
    prompts: DataSource = Field(description="the prompts: a .jsonl / .json / .parquet file (local, s3://, gs://, "
                                            "...), a dataset folder or a "
                                            "Hugging Face dataset name; a path alone is shorthand for {path: ...}")
    prompt_column: str = Field(default="prompt", description="the column holding the prompt: a string or chat "
                                                             "messages")
    reference_column: str = Field(default="reference", description="a column handed to a rule ranker as its "
                                  "reference (e.g. the constraints to check); rows without it pass null")
    bad_rows: Literal["error", "skip"] = Field(default="error", description="a prompt that is missing, empty or "
                                               "not text: stop naming its file and line (error), or count it "
                                               "(skip)")
    model: Optional[str] = Field(default=None, description="the model that samples the answers, a hub name or a "
                                                           "local path; null: policy.model (on-policy)")
    trust_remote_code: bool = Field(default=False, description="let transformers and vLLM run the model's own code")
    num_samples: int = Field(default=5, ge=2, description="answers sampled per prompt; the best and the worst "
                                                          "become chosen and rejected")
    temperature: float = Field(default=0.8, ge=0, description="the sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling's probability mass")
    max_new_tokens: int = Field(default=512, gt=0, description="tokens per answer at most")
    prompts_per_batch: int = Field(default=32, gt=0, description="prompts sampled (all their answers) per round "
                                   "trip; each batch is on disk, with a progress line, before the next, so a "
                                   "stopped job resumes without sampling finished prompts again")
    engines: int = Field(default=1, gt=0, description="vLLM engines sampling at once, each on its own GPUs, each "
                                                      "taking the next batch of prompts")
    generation: EngineSection = Field(default=EngineSection(), description="the sampling engines: the engine keys "
                                      "of eval.generation (on_gpus, tensor_parallel_size, kv_cache_memory_bytes, "
                                      "...)")
    ranker: RankerSection = Field(description="who scores the answers")

    @field_validator("prompts", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        return path_shorthand(value)


# The pipeline evaluates its two trained policies under these names (and its SFT stage's policy, when it has one,
# under SFT_MODEL).
PIPELINE_MODELS = ("tgdpo", "dpo")
SFT_MODEL = "sft"


class SFTSection(Section):
    epochs: int = Field(default=1, gt=0, description="passes over the chosen answers")
    learning_rate: float = Field(gt=0, description="AdamW's peak learning rate of the SFT stage (the rest of "
                                 "training applies)")


class JobConfig(Section):
    kind: Literal["train", "score", "pipeline", "demo", "eval", "pairs"] = Field(
        default="train", description="train: one training run with loss.type; score: scoring alone, the reference "
        "(and guidance) log-probs into the cache, for a later run; pipeline: the paper's experiment, a dpo run "
        "whose policy guides a tgdpo run from the same start (each in <output_dir>/<name>/<loss>/), then their "
        "evaluation if eval is set, after a pairs stage that makes their training pairs if pairs is set; demo: "
        "the pipeline, after building the tiny model and demo data its paths "
        "point at (when missing); eval: MT-Bench-style evaluation alone, vLLM answers for eval.models, an LLM "
        "judge, a report (needs only run, eval and ray); pairs: on-policy preference pairs, answers sampled by vLLM "
        "and ranked, into <run_dir>/pairs.jsonl (needs run, pairs and ray; policy.model is the default sampler)")
    run: RunSection = Field(default=RunSection(), description="the run's name, folder and seed")
    data: Optional[DataSection] = Field(default=None, description="the preference pairs and their tokenization; "
                                                                  "every kind but eval")
    loss: LossSection = Field(default=LossSection(), description="the loss and its hyperparameters")
    training: TrainingSection = Field(default=TrainingSection(), description="the optimizer, its schedule, "
                                      "batches, checkpoints")
    policy: Optional[PolicySection] = Field(default=None, description="the model trained and its Ray Train "
                                            "workers; every kind but eval")
    reference: ScorerSection = Field(default=ScorerSection(), description="the frozen reference scorer pool")
    guidance: GuidanceSection = Field(default=GuidanceSection(), description="the frozen guidance scorer pool "
                                      "(tgdpo only): the keys of reference, and where the token rewards come from")
    scoring: ScoringSection = Field(default=ScoringSection(), description="how scored pairs reach the trainers")
    tracking: TrackingSection = Field(default=TrackingSection(), description="trackers beside metrics.jsonl and "
                                      "TensorBoard (<run_dir>/tensorboard), which are always written")
    ray: RaySection = Field(default=RaySection(), description="the Ray cluster the job runs on")
    eval: Optional[EvalSection] = Field(default=None, description="kind eval; pipeline and demo: evaluate both "
                                        "policies at the end (see Evaluation)")
    pairs: Optional[PairsSection] = Field(default=None, description="kind pairs; pipeline: a first stage that "
                                          "generates the training pairs (then data.train is left out)")
    sft: Optional[SFTSection] = Field(default=None, description="pipeline and demo: a first training stage, SFT on "
                                      "the chosen answers (in <output_dir>/<name>/sft/); dpo and tgdpo then start "
                                      "from its policy, which is also their reference. null: they start from "
                                      "policy.model")

    @model_validator(mode="after")
    def _sections_for_the_kind(self) -> "JobConfig":
        if self.kind == "pairs":
            if self.pairs is None:
                raise ValueError("kind pairs needs the pairs section (prompts, ranker)")
            if self.pairs.model is None and self.policy is None:
                raise ValueError("kind pairs needs pairs.model (or policy.model): the model that samples answers")
            if self.eval is not None:
                raise ValueError("kind pairs does not evaluate: remove the eval section")
            return self
        if self.sft is not None and self.kind not in ("pipeline", "demo"):
            raise ValueError(f"kind {self.kind} has no SFT stage: the sft section belongs to kind pipeline or demo")
        if self.pairs is not None and self.kind != "pipeline":
            raise ValueError(f"kind {self.kind} does not generate pairs: the pairs section belongs to kind pairs "
                             "or pipeline")
        if self.kind == "eval":
            if self.eval is None or not self.eval.models:
                raise ValueError("kind eval needs eval.models (a name and a path each) and eval.judge")
            self.eval.check_models(self.eval.model_names())
            return self
        missing = [name for name in ("data", "policy") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"kind {self.kind} needs the section(s) {', '.join(missing)}")
        if self.data.train is None and self.pairs is None:
            raise ValueError(f"kind {self.kind} needs data.train (the training pairs)")
        if self.data.train is not None and self.pairs is not None:
            raise ValueError("a pipeline with a pairs section trains on the pairs it generates: remove data.train")
        if self.eval is not None and self.kind in ("train", "score"):
            raise ValueError(f"kind {self.kind} does not evaluate: the eval section belongs to kind eval, "
                             "pipeline or demo")
        if self.eval is not None:
            self.eval.check_models(self.eval.model_names(self.pipeline_models))
        return self

    @model_validator(mode="after")
    def _best_by_a_metric_that_exists(self) -> "JobConfig":
        best = self.training.keep_best
        if best is not None and best.metric.startswith("eval/") and self.data.eval is None \
                and self.kind in ("train", "pipeline", "demo"):
            raise ValueError(f"training.keep_best.metric {best.metric} is a held-out metric, and data.eval is "
                             "null: there are no held-out pairs to evaluate")
        return self

    @property
    def pipeline_models(self) -> tuple[str, ...]:
        """The names the pipeline evaluates its own policies under."""
        return PIPELINE_MODELS + ((SFT_MODEL,) if self.sft is not None else ())

    @model_validator(mode="after")
    def _models_for_the_loss(self) -> "JobConfig":
        if self.kind in ("eval", "pairs"):
            return self
        if self.kind in ("train", "score") and self.guidance_kind in SCORED_GUIDANCE and not self.guidance.model:
            raise ValueError("loss.type tgdpo needs guidance.model (for example the output of a dpo run), "
                             "or guidance.source: column with per-token rewards in the data")
        if self.kind in ("pipeline", "demo") and (self.guidance.model or self.guidance.source != "implicit"):
            raise ValueError(f"kind {self.kind} trains its own guidance model (implicit source): "
                             "remove guidance.model and guidance.source")
        return self

    @model_validator(mode="after")
    def _layout(self) -> "JobConfig":
        """training.packing auto becomes the layout the trainers run, so that the step count, the scorers and the
        run's saved config all name it."""
        training = self.training
        on_gpus = self.policy is not None and self.policy.gpus_per_worker > 0
        on_cpus = self.policy is not None and self.policy.gpus_per_worker == 0
        if training.packing == "auto":
            self.training = training = training.model_copy(
                update={"packing": "shared_prompt" if on_gpus else "padded"})
        if training.attention in ("flex", "varlen") and training.packing == "padded":
            raise ValueError(f"training.attention {training.attention} is for the packed layouts: set "
                             "training.packing to packed or shared_prompt (padded rows use SDPA with a padding mask)")
        if training.attention == "flex" and on_cpus:
            raise ValueError("training.attention flex needs GPU trainers (policy.gpus_per_worker > 0): FlexAttention "
                             "has no backward on CPUs; use auto (varlen or flex on CUDA, the dense mask elsewhere), "
                             "dense or varlen")
        if training.attention == "varlen" and self.policy is not None:
            # Every group that runs packed rows on GPUs: the trainers, and the scorer pools that read log-probs.
            groups = {"policy": (self.policy.gpus_per_worker, self.policy.precision)}
            if self.needs_reference:
                groups["reference"] = (self.reference.gpus_per_replica, self.scorer_precision(self.reference))
            if self.guidance_kind == "implicit":
                groups["guidance"] = (self.guidance.gpus_per_replica, self.scorer_precision(self.guidance))
            in_fp32 = [name for name, (gpus, precision) in groups.items() if gpus > 0 and precision == "fp32"]
            if in_fp32:
                raise ValueError(f"training.attention varlen: FlashAttention's varlen kernel takes bf16 or fp16, and "
                                 f"{' and '.join(in_fp32)} would run on GPUs in fp32; set their precision to bf16 or "
                                 "auto, or training.attention to auto (flex for a model in fp32)")
        return self

    @model_validator(mode="after")
    def _what_zero3_rules_out(self) -> "JobConfig":
        if not (self.policy and self.policy.zero_stage == 3):
            return self
        if self.training.probe:
            raise ValueError("training.probe runs the policy on rank 0 alone, which ZeRO-3 partitions across the "
                             "workers: use policy.zero_stage 0, 1 or 2 with a probe")
        if self.training.compile:
            raise ValueError("training.compile is not supported with policy.zero_stage 3 (ZeRO-3 gathers each "
                             "layer's weights in hooks around its call): use stage 0, 1 or 2, or compile false")
        return self

    @model_validator(mode="after")
    def _cache_beside_the_runs(self) -> "JobConfig":
        # Under the runs' folder, not the working directory's: a job submitted from elsewhere, or pointed at
        # another output_dir, caches where its runs are.
        if self.scoring.cache_dir is None:
            self.scoring.cache_dir = f"{self.run.output_dir.rstrip('/')}/cache"
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def eval_dir(self) -> Path:
        """Where answers, judgments and the report go: the run folder, or <run_dir>/eval for a pipeline."""
        return self.run_dir if self.kind == "eval" else RunDir(self.run_dir).eval

    @property
    def reference_model(self) -> str:
        return self.reference.model or self.policy.model

    def scorer_precision(self, section: ScorerSection) -> Precision:
        """The precision a scorer (config.reference or config.guidance) runs in: its own, else the policy's."""
        return section.precision or self.policy.precision

    @property
    def needs_reference(self) -> bool:
        return self.loss.type not in ("simpo", "sft")

    @property
    def guidance_kind(self) -> Optional[GuidanceSource]:
        """Where TGDPO's token rewards come from (guidance.source); None for a loss that takes no guidance. A
        guidance scorer pool runs for the kinds in SCORED_GUIDANCE."""
        return self.guidance.source if self.loss.type == "tgdpo" else None

