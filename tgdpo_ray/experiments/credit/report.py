"""What `tgdpo-ray reproduce` found: statistics over seeds, learning curves and the report.

Everything is computed from the probe records of the runs (slot probability, slot accuracy and filler KL every
few optimizer steps): steps to reach a slot accuracy are the first probed step at or above it, so they are
resolved to probe_every steps. Intervals are percentile bootstraps over seeds (bootstrap.mean_interval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from tgdpo_ray.common.intervals import interval_text, mean_interval
from tgdpo_ray.common.jsonl import rewrite_records
from tgdpo_ray.common.plotting import pyplot, save_small_png
from tgdpo_ray.experiments.credit.spec import GUIDANCE_RUN, GUIDED, ExperimentSpec, arms

METRICS = ("slot_accuracy", "slot_probability", "filler_kl")
TARGET_ACCURACY = 0.9
# Stated before the first run (issue #14): the guided arm reaches DPO's final slot accuracy in at most half of
# DPO's steps.
GOAL_RATIO = 0.5


def steps_to(curve: list[dict], accuracy: float) -> Optional[int]:
    """The first probed step whose slot accuracy is at least `accuracy`; None if none is."""
    return next((point["step"] for point in curve if point["slot_accuracy"] >= accuracy - 1e-9), None)


def summary(values: list[Optional[float]], samples: int) -> dict:
    """Mean and 95% interval over the seeds with a value; `n` counts them, out of `of`."""
    present = [value for value in values if value is not None]
    mean, low, high = mean_interval(present, samples)
    return {"mean": mean, "interval": None if low is None else [low, high], "n": len(present), "of": len(values),
            "per_seed": values}


def by_arm(spec: ExperimentSpec, curves: dict[str, list[dict]]) -> dict[str, dict[int, list[dict]]]:
    names = [GUIDANCE_RUN] + [arm.name for arm in arms(spec)]
    return {name: {seed: curves[f"seed-{seed}/{name}"] for seed in range(1, spec.seeds + 1)} for name in names}


def headline_ratio(runs: dict[str, dict[int, list[dict]]], samples: int, seeds: Optional[list[int]] = None) -> dict:
    """Per seed (all, or `seeds`): the guided arm's steps to reach DPO's final slot accuracy over DPO's own steps
    to reach it."""
    ratios, notes = [], []
    for seed, dpo in runs["dpo"].items():
        if seeds is not None and seed not in seeds:
            continue
        target = dpo[-1]["slot_accuracy"]
        dpo_steps, guided_steps = steps_to(dpo, target), steps_to(runs[GUIDED][seed], target)
        if not dpo_steps:  # DPO ended no higher than it started: there is no speed to compare
            ratios.append(None)
            notes.append(f"seed {seed}: DPO ended no higher than it started (slot accuracy {target:.2f}); no ratio")
        elif guided_steps is None:
            ratios.append(None)
            notes.append(f"seed {seed}: {GUIDED} never reached DPO's final slot accuracy {target:.2f} "
                         f"(DPO took {dpo_steps} steps)")
        else:
            ratios.append(guided_steps / dpo_steps)
    return summary(ratios, samples) | {"notes": notes}


def arm_table(runs: dict[str, dict[int, list[dict]]], samples: int) -> dict[str, dict]:
    """Per run: its steps, steps to 90% slot accuracy, its final metrics, and its final slot accuracy minus DPO's
    in the same seed (paired)."""
    table = {}
    dpo_final = {seed: curve[-1]["slot_accuracy"] for seed, curve in runs["dpo"].items()}
    for name, seeds in runs.items():
        row = {"steps": seeds[min(seeds)][-1]["step"],
               "steps_to_90": summary([steps_to(curve, TARGET_ACCURACY) for curve in seeds.values()], samples)}
        for metric in METRICS:
            row[f"final_{metric}"] = summary([curve[-1][metric] for curve in seeds.values()], samples)
        row["final_slot_accuracy_minus_dpo"] = summary(
            [curve[-1]["slot_accuracy"] - dpo_final[seed] for seed, curve in seeds.items()], samples)
        table[name] = row
    return table


def summary_text(block: dict, digits: int = 2) -> str:
    if block["mean"] is None:
        return f"none of {block['of']}"
    text = f"{block['mean']:.{digits}f} {interval_text(*block['interval'], digits)}"
    return text + (f" ({block['n']}/{block['of']})" if block["n"] != block["of"] else "")


def headline_table(table: dict[str, dict]) -> str:
    lines = [f"{'run':<25} {'steps':>5}  {'steps to 90% slot acc':<26} " + " ".join(
        f"{title:<20}" for title in ("final slot acc", "minus dpo's (paired)", "final P(f(K))", "final filler KL"))]
    for name, row in table.items():
        cells = [summary_text(row["final_slot_accuracy"]), summary_text(row["final_slot_accuracy_minus_dpo"]),
                 summary_text(row["final_slot_probability"]), summary_text(row["final_filler_kl"], 3)]
        lines.append(f"{name:<25} {row['steps']:>5}  {summary_text(row['steps_to_90'], 0):<26} "
                     + " ".join(f"{cell:<20}" for cell in cells))
    return "\n".join(lines)


def ratio_line(ratio: dict) -> str:
    if ratio["mean"] is None:
        return f"{GUIDED} vs dpo: no seed gives a ratio (see the notes), so the goal (<= {GOAL_RATIO}) is not met"
    verdict = "met" if ratio["interval"][1] <= GOAL_RATIO else (
        "not met" if ratio["interval"][0] > GOAL_RATIO else "undecided (the interval spans it)")
    return (f"{GUIDED} reached DPO's final slot accuracy in {ratio['mean']:.2f}x DPO's steps (95% interval "
            f"{interval_text(*ratio['interval'])}, {ratio['n']} of {ratio['of']} seeds); "
            f"goal <= {GOAL_RATIO}: {verdict}")


# ---------------------------------------------------------------- plots


def plot_curves(runs: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """One panel per metric: the mean over seeds per arm, shaded from the lowest seed to the highest."""
    plt = pyplot()

    titles = {"slot_accuracy": "slot accuracy (argmax over A)", "slot_probability": "P(f(K)) at the slot",
              "filler_kl": "KL(policy || reference) per filler token"}
    figure, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.6))
    for name, seeds in runs.items():
        if name == GUIDANCE_RUN:
            continue
        steps = [point["step"] for point in seeds[min(seeds)]]
        for axis, metric in zip(axes, METRICS):
            values = np.array([[point[metric] for point in curve] for curve in seeds.values()])
            axis.plot(steps, values.mean(axis=0), label=name, linewidth=1.4)
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.15)
    for axis, metric in zip(axes, METRICS):
        axis.set_title(titles[metric], fontsize=10)
        axis.set_xlabel("optimizer step")
    axes[-1].set_yscale("symlog", linthresh=0.01)
    axes[0].legend(fontsize=7)
    save_small_png(figure, path)


def plot_accuracy_against_kl(runs: dict[str, dict[int, list[dict]]], path: Path) -> None:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for name, seeds in runs.items():
        if name == GUIDANCE_RUN:
            continue
        mean = {metric: np.array([[p[metric] for p in curve] for curve in seeds.values()]).mean(axis=0)
                for metric in ("filler_kl", "slot_accuracy")}
        axis.plot(mean["filler_kl"], mean["slot_accuracy"], marker=".", markersize=3, linewidth=1, label=name)
    axis.set_xscale("symlog", linthresh=0.01)
    axis.set_xlabel("filler KL from the reference (mean over seeds)")
    axis.set_ylabel("slot accuracy (mean over seeds)")
    axis.legend(fontsize=7)
    save_small_png(figure, path)


# ---------------------------------------------------------------- the report


def guidance_check(spec: ExperimentSpec, runs: dict[str, dict[int, list[dict]]]) -> dict:
    finals = {seed: curve[-1]["slot_accuracy"] for seed, curve in runs[GUIDANCE_RUN].items()}
    below = [seed for seed, value in finals.items() if value < spec.guidance.min_slot_accuracy]
    return {"min_slot_accuracy": spec.guidance.min_slot_accuracy, "final_slot_accuracy": finals,
            "seeds_below": below}


def markdown(spec: ExperimentSpec, results: dict, table_text: str, runs: dict) -> str:
    guidance = results["guidance"]
    lines = [
        "# Does TGDPO learn faster than DPO where credit assignment matters?", "",
        "Generated by `make reproduce` (`tgdpo-ray reproduce --config jobs/reproduce.yaml`); every number below "
        "comes from the runs' probe records (curves.jsonl).", "",
        "## The task", "",
        f"Prompt `key: K` with K from {spec.task.keys} keys; the answer is 16 filler words (from "
        f"{spec.task.filler_words}), then `K => f(K)` for a bijection f drawn per seed. The rejected answer has a "
        "wrong value and a filler drawn again, so about 17 tokens differ per side and one matters. Every run starts "
        f"from one SFT warm start on the format ({spec.warm_start.pairs} pairs with a uniform value, "
        f"{spec.warm_start.epochs} epochs), which is also the reference. Each seed has {spec.task.train_pairs} "
        f"training pairs; the probe reads {spec.task.probe_answers_per_key} held-out answers per key (the keys "
        "are those trained on, since f cannot be guessed for an unseen key; the fillers are new), teacher-forced, "
        f"every {spec.probe_every} optimizer steps.", "",
        "## The runs", "",
        f"{spec.seeds} seeds, paired (every arm of a seed has the same f, data, pair order and start). "
        f"Arms: {spec.arms.epochs} epoch(s) at learning rate {spec.arms.learning_rate:g}; `dpo-lrM` at M times "
        f"that. `tgdpo-oracle`: +{spec.task.oracle_reward:g} on f(K) and -{spec.task.oracle_reward:g} on the "
        "wrong value (guidance.source: column); `tgdpo-shuffled`: the same rewards shuffled across each answer's "
        f"positions; `{GUIDED}`: the paper's recipe, guided by `{GUIDANCE_RUN}` ({spec.guidance.epochs} epochs at "
        f"{spec.guidance.learning_rate:g})"
        + (f"; `{GUIDED}-clamped`: the same with loss.clamp_weights (token weights clamped at 0)"
           if spec.arms.clamped_guidance else "")
        + f". Loss settings: {json.dumps(spec.job.get('loss', {}))}.", "",
        "## Results", "",
        f"Headline: {results['headline']}", "",
        "Intervals are 95% percentile bootstraps over seeds; `(n/N)`: the mean is over the n seeds that reached "
        "the value.", "",
        "```", table_text, "```", "",
        "Guidance model's final slot accuracy per seed: "
        + ", ".join(f"{seed}: {value:.2f}" for seed, value in guidance["final_slot_accuracy"].items())
        + (f" (below {guidance['min_slot_accuracy']:.2f} in seeds {guidance['seeds_below']}: "
           f"{GUIDED} there is not guided by a converged model)" if guidance["seeds_below"] else
           f" (all at least {guidance['min_slot_accuracy']:.2f})"), "",
    ]
    passed = results["tgdpo_steps_to_dpo_final_ratio_guidance_passed"]
    if guidance["seeds_below"]:
        lines += [f"Over the seeds whose guidance passed ({passed['seeds'] or 'none'}): "
                  + (ratio_line(passed) if passed["seeds"] else "no ratio."), ""]
    lines += [f"- {note}" for note in results["tgdpo_steps_to_dpo_final_ratio"]["notes"]]
    lines += ["", "![learning curves](curves.png)", "", "![slot accuracy against filler KL](accuracy_vs_kl.png)",
              "", f"Wall time of the invocation that wrote this report: {results['minutes']:.1f} minutes, training "
              f"{results['trained_runs']} of the {1 + len(runs) * spec.seeds} runs (the others had finished before "
              "and were kept).", ""]
    return "\n".join(lines)


def write_report(spec: ExperimentSpec, out: Path, curves: dict[str, list[dict]], seconds: float, trained: int,
                 log=print) -> dict:
    """curves.jsonl, curves.png, accuracy_vs_kl.png, reproduce.json and report.md under `out`; prints the table."""
    runs = by_arm(spec, curves)
    rewrite_records(out / "curves.jsonl", [{"run": name, "seed": seed, **point} for name, seeds in runs.items()
                                           for seed, curve in seeds.items() for point in curve])
    samples = spec.bootstrap_samples
    table = arm_table(runs, samples)
    ratio = headline_ratio(runs, samples)
    guidance = guidance_check(spec, runs)
    passed = [seed for seed in guidance["final_slot_accuracy"] if seed not in guidance["seeds_below"]]
    results = {
        "seeds": {name: sorted(seeds) for name, seeds in runs.items()},
        "tgdpo_steps_to_dpo_final_ratio": ratio,
        # The same, over the seeds whose guidance model passed its check: the paper's recipe proper.
        "tgdpo_steps_to_dpo_final_ratio_guidance_passed": headline_ratio(runs, samples, passed) | {"seeds": passed},
        "goal_ratio": GOAL_RATIO,
        "headline": ratio_line(ratio),
        "runs": table,
        "guidance": guidance,
        "minutes": seconds / 60,  # of this invocation, which trained `trained_runs` (finished runs are kept)
        "trained_runs": trained,
        "experiment": spec.model_dump(mode="json"),
    }
    plot_curves(runs, out / "curves.png")
    plot_accuracy_against_kl(runs, out / "accuracy_vs_kl.png")
    (out / "reproduce.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    text = headline_table(table)
    (out / "report.md").write_text(markdown(spec, results, text, runs))
    log("\n" + text + "\n\n" + results["headline"])
    log(f"\nreport: {out / 'report.md'}; raw per-step numbers: {out / 'curves.jsonl'}")
    return results
