"""The MT-Bench-style evaluation's report: report.md, PNG charts and a short console table, from the summary the
evaluation job builds:

    summary = {"mode": "single" | "pairwise", "judge": str, "questions": int, "models": [names],
               "scores": eval_stats.single_summary(...) or None,
               "pairwise": eval_stats.pairwise_summary(...) or None,
               "lengths": eval_stats.length_summary(...)}
"""

from __future__ import annotations

from pathlib import Path

LENGTH_NOTE = ("Note: LLM judges tend to favour longer answers, so read score differences next to the answer "
               "lengths.")


# --- number formatting ------------------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(ci: list[float] | None, digits: int = 2, sign: bool = False) -> str:
    if ci is None:
        return "n/a"
    return f"[{_number(ci[0], digits, sign)}, {_number(ci[1], digits, sign)}]"


def _percent_interval(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{_percent(ci[0])}, {_percent(ci[1])}]"


def _with_interval(value: str, interval: str) -> str:
    return "n/a" if value == "n/a" else f"{value} {interval}"


def _level(stats: dict) -> str:
    return f"{round(100 * stats.get('level', 0.95))}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


# --- single mode ------------------------------------------------------------------------------------------------


def _difference_sentence(difference: dict, level: str) -> str:
    """One paired difference, said with the better model first."""
    a, b = difference["model_a"], difference["model_b"]
    value, ci, n = difference["mean_difference"], difference["ci"], difference["n_questions"]
    if value is None:
        return f"- `{a}` vs `{b}`: no question where both were scored."
    if value < 0:  # state it from the better model's side
        a, b, value, ci = b, a, -value, [-ci[1], -ci[0]]
    if value == 0:
        return f"- `{a}` and `{b}` score the same on average ({level} CI {_interval(ci)}, {n} questions)."
    clear = ci[0] > 0
    verdict = (f"the interval excludes 0, so **{a}** is better" if clear
               else "the interval includes 0, so the difference is not clear at this number of questions")
    return (f"- **{a}** scores {value:.2f} points higher than `{b}` ({level} CI {_interval(ci)}, "
            f"paired over {n} questions both were scored on); {verdict}.")


def _single_sections(summary: dict) -> list[str]:
    scores, lengths = summary["scores"], summary.get("lengths") or {}
    models, level = scores["models"], _level(scores)
    ranked = sorted((m for m in models if models[m]["mean"] is not None), key=lambda m: -models[m]["mean"])
    lines = ["## Verdict", ""]
    if ranked:
        best = models[ranked[0]]
        lines.append(f"Highest mean score: **{ranked[0]}** ({_number(best['mean'])}, {level} CI "
                     f"{_interval(best['ci'])}).")
    else:
        lines.append("No model has a parsed score.")
    if scores["paired_differences"]:
        lines += ["", "Paired differences (per question, then averaged; CIs resample questions):", ""]
        lines += [_difference_sentence(d, level) for d in scores["paired_differences"]]

    lines += ["", "## Scores", ""]
    rows = []
    for model in models:
        block, length = models[model], lengths.get(model, {})
        rows.append([model, _number(block["mean"]), _interval(block["ci"]), str(block["n_scored"]),
                     str(block["n_unparseable"]), _number(length.get("mean_tokens"), 0),
                     _number(length.get("mean_words"), 0)])
    lines += _table(["model", "mean score", f"{level} CI", "scored", "unparseable", "mean tokens/turn",
                     "mean words/turn"], rows)
    lines += ["", LENGTH_NOTE, ""]

    unparseable = {m: models[m]["n_unparseable"] for m in models}
    if any(unparseable.values()):
        counts = ", ".join(f"`{m}` {unparseable[m]} of {unparseable[m] + models[m]['n_scored']}" for m in models)
        lines.append(f"**Unparseable judgments** (no score could be read, or the request failed; left out of every "
                     f"score): {counts}.")
    else:
        lines.append("Unparseable judgments: none; every judgment gave a score.")

    turns = sorted({turn for m in models for turn in models[m]["by_turn"]})
    lines += ["", "## By turn", ""]
    rows = [[model] + [_cell(models[model]["by_turn"].get(turn)) for turn in turns] for model in models]
    lines += _table(["model"] + [f"turn {turn}" for turn in turns], rows)

    categories = list(dict.fromkeys(c for m in models for c in models[m]["by_category"]))
    lines += ["", "## By category", "", f"Mean score and {level} CI (resampling that category's questions).", ""]
    rows = [[category] + [_cell(models[m]["by_category"].get(category)) for m in models] for category in categories]
    lines += _table(["category"] + list(models), rows)
    return lines


def _cell(block: dict | None) -> str:
    if block is None or block["mean"] is None:
        return "n/a"
    unparseable = f", {block['n_unparseable']} unparseable" if block["n_unparseable"] else ""
    return f"{_number(block['mean'])} {_interval(block['ci'])}{unparseable}"


# --- pairwise mode ----------------------------------------------------------------------------------------------


