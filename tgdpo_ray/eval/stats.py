"""Statistics for the MT-Bench-style evaluation: mean judge scores, pairwise win rates and answer lengths, with
confidence intervals over questions.

Why resample questions: the two turns of a question (and, in pairwise mode, the two presentation orders) are not
independent draws - a hard question lowers both turns. Resampling single judgments would treat them as
independent and give intervals that are too narrow. So every bootstrap here draws whole questions with
replacement and recomputes the statistic from everything those questions hold.

The core, `bootstrap_ci`, works on per-question totals: one row per question holding sums (a score sum and a
count; or win, loss and tie counts), and a statistic that turns column totals into a number (a ratio of sums).
Every statistic here is such a ratio, so one core serves both modes.

Fewer than 10 questions (BOOTSTRAP_MIN_QUESTIONS; e.g. jobs/smollm2-mtbench.yaml's `limit: 4`, and most categories
of a small run): a percentile bootstrap over so few groups under-covers badly (tgdpo_ray/common/intervals.py). There,
a mean score's interval is the Student-t interval (`t_interval`) of the per-question mean scores, and a paired
difference's the t-interval of the per-question differences. The other statistics (win rates with ties, Pearson's r)
are not means of per-question values, so a t-interval does not apply: below 10 questions they get no interval
(None). Every interval says how it was made in its `ci_method`: "bootstrap" (10 or more questions), "t" (a mean,
fewer than 10; ci is None with one question, which has no spread) or "none" (not a mean, fewer than 10).

Returned structures (plain JSON types only: float, int, str, list, dict, None; turn keys are the strings "1"
and "2" so the dicts read the same before and after a JSON round trip):

single_summary(judgments, samples, seed, level, answers=None) ->
    {"models": {model: {**score_block,
                        "by_turn": {"1": score_block, "2": score_block},
                        "by_category": {category: score_block},
                        "length_correlation": {"r": float|None, "ci": [low, high]|None, "n": int,
                                               "ci_method": "bootstrap"|"none"} | None}},
     "paired_differences": [{"model_a", "model_b", "mean_difference": float|None, "ci": [low, high]|None,
                             "ci_method": "bootstrap"|"t", "n_questions": int}],
     "samples": int, "seed": int, "level": float}
    score_block = {"mean": float|None, "ci": [low, high]|None, "ci_method": "bootstrap"|"t", "n_scored": int,
                   "n_unparseable": int, "n_questions": int}
    `mean` is the mean over all parsed judgments; `n_questions` counts questions with at least one parsed score.
    Below 10 questions `ci` is the t-interval of the per-question mean scores: centred on their mean, which is
    `mean` when every question has as many parsed scores.
    `mean_difference` is the mean over questions (where both models have a parsed score) of
    (mean score of model_a on the question - mean score of model_b on it).
    `length_correlation` (None without answers): Pearson's r between a parsed score and the generated tokens of
    the answer turn it grades, over the model's judgments that have both; n counts them. Its CI resamples
    questions too; it is None when some draw has no spread in scores or lengths (r undefined), or with fewer
    than 10 questions.

pairwise_summary(judgments, samples, seed, level, answers=None, length_tolerance=0.2) ->
    {"comparisons": [{"model_a", "model_b", **pairwise_block, "by_category": {category: pairwise_block},
                      "length_controlled": {**pairwise_block, "units_with_lengths": int} | None}],
     "position_bias": position_block,     # the judge over every comparison together
     "verdicts": [verdict_row],           # every unit, both orders' verdicts next to both answers' lengths
     "length_tolerance": float, "samples": int, "seed": int, "level": float}
    position_block = {"units": int, "decided": int, "unparseable": int, "inconsistent": int,
                      "position_consistency": float|None, "first_shown_won_both": int,
                      "second_shown_won_both": int, "tie_in_one_order": int,
                      "first_shown_share": float|None, "second_shown_share": float|None}
    pairwise_block = {**position_block, "wins": int, "losses": int, "ties": int, "n_questions": int,
                      "win_rate": float|None, "win_rate_ci": [low, high]|None,
                      "adjusted_win_rate": float|None, "adjusted_win_rate_ci": [low, high]|None,
                      "net": float|None, "net_ci": [low, high]|None,
                      "ci_method": "bootstrap"|"none"}      # the three CIs': "none" (all None) below 10 questions
    verdict_row = {"model_a", "model_b", "question_id", "category", "turn",
                   "winner_ab": str|None, "winner_ba": str|None,      # a model name, "tie", or None (unparseable)
                   "outcome": "win"|"loss"|"tie"|None,               # model_a's view, both orders combined
                   "flip": None|"first"|"second"|"tie",             # see combine_orders
                   "tokens_a": int|None, "tokens_b": int|None,       # generated tokens of that turn's answers
                   "length_difference": float|None, "similar_length": bool}
    A unit is one (question, turn) of a comparison, judged in both orders. wins/losses/ties are from model_a's
    view; decided = wins + losses + ties = units with both orders parsed; unparseable = units - decided (a
    unit with an unparseable, failed or missing verdict in either order is left out of everything else and
    counted here).
    Position bias: of the decided units, `inconsistent` ones got a different verdict in the two orders (they
    count as ties); position_consistency = (decided - inconsistent) / decided, so the position-bias rate is
    inconsistent / decided = 1 - position_consistency. The inconsistent units split into first_shown_won_both
    (the answer shown first won in both orders), second_shown_won_both, and tie_in_one_order; the shares are of
    `inconsistent`.
    Length control: length_difference = |tokens_a - tokens_b| / max(tokens_a, tokens_b) (0 when both are 0;
    None when either answer's length is unknown or the answer failed); a unit has similar_length when
    length_difference < length_tolerance (0.2: the two answers' lengths differ by less than 20% of the longer).
    `length_controlled` is pairwise_block over the similar-length units only (its `units` counts them, its
    `units_with_lengths` the units whose two lengths are known); None when no answers are given.

length_summary(answers) ->
    {model: {**length_block, "by_turn": {"1": length_block, "2": length_block}}}
    length_block = {"turns": int, "mean_tokens": float|None, "median_tokens": float|None,
                    "mean_words": float|None}

Model, comparison and question order is the order of first appearance in the input records (question order
decides which question each bootstrap draw index points at).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tgdpo_ray.common.intervals import bootstrap_ci, ratio, t_interval

# Below this many questions a percentile bootstrap over them under-covers badly: means get a t-interval instead,
# and the other statistics no interval.
BOOTSTRAP_MIN_QUESTIONS = 10


def _interval(low: float | None, high: float | None) -> list[float] | None:
    return None if low is None else [low, high]


def mean_with_interval(per_question: list[list[float]], samples: int, seed: int, level: float
                       ) -> tuple[float | None, list[float] | None, str]:
    """A mean from per-question [value sum, value count] rows (all sums over all counts) with its interval over
    questions, and how it was made: the question bootstrap ("bootstrap") from 10 questions on, below that the
    t-interval of the per-question means ("t")."""
    if len(per_question) >= BOOTSTRAP_MIN_QUESTIONS:
        value, low, high = bootstrap_ci(per_question, ratio, samples, seed, level)
        return value, _interval(low, high), "bootstrap"
    if not per_question:
        return None, None, "t"
    totals = np.asarray(per_question, dtype=float).sum(axis=0)
    _, low, high = t_interval([total / count for total, count in per_question], level)
    return float(totals[0] / totals[1]), _interval(low, high), "t"


def statistic_with_interval(groups: list[list[float]], statistic: Callable[[np.ndarray], np.ndarray],
                            samples: int, seed: int, level: float) -> tuple[float | None, list[float] | None, str]:
    """A statistic that is not a mean of per-question values (a win rate over units, Pearson's r) with its
    question-bootstrap interval from 10 questions on ("bootstrap"). Below that no interval ("none"): the percentile
    bootstrap under-covers there, and a t-interval does not apply."""
    if len(groups) >= BOOTSTRAP_MIN_QUESTIONS:
        value, low, high = bootstrap_ci(groups, statistic, samples, seed, level)
        return value, _interval(low, high), "bootstrap"
    if not groups:
        return None, None, "none"
    return float(statistic(np.asarray(groups, dtype=float).sum(axis=0))), None, "none"


# --- single mode ------------------------------------------------------------------------------------------------


def _score_block(records: list[dict], samples: int, seed: int, level: float) -> dict:
    """Mean score of some judgments with its CI over questions (see mean_with_interval). Groups only hold
    questions with a parsed score, so no bootstrap sample has a zero count."""
    scored = [r for r in records if r["score"] is not None]
    per_question: dict[str, list[float]] = {}  # question id -> [score sum, count]
    for record in scored:
        row = per_question.setdefault(record["question_id"], [0.0, 0])
        row[0] += float(record["score"])
        row[1] += 1
    mean, interval, method = mean_with_interval(list(per_question.values()), samples, seed, level)
    return {"mean": mean, "ci": interval, "ci_method": method, "n_scored": len(scored),
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


def pearson(totals: np.ndarray) -> np.ndarray:
    """Pearson's r from the sums [n, sum x, sum y, sum x^2, sum y^2, sum xy]; NaN where x or y has no spread."""
    n, sx, sy, sxx, syy, sxy = (totals[..., i] for i in range(6))
    spread_x, spread_y = n * sxx - sx * sx, n * syy - sy * sy  # n^2 times the variances
    # Rounding can leave a tiny non-zero spread where there is none: that is no spread too.
    flat = (spread_x <= 1e-12 * n * sxx) | (spread_y <= 1e-12 * n * syy)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flat, np.nan, (n * sxy - sx * sy) / np.sqrt(np.abs(spread_x * spread_y)))


