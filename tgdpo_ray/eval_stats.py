"""Statistics for the MT-Bench-style evaluation: mean judge scores, pairwise win rates and answer lengths, with
bootstrap confidence intervals that resample questions.

Why resample questions: the two turns of a question (and, in pairwise mode, the two presentation orders) are not
independent draws - a hard question lowers both turns. Resampling single judgments would treat them as
independent and give intervals that are too narrow. So every bootstrap here draws whole questions with
replacement and recomputes the statistic from everything those questions hold.

The core, `bootstrap_ci`, works on per-question totals: one row per question holding sums (a score sum and a
count; or win, loss and tie counts), and a statistic that turns column totals into a number (a ratio of sums).
Every statistic here is such a ratio, so one core serves both modes.

Returned structures (plain JSON types only: float, int, str, list, dict, None; turn keys are the strings "1"
and "2" so the dicts read the same before and after a JSON round trip):

single_summary(judgments) ->
    {"models": {model: {**score_block,
                        "by_turn": {"1": score_block, "2": score_block},
                        "by_category": {category: score_block}}},
     "paired_differences": [{"model_a", "model_b", "mean_difference": float|None, "ci": [low, high]|None,
                             "n_questions": int}],
     "samples": int, "seed": int, "level": float}
    score_block = {"mean": float|None, "ci": [low, high]|None, "n_scored": int, "n_unparseable": int,
                   "n_questions": int}
    `mean` is the mean over all parsed judgments; `n_questions` counts questions with at least one parsed score;
    `mean_difference` is the mean over questions (where both models have a parsed score) of
    (mean score of model_a on the question - mean score of model_b on it).

pairwise_summary(judgments) ->
    {"comparisons": [{"model_a", "model_b", **pairwise_block, "by_category": {category: pairwise_block}}],
     "samples": int, "seed": int, "level": float}
    pairwise_block = {"units": int, "decided": int, "wins": int, "losses": int, "ties": int,
                      "inconsistent": int, "unparseable": int, "n_questions": int,
                      "position_consistency": float|None,
                      "win_rate": float|None, "win_rate_ci": [low, high]|None,
                      "adjusted_win_rate": float|None, "adjusted_win_rate_ci": [low, high]|None,
                      "net": float|None, "net_ci": [low, high]|None}
    A unit is one (question, turn) of a comparison, judged in both orders. wins/losses/ties are from model_a's
    view; decided = wins + losses + ties = units with both orders parsed; unparseable = units - decided.

length_summary(answers) ->
    {model: {**length_block, "by_turn": {"1": length_block, "2": length_block}}}
    length_block = {"turns": int, "mean_tokens": float|None, "median_tokens": float|None,
                    "mean_words": float|None}

Model, comparison and question order is the order of first appearance in the input records (question order
decides which question each bootstrap draw index points at).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# --- bootstrap core -------------------------------------------------------------------------------------------


def bootstrap_ci(groups: Sequence[Sequence[float]], statistic: Callable[[np.ndarray], np.ndarray],
                 samples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float | None, float | None, float | None]:
    """Point value and percentile bootstrap interval of a statistic of per-question totals.

    groups: one row per question, the question's totals (shape [n_questions, k]).
    statistic: maps totals summed over a set of questions, an array [..., k], to values [...].
    The draws are `np.random.default_rng(seed).integers(0, n_questions, size=(samples, n_questions))`: row s
    of that matrix picks the questions of bootstrap sample s, and everything a question holds moves with it.
    Returns (value, low, high) as floats, or (None, None, None) when there is no question.
    """
    totals = np.asarray(groups, dtype=float)
    if totals.size == 0:
        return None, None, None
    n_questions = totals.shape[0]
    value = statistic(totals.sum(axis=0))
    index = np.random.default_rng(seed).integers(0, n_questions, size=(samples, n_questions))
    resampled = statistic(totals[index].sum(axis=1))  # [samples, n_questions, k] -> [samples, k] -> [samples]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(value), float(low), float(high)


def ratio(totals: np.ndarray) -> np.ndarray:
    """Column 0 over column 1: a sum of values over a count of values, i.e. their mean."""
    return totals[..., 0] / totals[..., 1]


def _interval(low: float | None, high: float | None) -> list[float] | None:
    return None if low is None else [low, high]


# --- single mode ------------------------------------------------------------------------------------------------


def _score_block(records: list[dict], samples: int, seed: int, level: float) -> dict:
    """Mean score of some judgments with a question-resampled CI. Groups only hold questions with a parsed
    score, so no bootstrap sample has a zero count."""
    scored = [r for r in records if r["score"] is not None]
    per_question: dict[str, list[float]] = {}  # question id -> [score sum, count]
    for record in scored:
        row = per_question.setdefault(record["question_id"], [0.0, 0])
        row[0] += float(record["score"])
        row[1] += 1
    mean, low, high = bootstrap_ci(list(per_question.values()), ratio, samples, seed, level)
    return {"mean": mean, "ci": _interval(low, high), "n_scored": len(scored),
            "n_unparseable": len(records) - len(scored), "n_questions": len(per_question)}


def _question_means(records: list[dict]) -> dict[str, float]:
    """Mean parsed score per question (over its turns), for the questions that have one."""
    sums: dict[str, list[float]] = {}
    for record in records:
        if record["score"] is not None:
            row = sums.setdefault(record["question_id"], [0.0, 0])
            row[0] += float(record["score"])
            row[1] += 1
    return {question: total / count for question, (total, count) in sums.items()}


def single_summary(judgments: list[dict], samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Per model: mean score with CI, scored and unparseable counts, per turn and per category; and the paired
    score difference of every pair of models. See the module docstring for the structure."""
    judgments = [j for j in judgments if j.get("mode", "single") == "single"]
    by_model: dict[str, list[dict]] = {}
    for record in judgments:
        by_model.setdefault(record["model"], []).append(record)

    models = {}
    for model, records in by_model.items():
        block = _score_block(records, samples, seed, level)
        block["by_turn"] = {str(turn): _score_block([r for r in records if r["turn"] == turn], samples, seed, level)
                            for turn in sorted({r["turn"] for r in records})}
        categories = dict.fromkeys(r["category"] for r in records)  # first-appearance order
        block["by_category"] = {category: _score_block([r for r in records if r["category"] == category],
                                                       samples, seed, level)
                                for category in categories}
        models[model] = block

    differences = []
    names = list(by_model)
    for i, model_a in enumerate(names):
        for model_b in names[i + 1:]:
            means_a, means_b = _question_means(by_model[model_a]), _question_means(by_model[model_b])
            # Only questions both models were scored on: the difference is paired per question.
            rows = [[means_a[q] - means_b[q], 1] for q in means_a if q in means_b]
            value, low, high = bootstrap_ci(rows, ratio, samples, seed, level)
            differences.append({"model_a": model_a, "model_b": model_b, "mean_difference": value,
                                "ci": _interval(low, high), "n_questions": len(rows)})
    return {"models": models, "paired_differences": differences, "samples": samples, "seed": seed, "level": level}