def _comparison_sentence(c: dict, level: str) -> str:
    a, b = c["model_a"], c["model_b"]
    if not c["decided"]:
        return f"- `{a}` vs `{b}`: no unit was judged in both orders; nothing to compare."
    counts = (f"`{a}` wins {c['wins']}, loses {c['losses']}, ties {c['ties']} of {c['decided']} decided units "
              f"over {c['n_questions']} questions")
    rates = (f"adjusted win rate {_percent(c['adjusted_win_rate'])} ({level} CI "
             f"{_percent_interval(c['adjusted_win_rate_ci'])}), net {_number(c['net'], sign=True)} "
             f"({level} CI {_interval(c['net_ci'], sign=True)})")
    low, high = c["net_ci"]
    ahead = a if c["net"] > 0 else b
    if low > 0 or high < 0:
        verdict = f"the net interval excludes 0, so **{ahead}** is better"
    elif c["net"] == 0:
        verdict = "the two are level"
    else:
        verdict = (f"`{ahead}` is ahead, but the net interval includes 0, so the difference is not clear at this "
                   "number of questions")
    return f"- `{a}` vs `{b}`: {counts}: {rates}; {verdict}."


def _pairwise_sections(summary: dict) -> list[str]:
    pairwise, lengths = summary["pairwise"], summary.get("lengths") or {}
    comparisons, level = pairwise["comparisons"], _level(pairwise)
    explanation = ("Each unit is one (question, turn), judged in both answer orders; an order-dependent verdict "
                   "counts as a tie. Net = (wins - losses) / decided units; CIs resample questions.")
    lines = ["## Verdict", "", explanation, ""]
    lines += [_comparison_sentence(c, level) for c in comparisons] or ["No comparison was judged."]

    lines += ["", "## Comparisons", ""]
    rows = [[f"{c['model_a']} vs {c['model_b']}", str(c["wins"]), str(c["losses"]), str(c["ties"]),
             _with_interval(_percent(c["win_rate"]), _percent_interval(c["win_rate_ci"])),
             _with_interval(_percent(c["adjusted_win_rate"]), _percent_interval(c["adjusted_win_rate_ci"])),
             _with_interval(_number(c["net"], sign=True), _interval(c["net_ci"], sign=True)),
             _percent(c["position_consistency"]), f"{c['unparseable']} of {c['units']}"] for c in comparisons]
    lines += _table(["comparison", "W", "L", "T", f"win rate ({level} CI)", "adjusted win rate", "net",
                     "position consistency", "unparseable units"], rows)

    lines += ["", "## Position consistency and unparseable verdicts", ""]
    for c in comparisons:
        agreeing = c["decided"] - c["inconsistent"]
        consistency = (f"the judge gave the same verdict in both orders for {agreeing} of {c['decided']} units "
                       f"({_percent(c['position_consistency'])}); {c['inconsistent']} flipped with the order "
                       "and count as ties" if c["decided"] else "no unit had both orders parsed")
        lines.append(f"- `{c['model_a']}` vs `{c['model_b']}`: {consistency}. **{c['unparseable']} of {c['units']} "
                     "units are unparseable** (a verdict could not be read, or the request failed, in at least one "
                     "order) and are left out.")

    lines += ["", "## Answer lengths", ""]
    lines += _length_table(summary.get("models") or list(lengths), lengths)
    lines += ["", LENGTH_NOTE]

    lines += ["", "## By category"]
    for c in comparisons:
        lines += ["", f"`{c['model_a']}` vs `{c['model_b']}`:", ""]
        rows = [[category, str(b["wins"]), str(b["losses"]), str(b["ties"]), _percent(b["adjusted_win_rate"]),
                 _number(b["net"], sign=True), _percent(b["position_consistency"]), str(b["unparseable"])]
                for category, b in c["by_category"].items()]
        lines += _table(["category", "W", "L", "T", "adjusted win rate", "net", "position consistency",
                         "unparseable"], rows)
    return lines


def _length_table(models: list[str], lengths: dict) -> list[str]:
    turns = sorted({turn for m in models for turn in lengths.get(m, {}).get("by_turn", {})})
    rows = []
    for model in models:
        length = lengths.get(model, {})
        rows.append([model, _number(length.get("mean_tokens"), 0), _number(length.get("median_tokens"), 0),
                     _number(length.get("mean_words"), 0)]
                    + [_number(length.get("by_turn", {}).get(turn, {}).get("mean_tokens"), 0) for turn in turns])
    return _table(["model", "mean tokens/turn", "median tokens/turn", "mean words/turn"]
                  + [f"turn {turn} mean tokens" for turn in turns], rows)


# --- charts -----------------------------------------------------------------------------------------------------


