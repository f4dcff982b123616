"""FastChat interop: eval.judge.parse fastchat reads verdicts as FastChat's own code does, and the files in FastChat's
layout (tgdpo_ray/eval/fastchat_export.py) are read by FastChat's own scripts to the same numbers as ours.

FastChat's code is the copy the registry package nvidia-mtbench-evaluator ships (make setup installs it without its
dependencies; the ones its llm_judge/common.py imports, torch, transformers and anthropic, come with ours). It is
imported and run here, never copied: these tests compare against the real functions. No Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest

from tgdpo_ray.config.eval import EvalSection
from tgdpo_ray.eval.fastchat_export import write_fastchat_files
from tgdpo_ray.eval.flow import judge_all, judgment_tasks
from tgdpo_ray.eval.judge import FASTCHAT_ASKS, load_prompts, parse_choice_fastchat, parse_rating_fastchat
from tgdpo_ray.eval.questions import Question
from tgdpo_ray.eval.stats import pairwise_summary, single_summary

JUDGE = "judge-model"


def fastchat_root() -> Path:
    """The folder holding FastChat's `fastchat` package inside nvidia-mtbench-evaluator."""
    try:
        root = Path(metadata.distribution("nvidia-mtbench-evaluator").locate_file("mtbench_evaluator/fastchat"))
    except metadata.PackageNotFoundError:
        pytest.skip("nvidia-mtbench-evaluator is not installed (make setup installs it)")
    return root


@pytest.fixture(scope="module")
def common():
    return fastchat_common()


