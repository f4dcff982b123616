"""What `tgdpo-ray reproduce` found: statistics over seeds, learning curves and the report.

Everything is computed from the probe records of the runs (slot probability, accuracy and margin, the allowed
values' mass, and filler KL every few optimizer steps): steps to reach a slot accuracy are the first probed step
at or above it, so they are resolved to probe_every steps.

Over a handful of seeds, intervals are t-intervals and tests exact (intervals.t_interval, sign_flip_test): a
percentile bootstrap over 5 seeds under-covers. The primary analysis (fixed before the runs it tests, docs/
preregistration-smollm2.md): the area under the held-out slot-margin curve, tgdpo-dpo-guided minus dpo, per seed,
with an exact one-sided sign-flip test over the seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from tgdpo_ray.common.intervals import interval_text, sign_flip_test, t_interval
from tgdpo_ray.common.provenance import last_commit_of
from tgdpo_ray.common.jsonl import rewrite_records
from tgdpo_ray.common.plotting import pyplot, save_small_png
from tgdpo_ray.experiments.credit.spec import GUIDANCE_RUN, GUIDED, ExperimentSpec, arms, guidance_run

METRICS = ("slot_accuracy", "slot_probability", "slot_margin", "filler_kl")
TARGET_ACCURACY = 0.9
# Stated before the first run (issue #14): the guided arm reaches DPO's final slot accuracy in at most half of
# DPO's steps.
GOAL_RATIO = 0.5


def steps_to(curve: list[dict], accuracy: float) -> Optional[int]:
    """The first probed step whose slot accuracy is at least `accuracy`; None if none is."""
    return next((point["step"] for point in curve if point["slot_accuracy"] >= accuracy - 1e-9), None)


def summary(values: list[Optional[float]]) -> dict:
    """Mean and 95% t-interval over the seeds with a value; `n` counts them, out of `of`."""
    present = [value for value in values if value is not None]
    mean, low, high = t_interval(present)
    return {"mean": mean, "interval": None if low is None else [low, high], "n": len(present), "of": len(values),
            "per_seed": values}


def by_arm(spec: ExperimentSpec, curves: dict[str, list[dict]]) -> dict[str, dict[int, list[dict]]]:
    """Every arm's curves by seed (the separate guidance run's too); a repeated arm's second run is left out."""
    names = ([GUIDANCE_RUN] if spec.guidance is not None else []) + [arm.name for arm in arms(spec)]
    return {name: {seed: curves[f"seed-{seed}/{name}"] for seed in spec.seed_numbers} for name in names}


def area(curve: list[dict], metric: str = "slot_margin") -> float:
    """The area under a probed curve over the steps (trapezoids), divided by the last step: the curve's mean over
    training."""
    steps = np.array([point["step"] for point in curve], dtype=float)
    values = np.array([point[metric] for point in curve], dtype=float)
    return float(np.trapezoid(values, steps) / steps[-1])


def contrast(runs: dict[str, dict[int, list[dict]]], arm: str, against: str, alternative: str = "two-sided") -> dict:
    """The area under the slot-margin curve, `arm` minus `against`, per seed (paired): mean, 95% t-interval and the
    exact sign-flip p-value."""
    differences = [area(runs[arm][seed]) - area(runs[against][seed]) for seed in sorted(runs[against])]
    return summary(differences) | {"p_value": sign_flip_test(differences, alternative), "alternative": alternative,
                                   "arm": arm, "against": against}


def steps_to_margin(curve: list[dict], target: float) -> Optional[int]:
    """The first probed step whose slot margin is at least `target`; None (censored: not by the last step)."""
    return next((point["step"] for point in curve if point["slot_margin"] >= target), None)


