"""The MT-Bench-style evaluation's report: report.md, PNG charts and a short console table, from the summary the
evaluation job builds:

    summary = {"mode": "single" | "pairwise", "judge": str, "judge_prompts": str,
               "judge_parse": "tgdpo-ray" | "fastchat", "questions": int,
               "models": [names],
               "scores": eval_stats.single_summary(..., answers=answers) or None,
               "pairwise": eval_stats.pairwise_summary(..., answers=answers) or None,
               "lengths": eval_stats.length_summary(...)}

`judge_prompts` names the judge prompt set ("tgdpo-ray", "fastchat" or a file path); a summary without it (an
older report.json) reads "not recorded"; `judge_parse` is eval.judge.parse, the rules verdicts were read by (an
older report.json's were ours, tgdpo-ray). Summaries built without answers have no length-controlled numbers, and
the report says so.

Intervals say how they were made (their `ci_method`, see eval_stats): a t-interval (under 10 questions) is named
"t-interval (n < 10 questions)" in sentences and marked "(t)" in tables, with that note under the table; a rate
without an interval for want of questions reads "n/a (fewer than 10 questions)". A summary without `ci_method` (an
older report.json) reads as the bootstrap it then was.
"""

from __future__ import annotations

from pathlib import Path

from tgdpo_ray.common.intervals import interval_text
from tgdpo_ray.common.plotting import pyplot

LENGTH_NOTE = ("Note: LLM judges tend to favour longer answers, so read score differences next to the answer "
               "lengths.")
T_INTERVAL = "t-interval (n < 10 questions)"
T_NOTE = (f"(t): {T_INTERVAL}, Student's t over the per-question values: a bootstrap over so few questions "
          "would be too narrow. Other intervals resample questions.")
NO_INTERVAL = "n/a (fewer than 10 questions)"


# --- number formatting ------------------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(ci: list[float] | None, digits: int = 2, sign: bool = False, method: str | None = None) -> str:
    """An interval for a table: "(t)" marks a t-interval; "none" is a statistic left without one (too few
    questions); `method` None (a sentence names the method itself) prints the bare interval."""
    if ci is None:  # "t" without an interval: one question, no spread
        return {"none": NO_INTERVAL, "t": "n/a (one question)"}.get(method, "n/a")
    return interval_text(ci[0], ci[1], digits, sign) + (" (t)" if method == "t" else "")


def _percent_interval(ci: list[float] | None, method: str | None = None) -> str:
    if ci is None:
        return NO_INTERVAL if method == "none" else "n/a"
    return f"[{_percent(ci[0])}, {_percent(ci[1])}]"


def _ci_name(level: str, method: str | None) -> str:
    """What a sentence calls an interval: "95% CI", or "95% t-interval (n < 10 questions)"."""
    return f"{level} {T_INTERVAL}" if method == "t" else f"{level} CI"


def _t_note(blocks) -> list[str]:
    """The note under a table that marked a t-interval with "(t)"; nothing when none was."""
    marked = any(b.get("ci_method") == "t" and b.get("ci") is not None for b in blocks)
    return ["", T_NOTE] if marked else []


def _with_interval(value: str, interval: str) -> str:
    return "n/a" if value == "n/a" else f"{value} {interval}"


def _level(stats: dict) -> str:
    return f"{round(100 * stats.get('level', 0.95))}%"


def _prompts(summary: dict) -> str:
    return summary.get("judge_prompts") or "not recorded"


def _judged_by(summary: dict) -> str:
    return f"Judge `{summary['judge']}`, judge prompts `{_prompts(summary)}`."


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


# --- single mode ------------------------------------------------------------------------------------------------


