"""Evaluation statistics and report: hand-computed scores and win rates, the question bootstrap against a direct
numpy computation and against cases with known intervals, and the written report (pure numpy/matplotlib)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tgdpo_ray.eval_report import format_table, write_eval_report
from tgdpo_ray.eval_stats import (
    bootstrap_ci,
    combine_orders,
    length_summary,
    pairwise_summary,
    ratio,
    single_summary,
)

# --- helpers ----------------------------------------------------------------------------------------------------


def single(model, question, category, turn, score):
    return {"mode": "single", "model": model, "question_id": question, "category": category, "turn": turn,
            "score": score, "judge_text": "", "attempts": 1, "error": None if score is not None else "no [[x]]"}


def pair(question, category, turn, order, winner, model_a="new", model_b="old"):
    return {"mode": "pairwise", "model_a": model_a, "model_b": model_b, "order": order, "question_id": question,
            "category": category, "turn": turn, "winner": winner, "judge_text": "", "attempts": 1, "error": None}


def direct_bootstrap(sums, counts, samples, seed, level=0.95):
    """The question bootstrap written out with numpy: same generator, same draws."""
    sums, counts = np.asarray(sums, float), np.asarray(counts, float)
    index = np.random.default_rng(seed).integers(0, len(sums), size=(samples, len(sums)))
    means = sums[index].sum(axis=1) / counts[index].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return np.percentile(means, [tail, 100 - tail])


def assert_plain_json(value):
    """Only JSON's own types, nested; numpy scalars (np.float64 passes isinstance float) are refused."""
    assert type(value) in (dict, list, str, int, float, bool, type(None)), type(value)
    if isinstance(value, dict):
        assert all(type(k) is str for k in value)
        for item in value.values():
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)


# Two models, three questions. `good`: q2 turn 2 unparseable. `bad`: both turns of q3 unparseable.
SINGLE = [
    single("good", "q1", "writing", 1, 8.0), single("good", "q1", "writing", 2, 6.0),
    single("good", "q2", "writing", 1, 9.0), single("good", "q2", "writing", 2, None),
    single("good", "q3", "math", 1, 7.0), single("good", "q3", "math", 2, 5.0),
    single("bad", "q1", "writing", 1, 4.0), single("bad", "q1", "writing", 2, 4.0),
    single("bad", "q2", "writing", 1, 5.0), single("bad", "q2", "writing", 2, 3.0),
    single("bad", "q3", "math", 1, None), single("bad", "q3", "math", 2, None),
]

# new vs old, 4 questions x 2 turns = 8 units, each judged in order "ab" and "ba".
PAIRWISE = [
    pair("q1", "writing", 1, "ab", "new"), pair("q1", "writing", 1, "ba", "new"),  # agree: new wins
    pair("q1", "writing", 2, "ab", "old"), pair("q1", "writing", 2, "ba", "old"),  # agree: old wins
    pair("q2", "writing", 1, "ab", "tie"), pair("q2", "writing", 1, "ba", "tie"),  # agree: tie
    pair("q2", "writing", 2, "ab", "new"), pair("q2", "writing", 2, "ba", "old"),  # disagree: tie, inconsistent
    pair("q3", "writing", 1, "ab", "new"), pair("q3", "writing", 1, "ba", None),   # one order unparseable
    pair("q3", "writing", 2, "ab", "new"), pair("q3", "writing", 2, "ba", "new"),  # new wins
    pair("q4", "math", 1, "ab", "new"), pair("q4", "math", 1, "ba", "new"),        # new wins
    pair("q4", "math", 2, "ab", "new"),                                            # "ba" never written
]


# --- single mode ------------------------------------------------------------------------------------------------


