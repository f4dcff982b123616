"""Evaluation statistics and report: hand-computed scores and win rates, the judge's position bias, win rates on
similar-length answers, the question bootstrap (10 or more questions) against a direct numpy computation and against
cases with known intervals, the t-interval of the per-question means (fewer than 10) against a hand computation, and
the written report (pure numpy/matplotlib)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tgdpo_ray.common.intervals import bootstrap_ci, mean_interval, ratio
from tgdpo_ray.eval.report import format_table, write_eval_report
from tgdpo_ray.eval.stats import (BOOTSTRAP_MIN_QUESTIONS, combine_orders, length_difference, length_summary,
                                  pairwise_summary, pairwise_units, single_summary)

T_975_DF1, T_975_DF3 = 12.706204736174707, 3.182446305284263  # Student-t 97.5% quantiles, from a t table

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


def copies(records, count):
    """`count` copies of some judgments, each copy's questions renamed ("q1" -> "q1-0", "q1-1", ...): as many
    times the questions, in the same order of first appearance, so a bootstrap over them has enough groups."""
    return [{**record, "question_id": f"{record['question_id']}-{i}"} for i in range(count) for record in records]


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
    assert bad["by_category"]["math"] == {"mean": None, "ci": None, "ci_method": "t", "n_scored": 0,
                                          "n_unparseable": 2, "n_questions": 0}

    # Paired per question, only where both were scored: q1 7 - 4 = 3, q2 9 - 4 = 5 (q3 has no `bad` score).
    # Two questions: the t-interval of 3 and 5, 4 +- t(0.975, 1 df) * sd / sqrt(2) with sd = sqrt(2).
    (difference,) = summary["paired_differences"]
    assert (difference["model_a"], difference["model_b"], difference["n_questions"]) == ("good", "bad", 2)
    assert difference["mean_difference"] == pytest.approx(4.0)
    assert difference["ci"] == pytest.approx([4.0 - T_975_DF1, 4.0 + T_975_DF1])
    assert difference["ci_method"] == "t"

    assert_plain_json(summary)
    assert json.loads(json.dumps(summary)) == summary


def test_single_ci_matches_a_direct_numpy_bootstrap_from_10_questions():
    # SINGLE four times over: 12 questions, enough for the bootstrap.
    summary = single_summary(copies(SINGLE, 4), samples=500, seed=3)
    good = summary["models"]["good"]
    assert good["n_questions"] == 12 >= BOOTSTRAP_MIN_QUESTIONS and good["ci_method"] == "bootstrap"
    # `good`'s questions in order of appearance: score sums and counts of parsed judgments.
    low, high = direct_bootstrap([14.0, 9.0, 12.0] * 4, [2, 1, 2] * 4, samples=500, seed=3)
    assert good["ci"] == pytest.approx([low, high])
    (difference,) = summary["paired_differences"]  # 8 questions both were scored on: still a t-interval
    assert (difference["n_questions"], difference["ci_method"]) == (8, "t")


def test_under_10_questions_a_mean_gets_the_t_interval_of_the_per_question_means():
    # Four questions; q2's second turn is unparseable. Per-question means 7, 9, 6, 5.
    judgments = [single("m", "q1", "writing", 1, 8.0), single("m", "q1", "writing", 2, 6.0),
                 single("m", "q2", "writing", 1, 9.0), single("m", "q2", "writing", 2, None),
                 single("m", "q3", "math", 1, 7.0), single("m", "q3", "math", 2, 5.0),
                 single("m", "q4", "math", 1, 4.0), single("m", "q4", "math", 2, 6.0)]
    block = single_summary(judgments, samples=500, seed=3)["models"]["m"]
    # By hand: mean 6.75; squared deviations 0.0625 + 5.0625 + 0.5625 + 3.0625 = 8.75, sd = sqrt(8.75 / 3),
    # half-width t(0.975, 3 df) * sd / sqrt(4).
    half_width = T_975_DF3 * np.sqrt(8.75 / 3) / 2
    assert block["ci_method"] == "t" and block["n_questions"] == 4
    assert block["ci"] == pytest.approx([6.75 - half_width, 6.75 + half_width])
    # The mean stays the mean of every parsed score, 45 / 7; the interval is centred on the per-question means'.
    assert block["mean"] == pytest.approx(45 / 7)
    # Per category (two questions each) too: writing's means 7 and 9, math's 6 and 5.
    assert block["by_category"]["writing"]["ci"] == pytest.approx([8.0 - T_975_DF1, 8.0 + T_975_DF1])
    assert block["by_category"]["math"]["ci"] == pytest.approx([5.5 - T_975_DF1 / 2, 5.5 + T_975_DF1 / 2])
    assert block["by_turn"]["2"]["ci_method"] == "t"
    # One question has no spread: no interval, said to be for want of questions.
    lone = single_summary(judgments[:2])["models"]["m"]
    assert (lone["mean"], lone["ci"], lone["ci_method"]) == (7.0, None, "t")


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


def test_the_mean_of_plain_values_resamples_each_value_alone():
    values = [3.0, 5.0, 10.0]
    mean, low, high = mean_interval(values, samples=4000, seed=1)
    assert mean == pytest.approx(6.0)
    draws = np.random.default_rng(1).integers(0, 3, size=(4000, 3))
    assert [low, high] == pytest.approx(list(np.percentile(np.asarray(values)[draws].mean(axis=1), [2.5, 97.5])))
    assert mean_interval([]) == (None, None, None)


def test_resampling_is_by_question_not_by_judgment():
    # Each question gets the same score on both turns, so the two turns carry one question's worth of evidence.
    values = [2.0, 9.0, 4.0, 8.0, 3.0, 7.0, 5.0, 6.0, 1.0, 10.0, 4.0, 8.0]
    judgments = [single("m", f"q{i}", "writing", turn, v) for i, v in enumerate(values) for turn in (1, 2)]
    low, high = single_summary(judgments, samples=2000, seed=0)["models"]["m"]["ci"]

    per_question = direct_bootstrap([2 * v for v in values], [2] * len(values), samples=2000, seed=0)
    per_judgment = direct_bootstrap([v for v in values for _ in (1, 2)], [1] * 24, samples=2000, seed=0)
    assert [low, high] == pytest.approx(list(per_question))
    assert high - low > 1.2 * (per_judgment[1] - per_judgment[0])


# --- pairwise mode ----------------------------------------------------------------------------------------------


def test_combine_orders_cases():
    def verdicts(ab, ba):
        return pair("q", "c", 1, "ab", ab), pair("q", "c", 1, "ba", ba)

    assert combine_orders(*verdicts("new", "new")) == ("win", None)
    assert combine_orders(*verdicts("old", "old")) == ("loss", None)
    assert combine_orders(*verdicts("tie", "tie")) == ("tie", None)
    # "ab" shows new (model_a) first, "ba" shows old first: new then old means whichever came first won.
    assert combine_orders(*verdicts("new", "old")) == ("tie", "first")
    assert combine_orders(*verdicts("old", "new")) == ("tie", "second")
    assert combine_orders(*verdicts("new", "tie")) == ("tie", "tie")
    assert combine_orders(*verdicts("tie", "old")) == ("tie", "tie")
    assert combine_orders(*verdicts("new", None)) == (None, None)
    assert combine_orders(*verdicts(None, "old")) == (None, None)  # would be a first-position flip if parsed
    assert combine_orders(pair("q", "c", 1, "ab", "new"), None) == (None, None)


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
    # The one flip (q2 turn 2: new when shown first, old when shown first) favoured the first position.
    assert (c["first_shown_won_both"], c["second_shown_won_both"], c["tie_in_one_order"]) == (1, 0, 0)
    assert (c["first_shown_share"], c["second_shown_share"]) == (1.0, 0.0)
    assert c["length_controlled"] is None and summary["verdicts"][0]["tokens_a"] is None  # no answers given

    writing, math = c["by_category"]["writing"], c["by_category"]["math"]
    assert (writing["wins"], writing["losses"], writing["ties"], writing["unparseable"]) == (2, 1, 2, 1)
    assert (math["wins"], math["losses"], math["ties"], math["unparseable"]) == (1, 0, 0, 1)
    assert math["net"] == pytest.approx(1.0) and math["position_consistency"] == pytest.approx(1.0)

    # Four questions: rates over units are no per-question means, so no t-interval, and no bootstrap either.
    assert (c["win_rate_ci"], c["adjusted_win_rate_ci"], c["net_ci"], c["ci_method"]) == (None, None, None, "none")
    assert writing["ci_method"] == "none"

    assert_plain_json(summary)


def test_pairwise_ci_matches_a_direct_numpy_bootstrap_from_10_questions():
    (c,) = pairwise_summary(copies(PAIRWISE, 3), samples=300, seed=1)["comparisons"]
    assert c["n_questions"] == 12 and c["ci_method"] == "bootstrap"
    # Net's CI: the question bootstrap over per-question (wins - losses, decided units).
    # q1: W1 L1, q2: T2, q3: W1, q4: W1; three times over.
    low, high = direct_bootstrap([0, 0, 1, 1] * 3, [2, 2, 1, 1] * 3, samples=300, seed=1)
    assert c["net_ci"] == pytest.approx([low, high])
    low, high = direct_bootstrap([1, 0, 1, 1] * 3, [2, 2, 1, 1] * 3, samples=300, seed=1)
    assert c["win_rate_ci"] == pytest.approx([low, high])


def test_pairwise_with_nothing_decided_gives_none():
    (c,) = pairwise_summary([pair("q1", "c", 1, "ab", None), pair("q1", "c", 1, "ba", "new")])["comparisons"]
    assert (c["units"], c["decided"], c["unparseable"]) == (1, 0, 1)
    assert c["position_consistency"] is None
    assert (c["win_rate"], c["net"], c["net_ci"], c["adjusted_win_rate_ci"]) == (None, None, None, None)


# --- position bias ----------------------------------------------------------------------------------------------

# new vs old: 8 units. 5 decided, of which 4 flipped: 2 to the answer shown first, 1 to the one shown second,
# 1 with a tie in one order. 3 units have an unparseable or missing verdict and are left out of every count
# but `unparseable` (two of them would be flips if they counted).
POSITION = [
    pair("q1", "writing", 1, "ab", "new"), pair("q1", "writing", 1, "ba", "new"),    # consistent: new wins
    pair("q1", "writing", 2, "ab", "new"), pair("q1", "writing", 2, "ba", "old"),    # first shown won both
    pair("q2", "writing", 1, "ab", "new"), pair("q2", "writing", 1, "ba", "old"),    # first shown won both
    pair("q2", "writing", 2, "ab", "old"), pair("q2", "writing", 2, "ba", "new"),    # second shown won both
    pair("q3", "math", 1, "ab", "tie"), pair("q3", "math", 1, "ba", "old"),          # a tie in one order
    pair("q3", "math", 2, "ab", "new"), pair("q3", "math", 2, "ba", None),           # unparseable
    pair("q4", "math", 1, "ab", None), pair("q4", "math", 1, "ba", "old"),           # unparseable
    pair("q4", "math", 2, "ab", "new"),                                              # "ba" missing
    # new vs base: one consistent unit, one flip to the first-shown answer.
    pair("q1", "writing", 1, "ab", "new", model_b="base"), pair("q1", "writing", 1, "ba", "new", model_b="base"),
    pair("q2", "writing", 1, "ab", "new", model_b="base"), pair("q2", "writing", 1, "ba", "base", model_b="base"),
]


def test_position_bias_counts_flips_and_excludes_unparseable():
    summary = pairwise_summary(POSITION, samples=100, seed=0)
    old, base = summary["comparisons"]
    assert (old["model_b"], base["model_b"]) == ("old", "base")
    assert (old["units"], old["decided"], old["unparseable"], old["inconsistent"]) == (8, 5, 3, 4)
    assert old["position_consistency"] == pytest.approx(1 / 5)  # position-bias rate 4 / 5
    assert (old["first_shown_won_both"], old["second_shown_won_both"], old["tie_in_one_order"]) == (2, 1, 1)
    assert old["first_shown_share"] == pytest.approx(2 / 4) and old["second_shown_share"] == pytest.approx(1 / 4)
    assert (old["wins"], old["losses"], old["ties"]) == (1, 0, 4)  # every flip is a tie

    math = old["by_category"]["math"]
    assert (math["units"], math["decided"], math["unparseable"], math["inconsistent"]) == (4, 1, 3, 1)
    assert (math["first_shown_won_both"], math["tie_in_one_order"]) == (0, 1)

    # The judge over both comparisons: 10 units, 7 decided, 5 flipped, 3 of them to the first-shown answer.
    overall = summary["position_bias"]
    assert (overall["units"], overall["decided"], overall["unparseable"], overall["inconsistent"]) == (10, 7, 3, 5)
    assert overall["position_consistency"] == pytest.approx(2 / 7)
    flips = (overall["first_shown_won_both"], overall["second_shown_won_both"], overall["tie_in_one_order"])
    assert flips == (3, 1, 1)
    assert overall["first_shown_share"] == pytest.approx(3 / 5)

    assert overall["second_shown_share"] == pytest.approx(1 / 5)
    assert_plain_json(summary)


def test_no_flip_gives_zero_counts_and_no_shares():
    (c,) = pairwise_summary([pair("q1", "c", 1, "ab", "new"), pair("q1", "c", 1, "ba", "new")])["comparisons"]
    assert (c["inconsistent"], c["first_shown_won_both"], c["second_shown_won_both"], c["tie_in_one_order"]) == (
        0, 0, 0, 0)
    assert (c["position_consistency"], c["first_shown_share"], c["second_shown_share"]) == (1.0, None, None)


# --- length control ---------------------------------------------------------------------------------------------


def answer(model, question, tokens, errors=None):
    return {"model": model, "question_id": question, "category": "writing", "turns": ["x"] * len(tokens),
            "tokens": tokens, "errors": errors or [None] * len(tokens)}


def test_length_difference_and_the_20_percent_boundary():
    assert length_difference(100, 80) == pytest.approx(0.2)
    assert length_difference(80, 100) == length_difference(100, 80)
    assert length_difference(100, 81) == pytest.approx(0.19)
    assert length_difference(0, 0) == 0.0 and length_difference(0, 5) == 1.0
    assert length_difference(None, 5) is None and length_difference(5, None) is None

    # Exactly 20% apart is not "less than 20%"; 19% is. An answer error has no length.
    judgments = [pair(q, "writing", 1, order, "new") for q in ("q1", "q2", "q3", "q4") for order in ("ab", "ba")]
    answers = [answer("new", "q1", [100]), answer("old", "q1", [80]),     # 0.20: out
               answer("new", "q2", [81]), answer("old", "q2", [100]),     # 0.19: in
               answer("new", "q3", [50]), answer("old", "q3", [50]),      # 0.00: in
               answer("new", "q4", [0], ["no room in max_model_len"]), answer("old", "q4", [60])]  # unknown
    rows = pairwise_units(judgments, answers)
    assert [(r["tokens_a"], r["tokens_b"], r["similar_length"]) for r in rows] == [
        (100, 80, False), (81, 100, True), (50, 50, True), (None, 60, False)]
    (c,) = pairwise_summary(judgments, samples=50, answers=answers)["comparisons"]
    assert (c["length_controlled"]["units"], c["length_controlled"]["units_with_lengths"]) == (2, 3)
    (c,) = pairwise_summary(judgments, samples=50, answers=answers, length_tolerance=0.21)["comparisons"]
    assert c["length_controlled"]["units"] == 3


def test_verdict_rows_put_both_lengths_next_to_both_verdicts():
    answers = [answer("new", "q1", [120, 300]), answer("old", "q1", [110, 90])]
    judgments = [pair("q1", "writing", 2, "ab", "new"), pair("q1", "writing", 2, "ba", "old"),
                 pair("q1", "writing", 1, "ab", "tie"), pair("q1", "writing", 1, "ba", None)]
    summary = pairwise_summary(judgments, samples=50, answers=answers)
    assert summary["verdicts"] == [
        {"model_a": "new", "model_b": "old", "question_id": "q1", "category": "writing", "turn": 2,
         "winner_ab": "new", "winner_ba": "old", "outcome": "tie", "flip": "first", "tokens_a": 300,
         "tokens_b": 90, "length_difference": pytest.approx(0.7), "similar_length": False},
        {"model_a": "new", "model_b": "old", "question_id": "q1", "category": "writing", "turn": 1,
         "winner_ab": "tie", "winner_ba": None, "outcome": None, "flip": None, "tokens_a": 120,
         "tokens_b": 110, "length_difference": pytest.approx(10 / 120), "similar_length": True}]
    assert summary["length_tolerance"] == 0.2
    assert_plain_json(summary)


def both_orders(question, turn, winner, model_a="new", model_b="old"):
    return [pair(question, "writing", turn, order, winner, model_a, model_b) for order in ("ab", "ba")]


def test_length_controlled_win_rate_and_interval_on_hand_cases():
    # q1, q2: similar lengths, new wins q1 and loses q2. q3: new's answer is twice as long and wins; it is
    # out of the length-controlled rate. Two questions: rates but no interval.
    judgments = both_orders("q1", 1, "new") + both_orders("q2", 1, "old") + both_orders("q3", 1, "new")
    answers = [answer("new", "q1", [100]), answer("old", "q1", [95]), answer("new", "q2", [100]),
               answer("old", "q2", [110]), answer("new", "q3", [400]), answer("old", "q3", [200])]
    (c,) = pairwise_summary(judgments, samples=2000, seed=0, answers=answers)["comparisons"]
    assert c["win_rate"] == pytest.approx(2 / 3)  # all units
    lc = c["length_controlled"]
    assert (lc["units"], lc["units_with_lengths"], lc["decided"], lc["n_questions"]) == (2, 3, 2, 2)
    assert (lc["wins"], lc["losses"], lc["ties"]) == (1, 1, 0)
    assert (lc["win_rate"], lc["win_rate_ci"], lc["net"], lc["net_ci"]) == (0.5, None, 0.0, None)
    assert lc["ci_method"] == "none"

    # Every similar-length unit a win, over 10 such questions (and 5 long-answer losses): the bootstrap interval
    # collapses to 1.
    judgments = both_orders("q1", 1, "new") + both_orders("q2", 1, "new") + both_orders("q3", 1, "old")
    (c,) = pairwise_summary(copies(judgments, 5), samples=500, answers=copies(answers, 5))["comparisons"]
    lc = c["length_controlled"]
    assert (lc["n_questions"], lc["ci_method"], lc["win_rate"], lc["win_rate_ci"]) == (10, "bootstrap", 1.0, [1.0, 1.0])
    assert c["win_rate"] == pytest.approx(2 / 3)


def test_length_controlled_interval_matches_a_direct_numpy_bootstrap():
    # Four similar-length questions (two turns each) and one long-answer question that is left out; three times
    # over, so 12 questions are resampled.
    # Per question (wins, decided) over similar-length units: q1 (2, 2), q2 (0, 2), q3 (1, 2), q4 (1, 1).
    judgments = (both_orders("q1", 1, "new") + both_orders("q1", 2, "new") + both_orders("q2", 1, "old")
                 + both_orders("q2", 2, "tie") + both_orders("q3", 1, "new") + both_orders("q3", 2, "old")
                 + both_orders("q4", 1, "new") + both_orders("q4", 2, "new") + both_orders("q5", 1, "new"))
    answers = [answer("new", "q1", [100, 100]), answer("old", "q1", [100, 100]),
               answer("new", "q2", [100, 100]), answer("old", "q2", [90, 100]),
               answer("new", "q3", [100, 100]), answer("old", "q3", [100, 85]),
               answer("new", "q4", [100, 100]), answer("old", "q4", [100, 50]),   # q4 turn 2: out
               answer("new", "q5", [100]), answer("old", "q5", [10])]             # out
    (c,) = pairwise_summary(copies(judgments, 3), samples=400, seed=5, answers=copies(answers, 3))["comparisons"]
    lc = c["length_controlled"]
    assert (lc["units"], lc["units_with_lengths"], lc["wins"], lc["losses"], lc["ties"]) == (21, 27, 12, 6, 3)
    assert lc["win_rate"] == pytest.approx(4 / 7) and lc["ci_method"] == "bootstrap"
    assert lc["win_rate_ci"] == pytest.approx(list(direct_bootstrap([2, 0, 1, 1] * 3, [2, 2, 2, 1] * 3, 400, 5)))
    # net per question: q1 +2, q2 -1 (a loss and a tie), q3 0, q4 +1
    assert lc["net_ci"] == pytest.approx(list(direct_bootstrap([2, -1, 0, 1] * 3, [2, 2, 2, 1] * 3, 400, 5)))


def test_single_score_length_correlation():
    # m's scores against its lengths: x = 10, 20, 30, 40 and y = 1, 3, 2, 4: r = 4 / sqrt(5 * 5) = 0.8.
    # An unparseable score and an answer error have no pair and are left out.
    judgments = [single("m", "q1", "writing", 1, 1.0), single("m", "q1", "writing", 2, 3.0),
                 single("m", "q2", "writing", 1, 2.0), single("m", "q2", "writing", 2, 4.0),
                 single("m", "q3", "writing", 1, None), single("m", "q3", "writing", 2, 9.0),
                 single("flat", "q1", "writing", 1, 5.0), single("flat", "q2", "writing", 1, 7.0)]
    answers = [answer("m", "q1", [10, 20]), answer("m", "q2", [30, 40]), answer("m", "q3", [99, 0], [None, "err"]),
               answer("flat", "q1", [50]), answer("flat", "q2", [50])]
    summary = single_summary(judgments, samples=300, seed=2, answers=answers)
    correlation = summary["models"]["m"]["length_correlation"]
    assert correlation["r"] == pytest.approx(0.8) and correlation["n"] == 4
    assert correlation["r"] == pytest.approx(np.corrcoef([10, 20, 30, 40], [1, 3, 2, 4])[0, 1])
    # Two questions: r is no mean, so no t-interval, and no bootstrap either.
    assert (correlation["ci"], correlation["ci_method"]) == (None, "none")
    # Every answer the same length: r is undefined, not NaN.
    assert summary["models"]["flat"]["length_correlation"] == {"r": None, "ci": None, "n": 2, "ci_method": "none"}
    assert single_summary(judgments)["models"]["m"]["length_correlation"] is None  # no answers
    assert_plain_json(summary)


def test_score_length_correlation_ci_matches_a_direct_numpy_bootstrap_from_10_questions():
    rng = np.random.default_rng(4)
    lengths, scores = rng.integers(10, 300, size=(10, 2)), rng.integers(1, 11, size=(10, 2)).astype(float)
    judgments = [single("m", f"q{i}", "writing", turn + 1, scores[i, turn]) for i in range(10) for turn in (0, 1)]
    answers = [answer("m", f"q{i}", [int(t) for t in lengths[i]]) for i in range(10)]
    correlation = single_summary(judgments, samples=300, seed=2, answers=answers)["models"]["m"]["length_correlation"]
    assert correlation["ci_method"] == "bootstrap"
    # The same draws of questions, r of each draw's (length, score) pairs.
    draws = np.random.default_rng(2).integers(0, 10, size=(300, 10))
    rs = [np.corrcoef(lengths[draw].ravel(), scores[draw].ravel())[0, 1] for draw in draws]
    assert correlation["ci"] == pytest.approx(list(np.percentile(rs, [2.5, 97.5])))


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
    summary = {"mode": "single", "judge": "judge-model", "judge_prompts": "fastchat", "questions": 3,
               "models": ["good", "bad"], "scores": single_summary(SINGLE, samples=200), "pairwise": None,
               "lengths": length_summary(ANSWERS)}
    path = write_eval_report(tmp_path / "eval", summary)
    text = path.read_text()
    assert path == tmp_path / "eval" / "report.md"
    assert "Highest mean score: **good**" in text
    assert "**good** scores 4.00 points higher than `bad`" in text
    assert "`good` 1 of 6, `bad` 2 of 6" in text  # unparseable counts, stated plainly
    assert "favour longer answers" in text
    assert "- judge prompts: `fastchat`" in text
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert "Judge `judge-model`, judge prompts `fastchat`." in verdict
    assert "score-length r" not in text  # no answers given
    assert is_png(tmp_path / "eval" / "scores_by_category.png")
    # Three questions: t-intervals, and the report says so where it gives them.
    assert "Highest mean score: **good** (7.00, 95% t-interval (n < 10 questions) [" in text
    assert "(95% t-interval (n < 10 questions) [-8.71, 16.71], paired over 2 questions" in text
    scores = text.split("## Scores")[1].split("##")[0]
    assert "| good | 7.00 | [" in scores and "] (t) |" in scores and "(t): t-interval (n < 10 questions)" in scores
    assert "(t): t-interval (n < 10 questions)" in text.split("## By category")[1]
    assert "| math | 6.00 n/a (one question) | n/a |" in text  # one question: no spread, no interval

    table = format_table(summary).splitlines()
    assert table[0] == "judge judge-model, judge prompts fastchat"
    assert len(table) == 5 and table[2].split()[:2] == ["good", "7.00"] and table[2].split()[4] == "(t)"
    assert table[4] == "(t): t-interval (n < 10 questions)"


def test_single_report_names_the_bootstrap_from_10_questions(tmp_path):
    summary = {"mode": "single", "judge": "j", "judge_prompts": "fastchat", "questions": 12,
               "models": ["good", "bad"], "scores": single_summary(copies(SINGLE, 4), samples=200), "pairwise": None,
               "lengths": {}}
    text = write_eval_report(tmp_path, summary).read_text()
    # `good` has 12 scored questions, `bad` 8 (its q3 copies are unparseable), as has their paired difference.
    assert "Highest mean score: **good** (7.00, 95% CI [" in text
    rows = {line.split(" | ")[0]: line for line in text.split("## Scores")[1].split("\n## ")[0].splitlines()
            if line.startswith("| ")}
    assert "(t)" not in rows["| good"] and "] (t) |" in rows["| bad"]
    assert "scores 4.00 points higher than `bad` (95% t-interval (n < 10 questions) [" in text
    table = format_table(summary).splitlines()
    assert "(t)" not in table[2] and "(t)" in table[3] and table[4] == "(t): t-interval (n < 10 questions)"


def test_single_report_shows_the_score_length_correlation(tmp_path):
    judgments = [single("m", "q1", "writing", 1, 1.0), single("m", "q1", "writing", 2, 3.0),
                 single("m", "q2", "writing", 1, 2.0), single("m", "q2", "writing", 2, 4.0)]
    answers = [answer("m", "q1", [10, 20]), answer("m", "q2", [30, 40])]
    summary = {"mode": "single", "judge": "j", "judge_prompts": "tgdpo-ray", "questions": 2, "models": ["m"],
               "scores": single_summary(judgments, samples=100, answers=answers), "pairwise": None,
               "lengths": length_summary(answers)}
    text = write_eval_report(tmp_path, summary).read_text()
    assert "score-length r (95% CI) |" in text and "| +0.80 n/a (fewer than 10 questions), n=4 |" in text


def test_pairwise_report(tmp_path):
    # `new` wins both turns of 10 questions in both orders; an 11th question is unparseable in one order.
    judgments = [pair(f"q{i}", "writing", turn, order, "new") for i in range(10) for turn in (1, 2)
                 for order in ("ab", "ba")]
    judgments += [pair("q10", "math", 1, "ab", "old"), pair("q10", "math", 1, "ba", None)]
    summary = {"mode": "pairwise", "judge": "judge-model", "judge_prompts": "/prompts/judge_prompts.jsonl",
               "questions": 11, "models": ["new", "old"], "scores": None,
               "pairwise": pairwise_summary(judgments, samples=200), "lengths": length_summary(ANSWERS)}
    text = write_eval_report(tmp_path, summary).read_text()
    assert "so **new** is better" in text
    assert "1 of 21 units are unparseable" in text
    assert "same verdict in both orders for 20 of 20 units (100.0%)" in text
    assert "position-bias rate 0.0%: 0 unit(s) flipped" in text
    assert "favour longer answers" in text
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert "judge prompts `/prompts/judge_prompts.jsonl`" in verdict
    assert "## Length-controlled win rate\n\nNot computed" in text  # no answers given
    assert is_png(tmp_path / "win_tie_loss.png")
    assert not (tmp_path / "scores_by_category.png").exists()

    table = format_table(summary).splitlines()
    assert table[0] == "judge judge-model, judge prompts /prompts/judge_prompts.jsonl"
    assert len(table) == 3 and table[2].split()[:6] == ["new", "vs", "old", "20", "0", "0"]
    assert table[2].split()[-1] == "n/a"  # no length-controlled rate


def test_pairwise_report_shows_position_bias_and_the_length_controlled_win_rate(tmp_path):
    # POSITION's new vs old and new vs base, with lengths: q1 and q2 similar, q3 and q4 far apart.
    answers = [answer("new", "q1", [100, 100]), answer("old", "q1", [90, 100]), answer("base", "q1", [100, 100]),
               answer("new", "q2", [100, 100]), answer("old", "q2", [100, 85]), answer("base", "q2", [100, 100]),
               answer("new", "q3", [100, 100]), answer("old", "q3", [10, 10]),
               answer("new", "q4", [100, 100]), answer("old", "q4", [10, 10])]
    pairwise = pairwise_summary(POSITION, samples=200, answers=answers)
    summary = {"mode": "pairwise", "judge": "judge-model", "judge_prompts": "fastchat", "questions": 4,
               "models": ["new", "old", "base"], "scores": None, "pairwise": pairwise,
               "lengths": length_summary(answers)}
    text = write_eval_report(tmp_path, summary).read_text()
    assert "## Position bias and unparseable verdicts" in text
    assert ("`new` vs `old`: the judge gave the same verdict in both orders for 1 of 5 units (20.0%); "
            "position-bias rate 80.0%: 4 unit(s) flipped with the order (counted as ties) (answer shown first won "
            "both times: 2 (50.0%); shown second won both times: 1 (25.0%); a tie in one order: 1)") in text
    assert "the judge over all comparisons: the judge gave the same verdict in both orders for 2 of 7 units" in text
    assert "position-bias rate 71.4%: 5 unit(s) flipped" in text
    assert "**3 of 8 units are unparseable**" in text

    # new vs old: the 4 units of q1 and q2 are similar in length (1 win, 3 flips: ties) of 8 with lengths.
    lc = pairwise["comparisons"][0]["length_controlled"]
    assert (lc["units"], lc["units_with_lengths"], lc["wins"], lc["ties"]) == (4, 8, 1, 3)
    section = text.split("## Length-controlled win rate")[1].split("\n## ")[0]
    assert "differ by less than 20.0%: |tokens_a - tokens_b| / max(tokens_a, tokens_b) < 0.2" in section
    assert "| new vs old | 4 of 8 | 4 | 1 | 0 | 3 | 25.0% n/a (fewer than 10 questions) |" in section
    assert "| new vs base | 2 of 2 | 2 | 1 | 0 | 1 | 50.0% n/a (fewer than 10 questions) |" in section
    assert ("Length-controlled, on the 4 of 8 units whose answers' lengths differ by less than 20.0% "
            "(4 decided)") in text

    assert "with no interval at this number of questions the difference is not clear" in text

    table = format_table(summary).splitlines()
    assert table[0] == "judge judge-model, judge prompts fastchat"
    assert table[2].split()[-1] == "62.5%" and table[3].split()[-1] == "75.0%"  # (W + T/2) / decided
    assert "n/a (fewer than 10 questions)" in table[2]


def test_reports_with_nothing_scored_do_not_crash(tmp_path):
    nothing = [single("m", "q1", "writing", 1, None)]
    summary = {"mode": "single", "judge": "j", "questions": 1, "models": ["m"], "scores": single_summary(nothing),
               "pairwise": None, "lengths": {}}
    text = write_eval_report(tmp_path / "single", summary).read_text()
    assert "No model has a parsed score." in text
    assert "judge prompts `not recorded`" in text  # a summary from before judge_prompts existed
    assert format_table(summary).splitlines()[0] == "judge j, judge prompts not recorded"

    undecided = [pair("q1", "c", 1, "ab", None), pair("q1", "c", 1, "ba", None)]
    summary = {"mode": "pairwise", "judge": "j", "questions": 1, "models": ["new", "old"], "scores": None,
               "pairwise": pairwise_summary(undecided), "lengths": {}}
    assert "nothing to compare" in write_eval_report(tmp_path / "pairwise", summary).read_text()
    assert is_png(tmp_path / "pairwise" / "win_tie_loss.png")
    format_table(summary)
