"""The credit-assignment experiment's spec (jobs/reproduce.yaml) and its arms: what `tgdpo-ray reproduce` runs,
read by the runner and by the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, ValidationError, field_validator

from tgdpo_ray.config.base import ConfigError, Section
from tgdpo_ray.config.loader import apply_overrides, describe_validation_error, read_raw_config


class TaskSpec(Section):
    keys: int = Field(default=8, ge=2, description="the size of the key set A (chance at the slot is 1/keys)")
    filler_words: int = Field(default=24, ge=2, description="the filler vocabulary; each answer draws 16 words")
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

    @field_validator("lr_multipliers")
    @classmethod
    def _includes_one(cls, value: list[float]) -> list[float]:
        if 1 not in value or any(m <= 0 for m in value) or len(set(value)) != len(value):
            raise ValueError("lr_multipliers must be distinct positive numbers including 1")
        return value


class ExperimentSpec(Section):
    name: str = Field(default="reproduce", description="results go to <output_dir>/<name>/")
    output_dir: str = Field(default="outputs", description="the folder that holds the experiment's folder")
    seeds: int = Field(default=5, gt=0, description="seeds 1..N: each its own f, data and pair order")
    concurrent_runs: int = Field(default=2, gt=0, description="training runs at once on the cluster")
    probe_every: int = Field(default=8, gt=0, description="optimizer steps between slot probes")
    bootstrap_samples: int = Field(default=2000, gt=0, description="resamples of seeds behind each interval")
    task: TaskSpec = Field(default=TaskSpec(), description="the credit-assignment task")
    warm_start: WarmStartSpec = Field(description="the SFT run on the format")
    guidance: GuidanceSpec = Field(description="the DPO run that guides arm tgdpo-dpo-guided")
    arms: ArmsSpec = Field(description="the compared runs' length and learning rate")
    job: dict[str, Any] = Field(default={}, description="job-config sections every run shares (data limits, loss "
                                "beta/alpha, training batch and schedule, policy, scorers, scoring, ray); the "
                                "experiment sets run, data paths, loss.type, the length and rate, policy.model, "
                                "guidance.model/source and training.probe")

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


GUIDANCE_RUN = "guidance-dpo"
GUIDED = "tgdpo-dpo-guided"  # the paper's recipe: the arm of the headline


def arms(spec: ExperimentSpec) -> list[Arm]:
    dpo = [Arm("dpo" if m == 1 else f"dpo-lr{m:g}", "dpo", m) for m in spec.arms.lr_multipliers]
    clamped = [Arm(f"{GUIDED}-clamped", "tgdpo", guided=True, clamp=True)] if spec.arms.clamped_guidance else []
    shuffled = [Arm("tgdpo-shuffled", "tgdpo", rewards="shuffled")] if spec.arms.shuffled_control else []
    return dpo + [Arm("tgdpo-oracle", "tgdpo", rewards="oracle"), Arm(GUIDED, "tgdpo", guided=True), *clamped,
                  *shuffled]