# --- pairwise mode ----------------------------------------------------------------------------------------------

OUTCOMES = ("win", "loss", "tie")  # column order of the per-question [W, L, T] totals


def _decided(totals: np.ndarray) -> np.ndarray:
    return totals[..., 0] + totals[..., 1] + totals[..., 2]


RATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "win_rate": lambda t: t[..., 0] / _decided(t),
    "adjusted_win_rate": lambda t: (t[..., 0] + t[..., 2] / 2) / _decided(t),
    "net": lambda t: (t[..., 0] - t[..., 1]) / _decided(t),
}


def _outcome(record: dict | None) -> str | None:
    """One order's verdict from model_a's view; None when missing or unparseable."""
    if record is None or record["winner"] is None:
        return None
    if record["winner"] == "tie":
        return "tie"
    if record["winner"] == record["model_a"]:
        return "win"
    if record["winner"] == record["model_b"]:
        return "loss"
    return None  # a name that is neither model: treat like an unparseable verdict


def combine_orders(ab: dict | None, ba: dict | None) -> tuple[str | None, bool]:
    """Outcome of one unit from its two orders, and whether the two orders disagreed.

    Both parsed and equal -> that outcome; both parsed and different -> "tie" and inconsistent (the verdict
    followed the position, not the answers); either unparseable or missing -> None (left out)."""
    first, second = _outcome(ab), _outcome(ba)
    if first is None or second is None:
        return None, False
    if first == second:
        return first, False
    return "tie", True