def _difference_sentence(difference: dict, level: str) -> str:
    """One paired difference, said with the better model first."""
    a, b = difference["model_a"], difference["model_b"]
    value, ci, n = difference["mean_difference"], difference["ci"], difference["n_questions"]
    name = _ci_name(level, difference.get("ci_method"))
    if value is None:
        return f"- `{a}` vs `{b}`: no question where both were scored."
    if value < 0:  # state it from the better model's side
        a, b, value = b, a, -value
        ci = None if ci is None else [-ci[1], -ci[0]]
    if value == 0:
        return f"- `{a}` and `{b}` score the same on average ({name} {_interval(ci)}, {n} questions)."
    if ci is None:  # one question: no spread, no interval
        verdict = "with no interval at this number of questions, the difference is not clear"
    elif ci[0] > 0:
        verdict = f"the interval excludes 0, so **{a}** is better"
    else:
        verdict = "the interval includes 0, so the difference is not clear at this number of questions"
    return (f"- **{a}** scores {value:.2f} points higher than `{b}` ({name} {_interval(ci)}, "
            f"paired over {n} questions both were scored on); {verdict}.")


def _single_sections(summary: dict) -> list[str]:
    scores, lengths = summary["scores"], summary.get("lengths") or {}
    models, level = scores["models"], _level(scores)
    ranked = sorted((m for m in models if models[m]["mean"] is not None), key=lambda m: -models[m]["mean"])
    lines = ["## Verdict", "", _judged_by(summary), ""]
    if ranked:
        best = models[ranked[0]]
        lines.append(f"Highest mean score: **{ranked[0]}** ({_number(best['mean'])}, "
                     f"{_ci_name(level, best.get('ci_method'))} {_interval(best['ci'])}).")
    else:
        lines.append("No model has a parsed score.")
    if scores["paired_differences"]:
        lines += ["", "Paired differences (per question, then averaged; CIs resample questions, or are t-intervals "
                  "of the per-question differences under 10 questions):", ""]
        lines += [_difference_sentence(d, level) for d in scores["paired_differences"]]

    lines += ["", "## Scores", ""]
    correlated = any(models[m].get("length_correlation") for m in models)
    rows = []
    for model in models:
        block, length = models[model], lengths.get(model, {})
        rows.append([model, _number(block["mean"]), _interval(block["ci"], method=block.get("ci_method")),
                     str(block["n_scored"]), str(block["n_unparseable"]), _number(length.get("mean_tokens"), 0),
                     _number(length.get("mean_words"), 0)]
                    + ([_correlation_cell(block.get("length_correlation"))] if correlated else []))
    lines += _table(["model", "mean score", f"{level} CI", "scored", "unparseable", "mean tokens/turn",
                     "mean words/turn"] + ([f"score-length r ({level} CI)"] if correlated else []), rows)
    lines += _t_note(models.values())
    lines += ["", LENGTH_NOTE]
    if correlated:
        lines.append("Score-length r: Pearson's correlation between a model's scores and the generated tokens of "
                     "the answer turns they grade; a clearly positive r means longer answers scored higher.")
    lines.append("")

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
    lines += _t_note(b for m in models for b in models[m]["by_turn"].values())

    categories = list(dict.fromkeys(c for m in models for c in models[m]["by_category"]))
    lines += ["", "## By category", "", f"Mean score and {level} CI (resampling that category's questions; where it "
              f"has fewer than 10, a {T_INTERVAL} of its per-question means).", ""]
    rows = [[category] + [_cell(models[m]["by_category"].get(category)) for m in models] for category in categories]
    lines += _table(["category"] + list(models), rows)
    lines += _t_note(b for m in models for b in models[m]["by_category"].values())
    return lines


def _correlation_cell(correlation: dict | None) -> str:
    if not correlation or correlation["r"] is None:
        return "n/a"
    interval = _interval(correlation["ci"], sign=True, method=correlation.get("ci_method"))
    return f"{_number(correlation['r'], sign=True)} {interval}, n={correlation['n']}"


