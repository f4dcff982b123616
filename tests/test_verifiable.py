"""The verifiable prompts: every checker, the prompt generator and its two splits, the rule functions and the files."""

from __future__ import annotations

import json

import pytest

from tgdpo_ray.onpolicy import verifiable
from tgdpo_ray.onpolicy.verifiable import (KINDS, combination, conflicting, instruction_score, instruction_text,
                                           make_prompts, parse_constraints, prompt_followed, reference_json,
                                           write_verifiable_data)

# (constraint, an answer that follows it, an answer that does not)
CHECKS = [
    ({"kind": "lowercase"}, "tea is warm and calm.", "Tea is warm and calm."),
    ({"kind": "lowercase"}, "tea is warm.", "123 ..."),  # no letter at all is not lowercase writing
    ({"kind": "uppercase"}, "TEA IS WARM, 100%.", "TEA IS wARM."),
    ({"kind": "include_keyword", "word": "happy"}, "Dogs make me HAPPY.", "Dogs make me unhappy."),
    ({"kind": "exclude_word", "word": "very"}, "Snow is everywhere.", "Snow is Very cold."),
    ({"kind": "no_commas"}, "Bread is soft and warm.", "Bread is soft, warm."),
    ({"kind": "sentence_count", "count": 1}, "The moon is bright tonight.", "The moon is bright. It glows."),
    ({"kind": "sentence_count", "count": 2}, "It rains! Is it cold?", "It rains and rains."),
    ({"kind": "sentence_count", "count": 3}, "One. Two! Three?", "One. Two."),
    ({"kind": "max_words", "count": 10}, "Trees are tall and green.", " ".join(["tree"] * 11)),
    ({"kind": "min_words", "count": 8}, "Rivers run from the hills down to the sea.", "Rivers run to the sea."),
    ({"kind": "end_with", "phrase": "Thanks for reading!"}, "Cats nap. Thanks for reading!  \n",
     "Thanks for reading! Cats nap."),
    ({"kind": "start_with", "word": "Today"}, '"today, the park is quiet."', "The park is quiet today."),
    ({"kind": "json_output"}, '{"topic": "tea", "hot": true}', "Tea is hot: {\"hot\": true}"),
    ({"kind": "json_output"}, '```json\n{"topic": "tea"}\n```', '```json\n{"topic": tea}\n```'),
    ({"kind": "json_output"}, '```\n["a", "b"]\n```', "Here is the JSON: []"),
    ({"kind": "bullet_count", "count": 2}, "Bees:\n* they buzz\n- they make honey", "- one\n- two\n- three"),
    ({"kind": "bullet_count", "count": 3}, "- a\n- b\n  - c", "**bold**\n- a\n- b"),
    ({"kind": "quoted"}, '  "The sun is warm."\n', 'The sun is "warm".'),
]


@pytest.mark.parametrize("constraint,good,bad", CHECKS)
def test_each_checker_accepts_a_conforming_answer_and_rejects_a_violating_one(constraint, good, bad):
    reference = reference_json([constraint])
    assert prompt_followed("", good, reference) == 1.0
    assert prompt_followed("", bad, reference) == 0.0


def test_every_kind_is_checked_above():
    assert {constraint["kind"] for constraint, _, _ in CHECKS} == set(KINDS)


def test_prompts_are_deterministic_per_seed_and_differ_across_seeds():
    for split in ("train", "heldout"):
        assert make_prompts(50, 3, split) == make_prompts(50, 3, split)
        assert [r["prompt"] for r in make_prompts(50, 3, split)] != [r["prompt"] for r in make_prompts(50, 4, split)]
    assert [r["prompt_id"] for r in make_prompts(3, 0, "heldout")] == ["heldout-0000", "heldout-0001", "heldout-0002"]
    with pytest.raises(ValueError, match="split"):
        make_prompts(1, 0, "test")


def test_splits_are_disjoint_in_topics_and_constraint_pairs():
    train, heldout = make_prompts(300, 0, "train"), make_prompts(300, 0, "heldout")
    for record in train + heldout:
        constraints = record["constraints"]
        assert 1 <= len(constraints) <= 2
        assert len(constraints) == 1 or not conflicting(*constraints)
        assert record["reference"] == json.dumps(constraints, sort_keys=True, separators=(",", ":"))
        assert record["topic"] in record["prompt"]
    assert not {r["topic"] for r in train} & {r["topic"] for r in heldout}
    train_pairs = {combination(r["constraints"]) for r in train if len(r["constraints"]) == 2}
    heldout_pairs = {combination(r["constraints"]) for r in heldout if len(r["constraints"]) == 2}
    assert heldout_pairs and not heldout_pairs & train_pairs
    assert heldout_pairs <= set(verifiable.HELDOUT_PAIRS)
    assert len(verifiable.HELDOUT_PAIRS) == len(verifiable.ALLOWED_PAIRS) // 4
    # single constraints appear in both splits
    assert any(len(r["constraints"]) == 1 for r in train) and any(len(r["constraints"]) == 1 for r in heldout)


def test_conflicts_are_encoded():
    assert conflicting({"kind": "lowercase"}, {"kind": "uppercase"})
    assert conflicting({"kind": "min_words", "count": 8}, {"kind": "max_words", "count": 50})
    assert conflicting({"kind": "json_output"}, {"kind": "bullet_count", "count": 2})
    assert conflicting({"kind": "include_keyword", "word": "happy"}, {"kind": "exclude_word", "word": "Happy"})
    assert conflicting({"kind": "exclude_word", "word": "day"}, {"kind": "end_with", "phrase": "Have a great day!"})
    assert not conflicting({"kind": "include_keyword", "word": "happy"}, {"kind": "exclude_word", "word": "very"})
    assert not any(frozenset(pair) in verifiable.CONFLICTING_KINDS for pair in verifiable.ALLOWED_PAIRS)