def test_single_means_per_turn_per_category_and_unparseable_counts():
    summary = single_summary(SINGLE, samples=200, seed=0)
    good, bad = summary["models"]["good"], summary["models"]["bad"]

    assert good["mean"] == pytest.approx(35 / 5)
    assert (good["n_scored"], good["n_unparseable"], good["n_questions"]) == (5, 1, 3)
    assert good["by_turn"]["1"]["mean"] == pytest.approx(8.0)
    assert good["by_turn"]["2"]["mean"] == pytest.approx(5.5)
    assert good["by_turn"]["2"]["n_unparseable"] == 1
    assert good["by_category"]["writing"]["mean"] == pytest.approx(23 / 3)
    assert good["by_category"]["math"]["mean"] == pytest.approx(6.0)

    assert bad["mean"] == pytest.approx(4.0)
    assert (bad["n_scored"], bad["n_unparseable"]) == (4, 2)
    # A category with no parsed score: None, not NaN and not a crash.
    assert bad["by_category"]["math"] == {"mean": None, "ci": None, "n_scored": 0, "n_unparseable": 2,
                                          "n_questions": 0}

    # Paired per question, only where both were scored: q1 7 - 4 = 3, q2 9 - 4 = 5 (q3 has no `bad` score).
    (difference,) = summary["paired_differences"]
    assert (difference["model_a"], difference["model_b"], difference["n_questions"]) == ("good", "bad", 2)
    assert difference["mean_difference"] == pytest.approx(4.0)
    assert difference["ci"][0] == pytest.approx(3.0) and difference["ci"][1] == pytest.approx(5.0)

    assert_plain_json(summary)
    assert json.loads(json.dumps(summary)) == summary


def test_single_ci_matches_a_direct_numpy_bootstrap():
    summary = single_summary(SINGLE, samples=500, seed=3)
    # `good`'s questions in order of appearance: score sums and counts of parsed judgments.
    low, high = direct_bootstrap([14.0, 9.0, 12.0], [2, 1, 2], samples=500, seed=3)
    assert summary["models"]["good"]["ci"] == pytest.approx([low, high])


def test_no_parsed_judgment_gives_none_not_a_crash():
    summary = single_summary([single("m", "q1", "writing", 1, None), single("m", "q1", "writing", 2, None)])
    block = summary["models"]["m"]
    assert (block["mean"], block["ci"], block["n_scored"], block["n_unparseable"]) == (None, None, 0, 2)
    assert single_summary([])["models"] == {}


# --- bootstrap core ---------------------------------------------------------------------------------------------


def test_bootstrap_matches_direct_numpy_with_the_same_draws():
    rng = np.random.default_rng(42)
    counts = rng.integers(1, 4, size=12)
    sums = rng.uniform(0, 10, size=12) * counts
    value, low, high = bootstrap_ci(np.stack([sums, counts], axis=1), ratio, samples=1000, seed=7)
    assert value == pytest.approx(sums.sum() / counts.sum())
    assert [low, high] == pytest.approx(list(direct_bootstrap(sums, counts, samples=1000, seed=7)))
    # A narrower level gives a narrower interval from the same draws.
    _, low_80, high_80 = bootstrap_ci(np.stack([sums, counts], axis=1), ratio, samples=1000, seed=7, level=0.8)
    assert low < low_80 < high_80 < high


def test_bootstrap_known_intervals():
    # Every question has the same value: the interval collapses to it.
    assert bootstrap_ci([[7.0, 1]] * 5, ratio) == pytest.approx((7.0, 7.0, 7.0))
    # Two questions with values 0 and 1: resampled means are 0, 0.5 or 1 (a quarter of the draws each at the
    # ends), so the 2.5% and 97.5% percentiles are exactly 0 and 1.
    assert bootstrap_ci([[0.0, 1], [1.0, 1]], ratio, samples=2000) == (0.5, 0.0, 1.0)
    assert bootstrap_ci([], ratio) == (None, None, None)