def censored_comparison(runs: dict[str, dict[int, list[dict]]], arm: str, against: str, target: float) -> dict:
    """Steps to a slot-margin target per seed, a run that never reached it counted as slower than any that did (never
    dropped): how many seeds `arm` reached it sooner, later or tied, and the exact two-sided sign test over the
    seeds that differ."""
    never = float("inf")
    pairs = [(steps_to_margin(runs[arm][seed], target), steps_to_margin(runs[against][seed], target))
             for seed in sorted(runs[against])]
    sooner = sum((a if a is not None else never) < (b if b is not None else never) for a, b in pairs)
    later = sum((a if a is not None else never) > (b if b is not None else never) for a, b in pairs)
    differing = sooner + later
    # The sign test is the sign-flip test of the signs: +1 for each seed sooner, -1 for each later.
    p_value = sign_flip_test([1.0] * sooner + [-1.0] * later, "two-sided") if differing else 1.0
    return {"target": target, "arm": arm, "against": against, "per_seed": [list(pair) for pair in pairs],
            "sooner": sooner, "later": later, "tied": len(pairs) - differing, "p_value": p_value}


def headline_ratio(runs: dict[str, dict[int, list[dict]]], seeds: Optional[list[int]] = None) -> dict:
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
    return summary(ratios) | {"notes": notes}


def arm_table(runs: dict[str, dict[int, list[dict]]]) -> dict[str, dict]:
    """Per run: its steps, steps to 90% slot accuracy, its final metrics, and its final slot accuracy minus DPO's
    in the same seed (paired)."""
    table = {}
    dpo_final = {seed: curve[-1]["slot_accuracy"] for seed, curve in runs["dpo"].items()}
    for name, seeds in runs.items():
        row = {"steps": seeds[min(seeds)][-1]["step"],
               "steps_to_90": summary([steps_to(curve, TARGET_ACCURACY) for curve in seeds.values()])}
        for metric in METRICS:
            row[f"final_{metric}"] = summary([curve[-1][metric] for curve in seeds.values()])
        row["final_slot_accuracy_minus_dpo"] = summary(
            [curve[-1]["slot_accuracy"] - dpo_final[seed] for seed, curve in seeds.items()])
        row["area_slot_margin"] = summary([area(curve) for curve in seeds.values()])
        table[name] = row
    return table


def summary_text(block: dict, digits: int = 2) -> str:
    if block["mean"] is None:
        return f"none of {block['of']}"
    text = f"{block['mean']:.{digits}f}"
    if block["interval"]:
        text += f" {interval_text(*block['interval'], digits)}"
    return text + (f" ({block['n']}/{block['of']})" if block["n"] != block["of"] else "")


def headline_table(table: dict[str, dict]) -> str:
    lines = [f"{'run':<25} {'steps':>5}  {'steps to 90% slot acc':<26} " + " ".join(
        f"{title:<20}" for title in ("final slot acc", "minus dpo's (paired)", "final P(f(K))", "final filler KL",
                                     "slot-margin area"))]
    for name, row in table.items():
        cells = [summary_text(row["final_slot_accuracy"]), summary_text(row["final_slot_accuracy_minus_dpo"]),
                 summary_text(row["final_slot_probability"]), summary_text(row["final_filler_kl"], 3),
                 summary_text(row["area_slot_margin"])]
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
              "slot_margin": "slot margin log P(f(K)) - log P(other values)",
              "filler_kl": "KL(policy || reference) per filler token"}
    figure, axes = plt.subplots(1, len(METRICS), figsize=(17, 3.6))
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


def what_carries_the_loss(runs: dict[str, dict[int, list[dict]]]) -> dict[str, dict]:
    """Per TGDPO arm: the means over its probed steps (after step 0) of z_dpo, z_guidance and the weight-sum gap,
    and its last training loss, each summarised over seeds (issue #31: a negative gap pays for pushing every
    token down)."""
    table = {}
    for name, seeds in runs.items():
        curves = [[point for point in curve if point["step"] > 0] for curve in seeds.values()]
        if not all(curve and "z_guidance" in curve[0] for curve in curves):
            continue
        table[name] = {key: summary([float(np.mean([point[key] for point in curve])) for curve in curves])
                       for key in ("z_dpo", "z_guidance", "weight_sum_gap")}
        table[name]["final_loss"] = summary([curve[-1]["loss"] for curve in curves])
    return table