def fastchat_common():
    """FastChat's fastchat/llm_judge/common.py, imported as FastChat's own scripts import it (`fastchat` on the
    path: it imports fastchat.model.model_adapter)."""
    root = str(fastchat_root())
    sys.path.insert(0, root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its regexes are plain strings with "\[": invalid-escape warnings
            import fastchat.llm_judge.common as module
    except ImportError as err:
        pytest.skip(f"FastChat's common.py cannot be imported here: {err}")
    finally:
        sys.path.remove(root)
    return module


class ScriptedClient:
    """FastChat's judge client (fastchat/clients/openai.py) as common.py uses it: generate() returns the next
    scripted text (the last one again when the script runs out); `calls` counts the requests."""

    backend = "openai"

    def __init__(self, *texts: str):
        self.texts, self.calls = list(texts), 0

    def generate(self, conversation) -> str:
        self.calls += 1
        return self.texts[min(self.calls, len(self.texts)) - 1]


def fastchat_judge(common, kind: str):
    """A FastChat Judge with MT-Bench's output formats (single-v1's [[rating]], pair-v2's [[A]])."""
    if kind == "single":
        template = {"name": "single-v1", "type": "single", "system_prompt": "Grade.", "output_format": "[[rating]]",
                    "prompt_template": "Q: {question}\nA: {answer}"}
    else:
        template = {"name": "pair-v2", "type": "pairwise", "system_prompt": "Compare.", "output_format": "[[A]]",
                    "prompt_template": "Q: {question}\nA: {answer_a}\nB: {answer_b}"}
    return common.Judge("gpt-4", template)


QUESTION = {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}
ANSWER = {"choices": [{"index": 0, "turns": ["A poem.", "Short."]}]}


def fastchat_score(common, text: str):
    score, _ = common.process_judgement(text, fastchat_judge(common, "single"))
    return score


def fastchat_choice(common, text: str) -> str:
    winner, _, _ = common.run_judge_pair(QUESTION, ANSWER, ANSWER, fastchat_judge(common, "pairwise"), None,
                                         ScriptedClient(text))
    return winner


# FastChat's edge cases. FastChat's scores: -1 where it has no verdict.
RATINGS = [
    "Rating: [[8]]",
    "A fair answer. [[8.5]]",
    "[[7]] at first, but on reflection [[9]]",  # two ratings: the first
    "Rating: [8]",  # the single-bracket fallback
    "As [1] says ... [[6]]",  # [[N]] is searched first, wherever it is
    "As [1] says, a fine answer.",  # the fallback takes a citation for a rating
    "No verdict here.",
    "",
    "[[11]]",  # no 1-10 check
    "[[0]]",
    "[[10]]",
    "[[8.]]",
    "[[ 8 ]]",  # no spaces allowed: none
    "[[8/10]]",
    "[[8.5.1]]",
    "Rating: 7",  # common.py's third pattern matches this, but its result never becomes the rating
    "[[A]]",
]
CHOICES = [
    "[[A]]", "[[B]]", "[[C]]",
    "[[A]] ... on second thought [[B]]",  # both: the first checked, A
    "[[B]] ... no, [[A]]",  # A is checked first, wherever it is
    "[[C]] or rather [[B]]",
    "[[ A ]]", "[A]", "[[a]]", "Assistant A is better.", "",
]


@pytest.mark.parametrize("text", RATINGS)
def test_fastchat_ratings_read_as_fastchats_own_code_reads_them(common, text):
    score, why = parse_rating_fastchat(text)
    expected = fastchat_score(common, text)
    if expected == -1:
        assert score is None and "score -1" in why
    else:
        assert (score, why) == (expected, None)


@pytest.mark.parametrize("text", CHOICES)
def test_fastchat_choices_read_as_fastchats_own_code_reads_them(common, text):
    choice, why = parse_choice_fastchat(text)
    expected = fastchat_choice(common, text)
    if expected == "error":
        assert choice is None and '"error"' in why
    else:
        assert (choice, why) == (expected, None)


def test_a_leading_zero_stops_fastchat_but_reads_as_the_number_here(common):
    # FastChat reads the number with ast.literal_eval, which rejects "07": its whole judging run stops there.
    # There is no FastChat verdict to match; we read the 7 the judge wrote.
    with pytest.raises(SyntaxError):
        fastchat_score(common, "[[07]]")
    assert parse_rating_fastchat("[[07]]") == (7.0, None)


def test_fastchat_asks_as_often_as_fastchats_own_code(common):
    client = ScriptedClient("No verdict.")
    score, _, judgment = common.run_judge_single(QUESTION, ANSWER, fastchat_judge(common, "single"), None, client)
    assert (score, judgment, client.calls) == (-1, "No verdict.", FASTCHAT_ASKS["single"])
    client = ScriptedClient("No verdict.")
    winner, _, _ = common.run_judge_pair(QUESTION, ANSWER, ANSWER, fastchat_judge(common, "pairwise"), None, client)
    assert (winner, client.calls) == ("error", FASTCHAT_ASKS["pairwise"])


# ---------------------------------------------------------------- judging with judge.parse fastchat


WRITING = Question("81", "writing", ("Write a poem about rain.", "Now make it shorter."))
STEM = Question("91", "stem", ("Why is the sky blue?", "Explain it to a child."))
HUMANITIES = Question("101", "humanities", ("Who wrote Hamlet?", "When?"))
QUESTIONS = [WRITING, STEM, HUMANITIES]


def answers_for(models: list[str], questions: list[Question]) -> list[dict]:
    """answers.jsonl records with an answer text unique to model, question and turn."""
    return [{"model": model, "question_id": q.question_id, "category": q.category,
             "turns": [f"{model} answers {q.question_id}/{turn}" for turn in (1, 2)], "tokens": [5, 5],
             "errors": [None, None]} for model in models for q in questions]


class ScriptedJudge:
    """A judge backend (flow's complete() interface) that answers each request from a script keyed by the exact
    messages; records every request's temperature."""

    def __init__(self, script: dict[str, str]):
        self.script, self.temperatures = script, []

    def complete(self, requests):
        self.temperatures += [temperature for _, temperature, _ in requests]
        return [(self.script[json.dumps(messages)], None) for messages, _, _ in requests]


def evaluation_of(**judge) -> EvalSection:
    return EvalSection.model_validate({"judge": {"backend": "openai", "base_url": "http://unused", "model": JUDGE,
                                                 **judge}})


def judge_with(evaluation: EvalSection, models: list[str], texts, tmp_path: Path, questions=QUESTIONS):
    """(answers, tasks, judgments, backend): every task judged with texts(task), by flow's own judge_all."""
    answers = answers_for(models, questions)
    tasks = judgment_tasks(evaluation, questions, answers, models, load_prompts("tgdpo-ray"))
    tmp_path.mkdir(parents=True, exist_ok=True)
    backend = ScriptedJudge({json.dumps(task["messages"]): texts(task) for task in tasks})
    judgments = judge_all(lambda: backend, evaluation, tasks, tmp_path / "judgments.jsonl", log=lambda _: None)
    return answers, tasks, judgments, backend


def test_judge_parse_is_ours_unless_set():
    assert evaluation_of().judge.parse == "tgdpo-ray"
    ours, theirs = evaluation_of(), evaluation_of(parse="fastchat")
    answers = answers_for(["m"], [WRITING])
    digests = [{t["digest"] for t in judgment_tasks(e, [WRITING], answers, ["m"], load_prompts("tgdpo-ray"))}
               for e in (ours, theirs)]
    assert not digests[0] & digests[1]  # a verdict read by other rules is judged again, not reused


def test_parse_fastchat_records_fastchats_verdicts_and_asks_as_fastchat_does(tmp_path):
    texts = {"81": "Too good: [[11]]", "91": "[[7]] then [[9]]", "101": "No verdict."}
    evaluation = evaluation_of(parse="fastchat", temperature=0.2)
    _, _, judgments, backend = judge_with(evaluation, ["m"], lambda t: texts[t["question_id"]], tmp_path)
    scores = {(j["question_id"], j["turn"]): j["score"] for j in judgments}
    assert scores == {("81", 1): 11.0, ("81", 2): 11.0, ("91", 1): 7.0, ("91", 2): 7.0, ("101", 1): None,
                      ("101", 2): None}
    unparsed = [j for j in judgments if j["score"] is None]
    # FastChat asks 5 times in all, the same request at the judge's own temperature, then records -1.
    assert all(j["attempts"] == 5 and len(j["earlier_texts"]) == 4 and "score -1" in j["error"] for j in unparsed)
    assert len(backend.temperatures) == 4 + 2 * 5 and set(backend.temperatures) == {0.2}

    pairwise = evaluation_of(parse="fastchat", mode="pairwise", baseline="old", parse_retries=3)
    _, _, judgments, backend = judge_with(pairwise, ["new", "old"], lambda t: {
        "81": "[[B]] ... no, [[A]]", "91": "[[C]]", "101": "Both fine."}[t["question_id"]], tmp_path / "pair")
    verdicts = {(j["question_id"], j["order"]): j["verdict"] for j in judgments if j["turn"] == 1}
    assert verdicts == {("81", "ab"): "A", ("81", "ba"): "A", ("91", "ab"): "tie", ("91", "ba"): "tie",
                        ("101", "ab"): None, ("101", "ba"): None}
    assert len(backend.temperatures) == len(judgments) == 12  # pairwise: asked once, parse_retries aside


# ---------------------------------------------------------------- FastChat's layout, read by FastChat


def test_the_files_have_fastchats_records_and_fastchat_loads_them(common, tmp_path):
    evaluation = evaluation_of()
    answers, tasks, judgments, _ = judge_with(evaluation, ["alpha", "beta"], lambda t: "Fine. [[7]]", tmp_path)
    written = write_fastchat_files(tmp_path, answers, judgments, tasks)
    assert written == {"answers": [tmp_path / "model_answer" / "alpha.jsonl", tmp_path / "model_answer" / "beta.jsonl"],
                       "judgments": [tmp_path / "model_judgment" / f"{JUDGE}_single.jsonl"]}

    # The records have exactly the fields FastChat's own writers give them (gen_model_answer.py's answer record;
    # play_a_match_single's and play_a_match_pair's results, run here with a scripted client).
    answer = json.loads(written["answers"][0].read_text().splitlines()[0])
    assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert answer["question_id"] == 81 and answer["model_id"] == "alpha"
    assert answer["choices"] == [{"index": 0, "turns": ["alpha answers 81/1", "alpha answers 81/2"]}]
    match = common.MatchSingle(QUESTION, "m", ANSWER, fastchat_judge(common, "single"))
    theirs = common.play_a_match_single(match, output_file=None, client=ScriptedClient("[[7]]"))
    ours = [json.loads(line) for line in written["judgments"][0].read_text().splitlines()]
    assert all(list(record) == list(theirs) for record in ours)
    first = ours[0]
    assert first["judge"] == [JUDGE, "single-v1"] and first["score"] == 7 and first["judgment"] == "Fine. [[7]]"
    assert first["user_prompt"] == tasks[0]["messages"][-1]["content"] and "alpha answers 81/1" in first["user_prompt"]

    pairwise = evaluation_of(mode="pairwise", baseline="beta")
    answers, tasks, judgments, _ = judge_with(pairwise, ["alpha", "beta"], lambda t: "[[A]]", tmp_path / "p")
    written = write_fastchat_files(tmp_path / "p", answers, judgments, tasks)
    match = common.MatchPair(QUESTION, "m1", "m2", ANSWER, ANSWER, fastchat_judge(common, "pairwise"))
    theirs = common.play_a_match_pair(match, output_file=None, client=ScriptedClient("[[A]]"))
    ours = [json.loads(line) for line in written["judgments"][0].read_text().splitlines()]
    assert written["judgments"][0].name == f"{JUDGE}_pair.jsonl"
    assert len(ours) == 6 and all(list(record) == list(theirs) for record in ours)  # 3 questions x 2 turns
    # "[[A]]" in both orders: the answer shown first won each time, as FastChat names it.
    assert {(r["g1_winner"], r["g2_winner"]) for r in ours} == {("model_1", "model_2")}

    # FastChat's loaders read them: answers by model (from the file name) and question, judgments by judge.
    loaded = common.load_model_answers(str(tmp_path / "model_answer"))
    assert sorted(loaded) == ["alpha", "beta"] and sorted(loaded["alpha"]) == [81, 91, 101]
    singles = common.load_single_model_judgments(str(tmp_path / "model_judgment" / f"{JUDGE}_single.jsonl"))
    assert set(singles) == {(JUDGE, "single-v1"), (JUDGE, "single-v1-multi-turn")}
    pairs = common.load_pairwise_model_judgments(str(written["judgments"][0]))
    assert all(game["winners"] == ("inconsistent",) for games in pairs.values() for game in games.values())


def test_a_model_or_judge_no_longer_in_the_eval_leaves_no_file(tmp_path):
    answers = answers_for(["alpha"], [WRITING])
    (tmp_path / "model_answer").mkdir()
    (tmp_path / "model_answer" / "gone.jsonl").write_text("{}\n")
    (tmp_path / "model_answer" / "notes.txt").write_text("kept")
    judgment = {"mode": "single", "model": "alpha", "question_id": "81", "category": "writing", "turn": 1,
                "prompt": "single-v1", "judge": "vllm:org/judge", "digest": "d", "score": None, "judge_text": "",
                "attempts": 0, "error": "answer missing: too long", "earlier_texts": []}
    written = write_fastchat_files(tmp_path, answers, [judgment])
    assert sorted(p.name for p in (tmp_path / "model_answer").iterdir()) == ["alpha.jsonl", "notes.txt"]
    # A judge named with a "/" gets gen_judgment.py's file name; a verdict that was never made is FastChat's -1.
    assert written["judgments"] == [tmp_path / "model_judgment" / "org--judge_single.jsonl"]
    record = json.loads(written["judgments"][0].read_text())
    assert record["judge"] == ["org/judge", "single-v1"] and record["score"] == -1 and record["user_prompt"] == ""


SHOW_RESULT = "fastchat/llm_judge/scripts/show_result.py"


def show_result(folder: Path, *args: str) -> list[list[str]]:
    """Run FastChat's show_result.py where it looks for data/mt_bench/model_judgment/<judge>_<mode>.jsonl (this
    copy has no --bench-name: it always reads mt_bench); the printed tables' lines, split into words."""
    pytest.importorskip("pandas")  # show_result.py's one dependency
    done = subprocess.run([sys.executable, str(fastchat_root() / SHOW_RESULT), "--judge-model", JUDGE, *args],
                          cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def test_fastchats_show_result_gives_our_mean_scores(tmp_path):
    # Scores of every kind (whole, half, a 10), one unparseable verdict and one answer that could not be
    # generated (never judged): both are FastChat's -1, which show_result.py leaves out, as our means do.
    texts = {("alpha", "81"): "[[8]]", ("alpha", "91"): "[[6.5]]", ("alpha", "101"): "I cannot grade this.",
             ("beta", "81"): "[[3]]", ("beta", "91"): "[[10]]", ("beta", "101"): "[[4]]",
             ("gamma", "81"): "[[5]]", ("gamma", "91"): "[[7]]", ("gamma", "101"): "[[9]]"}
    answers = answers_for(["alpha", "beta", "gamma"], QUESTIONS)
    answers[-1]["errors"][1] = "the prompt has 600 tokens; max_model_len is 512"  # gamma, 101, turn 2
    evaluation = evaluation_of(parse_retries=0)
    tasks = judgment_tasks(evaluation, QUESTIONS, answers, ["alpha", "beta", "gamma"], load_prompts("tgdpo-ray"))

    def text(task):  # turn 2 one point higher, so that the turns' means differ
        verdict = texts[(task["model"], task["question_id"])]
        return verdict.replace("[[8]]", "[[9]]").replace("[[3]]", "[[4]]") if task["turn"] == 2 else verdict

    backend = ScriptedJudge({json.dumps(task["messages"]): text(task) for task in tasks})
    judgments = judge_all(lambda: backend, evaluation, tasks, tmp_path / "judgments.jsonl", log=lambda _: None)
    assert sum(j["score"] is None for j in judgments) == 3  # alpha 101 (both turns), gamma 101 turn 2
    write_fastchat_files(tmp_path / "data" / "mt_bench", answers, judgments, tasks)

    lines = show_result(tmp_path, "--mode", "single")
    ours = single_summary(judgments, samples=10)["models"]
    sections = {}  # "First turn", "Second turn", "Average" -> {model: score}
    for words in lines:
        if words and words[0].startswith("###"):
            section = sections.setdefault(" ".join(w for w in words if not w.startswith("#")), {})
        elif sections and words and words[0] in ours:
            section[words[0]] = float(words[-1])
    assert set(sections) == {"First turn", "Second turn", "Average"}
    for model, block in ours.items():
        assert sections["Average"][model] == pytest.approx(block["mean"], abs=1e-6)
        assert sections["First turn"][model] == pytest.approx(block["by_turn"]["1"]["mean"], abs=1e-6)
        assert sections["Second turn"][model] == pytest.approx(block["by_turn"]["2"]["mean"], abs=1e-6)


# One unit (a question's turn in a comparison), both orders: "ab" shows model_a's answer first, "ba" model_b's.
UNITS = [
    ("[[A]]", "[[B]]"),  # model_a won in both orders
    ("[[B]]", "[[A]]"),  # model_b won in both
    ("[[C]]", "[[C]]"),  # a tie in both
    ("[[A]]", "[[A]]"),  # the answer shown first won both times: inconsistent, a tie
    ("[[A]]", "[[C]]"),  # a tie in one order only: a tie
    ("No idea.", "[[B]]"),  # unparseable in one order: left out
    ("[[A]]", "[[B]]"),  # model_a again, so that the comparisons' counts differ
]


def test_fastchats_show_result_gives_our_win_loss_tie_counts(tmp_path):
    models = ["alpha", "beta", "base"]
    evaluation = evaluation_of(mode="pairwise", pairs=[["alpha", "base"], ["beta", "base"], ["alpha", "beta"]],
                               parse_retries=0)
    answers = answers_for(models, QUESTIONS)
    tasks = judgment_tasks(evaluation, QUESTIONS, answers, models, load_prompts("tgdpo-ray"))
    comparisons = [("alpha", "base"), ("beta", "base"), ("alpha", "beta")]
    units = {c: list(dict.fromkeys((t["question_id"], t["turn"]) for t in tasks)) for c in comparisons}
    script = {}
    for task in tasks:
        comparison = (task["model_a"], task["model_b"])
        # Each comparison's 6 units go through UNITS from its own start: every comparison has an unparseable unit,
        # and their counts differ.
        at = units[comparison].index((task["question_id"], task["turn"])) + 2 * comparisons.index(comparison)
        script[json.dumps(task["messages"])] = UNITS[at % len(UNITS)][0 if task["order"] == "ab" else 1]
    judgments = judge_all(lambda: ScriptedJudge(script), evaluation, tasks, tmp_path / "judgments.jsonl",
                          log=lambda _: None)
    write_fastchat_files(tmp_path / "data" / "mt_bench", answers, judgments, tasks)
    summary = pairwise_summary(judgments, samples=10)["comparisons"]
    ours = {(c["model_a"], c["model_b"]): (c["wins"], c["losses"], c["ties"]) for c in summary}
    assert len(set(ours.values())) == 3 and all(c["unparseable"] == 1 and c["inconsistent"] for c in summary)

    def counts(lines):
        return {words[0]: tuple(int(w) for w in words[1:4]) for words in lines if words and words[0] in models}

    # Ours are per comparison, from model_a's view, both orders combined (disagreeing orders are a tie, an
    # unparseable order leaves the unit out). show_result.py combines the two games the same way but sums per
    # model over every comparison it is in, from that model's view: add ours up the same way.
    expected = {model: [0, 0, 0] for model in models}
    for (model_a, model_b), (wins, losses, ties) in ours.items():
        for model, add in ((model_a, (wins, losses, ties)), (model_b, (losses, wins, ties))):
            expected[model] = [total + n for total, n in zip(expected[model], add)]
    assert counts(show_result(tmp_path, "--mode", "pairwise-all")) == {m: tuple(c) for m, c in expected.items()}
    # Against a baseline: only the comparisons with it, and the baseline's own row dropped: ours as they are.
    assert counts(show_result(tmp_path, "--mode", "pairwise-baseline", "--baseline-model", "base")) == {
        "alpha": ours[("alpha", "base")], "beta": ours[("beta", "base")]}