def test_resampling_is_by_question_not_by_judgment():
    # Each question gets the same score on both turns, so the two turns carry one question's worth of evidence.
    values = [2.0, 9.0, 4.0, 8.0, 3.0, 7.0]
    judgments = [single("m", f"q{i}", "writing", turn, v) for i, v in enumerate(values) for turn in (1, 2)]
    low, high = single_summary(judgments, samples=2000, seed=0)["models"]["m"]["ci"]

    per_question = direct_bootstrap([2 * v for v in values], [2] * len(values), samples=2000, seed=0)
    per_judgment = direct_bootstrap([v for v in values for _ in (1, 2)], [1] * 12, samples=2000, seed=0)
    assert [low, high] == pytest.approx(list(per_question))
    assert high - low > 1.2 * (per_judgment[1] - per_judgment[0])


# --- pairwise mode ----------------------------------------------------------------------------------------------


def test_combine_orders_cases():
    def verdicts(ab, ba):
        return pair("q", "c", 1, "ab", ab), pair("q", "c", 1, "ba", ba)

    assert combine_orders(*verdicts("new", "new")) == ("win", False)
    assert combine_orders(*verdicts("old", "old")) == ("loss", False)
    assert combine_orders(*verdicts("tie", "tie")) == ("tie", False)
    assert combine_orders(*verdicts("new", "old")) == ("tie", True)
    assert combine_orders(*verdicts("new", "tie")) == ("tie", True)
    assert combine_orders(*verdicts("new", None)) == (None, False)
    assert combine_orders(pair("q", "c", 1, "ab", "new"), None) == (None, False)


def test_pairwise_counts_rates_and_position_consistency():
    summary = pairwise_summary(PAIRWISE, samples=300, seed=1)
    (c,) = summary["comparisons"]
    assert (c["model_a"], c["model_b"]) == ("new", "old")
    assert (c["wins"], c["losses"], c["ties"]) == (3, 1, 2)
    assert (c["units"], c["decided"], c["inconsistent"], c["unparseable"], c["n_questions"]) == (8, 6, 1, 2, 4)
    assert c["win_rate"] == pytest.approx(3 / 6)
    assert c["adjusted_win_rate"] == pytest.approx((3 + 2 / 2) / 6)
    assert c["net"] == pytest.approx((3 - 1) / 6)
    assert c["position_consistency"] == pytest.approx(5 / 6)

    writing, math = c["by_category"]["writing"], c["by_category"]["math"]
    assert (writing["wins"], writing["losses"], writing["ties"], writing["unparseable"]) == (2, 1, 2, 1)
    assert (math["wins"], math["losses"], math["ties"], math["unparseable"]) == (1, 0, 0, 1)
    assert math["net"] == pytest.approx(1.0) and math["position_consistency"] == pytest.approx(1.0)

    # Net's CI: the question bootstrap over per-question (wins - losses, decided units).
    # q1: W1 L1, q2: T2, q3: W1, q4: W1.
    low, high = direct_bootstrap([0, 0, 1, 1], [2, 2, 1, 1], samples=300, seed=1)
    assert c["net_ci"] == pytest.approx([low, high])
    low, high = direct_bootstrap([1, 0, 1, 1], [2, 2, 1, 1], samples=300, seed=1)
    assert c["win_rate_ci"] == pytest.approx([low, high])

    assert_plain_json(summary)


def test_pairwise_with_nothing_decided_gives_none():
    (c,) = pairwise_summary([pair("q1", "c", 1, "ab", None), pair("q1", "c", 1, "ba", "new")])["comparisons"]
    assert (c["units"], c["decided"], c["unparseable"]) == (1, 0, 1)
    assert c["position_consistency"] is None
    assert (c["win_rate"], c["net"], c["net_ci"], c["adjusted_win_rate_ci"]) == (None, None, None, None)


# --- lengths ----------------------------------------------------------------------------------------------------


