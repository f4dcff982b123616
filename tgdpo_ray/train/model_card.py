"""The model card in every exported model folder: README.md with Hugging Face's YAML front matter (what the Hub
and `huggingface_hub.ModelCard` read) and a body that says how the model was made: where it started, the data
and its fingerprint, the loss and its parameters, the steps and tokens, the held-out metrics, and the
evaluation's scores once one has run (a pipeline writes the card again after its eval stage)."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Optional

from tgdpo_ray.config.job import SCORED_GUIDANCE, JobConfig
from tgdpo_ray.config.loader import looks_local

CARD = "README.md"


def front_matter(config: JobConfig) -> dict:
    """The Hub's metadata: base_model and datasets only where they are Hub names (a local path means nothing
    there; the body names it)."""
    meta: dict = {"library_name": "transformers",
                  "tags": ["tgdpo-ray", config.loss.type] + (["lora"] if config.policy.lora else [])}
    if not looks_local(config.policy.model):
        meta["base_model"] = config.policy.model
    if config.data.train is not None and not looks_local(config.data.train.path):
        meta["datasets"] = [config.data.train.path]
    return meta


def loss_parameters(config: JobConfig) -> str:
    loss = config.loss
    if loss.type == "sft":
        return "sft (the chosen answers' negative log-likelihood per token)"
    parts = [loss.type, f"β {loss.beta:g}"]
    if loss.type == "tgdpo":
        parts.append(f"α {loss.alpha:g}")
        parts += [name for name in ("clamp_weights", "center_guidance", "shuffle_guidance", "normalize_weights")
                  if getattr(loss, name)]
        kind = config.guidance_kind  # implicit or token_reward_model: a guidance model scores; column: the data
        parts.append(f"guidance {config.guidance.model} ({kind})" if kind in SCORED_GUIDANCE
                     else "guidance rewards from the data's columns")
    if loss.type == "simpo":
        parts.append(f"γ {loss.simpo_gamma:g}")
    return ", ".join(parts)


def trained_weights(config: JobConfig) -> str:
    lora = config.policy.lora
    if lora is None:
        return "all (a full fine-tune)"
    return (f"LoRA adapters (r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}) on "
            f"{', '.join(lora.target_modules)}, merged into these weights; the adapters alone are in ../adapter")


def evaluation_lines(name: str, evaluation: dict) -> list[str]:
    """This model's lines of an evaluation summary (eval/report.json): its mean score, or its pairwise record."""
    lines = [f"- Judge: {evaluation['judge']} ({evaluation['mode']} mode, prompts {evaluation['judge_prompts']}), "
             f"{evaluation['questions']} questions, evaluated as {name!r}."]
    scores = (evaluation.get("scores") or {}).get("models", {}).get(name)
    if scores and scores["mean"] is not None:
        interval = (f" (95% interval {scores['ci'][0]:.2f} to {scores['ci'][1]:.2f}, {scores['ci_method']})"
                    if scores["ci"] else "")
        lines.append(f"- Mean score {scores['mean']:.2f}{interval} over {scores['n_scored']} judgments.")
    for comparison in (evaluation.get("pairwise") or {}).get("comparisons", []):
        if name in (comparison["model_a"], comparison["model_b"]):
            lines.append(f"- {comparison['model_a']} against {comparison['model_b']}: {comparison['wins']} wins, "
                         f"{comparison['losses']} losses, {comparison['ties']} ties (from {comparison['model_a']}'s "
                         "side).")
    return lines


def card_text(config: JobConfig, summary: dict, evaluation: Optional[dict] = None,
              evaluated_as: Optional[str] = None) -> str:
    """The card of the model a run exported: summary is its summary.json; evaluation an eval/report.json in which
    the model was named evaluated_as."""
    training, data = config.training, config.data
    try:
        version = metadata.version("tgdpo-ray")
    except metadata.PackageNotFoundError:
        version = "unknown"
    held_out = summary.get("eval")
    lines = ["---", meta_as_yaml(front_matter(config)), "---", "",
             f"# {config.run.name}", "",
             f"Trained with tgdpo-ray {version} (run `{config.run.name}`, {config.kind} job).", "",
             "## Training", "",
             f"- Started from: `{config.policy.model}`",
             f"- Data: `{data.train.path if data.train else 'generated pairs'}` (fingerprint `{summary.get('data_fingerprint')}`, "
             "an order-free digest of every kept pair's tokens)",
             f"- Loss: {loss_parameters(config)}",
             f"- Weights trained: {trained_weights(config)}",
             f"- Optimizer: AdamW, learning rate {training.learning_rate:g}, warmup ratio {training.warmup_ratio:g}, "
             f"{training.epochs} epoch(s), seed {config.run.seed}",
             f"- Steps: {summary['steps']} ({'complete' if summary['complete'] else 'stopped early'}), "
             f"{summary['tokens']} tokens",
             f"- Sequences: at most {data.max_length} tokens, prompts at most {data.max_prompt_length}"]
    best = summary.get("best_checkpoint")
    if best and training.export == "best":
        metric = training.keep_best.metric
        lines.append(f"- Exported: the best checkpoint by {metric} ({best[metric]:.4f}), step {best['step']}")
    if held_out:
        lines += ["", f"## Held-out metrics (step {summary.get('eval_step')})", ""]
        lines += [f"- {key}: {value:.4f}" for key, value in held_out.items() if isinstance(value, (int, float))]
    if evaluation is not None and evaluated_as is not None:
        lines += ["", "## Evaluation", "", *evaluation_lines(evaluated_as, evaluation)]
    return "\n".join(lines) + "\n"


def meta_as_yaml(meta: dict) -> str:
    """Flat YAML of strings and lists of strings, each quoted as JSON (valid YAML)."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def write_model_card(model_dir: str | Path, config: JobConfig, summary: dict, evaluation: Optional[dict] = None,
                     evaluated_as: Optional[str] = None) -> Path:
    path = Path(model_dir) / CARD
    path.write_text(card_text(config, summary, evaluation, evaluated_as))
    return path