def _length_correlation(records: list[dict], tokens: dict, samples: int, seed: int, level: float) -> dict:
    """Score against the tokens of the graded answer turn, over judgments with both; CI resamples questions (none
    below 10 questions: r is no mean, so no t-interval)."""
    per_question: dict[str, list[float]] = {}  # question id -> [n, sum x, sum y, sum x^2, sum y^2, sum xy]
    for record in records:
        length = tokens.get((record["model"], record["question_id"], record["turn"]))
        if record["score"] is None or length is None:
            continue
        x, y = float(length), float(record["score"])
        row = per_question.setdefault(record["question_id"], [0.0] * 6)
        for i, value in enumerate((1.0, x, y, x * x, y * y, x * y)):
            row[i] += value
    n = int(sum(row[0] for row in per_question.values()))
    value, interval, method = statistic_with_interval(list(per_question.values()), pearson, samples, seed, level)
    if value is None or not np.isfinite(value):
        return {"r": None, "ci": None, "n": n, "ci_method": method}
    if interval is not None and not np.all(np.isfinite(interval)):
        interval = None
    return {"r": value, "ci": interval, "n": n, "ci_method": method}


def single_summary(judgments: list[dict], samples: int = 1000, seed: int = 0, level: float = 0.95,
                   answers: list[dict] | None = None) -> dict:
    """Per model: mean score with CI, scored and unparseable counts, per turn and per category; and the paired
    score difference of every pair of models. With `answers` (answers.jsonl's records), also the correlation
    of each model's scores with its answers' lengths. See the module docstring for the structure."""
    judgments = [j for j in judgments if j.get("mode", "single") == "single"]
    tokens = answer_tokens(answers) if answers is not None else None
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
        block["length_correlation"] = (None if tokens is None
                                       else _length_correlation(records, tokens, samples, seed, level))
        models[model] = block

    differences = []
    names = list(by_model)
    for i, model_a in enumerate(names):
        for model_b in names[i + 1:]:
            means_a, means_b = _question_means(by_model[model_a]), _question_means(by_model[model_b])
            # Only questions both models were scored on: the difference is paired per question.
            # Each row's mean is that question's difference: below 10 questions, their t-interval.
            rows = [[means_a[q] - means_b[q], 1] for q in means_a if q in means_b]
            value, interval, method = mean_with_interval(rows, samples, seed, level)
            differences.append({"model_a": model_a, "model_b": model_b, "mean_difference": value,
                                "ci": interval, "ci_method": method, "n_questions": len(rows)})
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