def test_length_summary():
    answers = [
        {"model": "m", "question_id": "q1", "category": "c", "turns": ["one two three", "four five"],
         "tokens": [10, 40]},
        {"model": "m", "question_id": "q2", "category": "c", "turns": ["a b c d", "e"], "tokens": [20, 50]},
        {"model": "m", "question_id": "q3", "category": "c", "turns": ["a b", "c d e f g h"], "tokens": [90, 60]},
    ]
    lengths = length_summary(answers)["m"]
    assert lengths["turns"] == 6
    assert lengths["mean_tokens"] == pytest.approx(270 / 6)
    assert lengths["median_tokens"] == pytest.approx(45.0)
    assert lengths["mean_words"] == pytest.approx((3 + 2 + 4 + 1 + 2 + 6) / 6)
    assert lengths["by_turn"]["1"] == {"turns": 3, "mean_tokens": pytest.approx(40.0), "median_tokens": 20.0,
                                       "mean_words": pytest.approx(3.0)}
    assert lengths["by_turn"]["2"]["mean_tokens"] == pytest.approx(50.0)
    assert_plain_json(length_summary(answers))


# --- report -----------------------------------------------------------------------------------------------------


ANSWERS = [{"model": m, "question_id": f"q{i}", "category": "writing", "turns": ["word " * n, "word " * n],
            "tokens": [n, n]} for m, n in (("good", 300), ("bad", 100), ("new", 200), ("old", 150))
           for i in range(1, 4)]


def is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_report(tmp_path):
    summary = {"mode": "single", "judge": "judge-model", "questions": 3, "models": ["good", "bad"],
               "scores": single_summary(SINGLE, samples=200), "pairwise": None,
               "lengths": length_summary(ANSWERS)}
    path = write_eval_report(tmp_path / "eval", summary)
    text = path.read_text()
    assert path == tmp_path / "eval" / "report.md"
    assert "Highest mean score: **good**" in text
    assert "**good** scores 4.00 points higher than `bad`" in text
    assert "`good` 1 of 6, `bad` 2 of 6" in text  # unparseable counts, stated plainly
    assert "favour longer answers" in text
    assert is_png(tmp_path / "eval" / "scores_by_category.png")

    table = format_table(summary).splitlines()
    assert len(table) == 3 and table[1].split()[:2] == ["good", "7.00"]


def test_pairwise_report(tmp_path):
    # `new` wins both turns of 10 questions in both orders; an 11th question is unparseable in one order.
    judgments = [pair(f"q{i}", "writing", turn, order, "new") for i in range(10) for turn in (1, 2)
                 for order in ("ab", "ba")]
    judgments += [pair("q10", "math", 1, "ab", "old"), pair("q10", "math", 1, "ba", None)]
    summary = {"mode": "pairwise", "judge": "judge-model", "questions": 11, "models": ["new", "old"],
               "scores": None, "pairwise": pairwise_summary(judgments, samples=200),
               "lengths": length_summary(ANSWERS)}
    text = write_eval_report(tmp_path, summary).read_text()
    assert "so **new** is better" in text
    assert "1 of 21 units are unparseable" in text
    assert "same verdict in both orders for 20 of 20 units (100.0%)" in text
    assert "favour longer answers" in text
    assert is_png(tmp_path / "win_tie_loss.png")
    assert not (tmp_path / "scores_by_category.png").exists()

    table = format_table(summary).splitlines()
    assert len(table) == 2 and table[1].split()[:6] == ["new", "vs", "old", "20", "0", "0"]


def test_reports_with_nothing_scored_do_not_crash(tmp_path):
    nothing = [single("m", "q1", "writing", 1, None)]
    summary = {"mode": "single", "judge": "j", "questions": 1, "models": ["m"], "scores": single_summary(nothing),
               "pairwise": None, "lengths": {}}
    assert "No model has a parsed score." in write_eval_report(tmp_path / "single", summary).read_text()
    format_table(summary)

    undecided = [pair("q1", "c", 1, "ab", None), pair("q1", "c", 1, "ba", None)]
    summary = {"mode": "pairwise", "judge": "j", "questions": 1, "models": ["new", "old"], "scores": None,
               "pairwise": pairwise_summary(undecided), "lengths": {}}
    assert "nothing to compare" in write_eval_report(tmp_path / "pairwise", summary).read_text()
    assert is_png(tmp_path / "pairwise" / "win_tie_loss.png")
    format_table(summary)
