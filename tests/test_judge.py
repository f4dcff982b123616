"""The judge without models: prompt templates, strict verdict parsing against hand-written judge outputs, and
the OpenAI-compatible client (retries, rate limit, parse retries, resume) against a real HTTP server on loopback
whose replies the test scripts."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tgdpo_ray.config import EvalSection
from tgdpo_ray.evaluation import judge_all, judgment_tasks, read_jsonl
from tgdpo_ray.judge import JudgeError, OpenAIJudge, load_prompts, parse_choice, parse_rating, render
from tgdpo_ray.questions import Question

MATH = Question("7", "math", ("What is 2 + 3?", "And times 4?"), ("5", "20"))
WRITING = Question("8", "writing", ("Write a haiku about rain.", "Now make it sadder."))


@pytest.mark.parametrize("text, score", [
    ("The answer is fine. Rating: [[7]]", 7.0),
    ("Solid.\n\n[[ 10 ]]", 10.0),
    ("Half marks: [[5.5]]", 5.5),
    ("I said [[6]] and I repeat [[6]].", 6.0),
])
def test_ratings_that_parse(text, score):
    assert parse_rating(text) == (score, None)


@pytest.mark.parametrize("text, why", [
    ("Rating: 7/10", "no [[rating]]"),
    ("Rating: [7]", "no [[rating]]"),
    ("[[3]] or maybe [[8]]", "several different ratings"),
    ("[[0]]", "outside 1-10"),
    ("[[11]]", "outside 1-10"),
    ("", "no [[rating]]"),
])
def test_ratings_that_do_not_parse_say_why(text, why):
    score, problem = parse_rating(text)
    assert score is None and why in problem


@pytest.mark.parametrize("text, verdict", [
    ("A is clearer. [[A]]", "A"), ("[[B]]", "B"), ("Equally good: [[C]]", "tie"), ("[[ A ]] final: [[A]]", "A"),
])
def test_choices_that_parse(text, verdict):
    assert parse_choice(text) == (verdict, None)


@pytest.mark.parametrize("text, why", [
    ("A is better", "no [[A]]"), ("[[A]] ... no, [[B]]", "several different verdicts"), ("[[D]]", "no [[A]]"),
])
def test_choices_that_do_not_parse_say_why(text, why):
    verdict, problem = parse_choice(text)
    assert verdict is None and why in problem


def test_default_prompts_cover_every_mode_turn_and_reference():
    prompts = load_prompts(None)
    for name in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn",
                 "pair-v2", "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn"):
        assert name in prompts
        assert prompts[name]["output_format"] in ("[[rating]]", "[[A]]")


def test_turn_two_is_judged_with_the_whole_conversation_and_the_references():
    prompts = load_prompts(None)
    name, messages = render(prompts, "single", MATH, 2, [["It is 5.", "It is 20."]])
    assert name == "single-math-v1-multi-turn" and messages[0]["role"] == "system"
    text = messages[1]["content"]
    for part in ("What is 2 + 3?", "It is 5.", "And times 4?", "It is 20.", "5", "20"):
        assert part in text
    name, messages = render(prompts, "pairwise", WRITING, 1, [["drops fall"], ["grey sky weeps"]])
    assert name == "pair-v2"  # no reference for writing
    text = messages[1]["content"]
    assert text.index("drops fall") < text.index("grey sky weeps")  # A is shown first


def test_prompt_files_with_problems_fail_naming_the_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    good = {"name": "single-v1", "type": "single", "system_prompt": "", "prompt_template": "{question} {answer}"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt_template": "{question} {nonsense}"}) + "\n")
    with pytest.raises(JudgeError, match=r"prompts\.jsonl, line 2: .*nonsense"):
        load_prompts(str(bad))
    bad.write_text(json.dumps({**good, "type": "triple"}) + "\n")
    with pytest.raises(JudgeError, match="line 1: type must be single or pairwise"):
        load_prompts(str(bad))
    with pytest.raises(JudgeError, match="not found"):
        load_prompts(str(tmp_path / "none.jsonl"))
    bad.write_text(json.dumps(good) + "\n")
    with pytest.raises(JudgeError, match="no template named 'single-math-v1'"):
        render(load_prompts(str(bad)), "single", MATH, 1, [["5"]])


# ---------------------------------------------------------------- the OpenAI-compatible client


class ScriptedEndpoint:
    """A chat-completions server on loopback. `script` maps a marker found in the request's messages to the
    replies to give, in order: an int is an HTTP error status, a string the completion's content."""

    def __init__(self, script: dict[str, list]):
        self.script, self.requests, self.lock = script, [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = json.dumps(body["messages"])
                with endpoint.lock:
                    endpoint.requests.append((time.monotonic(), body, self.headers.get("Authorization")))
                    marker = next(m for m in endpoint.script if m in text)
                    reply = endpoint.script[marker].pop(0) if len(endpoint.script[marker]) > 1 \
                        else endpoint.script[marker][0]
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted"}')
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def client(url: str, **overrides) -> OpenAIJudge:
    settings = dict(base_url=url, model="judge", api_key_env=None, max_tokens=64, retries=3, timeout_s=10,
                    requests_per_second=1000, concurrency=4)
    return OpenAIJudge(**{**settings, **overrides})


def test_busy_endpoint_is_retried_and_a_wrong_request_stops_the_job(monkeypatch):
    endpoint = ScriptedEndpoint({"busy": [429, 503, "ok [[4]]"], "broken": [401], "down": [500]})
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge = client(endpoint.url, api_key_env="JUDGE_KEY", retries=2)
    assert judge.ask([{"role": "user", "content": "busy"}], 0.0, 1) == ("ok [[4]]", None)
    assert len(endpoint.requests) == 3 and endpoint.requests[0][2] == "Bearer secret"
    text, error = judge.ask([{"role": "user", "content": "down"}], 0.0, 1)
    assert text == "" and "gave up after 3 attempts" in error and "HTTP 500" in error
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.ask([{"role": "user", "content": "broken"}], 0.0, 1)
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(JudgeError, match="JUDGE_KEY is not set"):
        client(endpoint.url, api_key_env="JUDGE_KEY")


def test_the_rate_limit_spaces_request_starts():
    endpoint = ScriptedEndpoint({"go": ["[[5]]"]})
    judge = client(endpoint.url, requests_per_second=20, concurrency=8)
    judge.complete([([{"role": "user", "content": "go"}], 0.0, seed) for seed in range(9)])
    starts = sorted(at for at, _, _ in endpoint.requests)
    assert len(starts) == 9 and starts[-1] - starts[0] >= 8 / 20 - 0.02


def answers_for(models: dict[str, list[str]], question: Question) -> list[dict]:
    return [{"model": name, "question_id": question.question_id, "category": question.category, "turns": turns,
             "tokens": [len(t.split()) for t in turns], "errors": [None] * len(turns)}
            for name, turns in models.items()]


def test_pairwise_judging_in_both_orders_with_parse_retries_and_resume(tmp_path):
    evaluation = EvalSection.model_validate({"judge": {"backend": "openai", "base_url": "http://unused", "model": "j",
                                                       "mode": "pairwise", "parse_retries": 1}})
    answers = answers_for({"new": ["NEW-1", "NEW-2"], "old": ["OLD-1", "OLD-2"]}, WRITING)
    tasks = judgment_tasks(evaluation, [WRITING], answers, ["new", "old"], load_prompts(None), "openai:j")
    assert [(t["turn"], t["order"]) for t in tasks] == [(1, "ab"), (1, "ba"), (2, "ab"), (2, "ba")]
    # The marker is the answer shown first: turn 1 "ab" shows NEW-1 first, "ba" OLD-1 first.
    endpoint = ScriptedEndpoint({
        "Assistant A's answer]\\nNEW-1": ["A is better [[A]]"],  # new wins when shown first ...
        "Assistant A's answer]\\nOLD-1": ["I cannot decide", "B wins [[B]]"],  # ... and second, after a retry
        "Assistant A:\\nNEW-1": ["[[A]]"],  # turn 2: the first answer shown wins in both orders: inconsistent
        "Assistant A:\\nOLD-1": ["no verdict at all"],  # unparseable even after the retry
    })
    path = tmp_path / "judgments.jsonl"
    started = []
    judgments = judge_all(lambda: started.append(1) or client(endpoint.url), evaluation, tasks, path, log=print)
    by_key = {(j["turn"], j["order"]): j for j in judgments}
    assert by_key[(1, "ab")]["winner"] == "new" and by_key[(1, "ab")]["attempts"] == 1
    assert by_key[(1, "ba")]["winner"] == "new" and by_key[(1, "ba")]["attempts"] == 2
    assert by_key[(1, "ba")]["earlier_texts"] == ["I cannot decide"]
    assert by_key[(2, "ab")]["winner"] == "new"
    unparsed = by_key[(2, "ba")]
    assert unparsed["winner"] is None and unparsed["judge_text"] == "no verdict at all"
    assert unparsed["attempts"] == 2 and "no [[A]]" in unparsed["error"]
    assert len(endpoint.requests) == 6  # 4 first attempts + 2 retries
    # Retries sample (judge.retry_temperature), so that the judge can answer differently.
    assert sorted(body["temperature"] for _, body, _ in endpoint.requests) == [0.0] * 4 + [0.7] * 2
    assert len(read_jsonl(path)) == 4

    # A re-run finds every judgment on disk: the judge is not even started.
    again = judge_all(lambda: started.append(1) or client(endpoint.url), evaluation, tasks, path, log=print)
    assert again == judgments and started == [1] and len(endpoint.requests) == 6


def test_an_answer_that_could_not_be_generated_is_recorded_not_judged(tmp_path):
    evaluation = EvalSection.model_validate({"judge": {"model": "j"}})
    answers = answers_for({"m": ["fine", ""]}, WRITING)
    answers[0]["errors"][1] = "the prompt has 600 tokens; max_model_len is 512"
    tasks = judgment_tasks(evaluation, [WRITING], answers, ["m"], load_prompts(None), "openai:j")
    endpoint = ScriptedEndpoint({"fine": ["[[8]]"]})
    judgments = judge_all(lambda: client(endpoint.url), evaluation, tasks, tmp_path / "j.jsonl", log=print)
    assert [j["score"] for j in judgments] == [8.0, None]
    assert judgments[1]["error"].startswith("answer missing: the prompt has 600 tokens")
    assert len(endpoint.requests) == 1


def test_identical_answers_still_get_a_judgment_per_model_and_order(tmp_path):
    evaluation = EvalSection.model_validate({"judge": {"model": "j", "mode": "pairwise", "baseline": "old"}})
    answers = answers_for({"new": ["SAME", "SAME"], "old": ["SAME", "SAME"], "mid": ["SAME", "SAME"]}, WRITING)
    tasks = judgment_tasks(evaluation, [WRITING], answers, ["new", "old", "mid"], load_prompts(None), "openai:j")
    assert len({task["digest"] for task in tasks}) == len(tasks) == 8  # 2 comparisons x 2 turns x 2 orders
    endpoint = ScriptedEndpoint({"SAME": ["[[C]]"]})
    judgments = judge_all(lambda: client(endpoint.url), evaluation, tasks, tmp_path / "j.jsonl", log=print)
    assert sorted((j["model_a"], j["order"]) for j in judgments) == sorted(
        (model, order) for model in ("new", "mid") for order in ("ab", "ba") for _ in (1, 2))