def _cell(block: dict | None) -> str:
    if block is None or block["mean"] is None:
        return "n/a"
    unparseable = f", {block['n_unparseable']} unparseable" if block["n_unparseable"] else ""
    return f"{_number(block['mean'])} {_interval(block['ci'], method=block.get('ci_method'))}{unparseable}"


# --- pairwise mode ----------------------------------------------------------------------------------------------


def _comparison_sentence(c: dict, level: str) -> str:
    a, b = c["model_a"], c["model_b"]
    if not c["decided"]:
        return f"- `{a}` vs `{b}`: no unit was judged in both orders; nothing to compare."
    counts = (f"`{a}` wins {c['wins']}, loses {c['losses']}, ties {c['ties']} of {c['decided']} decided units "
              f"over {c['n_questions']} questions")
    method = c.get("ci_method")
    rates = (f"adjusted win rate {_percent(c['adjusted_win_rate'])} ({level} CI "
             f"{_percent_interval(c['adjusted_win_rate_ci'], method)}), net {_number(c['net'], sign=True)} "
             f"({level} CI {_interval(c['net_ci'], sign=True, method=method)})")
    ahead = a if c["net"] > 0 else b
    if c["net"] == 0:
        verdict = "the two are level"
    elif c["net_ci"] is None:  # fewer than 10 questions: no interval to read a difference from
        verdict = f"`{ahead}` is ahead, but with no interval at this number of questions the difference is not clear"
    elif c["net_ci"][0] > 0 or c["net_ci"][1] < 0:
        verdict = f"the net interval excludes 0, so **{ahead}** is better"
    else:
        verdict = (f"`{ahead}` is ahead, but the net interval includes 0, so the difference is not clear at this "
                   "number of questions")
    return f"- `{a}` vs `{b}`: {counts}: {rates}; {verdict}."


def _pairwise_sections(summary: dict) -> list[str]:
    pairwise, lengths = summary["pairwise"], summary.get("lengths") or {}
    comparisons, level = pairwise["comparisons"], _level(pairwise)
    explanation = ("Each unit is one (question, turn), judged in both answer orders; an order-dependent verdict "
                   "counts as a tie. Net = (wins - losses) / decided units; CIs resample questions. With fewer "
                   "than 10 questions the rates get no CI: a bootstrap over so few is too narrow, and these rates "
                   "are no per-question means for a t-interval.")
    lines = ["## Verdict", "", _judged_by(summary), "", explanation, ""]
    for c in comparisons:
        lines.append(_comparison_sentence(c, level))
        if c.get("length_controlled") is not None:
            lines.append("  - " + _length_controlled_sentence(c, pairwise, level))
    lines += [] if comparisons else ["No comparison was judged."]

    lines += ["", "## Comparisons", ""]
    rows = [[f"{c['model_a']} vs {c['model_b']}", str(c["wins"]), str(c["losses"]), str(c["ties"]),
             *_rate_cells(c),
             _percent(c["position_consistency"]), f"{c['unparseable']} of {c['units']}"] for c in comparisons]
    lines += _table(["comparison", "W", "L", "T", f"win rate ({level} CI)", "adjusted win rate", "net",
                     "position consistency", "unparseable units"], rows)

    lines += ["", "## Position bias and unparseable verdicts", "",
              "Every unit is judged with each answer shown first once. A verdict that flips with the order is "
              "position bias: the position-bias rate is the share of units decided in both orders whose two "
              "verdicts differ (1 - position consistency); those units count as ties. A flip either has the "
              "answer shown first win both times, the answer shown second win both times, or a tie in one "
              "order.", ""]
    for c in comparisons:
        lines.append(f"- `{c['model_a']}` vs `{c['model_b']}`: {_position_sentence(c)}. **{c['unparseable']} of "
                     f"{c['units']} units are unparseable** (a verdict could not be read, or the request failed, in "
                     "at least one order) and are left out.")
    overall = pairwise.get("position_bias")
    if overall and len(comparisons) > 1:
        lines.append(f"- the judge over all comparisons: {_position_sentence(overall)}; {overall['unparseable']} "
                     f"of {overall['units']} units unparseable.")

    lines += ["", "## Length-controlled win rate", ""]
    if all(c.get("length_controlled") is None for c in comparisons):
        lines.append("Not computed: the summary holds no answer lengths.")
    else:
        tolerance = pairwise.get("length_tolerance", 0.2)
        lines += [f"Judges favour longer answers, so the rates are also given over the units whose two answers' "
                  f"lengths differ by less than {_percent(tolerance)}: |tokens_a - tokens_b| / max(tokens_a, "
                  f"tokens_b) < {tolerance:g}, with tokens the generated tokens of that turn's answers. CIs resample "
                  "those units' questions. Every unit's two verdicts next to both answers' token counts are in "
                  "report.json (`pairwise.verdicts`).", ""]
        rows = []
        for c in comparisons:
            lc = c.get("length_controlled")
            if lc is None:
                continue
            rows.append([f"{c['model_a']} vs {c['model_b']}", f"{lc['units']} of {lc['units_with_lengths']}",
                         str(lc["decided"]), str(lc["wins"]), str(lc["losses"]), str(lc["ties"]),
                         *_rate_cells(lc), _percent(c["adjusted_win_rate"])])
        lines += _table(["comparison", "similar-length units (of units with lengths)", "decided", "W", "L", "T",
                         f"win rate ({level} CI)", "adjusted win rate", "net", "adjusted win rate, all units"],
                        rows)

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


