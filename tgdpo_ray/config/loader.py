"""Loading a job config: YAML in, a validated JobConfig out, clear errors before any Ray resource starts.

Loading never changes what it is given: overrides apply to a copy of the raw config, and absolute paths go
into a new JobConfig.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from tgdpo_ray.common.files import is_data_file, is_uri
from tgdpo_ray.config.base import ConfigError
from tgdpo_ray.config.eval import PROMPT_SETS, QUESTION_SETS
from tgdpo_ray.config.job import SCORED_GUIDANCE, JobConfig


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
    """A copy of `raw` with each dotted key set; a number indexes a list (`eval.models.0.path=...`)."""
    raw = copy.deepcopy(raw)  # the caller's dict stays as it was
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
        elif "input" in problem and not isinstance(problem["input"], (dict, BaseModel)):  # a section: too long
            message += f" (got {problem['input']!r})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def looks_local(name: str) -> bool:
    """A path the user means to be on disk (vs a Hugging Face hub name such as `org/model`, or a URI such as
    s3://bucket/pairs.jsonl, which is checked where it is read: files.py)."""
    if is_uri(name):
        return False
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name)) or is_data_file(name)


def check_local_paths(config: JobConfig, source: str) -> None:
    """A path that should be on disk and is not fails here, naming its key, before anything starts."""
    candidates = {}
    if config.policy is not None:
        candidates = {
            "policy.model": config.policy.model,
            "reference.model": config.reference.model,
            "guidance.model": config.guidance.model if config.guidance_kind in SCORED_GUIDANCE else None,
        }
    if config.data is not None:
        candidates.update({"data.train.path": config.data.train.path if config.data.train else None,
                           "data.eval.path": config.data.eval.path if config.data.eval else None})
    if config.pairs is not None:
        pairs, ranker = config.pairs, config.pairs.ranker
        candidates.update({
            "pairs.prompts.path": pairs.prompts.path,
            "pairs.model": pairs.model,
            "pairs.ranker.reward_model.model": ranker.reward_model.model if ranker.reward_model else None,
            "pairs.ranker.judge.model": ranker.judge.model if ranker.judge and ranker.judge.backend == "vllm" else None,
        })
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
    for key, package in (("wandb_project", "wandb"), ("mlflow_experiment", "mlflow")):
        if getattr(config.tracking, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"invalid job config {source}:\n  tracking.{key}: needs the {package} package "
                              f"(pip install 'tgdpo-ray[{package}]')")


def import_function(spec: str, key: str):
    """The function a config names as module:function (`key` names the config key in errors)."""
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key} {spec}: cannot import it ({type(err).__name__}: {err})") from None
    if not callable(function):
        raise ConfigError(f"{key} {spec} is not a function")
    return function


def absolutize(config: JobConfig) -> JobConfig:
    """A copy of `config` with absolute local paths: Ray workers do not share the driver's working directory."""
    def fix(value: Optional[str]) -> Optional[str]:
        if value and looks_local(value):
            return str(Path(os.path.expanduser(value)).resolve())
        return value

    def fix_storage(value: Optional[str]) -> Optional[str]:
        """A local folder made absolute; a URI (s3://, gs://, file://) as it is."""
        return str(Path(value).expanduser().resolve()) if value and "://" not in value else value

    config = config.model_copy(deep=True)  # the caller's config stays as it was
    config.run.output_dir = str(Path(config.run.output_dir).resolve())
    config.run.checkpoint_storage = fix_storage(config.run.checkpoint_storage)
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
    if config.pairs is not None:
        pairs, ranker = config.pairs, config.pairs.ranker
        pairs.prompts.path, pairs.model = fix(pairs.prompts.path), fix(pairs.model)
        if ranker.reward_model is not None:
            ranker.reward_model.model = fix(ranker.reward_model.model)
        if ranker.judge is not None and ranker.judge.backend == "vllm":
            ranker.judge.model = fix(ranker.judge.model)
    if config.kind == "eval" or config.policy is None:
        return config
    config.scoring.cache_dir = fix_storage(config.scoring.cache_dir)
    for section in (config.policy, config.reference, config.guidance):
        section.model = fix(section.model)
    for source in (config.data.train, config.data.eval):
        if source is not None:
            source.path = fix(source.path)
    if config.data.chat_template and os.path.isfile(config.data.chat_template):
        # A template file stays a path (the tokenizer loader reads it), made absolute like the others.
        config.data.chat_template = str(Path(config.data.chat_template).resolve())
    return config


def ready_to_run(config: JobConfig, source: str = "<config>") -> JobConfig:
    """The checks that need this machine (local paths exist, tracker packages are installed), then a copy with
    absolute paths."""
    check_local_paths(config, source)
    check_trackers(config, source)
    if config.kind != "eval" and config.training.probe:
        import_function(config.training.probe.function, "training.probe.function")
    if config.pairs is not None and config.pairs.ranker.type == "rule":
        import_function(config.pairs.ranker.function, "pairs.ranker.function")
    return absolutize(config)


def build_config(raw: Any, source: str = "<config>", overrides: Optional[list[str]] = None,
                 check_paths: bool = True) -> JobConfig:
    """Validates a raw config. check_paths=False checks keys and values only: for a job bound for a cluster,
    whose paths name the cluster's disks."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job config {source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        config = JobConfig.model_validate(apply_overrides(raw, overrides or []))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None
    return ready_to_run(config, source) if check_paths else config


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