def guidance_check(spec: ExperimentSpec, runs: dict[str, dict[int, list[dict]]]) -> dict:
    """The guidance model's final held-out slot accuracy per seed against the spec's threshold."""
    threshold = spec.guidance.min_slot_accuracy if spec.guidance is not None else spec.min_guidance_slot_accuracy
    finals = {seed: curve[-1]["slot_accuracy"] for seed, curve in runs[guidance_run(spec)].items()}
    below = [seed for seed, value in finals.items() if value < threshold]
    return {"run": guidance_run(spec), "min_slot_accuracy": threshold, "final_slot_accuracy": finals,
            "seeds_below": below}


def reference_check(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """At step 0 (the start, every arm alike): the probability mass the reference puts on the allowed values at
    the slot, per seed; the colours task needs at least half of it there."""
    masses = {seed: curve[0].get("allowed_mass") for seed, curve in runs["dpo"].items()}
    return {"allowed_mass_at_step_0": masses, "minimum": 0.5,
            "seeds_below": [seed for seed, mass in masses.items() if mass is not None and mass < 0.5]}


def repeat_check(spec: ExperimentSpec, runs: dict, curves: dict[str, list[dict]]) -> Optional[dict]:
    """A repeated arm (arms.repeat, the first seed): its slot-margin area and final metrics beside the first
    run's."""
    name, seed = spec.arms.repeat, spec.first_seed
    if name is None:
        return None
    first, again = runs[name][seed], curves[f"seed-{seed}/{name}-repeat"]
    return {"arm": name, "seed": seed, "area_slot_margin": [area(first), area(again)],
            "final": {metric: [first[-1][metric], again[-1][metric]] for metric in METRICS},
            "identical_curves": first == again}


def signed_interval(block: dict) -> str:
    """A contrast's 95% t-interval as text; one seed has none."""
    return interval_text(*block["interval"], 3, sign=True) if block["interval"] else "n/a (one seed)"


def primary_line(primary: dict) -> str:
    return (f"{GUIDED} minus dpo, area under the held-out slot-margin curve (nats): {primary['mean']:+.3f} "
            f"(95% t-interval {signed_interval(primary)}, {primary['of']} seeds; per seed "
            + ", ".join(f"{value:+.3f}" for value in primary["per_seed"])
            + f"); exact one-sided sign-flip p = {primary['p_value']:.3f}")


def contrast_line(block: dict) -> str:
    return (f"{block['arm']} minus {block['against']}: {block['mean']:+.3f} {signed_interval(block)}, sign-flip p = "
            f"{block['p_value']:.3f} ({block['alternative']})")


def task_text(spec: ExperimentSpec) -> str:
    if spec.task.kind == "colours":
        return (f"Each of {spec.task.keys} animals has a secret colour f(K) (a bijection drawn per seed); the prompt "
                "lists the allowed colours, the answer is a filler sentence then `The K's colour is X.`, and the "
                "rejected answer has another sentence and a wrong colour. Every run starts from the pretrained "
                f"`{spec.model}`, also the reference.")
    return (f"Prompt `key: K` with K from {spec.task.keys} keys; the answer is 16 filler words (from "
            f"{spec.task.filler_words}), then `K => f(K)` for a bijection f drawn per seed. The rejected answer has a "
            "wrong value and a filler drawn again, so about 17 tokens differ per side and one matters. Every run "
            f"starts from one SFT warm start on the format ({spec.warm_start.pairs} pairs with a uniform value, "
            f"{spec.warm_start.epochs} epochs), which is also the reference.")


def markdown(spec: ExperimentSpec, results: dict, table_text: str) -> str:
    guidance = results["guidance_check"]
    lines = [
        f"# {spec.name}: does TGDPO learn faster than DPO where credit assignment matters?", "",
        f"Generated by `tgdpo-ray reproduce` ({results['provenance']['command']}) at commit "
        f"{results['code_commit']}; every number below comes from the runs' probe records (curves.jsonl).", "",
        "## The task", "", task_text(spec) + f" Each seed has {spec.task.train_pairs} training pairs; the probe "
        f"reads {spec.task.probe_answers_per_key} held-out answers per key (trained keys, new fillers), "
        f"teacher-forced, every {spec.probe_every} optimizer steps.", "",
        "## The runs", "",
        f"{spec.seeds} seeds, paired (every arm of a seed has the same f, data, pair order and start); arms "
        f"{', '.join(results['seeds'])}, {spec.arms.epochs} epoch(s) at learning rate {spec.arms.learning_rate:g}. "
        f"Loss settings: {json.dumps(spec.job.get('loss', {}))}.", "",
        "## Results", "",
        f"Primary: {primary_line(results['primary'])}.", "",
        *[f"- {contrast_line(block)}" for block in results["contrasts"]], "",
        "Intervals are 95% t-intervals over seeds; `(n/N)`: the mean is over the n seeds that reached the value.", "",
        "```", table_text, "```", "",
        f"Guidance model ({guidance['run']}) final slot accuracy per seed: "
        + ", ".join(f"{seed}: {value:.2f}" for seed, value in guidance["final_slot_accuracy"].items())
        + (f" (below {guidance['min_slot_accuracy']:.2f} in seeds {guidance['seeds_below']}; kept in every analysis)"
           if guidance["seeds_below"] else f" (all at least {guidance['min_slot_accuracy']:.2f})"), "",
        "Reference's mass on the allowed values at the slot, step 0: " + ", ".join(
            f"{seed}: {mass:.2f}" if mass is not None else f"{seed}: n/a"
            for seed, mass in results["reference_check"]["allowed_mass_at_step_0"].items()), "",
    ]
    carried = results["what_carries_the_loss"]
    if carried:
        lines += ["What carries TGDPO's loss (means over the probed steps, then over seeds): "
                  "`z_dpo | z_guidance | weight-sum gap | final loss`", ""]
        lines += [f"- {name}: " + " | ".join(summary_text(row[key], 3) for key in
                                             ("z_dpo", "z_guidance", "weight_sum_gap", "final_loss"))
                  for name, row in carried.items()]
        lines += [""]
    if results["repeat"]:
        repeat = results["repeat"]
        first, again = repeat["area_slot_margin"]
        lines += [f"Repeat: {repeat['arm']} run twice in seed {repeat['seed']}: slot-margin area {first:+.4f} and "
                  f"{again:+.4f}" + (" (identical curves)" if repeat["identical_curves"] else ""), ""]
    lines += [f"Toy headline (issue #14's goal): {results['headline']}", ""]
    lines += [f"- {note}" for note in results["tgdpo_steps_to_dpo_final_ratio"]["notes"]]
    lines += ["", "![learning curves](curves.png)", "", "![slot accuracy against filler KL](accuracy_vs_kl.png)",
              "", f"Wall time of the invocation that wrote this report: {results['minutes']:.1f} minutes, training "
              f"{results['provenance']['runs_trained']} runs (others had finished before and were kept).", ""]
    return "\n".join(lines)


def write_report(spec: ExperimentSpec, out: Path, curves: dict[str, list[dict]], seconds: float, record: dict,
                 log=print) -> dict:
    """curves.jsonl, curves.png, accuracy_vs_kl.png, reproduce.json and report.md under `out`; prints the table.
    `record`: the invocation's provenance (common.provenance), made before its runs."""
    runs = by_arm(spec, curves)
    rewrite_records(out / "curves.jsonl", [{"run": name, "seed": seed, **point} for name, seeds in curves_by_run(
        runs, curves, spec).items() for seed, curve in seeds.items() for point in curve])
    table = arm_table(runs)
    if GUIDED not in runs:  # a pilot of the dpo arms alone (arms.dpo_only): their table and curves only
        return write_pilot_report(spec, out, runs, table, record, log)
    ratio = headline_ratio(runs)
    guidance = guidance_check(spec, runs)
    passed = [seed for seed in guidance["final_slot_accuracy"] if seed not in guidance["seeds_below"]]
    primary = contrast(runs, GUIDED, "dpo", alternative="greater")
    others = [name for name in runs if name not in ("dpo", GUIDED, GUIDANCE_RUN)]
    contrasts = [contrast(runs, name, "dpo") for name in others]
    if f"{GUIDED}-shuffled" in runs:
        contrasts.append(contrast(runs, GUIDED, f"{GUIDED}-shuffled"))
    results = {
        "preregistration": spec.preregistration,
        "preregistration_commit": last_commit_of(spec.preregistration) if spec.preregistration else None,
        "code_commit": record["code_commit"],
        "provenance": record,
        "seeds": {name: sorted(seeds) for name, seeds in runs.items()},
        "primary": primary | {"metric": "area under the held-out slot-margin curve", "test": "exact sign-flip"},
        "contrasts": contrasts,
        "what_carries_the_loss": what_carries_the_loss(runs),
        "steps_to_margin_0": [censored_comparison(runs, name, "dpo", 0.0) for name in runs if name != "dpo"],
        "guidance_check": guidance,
        "reference_check": reference_check(runs),
        "repeat": repeat_check(spec, runs, curves),
        "tgdpo_steps_to_dpo_final_ratio": ratio,
        # The same, over the seeds whose guidance model passed its check: the paper's recipe proper.
        "tgdpo_steps_to_dpo_final_ratio_guidance_passed": headline_ratio(runs, passed) | {"seeds": passed},
        "goal_ratio": GOAL_RATIO,
        "headline": ratio_line(ratio),
        "runs": table,
        "minutes": seconds / 60,  # of this invocation, which trained provenance.runs_trained (others are kept)
        "experiment": spec.model_dump(mode="json"),
    }
    plot_curves(runs, out / "curves.png")
    plot_accuracy_against_kl(runs, out / "accuracy_vs_kl.png")
    (out / "reproduce.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    text = headline_table(table)
    (out / "report.md").write_text(markdown(spec, results, text))
    log("\n" + text + "\n\nPrimary: " + primary_line(primary))
    log(f"\nreport: {out / 'report.md'}; raw per-step numbers: {out / 'curves.jsonl'}")
    return results


def write_pilot_report(spec: ExperimentSpec, out: Path, runs: dict, table: dict, record: dict, log=print) -> dict:
    """The dpo arms of a learning-rate pilot: reproduce.json (table, provenance), curves.png and the table."""
    results = {"pilot": True, "code_commit": record["code_commit"], "provenance": record,
               "seeds": {name: sorted(seeds) for name, seeds in runs.items()}, "runs": table,
               "experiment": spec.model_dump(mode="json")}
    plot_curves(runs, out / "curves.png")
    plot_accuracy_against_kl(runs, out / "accuracy_vs_kl.png")
    (out / "reproduce.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    log("\n" + headline_table(table))
    return results


def curves_by_run(runs: dict, curves: dict[str, list[dict]], spec: ExperimentSpec) -> dict[str, dict[int, list]]:
    """Every run's curve for curves.jsonl: the arms by seed, and a repeat under its own name."""
    every = dict(runs)
    if spec.arms.repeat is not None:
        seed = spec.first_seed
        every[f"{spec.arms.repeat}-repeat"] = {seed: curves[f"seed-{seed}/{spec.arms.repeat}-repeat"]}
    return every
