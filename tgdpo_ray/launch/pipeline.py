"""Running a job spec by its kind: one training run, pairs generation, or the paper's experiment as one job.

The pipeline (after a pairs stage that generates its training pairs, when it has one, and an SFT stage on their
chosen answers, when it has an sft section) trains the guidance model with DPO, then TGDPO from the same starting
model guided by it, each stage in its own folder under <output_dir>/<name>/, and ends with a table comparing
them; with an `eval` section it then evaluates its policies (vLLM answers, an LLM judge) into
<output_dir>/<name>/eval/ and says in one line what the difference between TGDPO and DPO does and does not show.
"""

from __future__ import annotations

import json
from pathlib import Path

from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.config.job import SFT_MODEL, JobConfig
from tgdpo_ray.config.loader import load_config, read_raw_config, ready_to_run
from tgdpo_ray.onpolicy.pairs import run_pairs
from tgdpo_ray.train.driver import run_score, run_train
from tgdpo_ray.train.model_card import write_model_card


def stage_config(config: JobConfig, loss_type: str, guidance: str | None = None,
                 pairs_file: str | None = None, start: str | None = None) -> JobConfig:
    """One stage of the pipeline: a train job in <pipeline run dir>/<loss_type>/, on the pairs its pairs stage
    wrote when it has one (pairs_file), from `start` when given (the SFT stage's policy: also the reference)."""
    raw = config.model_dump(mode="json")
    raw.update(kind="train", sft=None)
    raw["loss"]["type"] = loss_type
    if loss_type == SFT_MODEL:
        raw["training"].update(epochs=config.sft.epochs, learning_rate=config.sft.learning_rate)
    if start is not None:
        raw["policy"]["model"] = raw["reference"]["model"] = start
    raw["run"].update(output_dir=str(config.run_dir), name=loss_type)
    raw["tracking"]["group"] = config.tracking.group or config.run.name  # the stages are one group of runs
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
    raw.update(kind="pairs", eval=None, data=None, sft=None)
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
    start, stages = None, {}
    for loss_type in ((SFT_MODEL,) if config.sft is not None else ()) + ("dpo", "tgdpo"):
        stage = stages[loss_type] = stage_config(config, loss_type, guidance, pairs_file, start)
        log(f"[pipeline] stage {loss_type}: {stage.run_dir}")
        runs[loss_type] = run_train(stage, log)
        runs[loss_type]["final_train_loss"] = last_train_loss(stage.run_dir)
        if loss_type == SFT_MODEL:
            start = runs[loss_type]["model_dir"]  # both preference stages start from it
        if loss_type == "dpo":
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
        for name, stage in stages.items():  # each policy's card gains its scores
            write_model_card(runs[name]["model_dir"], stage, runs[name], runs["eval"], evaluated_as=name)
        log(verdict(runs["eval"]))
    return runs


def evaluate_policies(config: JobConfig, runs: dict[str, dict], log=print) -> dict:
    """The last stage: the pipeline's policies (and any eval.models) answer, the judge grades, into <run>/eval/."""
    from tgdpo_ray.eval.flow import run_eval

    return run_eval(config, {name: runs[name]["model_dir"] for name in config.pipeline_models}, log)


def verdict(summary: dict) -> str:
    """One line on TGDPO against DPO in the evaluation's summary, and what it does and does not show: the paired
    difference of their mean scores over the questions (single mode), or TGDPO's net wins against DPO, (wins -
    losses) / judged (pairwise mode), each with its 95% interval over the questions: from resampling them, or under
    10 questions a t-interval (a mean difference) or none (net wins)."""
    if summary.get("scores"):
        rows, what = summary["scores"]["paired_differences"], "tgdpo - dpo mean score"
        value_key, interval_key = "mean_difference", "ci"
    else:
        rows, what = summary["pairwise"]["comparisons"], "tgdpo's net wins against dpo"
        value_key, interval_key = "net", "net_ci"
    found = next((row for row in rows if {row["model_a"], row["model_b"]} == {"tgdpo", "dpo"}), None)
    if found is None:
        return "[pipeline] verdict: the evaluation holds no comparison of tgdpo and dpo"
    if not found["n_questions"]:
        return "[pipeline] verdict: the judge decided no question between tgdpo and dpo: nothing is shown"
    sign = 1 if found["model_a"] == "tgdpo" else -1  # both statistics change sign with the order
    value = sign * found[value_key]
    if found[interval_key] is None:  # too few questions for an interval (see eval_stats)
        return (f"[pipeline] verdict: {what} {value:+.3f} over {found['n_questions']} questions, too few for an "
                "interval: no difference is shown")
    low, high = sorted(sign * bound for bound in found[interval_key])
    named = " t-interval (n < 10 questions)" if found.get("ci_method") == "t" else ""
    shown = ("the interval holds 0: no difference is shown" if low <= 0 <= high
             else f"tgdpo did {'better' if value > 0 else 'worse'} than dpo on these questions")
    return (f"[pipeline] verdict: {what} {value:+.3f} [{low:+.3f}, {high:+.3f}]{named} over "
            f"{found['n_questions']} questions: {shown}; one run of each on one data set does not say how often "
            "that would hold")


def run_job(config_path: str, overrides: list[str], kind: str | None = None, log=print) -> dict:
    """Runs a job spec; `kind` (from the command) overrides the spec's own kind."""
    overrides = list(overrides)
    if kind in ("train", "score"):
        # One run of a pipeline's spec: its pipeline stages are not this command's, so they are left out, and said.
        raw = read_raw_config(config_path)
        stages = [name for name in ("sft", "eval") if isinstance(raw, dict) and raw.get(name) is not None]
        if stages:
            log(f"[{kind}] one {kind} run of {config_path}: its pipeline stages ({', '.join(stages)}) are left out")
            overrides += [f"{name}=null" for name in stages]
    # The command's kind is applied last, after the user's overrides.
    overrides += [f"kind={kind}"] if kind else []
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
