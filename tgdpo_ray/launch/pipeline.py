"""Running a job spec by its kind: one training run, pairs generation, or the paper's experiment as one job.

The pipeline (after a pairs stage that generates its training pairs, when it has one) trains the guidance
model with DPO, then TGDPO from the same starting model guided by it, each stage in its own folder under
<output_dir>/<name>/, and ends with a table comparing the two; with an `eval` section it then evaluates both
policies (vLLM answers, an LLM judge) into <output_dir>/<name>/eval/.
"""

from __future__ import annotations

import json
from pathlib import Path

from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.job import PIPELINE_MODELS, JobConfig
from tgdpo_ray.config.loader import load_config, ready_to_run
from tgdpo_ray.onpolicy.pairs import run_pairs
from tgdpo_ray.train.driver import run_score, run_train


def stage_config(config: JobConfig, loss_type: str, guidance: str | None = None,
                 pairs_file: str | None = None) -> JobConfig:
    """One stage of the pipeline: a train job in <pipeline run dir>/<loss_type>/, on the pairs its pairs stage
    wrote when it has one (pairs_file)."""
    raw = config.model_dump(mode="json")
    raw["kind"] = "train"
    raw["loss"]["type"] = loss_type
    raw["run"].update(output_dir=str(config.run_dir), name=loss_type)
    if config.run.checkpoint_storage:  # each stage's checkpoints under the pipeline's name, as its run folder is
        raw["run"]["checkpoint_storage"] = f"{config.run.checkpoint_storage.rstrip('/')}/{config.run.name}"
    raw["guidance"]["model"] = guidance
    raw["eval"] = None  # the pipeline evaluates after both stages
    if pairs_file is not None:
        raw["pairs"], raw["data"]["train"] = None, {"path": pairs_file}
    return JobConfig.model_validate(raw)


def pairs_stage_config(config: JobConfig) -> JobConfig:
    """The pipeline's first stage, when it has a pairs section: a pairs job in <pipeline run dir>/pairs/, sampling
    from the policy's starting model unless pairs.model says otherwise."""
    raw = config.model_dump(mode="json")
    raw.update(kind="pairs", eval=None, data=None)
    raw["run"].update(output_dir=str(config.run_dir), name="pairs")
    return JobConfig.model_validate(raw)


def last_train_loss(run_dir: Path) -> float:
    records = read_records(RunDir(run_dir).metrics)
    return [record for record in records if "loss" in record][-1]["loss"]


def summary_table(runs: dict[str, dict]) -> str:
    """Held-out loss is each run's own loss; held-out DPO loss is plain DPO's for every run, so they compare.
    A run without held-out pairs says "none" in those columns."""
    lines = [f"{'run':<8} {'final train loss':>17} {'held-out loss':>14} {'held-out DPO loss':>18} "
             f"{'held-out reward acc':>20} {'tokens/s':>9}"]
    for name, summary in runs.items():
        held_out = summary.get("eval") or {}

        def cell(key: str, width: int, decimals: int) -> str:
            return f"{held_out[key]:>{width}.{decimals}f}" if key in held_out else f"{'none':>{width}}"

        lines.append(f"{name:<8} {summary['final_train_loss']:>17.4f} {cell('loss', 14, 4)} {cell('dpo_loss', 18, 4)} "
                     f"{cell('reward_accuracy', 20, 3)} {summary['tokens_per_second']:>9.0f}")
    return "\n".join(lines)


def run_pipeline(config: JobConfig, log=print) -> dict[str, dict]:
    runs = {}
    guidance, pairs_file = None, None
    if config.pairs is not None:
        stage = pairs_stage_config(config)
        log(f"[pipeline] stage pairs: {stage.run_dir}")
        pairs_file = run_pairs(stage, log)["pairs_file"]
    for loss_type in ("dpo", "tgdpo"):
        stage = stage_config(config, loss_type, guidance, pairs_file)
        log(f"[pipeline] stage {loss_type}: {stage.run_dir}")
        runs[loss_type] = run_train(stage, log)
        runs[loss_type]["final_train_loss"] = last_train_loss(stage.run_dir)
        guidance = runs[loss_type]["model_dir"]  # the DPO policy guides the TGDPO stage
    table = summary_table(runs)
    RunDir(config.run_dir).pipeline.write_text(json.dumps({"runs": runs, "table": table}, indent=2))
    log("\n" + table)
    log(f"\nDPO policy (the guidance model): {runs['dpo']['model_dir']}")
    log(f"TGDPO policy:                    {runs['tgdpo']['model_dir']}")
    log(f"Summaries: {config.run_dir / 'pipeline.json'}; per-step metrics: <stage>/metrics.jsonl")
    if config.eval is not None:
        log(f"\n[pipeline] stage eval: {config.eval_dir}")
        runs["eval"] = evaluate_policies(config, runs, log)
    return runs


def evaluate_policies(config: JobConfig, runs: dict[str, dict], log=print) -> dict:
    """The last stage: both trained policies (and any eval.models) answer, the judge grades, into <run>/eval/."""
    from tgdpo_ray.eval.flow import run_eval

    return run_eval(config, {name: runs[name]["model_dir"] for name in PIPELINE_MODELS}, log)


def run_job(config_path: str, overrides: list[str], kind: str | None = None, log=print) -> dict:
    """Runs a job spec; `kind` (from the command) overrides the spec's own kind."""
    # The command's kind is applied last, after the user's overrides.
    overrides = list(overrides) + ([f"kind={kind}"] if kind else [])
    # Keys and values first, then the paths: the same order as a demo job, whose paths exist only once
    # experiments/demo.py has built its inputs.
    config = ready_to_run(load_config(config_path, overrides, check_paths=False), config_path)
    if config.kind == "train":
        return run_train(config, log)
    if config.kind == "score":
        return run_score(config, log)
    if config.kind == "eval":
        from tgdpo_ray.eval.flow import run_eval

        return run_eval(config, log=log)
    if config.kind == "pairs":
        return run_pairs(config, log)
    return run_pipeline(config, log)