def _pairwise_block(units: list[dict], samples: int, seed: int, level: float) -> dict:
    """Counts, position consistency and rates with question-resampled CIs. Groups only hold questions with a
    decided unit, so no bootstrap sample has W + L + T = 0."""
    decided = [u for u in units if u["outcome"] is not None]
    per_question: dict[str, list[int]] = {}  # question id -> [wins, losses, ties]
    for unit in decided:
        per_question.setdefault(unit["question_id"], [0, 0, 0])[OUTCOMES.index(unit["outcome"])] += 1
    inconsistent = sum(u["inconsistent"] for u in decided)
    block = {"units": len(units), "decided": len(decided),
             "wins": sum(u["outcome"] == "win" for u in decided),
             "losses": sum(u["outcome"] == "loss" for u in decided),
             "ties": sum(u["outcome"] == "tie" for u in decided),
             "inconsistent": inconsistent, "unparseable": len(units) - len(decided),
             "n_questions": len(per_question),
             "position_consistency": (len(decided) - inconsistent) / len(decided) if decided else None}
    groups = list(per_question.values())
    for name, statistic in RATES.items():
        value, low, high = bootstrap_ci(groups, statistic, samples, seed, level)
        block[name], block[f"{name}_ci"] = value, _interval(low, high)
    return block


def pairwise_summary(judgments: list[dict], samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Per (model_a, model_b) comparison: W/L/T from model_a's view after combining both orders, inconsistent
    and unparseable units, position consistency, win rate, adjusted win rate and net with CIs, and the same per
    category. A record repeated for the same unit and order replaces the earlier one. See the module docstring."""
    judgments = [j for j in judgments if j.get("mode", "pairwise") == "pairwise"]
    # (model_a, model_b) -> (question id, turn) -> {"category": ..., "ab": record, "ba": record}
    comparisons: dict[tuple[str, str], dict[tuple[str, int], dict]] = {}
    for record in judgments:
        pair = (record["model_a"], record["model_b"])
        unit = comparisons.setdefault(pair, {}).setdefault((record["question_id"], record["turn"]),
                                                           {"category": record["category"]})
        unit[record["order"]] = record

    results = []
    for (model_a, model_b), by_unit in comparisons.items():
        units = []
        for (question, _turn), orders in by_unit.items():
            outcome, inconsistent = combine_orders(orders.get("ab"), orders.get("ba"))
            units.append({"question_id": question, "category": orders["category"], "outcome": outcome,
                          "inconsistent": inconsistent})
        block = {"model_a": model_a, "model_b": model_b, **_pairwise_block(units, samples, seed, level)}
        categories = dict.fromkeys(u["category"] for u in units)
        block["by_category"] = {category: _pairwise_block([u for u in units if u["category"] == category],
                                                          samples, seed, level)
                                for category in categories}
        results.append(block)
    return {"comparisons": results, "samples": samples, "seed": seed, "level": level}


# --- answer lengths ---------------------------------------------------------------------------------------------


def _length_block(turns: list[tuple[int | None, int]]) -> dict:
    """turns: (generated tokens or None when not recorded, words) per answer turn."""
    tokens = [t for t, _ in turns if t is not None]
    return {"turns": len(turns),
            "mean_tokens": float(np.mean(tokens)) if tokens else None,
            "median_tokens": float(np.median(tokens)) if tokens else None,
            "mean_words": float(np.mean([w for _, w in turns])) if turns else None}


def length_summary(answers: list[dict]) -> dict:
    """Per model: mean and median generated tokens and mean words per answer turn, overall and per turn.
    Judges tend to favour long answers, so the report shows these next to the scores."""
    per_model: dict[str, dict[int, list[tuple[int | None, int]]]] = {}  # model -> turn -> [(tokens, words)]
    for record in answers:
        tokens = record.get("tokens") or []
        for i, text in enumerate(record["turns"]):
            per_turn = per_model.setdefault(record["model"], {})
            per_turn.setdefault(i + 1, []).append((tokens[i] if i < len(tokens) else None, len(text.split())))
    summary = {}
    for model, per_turn in per_model.items():
        block = _length_block([t for turn in sorted(per_turn) for t in per_turn[turn]])
        block["by_turn"] = {str(turn): _length_block(per_turn[turn]) for turn in sorted(per_turn)}
        summary[model] = block
    return summary
