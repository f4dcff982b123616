"""The base of every job-config section: unknown keys are refused, assignments validated; and the error a config
that cannot run raises. config.py (the job) and config_eval.py (engines, judges, evaluation) build on it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tgdpo_ray.common.errors import UserError


class ConfigError(UserError, ValueError):
    """A job config that cannot run; the message names the key and the file."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Placement(Section):
    """Where a group's processes may run: Ray node labels they require, custom resources each one holds."""

    node_labels: dict[str, str] = Field(default={}, description="Ray node labels the processes need, e.g. "
                                        "{tgdpo-group: policy}: only nodes started with these labels")
    resources: dict[str, float] = Field(default={}, description="custom Ray resources each process holds, e.g. "
                                                                "{policy_slot: 1}")