def plot_scores_by_category(scores: dict, path: Path) -> Path:
    """Grouped bars: one group per category (and overall), one bar per model, CI as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = scores["models"]
    categories = list(dict.fromkeys(c for m in models for c in models[m]["by_category"]))
    groups = ["overall"] + categories
    width = 0.8 / max(len(models), 1)
    figure, axis = plt.subplots(figsize=(max(7, 1.1 * len(groups) * max(len(models), 1) / 2 + 3), 4))
    for i, model in enumerate(models):
        blocks = [models[model]] + [models[model]["by_category"].get(c) for c in categories]
        # A category a model has no parsed score in gets no bar rather than a zero bar.
        shown = [(x, b) for x, b in enumerate(blocks) if b is not None and b["mean"] is not None]
        xs = [x + (i - (len(models) - 1) / 2) * width for x, _ in shown]
        heights = [b["mean"] for _, b in shown]
        errors = [[b["mean"] - b["ci"][0] for _, b in shown], [b["ci"][1] - b["mean"] for _, b in shown]]
        axis.bar(xs, heights, width=width, yerr=errors, capsize=3, label=model)
    axis.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axis.set_ylabel(f"mean judge score ({_level(scores)} CI)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_win_tie_loss(pairwise: dict, path: Path) -> Path:
    """Stacked horizontal bars per comparison: wins, ties, losses of model_a as fractions of decided units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = pairwise["comparisons"]
    labels = [f"{c['model_a']} vs {c['model_b']}" for c in comparisons]
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.6 * max(len(comparisons), 1)))
    left = [0.0] * len(comparisons)
    for key, label, color in (("wins", "first-named wins", "tab:green"), ("ties", "tie", "tab:gray"),
                              ("losses", "first-named loses", "tab:red")):
        widths = [c[key] / c["decided"] if c["decided"] else 0.0 for c in comparisons]
        bars = axis.barh(labels, widths, left=left, color=color, label=label)
        axis.bar_label(bars, labels=[str(c[key]) if c[key] else "" for c in comparisons], label_type="center")
        left = [x + w for x, w in zip(left, widths)]
    axis.set_xlim(0, 1)
    axis.invert_yaxis()  # first comparison on top, as in the report's table
    axis.set_xlabel("fraction of units judged in both orders (bar labels: unit counts)")
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# --- entry points -----------------------------------------------------------------------------------------------


def write_eval_report(eval_dir: Path, summary: dict) -> Path:
    """Write report.md and the mode's chart into eval_dir; return the report.md path."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# MT-Bench evaluation", "",
             f"- mode: {summary['mode']}", f"- judge: `{summary['judge']}`",
             f"- questions: {summary['questions']}",
             f"- models: {', '.join(f'`{m}`' for m in summary.get('models') or [])}", ""]
    if summary.get("answer_errors"):
        lines += [f"**{summary['answer_errors']} answer turn(s) could not be generated** (the conversation left no "
                  "room in max_model_len; see `errors` in answers.jsonl): their judgments count as unparseable.", ""]
    if summary["mode"] == "single":
        lines += _single_sections(summary)
        chart = plot_scores_by_category(summary["scores"], eval_dir / "scores_by_category.png")
    else:
        lines += _pairwise_sections(summary)
        chart = plot_win_tie_loss(summary["pairwise"], eval_dir / "win_tie_loss.png")
    lines += ["", f"![{chart.stem}]({chart.name})", ""]
    path = eval_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def format_table(summary: dict) -> str:
    """A short fixed-width table for the console: one line per model (single) or comparison (pairwise)."""
    lengths = summary.get("lengths") or {}
    if summary["mode"] == "single":
        models = summary["scores"]["models"]
        width = max([len("model")] + [len(m) for m in models])
        ci = _level(summary["scores"]) + " CI"
        lines = [f"{'model':<{width}}  {'mean':>6}  {ci:>16}  {'scored':>6}  {'unparsed':>8}  {'tokens':>6}"]
        for model, block in models.items():
            lines.append(f"{model:<{width}}  {_number(block['mean']):>6}  {_interval(block['ci']):>16}  "
                         f"{block['n_scored']:>6}  {block['n_unparseable']:>8}  "
                         f"{_number(lengths.get(model, {}).get('mean_tokens'), 0):>6}")
        return "\n".join(lines)
    comparisons = summary["pairwise"]["comparisons"]
    names = [f"{c['model_a']} vs {c['model_b']}" for c in comparisons]
    width = max([len("comparison")] + [len(n) for n in names])
    ci = "net " + _level(summary["pairwise"]) + " CI"
    header = (f"{'comparison':<{width}}  {'W':>4}  {'L':>4}  {'T':>4}  {'adj.win':>7}  {'net':>6}  "
              f"{ci:>16}  {'consist':>7}  {'unparsed':>8}")
    lines = [header]
    for name, c in zip(names, comparisons):
        lines.append(f"{name:<{width}}  {c['wins']:>4}  {c['losses']:>4}  {c['ties']:>4}  "
                     f"{_percent(c['adjusted_win_rate']):>7}  {_number(c['net'], sign=True):>6}  "
                     f"{_interval(c['net_ci'], sign=True):>16}  {_percent(c['position_consistency']):>7}  "
                     f"{c['unparseable']:>8}")
    return "\n".join(lines)