def combine_orders(ab: dict | None, ba: dict | None) -> tuple[str | None, str | None]:
    """Outcome of one unit from its two orders, and how the verdict flipped with the order (None: it did not).

    Both parsed and equal -> (that outcome, None). Both parsed and different -> ("tie", flip): the verdict
    followed the position, not the answers, and the unit counts as a tie; flip is "first" when the answer shown
    first won in both orders (model_a in "ab", model_b in "ba"), "second" when the answer shown second won in
    both, "tie" when one order was a tie. Either unparseable or missing -> (None, None): left out."""
    first, second = _outcome(ab), _outcome(ba)
    if first is None or second is None:
        return None, None
    if first == second:
        return first, None
    flip = {("win", "loss"): "first", ("loss", "win"): "second"}.get((first, second), "tie")
    return "tie", flip


FLIPS = {"first": "first_shown_won_both", "second": "second_shown_won_both", "tie": "tie_in_one_order"}


def _position_block(units: list[dict]) -> dict:
    """Decided, unparseable and order-flipped units, and how they flipped. The one home of position bias."""
    decided = [u for u in units if u["outcome"] is not None]
    flipped = [u["flip"] for u in decided if u["flip"] is not None]
    block = {"units": len(units), "decided": len(decided), "unparseable": len(units) - len(decided),
             "inconsistent": len(flipped),
             "position_consistency": (len(decided) - len(flipped)) / len(decided) if decided else None}
    block.update({name: flipped.count(flip) for flip, name in FLIPS.items()})
    block["first_shown_share"] = flipped.count("first") / len(flipped) if flipped else None
    block["second_shown_share"] = flipped.count("second") / len(flipped) if flipped else None
    return block