def test_the_prompt_says_each_constraint():
    for record in make_prompts(100, 1, "train") + make_prompts(100, 1, "heldout"):
        for constraint in record["constraints"]:
            assert instruction_text(constraint) in record["prompt"]


def test_instruction_score_is_the_fraction_followed_and_prompt_followed_all_or_nothing():
    reference = reference_json([{"kind": "no_commas"}, {"kind": "lowercase"}])
    assert instruction_score("p", "tea is hot", reference) == 1.0
    assert instruction_score("p", "Tea is hot", reference) == 0.5
    assert instruction_score("p", "Tea, hot", reference) == 0.0
    assert prompt_followed("p", "tea is hot", reference) == 1.0
    assert prompt_followed("p", "Tea is hot", reference) == 0.0
    # an empty answer follows nothing, not even the constraints it would pass vacuously
    assert instruction_score("p", "  \n", reference) == 0.0
    assert prompt_followed("p", "", reference_json([{"kind": "no_commas"}])) == 0.0


@pytest.mark.parametrize("reference,named", [
    (None, "missing"),
    ("not json", "not valid JSON"),
    ('{"kind": "no_commas"}', "list"),
    ("[]", "list"),
    ('[{"kind": "rhyme"}]', "unknown kind 'rhyme'"),
    ('[{"word": "tea"}]', "kind"),
    ('[{"kind": "max_words"}]', "max_words.*count"),
])
def test_a_bad_reference_raises_naming_the_problem(reference, named):
    with pytest.raises(ValueError, match=named):
        instruction_score("p", "an answer", reference)
    with pytest.raises(ValueError, match=named):
        prompt_followed("p", "", reference)


def test_write_verifiable_data(tmp_path):
    paths = write_verifiable_data(str(tmp_path / "data"), train_prompts=20, heldout_prompts=7, seed=5)
    assert set(paths) == {"prompts", "heldout", "questions"}
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert len(rows["prompts"]) == 20 and len(rows["heldout"]) == 7 and len(rows["questions"]) == 7
    assert rows["prompts"] == make_prompts(20, 5, "train") and rows["heldout"] == make_prompts(7, 5, "heldout")
    for number, (question, record) in enumerate(zip(rows["questions"], rows["heldout"]), start=1):
        assert question == {"question_id": number, "category": "ifeval", "turns": [record["prompt"]],
                            "reference": [record["reference"]]}
        assert parse_constraints(question["reference"][0]) == record["constraints"]


def satisfying_answer(constraints: list[dict]) -> str:
    """An answer built to follow any allowed combination of constraints: plain sentences of filler words, shaped by
    each constraint (its start word, keyword, length, sentence or bullet count, ending phrase, case, JSON, quotes)."""
    given = {constraint["kind"]: constraint for constraint in constraints}
    ending = given.get("end_with", {}).get("phrase")
    ending_words = len(verifiable.words(ending)) if ending else 0
    if "bullet_count" in given:
        pieces = given["bullet_count"]["count"]
    else:  # the ending phrase is a sentence of its own
        pieces = given.get("sentence_count", {"count": 2})["count"] - (1 if ending else 0)
    total = given.get("min_words", {"count": 6})["count"]
    total = min(total, given.get("max_words", {"count": 1000})["count"] - ending_words)
    first = [given["start_with"]["word"]] if "start_with" in given else []
    keyword = [given["include_keyword"]["word"]] if "include_keyword" in given else []
    body = first + keyword + ["calm"] * max(total - len(first) - len(keyword), pieces)
    per_piece = [body[i::pieces] for i in range(pieces)]  # the start word, body[0], stays first
    if "bullet_count" in given:
        text = "\n".join("- " + " ".join(piece) for piece in per_piece)
    else:
        text = " ".join(" ".join(piece) + "." for piece in per_piece)
    if ending:  # after the bullets on a line of its own, else after the last sentence
        separator = "\n" if "bullet_count" in given else " "
        text = f"{text}{separator}{ending}".strip()
    if "json_output" in given:
        text = json.dumps({"answer": text})
    if "lowercase" in given:
        text = text.lower()
    if "uppercase" in given:
        text = text.upper()
    if "quoted" in given:
        text = f'"{text}"'
    return text


def test_a_built_answer_follows_every_generated_prompt():
    fixed = [
        [{"kind": "start_with", "word": "Today"}, {"kind": "include_keyword", "word": "happy"}],
        [{"kind": "end_with", "phrase": "Thanks for reading!"}, {"kind": "sentence_count", "count": 1}],
        [{"kind": "json_output"}, {"kind": "uppercase"}],
        [{"kind": "bullet_count", "count": 4}, {"kind": "max_words", "count": 10}],
        [{"kind": "quoted"}, {"kind": "min_words", "count": 40}],
    ]
    generated = [r["constraints"] for r in make_prompts(300, 2, "train") + make_prompts(300, 2, "heldout")]
    for constraints in fixed + generated:
        answer = satisfying_answer(constraints)
        assert prompt_followed("", answer, reference_json(constraints)) == 1.0, (constraints, answer)