def _rate_cells(block: dict) -> list[str]:
    """Win rate, adjusted win rate and net of a pairwise block, each with its interval."""
    method = block.get("ci_method")
    return [_with_interval(_percent(block["win_rate"]), _percent_interval(block["win_rate_ci"], method)),
            _with_interval(_percent(block["adjusted_win_rate"]),
                           _percent_interval(block["adjusted_win_rate_ci"], method)),
            _with_interval(_number(block["net"], sign=True), _interval(block["net_ci"], sign=True, method=method))]


def _position_sentence(block: dict) -> str:
    """Consistency and the position-bias split of a position block (a comparison's, or the judge's overall)."""
    if not block["decided"]:
        return "no unit had both orders parsed"
    agreeing, flipped = block["decided"] - block["inconsistent"], block["inconsistent"]
    text = (f"the judge gave the same verdict in both orders for {agreeing} of {block['decided']} units "
            f"({_percent(block['position_consistency'])}); position-bias rate "
            f"{_percent(flipped / block['decided'])}: {flipped} unit(s) flipped with the order (counted as ties)")
    if flipped:
        text += (f" (answer shown first won both times: {block['first_shown_won_both']} "
                 f"({_percent(block['first_shown_share'])}); shown second won both times: "
                 f"{block['second_shown_won_both']} ({_percent(block['second_shown_share'])}); a tie in one "
                 f"order: {block['tie_in_one_order']})")
    return text