def _pairwise_block(units: list[dict], samples: int, seed: int, level: float) -> dict:
    """Counts, position bias and rates with question-resampled CIs (none below 10 questions, see
    statistic_with_interval). Groups only hold questions with a decided unit, so no bootstrap sample has
    W + L + T = 0."""
    decided = [u for u in units if u["outcome"] is not None]
    per_question: dict[str, list[int]] = {}  # question id -> [wins, losses, ties]
    for unit in decided:
        per_question.setdefault(unit["question_id"], [0, 0, 0])[OUTCOMES.index(unit["outcome"])] += 1
    block = {**_position_block(units),
             "wins": sum(u["outcome"] == "win" for u in decided),
             "losses": sum(u["outcome"] == "loss" for u in decided),
             "ties": sum(u["outcome"] == "tie" for u in decided),
             "n_questions": len(per_question)}
    groups = list(per_question.values())
    for name, statistic in RATES.items():
        block[name], block[f"{name}_ci"], block["ci_method"] = statistic_with_interval(groups, statistic, samples,
                                                                                       seed, level)
    return block


def length_difference(tokens_a: int | None, tokens_b: int | None) -> float | None:
    """|a - b| / max(a, b): how much shorter the shorter answer is, as a share of the longer (0 when both are
    empty); None when either length is unknown."""
    if tokens_a is None or tokens_b is None:
        return None
    longest = max(tokens_a, tokens_b)
    return abs(tokens_a - tokens_b) / longest if longest else 0.0


