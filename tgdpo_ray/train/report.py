"""`tgdpo-ray report RUN_DIR`: PNG plots and a short Markdown summary of one training run, from the files
the run wrote (metrics.jsonl, scoring/*.jsonl, summary.json, data_report.json)."""

from __future__ import annotations

import json
from pathlib import Path

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.jsonl import read_records
from tgdpo_ray.common.plotting import pyplot
from tgdpo_ray.common.run_dir import RunDir
from tgdpo_ray.scoring.throughput import ScorerThroughput


class ReportError(UserError):
    pass


def load_run(run_dir: Path) -> dict:
    files = RunDir(run_dir)
    metrics_file = files.metrics
    if not metrics_file.exists():
        raise ReportError(f"{run_dir} is not a run folder: no metrics.jsonl")
    records = read_records(metrics_file)
    steps = [r for r in records if "eval" not in r]
    if not steps:
        raise ReportError(f"{metrics_file} holds no training step yet")
    pools = ScorerThroughput(run_dir).read()
    optional = lambda path: json.loads(path.read_text()) if path.exists() else None  # noqa: E731
    return {"steps": steps, "evals": [r for r in records if "eval" in r], "pools": pools,
            "summary": optional(files.summary), "data": optional(files.data_report)}


def plot(run: dict, out: Path) -> list[Path]:
    plt = pyplot()

    steps = run["steps"]
    x = [r["step"] for r in steps]
    charts = {
        "loss.png": ("loss", [("train loss", [r["loss"] for r in steps])]),
        "rewards.png": ("reward", [("reward margin", [r["reward_margin"] for r in steps]),
                                   ("reward accuracy", [r["reward_accuracy"] for r in steps])]),
        "throughput.png": ("tokens / second", [("trainer tokens/s", [r["tokens_per_second"] for r in steps])]),
        "data_wait.png": ("seconds", [("trainer wait for data per step", [r["data_wait_seconds"] for r in steps])]),
    }
    if "chosen_weight_mean" in steps[0]:
        charts["guidance_weights.png"] = ("weight", [
            ("mean weight, chosen tokens", [r["chosen_weight_mean"] for r in steps]),
            ("mean weight, rejected tokens", [r["rejected_weight_mean"] for r in steps]),
            ("fraction of negative weights", [r["negative_weight_fraction"] for r in steps])])
    if "z_dpo" in steps[0]:  # runs from before these were logged have none
        charts["guidance_z.png"] = ("per pair (means over a step)", [
            ("z_dpo: DPO's contrast", [r["z_dpo"] for r in steps]),
            ("z_guidance: the guidance's part of z", [r["z_guidance"] for r in steps]),
            ("weight-sum gap / beta (chosen - rejected)", [r["weight_sum_gap"] for r in steps]),
            ("largest token weight / beta", [r["weight_max"] for r in steps])])
    written = []
    if "chosen_weight_histogram" in steps[0]:
        written.append(plot_weight_distribution(steps, out, plt))
    for name, (ylabel, series) in charts.items():
        figure, axis = plt.subplots(figsize=(7, 3.5))
        for label, values in series:
            axis.plot(x, values, label=label)
        if name == "loss.png" and run["evals"]:
            axis.plot([r["step"] for r in run["evals"]], [r["eval"]["loss"] for r in run["evals"]], "o-",
                      label="held-out loss (per epoch)")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(out / name)
    return written


def plot_weight_distribution(steps: list[dict], out: Path, plt) -> Path:
    """Token weights over the whole run, in units of beta (1 is plain DPO's weight)."""
    from tgdpo_ray.kernels.losses import WEIGHT_BINS, WEIGHT_RANGE

    width = (WEIGHT_RANGE[1] - WEIGHT_RANGE[0]) / WEIGHT_BINS
    centres = [WEIGHT_RANGE[0] + width * (i + 0.5) for i in range(WEIGHT_BINS)]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for key, label in (("chosen_weight_histogram", "chosen tokens"), ("rejected_weight_histogram", "rejected tokens")):
        counts = [sum(step[key][i] for step in steps) for i in range(WEIGHT_BINS)]
        axis.bar(centres, counts, width=width, alpha=0.6, label=label)
    axis.axvline(1.0, color="black", linewidth=0.8, label="DPO weight (beta)")
    axis.set_xlabel("token weight / beta (edges hold everything beyond)")
    axis.set_ylabel("tokens")
    axis.legend()
    figure.tight_layout()
    path = out / "guidance_weight_distribution.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summary_markdown(run_dir: Path, run: dict, charts: list[Path]) -> str:
    steps, last = run["steps"], run["steps"][-1]
    lines = [f"# Run report: {run_dir.name}", "",
             f"- optimizer steps: {last['step']} over {last['epoch'] + 1} epoch(s), {sum(r['pairs'] for r in steps)} pairs",
             f"- final train loss {last['loss']:.4f}, reward accuracy {last['reward_accuracy']:.3f}, "
             f"margin {last['reward_margin']:.4f}",
             f"- trainer throughput: median {sorted(r['tokens_per_second'] for r in steps)[len(steps) // 2]:.0f} "
             f"tokens/s per step; data wait {sum(r['data_wait_seconds'] for r in steps):.1f}s in total"]
    if run["evals"]:
        held_out = run["evals"][-1]["eval"]
        lines.append(f"- held-out: loss {held_out['loss']:.4f}, reward accuracy {held_out['reward_accuracy']:.3f} "
                     f"on {held_out['pairs']} pairs")
    for name, pool in sorted(run["pools"].items()):
        lines.append(f"- {name} scorers: {pool.pairs} pairs, {pool.pairs_per_second:.1f} pairs/s "
                     f"({pool.pairs_per_busy_second:.1f} per busy second)")
    if run["data"]:
        train = run["data"]["train"]
        lines.append(f"- data: {train['rows_kept']} of {train['rows_read']} rows kept, skipped "
                     f"{train['skipped_by_reason'] or 'none'}, {train['pairs_truncated']} truncated")
    lines += ["", *[f"![{chart.stem}]({chart.name})" for chart in charts], ""]
    return "\n".join(lines)


def write_report(run_dir: str) -> Path:
    folder = Path(run_dir)
    run = load_run(folder)
    out = folder / "report"
    out.mkdir(exist_ok=True)
    charts = plot(run, out)
    (out / "report.md").write_text(summary_markdown(folder, run, charts))
    return out / "report.md"