def _length_controlled_sentence(c: dict, pairwise: dict, level: str) -> str:
    lc, tolerance = c["length_controlled"], pairwise.get("length_tolerance", 0.2)
    where = (f"on the {lc['units']} of {lc['units_with_lengths']} units whose answers' lengths differ by less than "
             f"{_percent(tolerance)}")
    if not lc["decided"]:
        return f"Length-controlled: no decided unit {where}."
    method = lc.get("ci_method")
    return (f"Length-controlled, {where} ({lc['decided']} decided): `{c['model_a']}` W {lc['wins']} L "
            f"{lc['losses']} T {lc['ties']}, adjusted win rate {_percent(lc['adjusted_win_rate'])} ({level} CI "
            f"{_percent_interval(lc['adjusted_win_rate_ci'], method)}), net {_number(lc['net'], sign=True)} "
            f"({level} CI {_interval(lc['net_ci'], sign=True, method=method)}).")


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
    plt = pyplot()

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
        # A one-question block has no interval: no error bar. A t-interval is centred on the per-question means'
        # mean, which can differ a little from the mean over judgments: matplotlib refuses negative bars.
        errors = [[max(0.0, b["mean"] - b["ci"][0]) if b["ci"] else 0.0 for _, b in shown],
                  [max(0.0, b["ci"][1] - b["mean"]) if b["ci"] else 0.0 for _, b in shown]]
        axis.bar(xs, heights, width=width, yerr=errors, capsize=3, label=model)
    axis.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    blocks = [b for m in models for b in (models[m], *models[m]["by_category"].values())]
    t_used = bool(_t_note(blocks))
    axis.set_ylabel(f"mean judge score ({_level(scores)} CI" + ("; t-interval where n < 10 questions)" if t_used
                                                               else ")"))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_win_tie_loss(pairwise: dict, path: Path) -> Path:
    """Stacked horizontal bars per comparison: wins, ties, losses of model_a as fractions of decided units."""
    plt = pyplot()

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
             f"- judge prompts: `{_prompts(summary)}`",
             f"- verdicts parsed by: `{summary.get('judge_parse') or 'tgdpo-ray'}` rules",
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
    """A short fixed-width table for the console: a line naming the judge and its prompt set, then one line per
    model (single) or comparison (pairwise)."""
    caption = f"judge {summary['judge']}, judge prompts {_prompts(summary)}"
    return caption + "\n" + _format_rows(summary)


def _format_rows(summary: dict) -> str:
    lengths = summary.get("lengths") or {}
    if summary["mode"] == "single":
        models = summary["scores"]["models"]
        width = max([len("model")] + [len(m) for m in models])
        ci = _level(summary["scores"]) + " CI"
        lines = [f"{'model':<{width}}  {'mean':>6}  {ci:>16}  {'scored':>6}  {'unparsed':>8}  {'tokens':>6}"]
        for model, block in models.items():
            lines.append(f"{model:<{width}}  {_number(block['mean']):>6}  "
                         f"{_interval(block['ci'], method=block.get('ci_method')):>16}  "
                         f"{block['n_scored']:>6}  {block['n_unparseable']:>8}  "
                         f"{_number(lengths.get(model, {}).get('mean_tokens'), 0):>6}")
        if _t_note(models.values()):
            lines.append(f"(t): {T_INTERVAL}")
        return "\n".join(lines)
    comparisons = summary["pairwise"]["comparisons"]
    names = [f"{c['model_a']} vs {c['model_b']}" for c in comparisons]
    width = max([len("comparison")] + [len(n) for n in names])
    ci = "net " + _level(summary["pairwise"]) + " CI"
    intervals = [_interval(c["net_ci"], sign=True, method=c.get("ci_method")) for c in comparisons]
    ci_width = max([16] + [len(text) for text in intervals])  # "n/a (fewer than 10 questions)" is wider
    header = (f"{'comparison':<{width}}  {'W':>4}  {'L':>4}  {'T':>4}  {'adj.win':>7}  {'net':>6}  "
              f"{ci:>{ci_width}}  {'consist':>7}  {'unparsed':>8}  {'adj.win<20%':>11}")
    lines = [header]
    for name, c, interval in zip(names, comparisons, intervals):
        controlled = (c.get("length_controlled") or {}).get("adjusted_win_rate")  # similar-length units only
        lines.append(f"{name:<{width}}  {c['wins']:>4}  {c['losses']:>4}  {c['ties']:>4}  "
                     f"{_percent(c['adjusted_win_rate']):>7}  {_number(c['net'], sign=True):>6}  "
                     f"{interval:>{ci_width}}  {_percent(c['position_consistency']):>7}  "
                     f"{c['unparseable']:>8}  {_percent(controlled):>11}")
    return "\n".join(lines)