def pairwise_units(judgments: list[dict], answers: list[dict] | None = None,
                   length_tolerance: float = 0.2) -> list[dict]:
    """One verdict row per unit (comparison, question, turn): both orders' winners, the combined outcome, the
    flip, and the token lengths of both models' answers for that turn (None without answers). Pairwise records
    only; a record repeated for the same unit and order replaces the earlier one. See the module docstring."""
    tokens = answer_tokens(answers) if answers is not None else {}
    units: dict[tuple, dict] = {}  # (model_a, model_b, question id, turn) -> {"category", "ab", "ba"}
    for record in judgments:
        if record.get("mode", "pairwise") != "pairwise":
            continue
        key = (record["model_a"], record["model_b"], record["question_id"], record["turn"])
        units.setdefault(key, {"category": record["category"]})[record["order"]] = record
    rows = []
    for (model_a, model_b, question, turn), orders in units.items():
        ab, ba = orders.get("ab"), orders.get("ba")
        outcome, flip = combine_orders(ab, ba)
        tokens_a, tokens_b = tokens.get((model_a, question, turn)), tokens.get((model_b, question, turn))
        difference = length_difference(tokens_a, tokens_b)
        rows.append({"model_a": model_a, "model_b": model_b, "question_id": question,
                     "category": orders["category"], "turn": turn,
                     "winner_ab": None if ab is None else ab["winner"],
                     "winner_ba": None if ba is None else ba["winner"],
                     "outcome": outcome, "flip": flip, "tokens_a": tokens_a, "tokens_b": tokens_b,
                     "length_difference": difference,
                     "similar_length": difference is not None and difference < length_tolerance})
    return rows


def pairwise_summary(judgments: list[dict], samples: int = 1000, seed: int = 0, level: float = 0.95,
                     answers: list[dict] | None = None, length_tolerance: float = 0.2) -> dict:
    """Per (model_a, model_b) comparison: W/L/T from model_a's view after combining both orders, unparseable
    units, position bias (consistency and how verdicts flipped), win rate, adjusted win rate and net with CIs,
    and the same per category; with `answers` (answers.jsonl's records), the same rates over the units whose
    two answers' lengths differ by less than `length_tolerance`. Also the judge's position bias over every
    comparison, and every unit's verdicts next to its answers' lengths. See the module docstring."""
    rows = pairwise_units(judgments, answers, length_tolerance)
    comparisons: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        comparisons.setdefault((row["model_a"], row["model_b"]), []).append(row)

    results = []
    for (model_a, model_b), units in comparisons.items():
        block = {"model_a": model_a, "model_b": model_b, **_pairwise_block(units, samples, seed, level)}
        categories = dict.fromkeys(u["category"] for u in units)
        block["by_category"] = {category: _pairwise_block([u for u in units if u["category"] == category],
                                                          samples, seed, level)
                                for category in categories}
        block["length_controlled"] = None
        if answers is not None:
            similar = [u for u in units if u["similar_length"]]
            block["length_controlled"] = {**_pairwise_block(similar, samples, seed, level),
                                          "units_with_lengths": sum(u["length_difference"] is not None
                                                                    for u in units)}
        results.append(block)
    return {"comparisons": results, "position_bias": _position_block(rows), "verdicts": rows,
            "length_tolerance": length_tolerance, "samples": samples, "seed": seed, "level": level}


# --- answer lengths ---------------------------------------------------------------------------------------------


def _length_block(turns: list[tuple[int | None, int]]) -> dict:
    """turns: (generated tokens or None when not recorded, words) per answer turn."""
    tokens = [t for t, _ in turns if t is not None]
    return {"turns": len(turns),
            "mean_tokens": float(np.mean(tokens)) if tokens else None,
            "median_tokens": float(np.median(tokens)) if tokens else None,
            "mean_words": float(np.mean([w for _, w in turns])) if turns else None}


def answer_tokens(answers: list[dict]) -> dict[tuple[str, str, int], int]:
    """(model, question id, turn) -> generated tokens of that answer turn, for every turn that was generated:
    a turn with an answer error, or without a recorded count, has no length."""
    lengths = {}
    for record in answers:
        tokens, errors = record.get("tokens") or [], record.get("errors") or []
        for i, count in enumerate(tokens):
            if count is not None and not (i < len(errors) and errors[i]):
                lengths[(record["model"], record["question_id"], i + 1)] = int(count)
    return lengths


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
